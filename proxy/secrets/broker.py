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
  Revocation is reliable (:mod:`proxy.secrets.revocation`): retried with backoff
  until it succeeds or the credential expires, kept in the state store across
  restarts, recorded and counted.
- Values live only here, in memory (what revokes one is also in the store,
  sealed). Every value handed out in the last ``expires_at + REDACT_GRACE``
  seconds feeds the :class:`Redactor`.
- Nothing here dies silently: a fetch that fails unexpectedly is logged,
  counted (``on_background_error``) and answered as a provider failure (the next
  call fetches again); the revocation jobs are supervised and restarted.
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
from proxy.policy import Rule

from .providers import Provider, make_provider
from .redact import MIN_VALUE_BYTES, Redactor
from .revocation import Revocations
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
                 clock: Any = time.time, store: Any = None, key_path: str | None = None,
                 audit: Any = None) -> None:
        """``store`` (a :class:`~proxy.store._store.TaskStore`) keeps credentials to revoke
        across restarts, sealed with the key in ``key_path``; ``audit`` writes a
        record of each revocation outcome. Without them, revocations are retried
        in memory only."""
        self.specs = dict(specs)
        self.clock = clock
        self._session = session
        self._providers: dict[str, Provider] = {
            name: make_provider(spec, session, clock) for name, spec in self.specs.items()}
        self._slots: dict[Key, _Slot] = {}
        self._task_keys: dict[str, set[Key]] = {}
        # Observer of background failures: (job) — the metrics. Logged before it is called.
        self.on_background_error: Callable[[str], None] | None = None
        self.revocations = Revocations(self._providers, clock, store=store, key_path=key_path,
                                       audit=audit, on_error=self._background_error)
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
        provider = self._providers.get(name) if name in self.specs else None
        if provider is None:
            raise ProviderError(name, "misconfigured", "no such secret is configured")
        task, scope = provider.scope(caller, rule)
        workload = caller.workload
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
            minted = await self._refresh(key, slot, provider, task, rule, workload)
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
                       rule: Rule, workload: str) -> Minted:
        if slot.refreshing is None:
            job = asyncio.create_task(self._fetch(key, slot, provider, task, rule, workload),
                                      name=f"taskgate-secret-{provider.name}")
            job.add_done_callback(lambda t: t.cancelled() or t.exception())
            slot.refreshing = job
        return await asyncio.shield(slot.refreshing)

    async def _fetch(self, key: Key, slot: _Slot, provider: Provider, task: str | None,
                     rule: Rule, workload: str) -> Minted:
        ok = False
        try:
            self.fetches += 1
            minted = await provider.fetch(task, rule)
            cred = (await self.revocations.track(minted, provider, workload)
                    if provider.revocable else None)
            if not _usable_text(minted.value.reveal()):
                if cred is not None:
                    await self.revocations.retire([cred])
                raise provider.fail("bad_response", "the value is not printable ASCII of at "
                                                    f"least {MIN_VALUE_BYTES} characters")
            self._remember(minted)
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
        except Refused:
            raise
        except Exception:  # noqa: BLE001 - a bug: said and counted, the call fails closed
            log.exception("secret %r: fetching a value failed unexpectedly", provider.name)
            self._background_error("fetch")
            raise provider.fail("internal") from None
        finally:
            slot.refreshing = None
            if self.on_fetch is not None:
                self.on_fetch(key[0], ok)

    def reconfigure(self, specs: Mapping[str, SecretSpec]) -> list[str]:
        """Take the secret specs of a reloaded config; return the names whose spec
        changed or is new. Their cached values are dropped, so the next call fetches
        anew with the new spec; a removed secret is handed out no more (its provider
        stays for credentials still to revoke)."""
        changed = sorted(name for name, spec in specs.items() if self.specs.get(name) != spec)
        gone = [name for name in self.specs if name not in specs]
        for name in changed:
            self._providers[name] = make_provider(specs[name], self._session, self.clock)
        self.specs = dict(specs)
        dropped = set(changed) | set(gone)
        for key in [k for k in self._slots if k[0] in dropped]:
            del self._slots[key]
        return changed

    # -- task end and shutdown ------------------------------------------------
    async def task_ended(self, task_id: str) -> None:
        """Drop the task's cached values and revoke what was minted for it."""
        self._ended[task_id] = None
        while len(self._ended) > ENDED_TASKS_KEPT:
            self._ended.popitem(last=False)
        for key in self._task_keys.pop(task_id, ()):
            self._slots.pop(key, None)
        await self.revocations.end_task(task_id)

    def start(self) -> None:
        """Take over the revocations an earlier run left pending (needs a running loop)."""
        self.revocations.start()

    async def close(self, grace: float = CLOSE_TIMEOUT) -> None:
        """Revoke everything revocable still alive (minted tokens die with the process),
        for at most ``grace`` seconds; what is left is retried by the next start.
        Idempotent: the control plane's cleanup calls it while the audit log and the
        store are still open, the server's once more at the end."""
        await self.revocations.close(grace)

    def credentials(self, task_id: str) -> list[dict[str, Any]]:
        """The task's minted credentials still live or pending revocation (never values)."""
        return self.revocations.view(task_id)

    def pending_revocations(self) -> float:
        return float(self.revocations.pending_count())

    def _background_error(self, job: str) -> None:
        if self.on_background_error is not None:
            try:
                self.on_background_error(job)
            except Exception:  # noqa: BLE001 - an observer never breaks the broker
                log.exception("secrets: the background-error observer failed")

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

    def label(self, minted: Minted) -> str:
        """The audit ``secret`` field: the secret's name, nothing else (SPEC), so a search
        by name finds every call that used it."""
        return minted.secret
