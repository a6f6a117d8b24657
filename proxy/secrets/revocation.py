"""Revoking minted credentials reliably: retried, remembered, recorded, counted.

Every revocable credential the broker mints (a Vault lease, a GitHub
installation token) is tracked here from the moment it is minted:

- ``live`` while its task runs. It is in the state store (its handle sealed, see
  :mod:`proxy.secrets.seal`) before it is handed out, so even a crash leaves it
  known; if it cannot be recorded it is revoked at once and the call fails (502).
- ``pending_revocation`` once its task ends: revoked at once, and after a
  failure again after a backoff that doubles from the secret's
  ``revoke_backoff_seconds`` up to ``revoke_max_backoff_seconds`` (each wait
  drawn between half and all of that), until the issuer confirms or the
  credential expires (then nothing is left to revoke: no more attempts).
- At shutdown every live credential becomes pending and every pending one is
  tried, for at most the ``grace`` given to :meth:`Revocations.close`; what is left
  stays pending in the store. A credential of an earlier run is never used
  again, so the next start finds every stored one pending and goes on trying.

Each outcome is an audit record (:func:`revocation_record`) and a count
(``on_outcome(secret, outcome)``): ``failed`` for every failed attempt (record
``error``), then one final ``revoked`` (record ``allow``), ``expired`` or
``abandoned`` (record ``error``: the credential stays valid until it expires —
its secret is no longer configured, or its stored handle does not open). A
record names the secret, the kind of credential and the revocation call, never
the value nor the handle.

The retry loop and the loading of stored credentials run under
:meth:`Revocations._supervise`: an exception is logged, counted
(``on_error(job)``) and the job restarted after a pause; one credential's
failure never stops another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from proxy.audit import new_record, rfc3339
from proxy.store import CredentialRow, StateStore

from .providers import Provider
from .seal import Sealer
from .value import Minted, ProviderError, SecretValue

__all__ = ["LIVE", "OUTCOMES", "PENDING", "Credential", "Revocations", "backoff",
           "revocation_record"]

log = logging.getLogger(__name__)

LIVE, PENDING = "live", "pending_revocation"
_STORED = {LIVE: "live", PENDING: "pending"}  # state column ↔ state
OUTCOMES = ("revoked", "failed", "expired", "abandoned")
PRUNE_EVERY = 30.0  # how often live credentials that expired are forgotten
IDLE_WAIT = 5.0  # the retry loop looks again at least this often
RESTART_FIRST, RESTART_MAX = 0.1, 30.0  # pause before a failed job is restarted
CLOSE_MARGIN = 5.0  # at shutdown, past the grace: for the last records and store writes
TAKEOVER_SECONDS = 5.0  # shared state: how often credentials of dead replicas are looked for
LEASE_MS = 30_000  # shared state: one replica's turn at revoking a credential
STOPPED = "no answer before the gateway stopped"
REASON = "secret revocation"  # every record's reason starts so: `taskgate logs` finds them

Audit = Callable[[dict[str, Any]], Awaitable[None]]


def backoff(attempts: int, first: float, cap: float, rng: Callable[[], float]) -> float:
    """Seconds before the next try after ``attempts`` failed ones: ``first`` doubled per
    failure, at most ``cap``, drawn between half and all of that (jitter: many
    credentials that failed together do not retry together)."""
    ceiling = min(cap, first * 2.0 ** min(max(attempts - 1, 0), 60))
    return ceiling / 2 + rng() * ceiling / 2


@dataclass(slots=True, eq=False)
class Credential:
    """One minted credential to revoke. ``handle`` revokes it (a lease id, the token)."""

    id: str
    secret: str
    kind: str
    task: str | None
    workload: str | None
    issued_at: float
    expires_at: float | None
    handle: SecretValue = field(repr=False)
    state: str = LIVE
    attempts: int = 0
    last_error: str | None = None
    next_at: float = 0.0
    busy: bool = False

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def view(self) -> dict[str, Any]:
        """As the control plane shows it: never the value, never the handle."""
        return {"secret": self.secret, "kind": self.kind, "state": self.state,
                "issued_at": rfc3339(self.issued_at),
                "expires_at": rfc3339(self.expires_at) if self.expires_at else None,
                "attempts": self.attempts, "last_error": self.last_error,
                "next_attempt_at": rfc3339(self.next_at) if self.state == PENDING else None}


def _context(cid: str, secret: str, kind: str) -> bytes:
    """What a sealed handle is bound to: its row."""
    return f"taskgate-revocation\0{cid}\0{secret}\0{kind}".encode()


def revocation_record(cred: Credential, target: tuple[str, str] | None, decision: str,
                      reason: str, owner: str | None, duration: float) -> dict[str, Any]:
    """The audit record of one revocation outcome.

    ``method``/``scheme``/``host``/``port``/``path``: the issuer's revocation call
    (none when the secret is no longer configured); ``secret``: the secret's name;
    ``decision``: ``allow`` (revoked) or ``error``; ``reason``: ``secret
    revocation: …`` with the kind, the attempt and what failed (fixed, value-free
    phrases); ``rule``, ``status``, ``client`` are empty: no agent call made it.
    """
    method = scheme = host = path = None
    port: int | None = None
    if target is not None:
        method, url = target
        parts = urlsplit(url)
        scheme, host, path = parts.scheme, parts.hostname, parts.path or "/"
        port = parts.port or (443 if scheme == "https" else 80)
    return new_record(ts=rfc3339(time.time()), request_id=uuid.uuid4().hex,
                      workload=cred.workload, task=cred.task, owner=owner, method=method,
                      scheme=scheme, host=host, port=port, path=path, decision=decision,
                      reason=reason, secret=cred.secret, bytes_in=0, bytes_out=0,
                      duration_ms=round(duration * 1000, 3))


class Revocations:
    """Every revocable credential minted, until it is revoked or expires."""

    def __init__(self, providers: Mapping[str, Provider], clock: Callable[[], float], *,
                 store: StateStore | None = None, key_path: str | None = None,
                 audit: Audit | None = None,
                 owner_of: Callable[[str], str | None] | None = None,
                 on_error: Callable[[str], None] | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        if store is not None and key_path is None:
            raise ValueError("a store needs a key to seal what it keeps")
        self._providers = providers
        self.clock = clock
        self._store = store
        self._key_path = key_path
        self._sealer: Sealer | None = None
        self._audit = audit
        self.owner_of = owner_of
        self._on_error = on_error
        self._rng = rng
        # Observer of every outcome: (secret name, one of OUTCOMES) — the metrics.
        self.on_outcome: Callable[[str, str], None] | None = None
        self._creds: dict[str, Credential] = {}
        self._by_task: dict[str | None, dict[str, Credential]] = {}
        self._pending: dict[str, Credential] = {}
        self._ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._loader: asyncio.Task[None] | None = None
        self._retrier: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._closed = False
        self._next_prune = 0.0

    # -- what others read ----------------------------------------------------------
    async def loaded(self) -> None:
        """Returns once what an earlier run left was read (or could not be)."""
        await self._ready.wait()

    def pending_count(self) -> int:
        """Credentials due for revocation and not yet revoked (a gauge)."""
        return len(self._pending)

    def view(self, task: str | None) -> list[dict[str, Any]]:
        """``task``'s credentials still live or pending revocation, oldest first."""
        now = self.clock()
        creds = [c for c in self._by_task.get(task, {}).values()
                 if c.state == PENDING or not c.expired(now)]
        return [c.view() for c in sorted(creds, key=lambda c: c.issued_at)]

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Load the credentials an earlier run left (with a store); needs a running loop."""
        if self._store is None:
            self._ready.set()
        elif self._loader is None:
            self._loader = asyncio.get_running_loop().create_task(
                self._supervise("load", self._load_forever if self._store.shared
                                else self._load), name="taskgate-secret-revocations-load")

    async def close(self, grace: float) -> None:
        """Stop the loop; try every live and pending credential for up to ``grace`` s."""
        if self._closed:
            return
        self._closed = True
        deadline = asyncio.get_running_loop().time() + grace
        loops = [t for t in (self._loader, self._retrier) if t is not None]
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if self._jobs:  # attempts under way finish, so their outcome is recorded
            _, stragglers = await asyncio.wait(set(self._jobs), timeout=grace)
            for t in stragglers:
                t.cancel()
            await asyncio.gather(*stragglers, return_exceptions=True)
        for c in self._creds.values():
            c.busy = False  # a job cancelled before it started leaves its mark
        live = [c for c in self._creds.values() if c.state == LIVE]
        try:
            await asyncio.wait_for(self._drain(live, deadline), grace + CLOSE_MARGIN)
        except TimeoutError:
            log.error("secrets: the store or the audit log did not take the last "
                      "revocation records in time")
        if self._pending:
            log.warning("secrets: %d credentials are still pending revocation at shutdown; %s",
                        len(self._pending),
                        "the next start tries again" if self._store is not None
                        else "they stay valid until they expire")

    async def _drain(self, live: list[Credential], deadline: float) -> None:
        """Try every pending credential until ``deadline`` (loop time): an attempt
        still waiting for its issuer then is a failed one, recorded like any other."""
        loop = asyncio.get_running_loop()
        await self._mark_pending(live)
        now = self.clock()
        for c in self._pending.values():
            c.next_at = min(c.next_at, now)  # all tried now, not at their next turn
        while self._pending and loop.time() < deadline:
            now = self.clock()
            due = [c for c in self._pending.values() if c.next_at <= now and not c.busy]
            if due:
                await asyncio.gather(*(self._attempt(c, deadline) for c in due))
                continue
            soonest = min(c.next_at for c in self._pending.values())
            await asyncio.sleep(min(max(soonest - now, 0.01), 1.0,
                                    max(deadline - loop.time(), 0.0)))

    # -- minting and retiring ----------------------------------------------------------
    async def track(self, minted: Minted, provider: Provider, workload: str | None
                    ) -> Credential | None:
        """Remember ``minted`` until it is revoked; ``None`` if nothing revokes it.

        Raises :class:`ProviderError` (``unrecorded``) after revoking it when it
        cannot be recorded in the store: a credential no restart could revoke is
        not handed out."""
        handle = provider.handle(minted)
        if handle is None:
            return None
        cred = Credential(uuid.uuid4().hex, minted.secret, provider.credential_kind,
                          minted.task, workload, minted.issued_at, minted.expires_at, handle)
        self._add(cred)
        await self._prune()
        if self._store is not None:
            if self._loader is None:
                self.start()
            await self._ready.wait()
            try:
                if self._sealer is None:
                    raise ValueError("the sealing key is not loaded")
                await self._store.add_credential(self._row(cred))
            except Exception as e:  # noqa: BLE001 - any failure: fail closed
                log.error("secret %r: a %s could not be recorded for its revocation (%s); "
                          "revoking it now", cred.secret, cred.kind, type(e).__name__)
                await self.retire([cred])
                raise ProviderError(cred.secret, "unrecorded") from None
        return cred

    async def end_task(self, task: str) -> None:
        await self.retire([c for c in self._by_task.get(task, {}).values() if c.state == LIVE])

    async def retire(self, creds: Iterable[Credential]) -> None:
        """Make ``creds`` pending and try each once now; failures are retried later."""
        fresh = [c for c in creds if c.state == LIVE]
        await self._mark_pending(fresh)
        await asyncio.gather(*(self._attempt(c) for c in fresh))
        self._kick()

    async def _mark_pending(self, creds: list[Credential]) -> None:
        now = self.clock()
        for c in creds:
            c.state, c.next_at = PENDING, now
            self._pending[c.id] = c
        await self._save(creds)

    # -- one attempt ---------------------------------------------------------------------
    async def _attempt(self, cred: Credential, deadline: float | None = None) -> None:
        """Try to revoke ``cred`` once (the issuer's answer awaited until ``deadline``,
        loop time, if given); never raises (but for cancellation)."""
        if cred.busy or cred.id not in self._pending:
            return
        cred.busy = True
        started = time.monotonic()
        try:
            await self._try(cred, started, deadline)
        except Exception:  # noqa: BLE001 - a bug here must not end the retries
            log.exception("secret %r: revoking a %s failed unexpectedly; trying again later",
                          cred.secret, cred.kind)
            self._error("revocation")
            cred.next_at = self.clock() + self._backoff(cred)
        finally:
            cred.busy = False
            self._wake.set()

    async def _try(self, cred: Credential, started: float, deadline: float | None) -> None:
        what = f"{REASON}: {cred.kind} of secret {cred.secret!r}"
        provider = self._providers.get(cred.secret)
        if provider is None:
            await self._finish(cred, "abandoned", f"{what} cannot be revoked: the secret is "
                               "no longer configured; it stays valid until it expires", started)
            return
        if cred.expired(self.clock()):
            await self._finish(cred, "expired", f"{what} expired before it could be revoked "
                               f"({cred.attempts} attempts failed); nothing left to revoke",
                               started, provider)
            return
        if self._store is not None and self._store.shared:
            turn = await self._store.revoke_lease(cred.id, LEASE_MS)
            if turn == -1:  # another replica revoked it (it took it over): nothing to do
                log.info("secret %r: %s of task %s was revoked by another replica",
                         cred.secret, cred.kind, cred.task)
                self._drop(cred)
                return
            if turn == 0:  # another replica is revoking it right now: look again later
                cred.next_at = self.clock() + LEASE_MS / 1000
                return
        cred.attempts += 1
        try:
            async with asyncio.timeout_at(deadline):
                await provider.revoke(cred.handle)
        except ProviderError as e:
            error = e.what
        except TimeoutError:  # only with a deadline: the provider's own is a ProviderError
            error = STOPPED
        except Exception:  # noqa: BLE001 - a bug: a failed attempt like any other
            log.exception("secret %r: revoking a %s failed unexpectedly", cred.secret,
                          cred.kind)
            self._error("revocation")
            error = "the gateway failed while revoking it (see its log)"
        else:
            await self._finish(cred, "revoked", f"{what} revoked (attempt {cred.attempts})",
                               started, provider)
            return
        delay = self._backoff(cred)
        now = self.clock()
        cred.last_error = error
        cred.next_at = now + delay
        if cred.expires_at is not None:
            cred.next_at = min(cred.next_at, cred.expires_at)  # to record the expiry
        log.warning("secret %r: revoking a %s of task %s failed (attempt %d: %s); next "
                    "attempt in %.1f s", cred.secret, cred.kind, cred.task, cred.attempts,
                    error, cred.next_at - now)
        self._count(cred.secret, "failed")
        await self._save([cred])
        await self._record(cred, provider, "error",
                           f"{what}: attempt {cred.attempts} failed: {error}; next attempt in "
                           f"{cred.next_at - now:.1f} s", started)

    def _backoff(self, cred: Credential) -> float:
        provider = self._providers.get(cred.secret)
        first, cap = ((provider.spec.revoke_backoff_seconds,
                       provider.spec.revoke_max_backoff_seconds)
                      if provider is not None else (1.0, 300.0))
        return backoff(cred.attempts, first, cap, self._rng)

    async def _finish(self, cred: Credential, outcome: str, reason: str, started: float,
                      provider: Provider | None = None) -> None:
        """The final outcome: recorded and counted first, so a credential gone from
        the task's view has its record in the log."""
        if outcome == "revoked":
            log.info("secret %r: %s of task %s revoked", cred.secret, cred.kind, cred.task)
        else:
            log.warning("%s", reason)
        await self._record(cred, provider, "allow" if outcome == "revoked" else "error",
                           reason, started)
        self._count(cred.secret, outcome)
        self._drop(cred)
        if self._store is not None:
            await self._quietly(self._store.delete_credentials([cred.id]))

    async def _record(self, cred: Credential, provider: Provider | None, decision: str,
                      reason: str, started: float) -> None:
        if self._audit is None:
            return
        owner = None
        if cred.task is not None and self.owner_of is not None:
            try:
                owner = self.owner_of(cred.task)
            except Exception:  # noqa: BLE001 - the record goes without it
                log.exception("secrets: looking up the owner of task %s failed", cred.task)
        target = provider.revoke_target() if provider is not None else None
        record = revocation_record(cred, target, decision, reason, owner,
                                   time.monotonic() - started)
        try:
            await self._audit(record)
        except Exception as e:  # noqa: BLE001 - the revocation itself goes on
            log.error("audit: the record of a %s revocation of secret %r could not be "
                      "written: %s", cred.kind, cred.secret, type(e).__name__)

    # -- the retry loop ------------------------------------------------------------------
    def _kick(self) -> None:
        """Make sure the retry loop runs while anything is pending."""
        if self._closed or not self._pending:
            return
        self._wake.set()
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(
                self._supervise("revocations", self._retry_loop),
                name="taskgate-secret-revocations")

    async def _retry_loop(self) -> None:
        while self._pending:
            now = self.clock()
            soonest = now + IDLE_WAIT
            for cred in list(self._pending.values()):
                if cred.busy:
                    continue
                if cred.next_at <= now:
                    self._spawn(cred)
                else:
                    soonest = min(soonest, cred.next_at)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(soonest - self.clock(), 0.0))

    def _spawn(self, cred: Credential) -> None:
        cred.busy = True  # from now: no second attempt starts before this one ran
        job = asyncio.get_running_loop().create_task(self._spawned(cred))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _spawned(self, cred: Credential) -> None:
        cred.busy = False
        await self._attempt(cred)

    async def _supervise(self, job: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run`` to its end; after an exception: log, count, pause, run it again."""
        failures = 0
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the job must outlive any one failure
                failures += 1
                log.exception("secrets: background job %r failed (%d times); restarting it",
                              job, failures)
                self._error(job)
            await asyncio.sleep(min(RESTART_MAX, RESTART_FIRST * 2 ** min(failures, 10)))

    async def _load_forever(self) -> None:
        """Shared state: take over, now and every :data:`TAKEOVER_SECONDS`, what replicas
        that died (or this one's earlier run) left to revoke."""
        while True:
            await self._load()
            await asyncio.sleep(TAKEOVER_SECONDS)

    async def _load(self) -> None:
        """Take over what an earlier run left in the store: every credential is pending."""
        assert self._store is not None and self._key_path is not None
        try:
            if self._sealer is None:
                self._sealer = await asyncio.to_thread(Sealer.load_or_create, self._key_path)
            rows = await self._store.load_credentials()
        finally:
            self._ready.set()  # mints wait for this; without a key they fail closed
        now, stale, lost = self.clock(), [], []
        for row in rows:
            if row.id in self._creds:
                continue  # minted by this run
            try:
                handle = self._sealer.open(row.handle, _context(row.id, row.secret, row.kind))
            except ValueError:
                handle = None
            cred = Credential(row.id, row.secret, row.kind, row.task, row.workload,
                              row.issued_at, row.expires_at, handle or SecretValue(""),
                              PENDING, row.attempts, row.last_error, now)
            if handle is None:
                lost.append(cred)
                continue
            self._add(cred)
            self._pending[cred.id] = cred
            if row.state != _STORED[PENDING]:
                stale.append(cred)
        await self._save(stale)
        for cred in lost:
            await self._finish(cred, "abandoned", f"{REASON}: {cred.kind} of secret "
                               f"{cred.secret!r} cannot be revoked: its stored handle does "
                               f"not open with {self._key_path}; it stays valid until it "
                               "expires", time.monotonic())
        if self._pending:
            log.info("secrets: %d credentials are pending revocation", len(self._pending))
        self._kick()

    # -- bookkeeping -----------------------------------------------------------------------
    def _add(self, cred: Credential) -> None:
        self._creds[cred.id] = cred
        self._by_task.setdefault(cred.task, {})[cred.id] = cred

    def _drop(self, cred: Credential) -> None:
        self._creds.pop(cred.id, None)
        self._pending.pop(cred.id, None)
        mine = self._by_task.get(cred.task)
        if mine is not None:
            mine.pop(cred.id, None)
            if not mine:
                del self._by_task[cred.task]

    async def _prune(self) -> None:
        """Forget live credentials that expired (nothing to revoke), now and then."""
        now = self.clock()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY
        gone = [c for c in self._creds.values() if c.state == LIVE and c.expired(now)]
        for c in gone:
            self._drop(c)
        if gone and self._store is not None:
            await self._quietly(self._store.delete_credentials([c.id for c in gone]))

    def _row(self, cred: Credential) -> CredentialRow:
        assert self._sealer is not None
        sealed = self._sealer.seal(cred.handle, _context(cred.id, cred.secret, cred.kind))
        return CredentialRow(cred.id, cred.secret, cred.kind, cred.task, cred.workload,
                             cred.issued_at, cred.expires_at, _STORED[cred.state],
                             cred.attempts, cred.last_error, sealed)

    async def _save(self, creds: list[Credential]) -> None:
        if self._store is not None and creds:
            await self._quietly(self._store.update_credentials(
                [(c.id, _STORED[c.state], c.attempts, c.last_error) for c in creds]))

    async def _quietly(self, write: Awaitable[None]) -> None:
        """A store write whose failure is logged and counted, never raised: the
        credential is still revoked from memory; only a restart would forget it."""
        try:
            await write
        except Exception as e:  # noqa: BLE001
            log.error("secrets: the state store could not record a revocation's progress: "
                      "%s", type(e).__name__)
            self._error("store")

    def _count(self, secret: str, outcome: str) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(secret, outcome)
            except Exception:  # noqa: BLE001 - observers never affect a revocation
                log.exception("secrets: the revocation observer failed")

    def _error(self, job: str) -> None:
        if self._on_error is not None:
            try:
                self._on_error(job)
            except Exception:  # noqa: BLE001
                log.exception("secrets: the background-error observer failed")
