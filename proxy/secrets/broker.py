"""The secret broker: values per secret and scope, refreshed early, revoked at task end.

- A value is cached under (secret, task, scope): the task is ``None`` for
  values every caller shares (an API key, a KV read, an OAuth token without
  ``per_task``); a GitHub token is also keyed by the rule's repositories and
  permissions.
- One refresh at a time per key, however many calls wait: the first caller
  starts the fetch as its own task, every caller awaits it (shielded, so a
  caller that goes away does not cancel it for the others).
- Refresh early: once less than min(half the lifetime, ``refresh_skew_seconds``)
  is left. If the refresh fails, the value in hand is used while it has not
  expired; an expired value is never handed out (the call fails, 502).
- At task end every revocable value minted for the task (superseded ones too)
  is revoked at its issuer, the task's cache entries dropped, and a fetch still
  running for it is revoked when it lands. At shutdown, everything revocable.
- Values live only here, in memory. Every value handed out in the last
  ``expires_at + REDACT_GRACE`` seconds feeds the :class:`Redactor`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.errors import Refused
from proxy.identity import Caller
from proxy.rules import Rule

from .providers import Provider, make_provider
from .redact import MIN_VALUE_BYTES, Redactor
from .spec import SecretSpec
from .value import Minted, ProviderError

__all__ = ["SecretBroker"]

log = logging.getLogger(__name__)

Key = tuple[str, str | None, Hashable]
REDACT_GRACE = 3600.0
ENDED_TASKS_KEPT = 10_000
PRUNE_EVERY = 30.0
CLOSE_TIMEOUT = 5.0


@dataclass(slots=True)
class _Slot:
    current: Minted | None = None
    refreshing: asyncio.Task[Minted] | None = None


def _usable_text(value: str) -> bool:
    return len(value) >= MIN_VALUE_BYTES and all(" " <= c <= "~" for c in value)


class SecretBroker:
    """Hands out secret values for authorized calls; the only holder of minted tokens."""

    def __init__(self, specs: Mapping[str, SecretSpec], session: Any, *,
                 clock: Any = time.time) -> None:
        self.specs = dict(specs)
        self.clock = clock
        self._providers: dict[str, Provider] = {
            name: make_provider(spec, session, clock) for name, spec in self.specs.items()}
        self._slots: dict[Key, _Slot] = {}
        self._task_keys: dict[str, set[Key]] = {}
        self._revocable: dict[str | None, list[Minted]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._values: dict[bytes, float] = {}
        self._redactor = Redactor(())
        self._dirty = False
        # Observer of every provider fetch: (secret name, succeeded) — the metrics.
        self.on_fetch: Callable[[str, bool], None] | None = None
        self._next_prune = 0.0
        self.fetches = 0  # provider fetches started (for tests and metrics)

    # -- handing out ----------------------------------------------------------
    async def token(self, name: str, caller: Caller, rule: Rule) -> Minted:
        """A usable value of secret ``name`` for ``caller`` under ``rule``.

        Raises :class:`ProviderError` (→ 502) or :class:`Refused` if the task ended.
        """
        provider = self._providers.get(name)
        if provider is None:
            raise ProviderError(name, "misconfigured", "no such secret is configured")
        task, scope = provider.scope(caller, rule)
        if task is not None and task in self._ended:
            raise Refused("the task has ended", rule.id)
        key: Key = (name, task, scope)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
            if task is not None:
                self._task_keys.setdefault(task, set()).add(key)
        current = slot.current
        if current is not None and current.fresh(self.clock(),
                                                 provider.spec.refresh_skew_seconds):
            return self._checked(current)
        try:
            minted = await self._refresh(key, slot, provider, task, rule)
        except ProviderError as e:
            current = slot.current
            if current is None or not current.usable(self.clock()):
                raise
            log.warning("secret %r: refresh failed (%s); using the value in hand until it "
                        "expires", name, e.kind)
            minted = current
        return self._checked(minted)

    def _checked(self, minted: Minted) -> Minted:
        """The moment of injection: an expired value never leaves."""
        if not minted.usable(self.clock()):
            raise ProviderError(minted.secret, "expired")
        return minted

    async def _refresh(self, key: Key, slot: _Slot, provider: Provider, task: str | None,
                       rule: Rule) -> Minted:
        if slot.refreshing is None:
            job = asyncio.create_task(self._fetch(key, slot, provider, task, rule),
                                      name=f"taskgate-secret-{provider.name}")
            job.add_done_callback(lambda t: t.cancelled() or t.exception())
            slot.refreshing = job
        return await asyncio.shield(slot.refreshing)

    async def _fetch(self, key: Key, slot: _Slot, provider: Provider, task: str | None,
                     rule: Rule) -> Minted:
        ok = False
        try:
            self.fetches += 1
            minted = await provider.fetch(task, rule)
            if not _usable_text(minted.value.reveal()):
                await self._revoke(provider, minted)
                raise provider.fail("bad_response", "the value is not printable ASCII of at "
                                                    f"least {MIN_VALUE_BYTES} characters")
            self._remember(minted)
            if provider.revocable and minted.revoke is not None:
                self._revocable.setdefault(task, []).append(minted)
            if task is not None and task in self._ended:
                await self.task_ended(task)  # landed after the task ended: revoke it now
                raise Refused("the task has ended", rule.id)
            if self._slots.get(key) is slot:
                slot.current = minted
            ok = True
            return minted
        except ProviderError as e:
            log.warning("%s", e.reason)
            raise
        finally:
            slot.refreshing = None
            if self.on_fetch is not None:
                self.on_fetch(key[0], ok)

    # -- task end and shutdown ------------------------------------------------
    async def task_ended(self, task_id: str) -> None:
        """Drop the task's cached values and revoke what was minted for it."""
        self._ended[task_id] = None
        while len(self._ended) > ENDED_TASKS_KEPT:
            self._ended.popitem(last=False)
        for key in self._task_keys.pop(task_id, ()):
            self._slots.pop(key, None)
        minted = self._revocable.pop(task_id, [])
        if minted:
            await asyncio.gather(*(self._revoke(self._providers[m.secret], m) for m in minted))

    async def close(self) -> None:
        """Revoke everything revocable still alive (minted tokens die with the process)."""
        pending = [m for ms in self._revocable.values() for m in ms]
        self._revocable.clear()
        now = self.clock()
        jobs = [self._revoke(self._providers[m.secret], m) for m in pending if m.usable(now)]
        if jobs:
            try:
                await asyncio.wait_for(asyncio.gather(*jobs), CLOSE_TIMEOUT)
            except TimeoutError:
                log.warning("secrets: revoking %d tokens at shutdown timed out", len(jobs))

    @staticmethod
    async def _revoke(provider: Provider, minted: Minted) -> None:
        try:
            await provider.revoke(minted)
        except ProviderError as e:
            log.warning("secret %r: revoking a value of task %s failed (%s)",
                        provider.name, minted.task, e.kind)

    # -- redaction and audit --------------------------------------------------
    def _remember(self, minted: Minted) -> None:
        until = math.inf if minted.expires_at is None else minted.expires_at + REDACT_GRACE
        value = minted.value.reveal().encode()
        if self._values.get(value, -math.inf) < until:
            self._dirty = value not in self._values or self._dirty
            self._values[value] = until

    def redactor(self) -> Redactor | None:
        """Masks every value handed out lately; ``None`` when there is none."""
        now = self.clock()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            for value in [v for v, until in self._values.items() if until < now]:
                del self._values[value]
                self._dirty = True
            self._prune_slots(now)
        if self._dirty:
            self._redactor, self._dirty = Redactor(self._values), False
        return None if self._redactor.empty else self._redactor

    def _prune_slots(self, now: float) -> None:
        for key, slot in list(self._slots.items()):
            m = slot.current
            if slot.refreshing is None and m is not None and not m.usable(now - REDACT_GRACE):
                del self._slots[key]
                if key[1] is not None:
                    self._task_keys.get(key[1], set()).discard(key)
        for task, minted in list(self._revocable.items()):
            alive = [m for m in minted if m.usable(now)]
            if alive:
                self._revocable[task] = alive
            else:
                del self._revocable[task]

    def label(self, minted: Minted) -> str:
        """The audit ``secret`` field: the secret's name, nothing else (SPEC), so a search
        by name finds every call that used it."""
        return minted.secret
