"""Task grants at run time: the registry of tasks and the policy that enforces them.

:class:`TaskRegistry` holds every stored task in memory, indexed by task id
(and each task's rules by host, :class:`~proxy.policy._rules.RuleSet`), so a decision
costs the same with ten tasks or a hundred thousand. Changes go to the
:class:`~proxy.store._store.TaskStore` first and are awaited.

Enforcement, on every call (also inside open tunnels and keep-alive
connections, through ``Gateway.recheck``):

* ``check`` — the task exists, is not revoked (→ 407 "task revoked") or
  expired (→ 407 "task expired"), and has budget left (→ 403 "task budget
  spent"). Revoked and expired tasks make their token a dead credential,
  hence 407 like any revoked credential (SPEC, Identity).
* ``admit`` — once a rule matched, take one call from the budget: check and
  increment happen in one step on the event loop (so 50 parallel calls
  against ``max_calls: 10`` let exactly 10 through), and the increment is
  committed to the store before the call goes on. A call refused later in
  the chain (an MCP tool not granted, an approval denied) is given back when
  its audit record shows ``deny`` or ``rejected``; a call that was let through
  and then failed upstream (``error``) stays counted.

* ``check_client`` — a task bound to client networks (``bind``) refuses its token
  from any other client address (→ 407 "the task token is bound elsewhere").

In report mode (the workload's ``mode: report``, or the task's) a spent budget does
not refuse: ``admit`` still counts the call and answers a refusal the gateway records
``would_deny`` and lets through.

Standing rules do not apply to a task caller: a task token carries exactly
its task's rules, so what an agent can do on a task is what the task says.
Workload tokens (no task) keep their ``standing`` rules.

Expiry is noticed by a sweeper (every :data:`SWEEP_SECONDS`) that runs
the task-end hooks (:attr:`TaskRegistry.on_end`) once per task (also for tasks that ended while the
gateway was down); ended tasks stay visible on the control plane for
:data:`RETENTION_SECONDS`, then are purged from memory and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from proxy.batching import FAILURES
from proxy.config import Config, Network
from proxy.errors import InvalidCredential, InvalidField, Refused, TaskgateError, Unavailable
from proxy.identity import TASK_ISSUER, Caller, Identity, TaskKeys, TaskTokenIssuer
from proxy.policy import Breach, Budget, Decision, Rule, breach
from proxy.secrets import check_token_scope
from proxy.store import StateStore, TaskRow, TaskStore
from proxy.tasks._model import RuleSets, Task, TaskRequest, canonical_rules, read_terms

__all__ = ["Clock", "TaskEndHook", "TaskRegistry", "open_registry"]

Clock = Callable[[], float]
# Called with a task id when the task ends (revoked, expired): secret providers revoke
# what they minted for it, approvals waiting on it are refused.
TaskEndHook = Callable[[str], Awaitable[None]]

log = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0
RETENTION_SECONDS = 3600.0
ADMITTED_MAX_AGE = 3600.0
ACTIVE_COUNT_SECONDS = 1.0  # /metrics is open to anyone: count the tasks at most this often
CEILING_CHECK_STATES = 100_000  # automaton states one task request may cost
_REFUND = ("deny", "rejected")


class TaskRegistry:
    """Every task, in memory and in the store; creation, revocation, budgets, expiry."""

    def __init__(self, config: Config, identity: Identity, store: StateStore, keys: TaskKeys,
                 *, retention: float = RETENTION_SECONDS, clock: Clock = time.time) -> None:
        self.config = config
        self.identity = identity
        self.on_end: list[TaskEndHook] = []
        self._clock = clock  # wall-clock time: expiry, revocation (tests pass their own)
        self.store = store
        self.keys = keys
        self.retention = retention
        self.tasks: dict[str, Task] = {}
        # workload → its bound tasks by id: transparent mode looks here on every call.
        self._bound: dict[str, dict[str, Task]] = {}
        self.rulesets = RuleSets()
        self._ends: list[tuple[float, str]] = []    # (expires_at, id): who ends next
        self._purges: list[tuple[float, str]] = []  # (ended + retention, id)
        self._kid_until: dict[str, float] = {}      # a key's last token expiry
        self._admitted: dict[str, tuple[str, float]] = {}  # request id → (task, when)
        self._background: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.sweep_failing = False  # the last sweep raised (supervision: /readyz, /metrics)
        self._closing = False
        self._active: tuple[float, float] | None = None  # (monotonic when, count)
        self._creating = 0  # task creations under way (a config reload waits for them)
        self._unpersisted: set[str] = set()  # revoked in memory, the store not yet told
        self._no_creation = asyncio.Event()
        self._no_creation.set()
        self._creation_open = asyncio.Event()
        self._creation_open.set()

    # -- loading --------------------------------------------------------------
    async def load(self) -> None:
        """Read every stored task; tasks that ended unnoticed are ended on the next sweep."""
        await self.store.start()
        async for page in self.store.pages():
            for row in page:
                self._index(self._from_row(row))
        for kid in self.keys.kids():
            self._kid_until.setdefault(kid, 0.0)

    def _from_row(self, row: TaskRow) -> Task:
        key, rs = self.rulesets.acquire(row.rules)
        owner = sys.intern(row.owner) if row.owner else None
        mode, bind = read_terms(row.terms)
        return Task(row.id, sys.intern(row.workload), owner, row.purpose, row.created_at,
                    row.expires_at, row.max_calls, key, rs, sys.intern(row.kid), row.used,
                    row.revoked_at, row.ended, mode, bind)

    def _index(self, task: Task) -> None:
        self.tasks[task.id] = task
        if task.bind:
            self._bound.setdefault(task.workload, {})[task.id] = task
        self._active = None
        heapq.heappush(self._ends, (task.revoked_at or task.expires_at, task.id))
        heapq.heappush(self._purges, (task.ended_at() + self.retention, task.id))
        self._kid_until[task.kid] = max(self._kid_until.get(task.kid, 0.0), task.expires_at)

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    async def current(self, task_id: str) -> Task | None:
        """The task as it stands now, for the control plane (shared state: re-read)."""
        return self.tasks.get(task_id)

    def active_count(self) -> float:
        """Tasks that can still make calls (read at /metrics scrape time). Counted again
        at most once a second, or after a task was created or revoked: a scrape flood
        must not walk every task each time."""
        now = time.monotonic()
        if self._active is None or now - self._active[0] >= ACTIVE_COUNT_SECONDS:
            wall = self._clock()
            self._active = (now, float(sum(1 for t in self.tasks.values()
                                           if t.state(wall) == "active")))
        return self._active[1]

    # -- creation and revocation ----------------------------------------------
    async def workload_of(self, req: TaskRequest) -> str:
        """The workload a request asks for: named, or attested by a trusted issuer's JWT."""
        if req.workload is not None:
            return req.workload
        assert req.workload_token is not None
        try:
            caller = await self.identity.identify(f"Bearer {req.workload_token}")
        except TaskgateError as e:
            raise InvalidField("workload_token", f"the workload token was not accepted: "
                                                 f"{e.reason}", status=403,
                               error="attestation_failed") from None
        if caller.issuer == TASK_ISSUER:
            raise InvalidField("workload_token", "a task token cannot create tasks; use a "
                                                 "workload token from a trusted issuer",
                               status=403, error="attestation_failed")
        return caller.workload

    async def create(self, req: TaskRequest) -> tuple[Task, str]:
        """Check the request against its workload's ceiling, store it, sign its token."""
        workload = await self.workload_of(req)
        await self._creation_open.wait()  # a config reload is judging the tasks there are
        self._creating += 1
        self._no_creation.clear()
        try:
            return await self._create(req, workload)
        finally:
            self._creating -= 1
            if self._creating == 0:
                self._no_creation.set()

    async def _create(self, req: TaskRequest, workload: str) -> tuple[Task, str]:
        config = self.config
        await self._check_request(req, workload, config)
        wl = config.workloads[workload]
        self._check_token_scopes(req.rules)
        now = self._clock()
        rules_json = canonical_rules(req.rules)
        task_id = uuid.uuid4().hex
        key, rs = self.rulesets.acquire(rules_json)
        task = Task(task_id, workload, req.owner or wl.owner, req.purpose, now,
                    now + req.ttl_seconds, req.max_calls, key, rs, self.keys.current,
                    mode=req.mode, bind=req.bind)
        try:
            await self.store.insert(task.row())
        except BaseException:
            self.rulesets.release(key)
            raise
        self._index(task)
        token = self.keys.sign(task_id=task_id, workload=workload,
                               expires_at=task.expires_at, now=now)
        return task, token

    async def _check_request(self, req: TaskRequest, workload: str, config: Config) -> None:
        """The request fits ``workload`` as ``config`` has it: mode, binding, ceiling."""
        wl = config.workloads.get(workload)
        if wl is None:
            raise InvalidField("workload", f"unknown workload {workload!r}; it must be listed "
                                           "under 'workloads' in the config")
        if req.mode == "report" and not wl.report_allowed:
            raise InvalidField("mode", f"workload {workload!r} does not allow report-mode "
                                       "tasks (report_allowed: true in its config)")
        if wl.require_binding and not req.bind:
            raise InvalidField("bind", f"workload {workload!r} requires its tasks to be bound "
                                       "to where the agent runs: give bind.client_cidrs")
        _check_bind_sources(req.bind, workload, config)
        # Containment is CPU work (automata over path globs): off the event loop, and
        # bounded per request so a request of pathological globs is refused, not slow.
        why = await asyncio.to_thread(_first_breach, req.rules, wl.ceiling)
        if why is not None:
            i, b = why
            raise InvalidField(("rules", i, b.key), f"rule {b.rule!r}: {b.reason}",
                               error="beyond_ceiling", rule=b.rule)

    def beyond_ceiling(self, config: Config, tasks: list[Task]) -> list[tuple[Task, str]]:
        """Which of ``tasks`` no longer fit their workload's ceiling in ``config`` (a
        reload lowered it, or dropped the workload), and why. CPU work: run it off the
        event loop on a list taken on it."""
        out: list[tuple[Task, str]] = []
        for task in tasks:
            wl = config.workloads.get(task.workload)
            if wl is None:
                out.append((task, f"workload {task.workload!r} is no longer in the config"))
                continue
            old = self.config.workloads.get(task.workload)
            if old is not None and old.ceiling == wl.ceiling:
                continue
            why = _first_breach(task.ruleset.rules, wl.ceiling)
            if why is not None:
                i, b = why
                out.append((task, f"rules[{i}] {b.rule!r} no longer fits the ceiling of "
                                  f"workload {task.workload!r}: {b.reason}"))
        return out

    @contextlib.asynccontextmanager
    async def creation_paused(self) -> AsyncIterator[None]:
        """No task is being created while inside (those under way are waited for):
        a config reload judges the tasks there are against the new ceilings, swaps the
        config, and no task checked against the old one is added behind its back."""
        self._creation_open.clear()
        try:
            await self._no_creation.wait()
            yield
        finally:
            self._creation_open.set()

    def live(self) -> list[Task]:
        """The tasks that can still make calls, now."""
        now = self._clock()
        return [t for t in self.tasks.values() if t.revoked_at is None and now < t.expires_at]

    def _check_token_scopes(self, rules: tuple[Rule, ...]) -> None:
        """``repositories``/``permissions`` only where they limit a token: a github_app
        secret. Elsewhere the provider would ignore them, and the task would look
        narrower than the credential it gets. The rule is proxy.secrets.check_token_scope
        (the config runs it too)."""
        for i, r in enumerate(rules):
            try:
                check_token_scope(r, self.config.secrets)
            except InvalidField as e:
                raise e.at("rules", i) from None

    async def revoke(self, task_id: str) -> Task | None:
        """Revoke now (memory first, so the next call is refused), then persist and
        run the task-end hooks. Idempotent."""
        task = self.tasks.get(task_id)
        if task is None:
            return None
        self.revoke_now(task)
        if task.id in self._unpersisted:  # revoked in memory, not yet in the store
            assert task.revoked_at is not None
            await self.store.revoke(task_id, task.revoked_at)
            self._unpersisted.discard(task.id)
        await self._end([task])
        return task

    def revoke_now(self, task: Task) -> bool:
        """Revoke ``task`` in memory (its next call is refused); :meth:`revoke` persists
        it and runs the task-end hooks. False if it was revoked already."""
        if task.revoked_at is not None:
            return False
        task.revoked_at = self._clock()
        self._unpersisted.add(task.id)
        self._active = None
        heapq.heappush(self._purges, (task.ended_at() + self.retention, task.id))
        self.identity.forget(lambda c: c.task == task.id)
        return True

    async def notify_ended(self, task_id: str) -> None:
        """Run every task-end hook; one failing hook never stops the others."""
        for hook in list(self.on_end):
            try:
                await hook(task_id)
            except Exception:  # noqa: BLE001
                log.exception("task-end hook failed for task %s", task_id)

    async def _end(self, tasks: list[Task]) -> None:
        ending = [t for t in tasks if not t.ended]
        for t in ending:
            t.ended = True
        # Together: a provider slow to revoke one task's token must not hold up the
        # revocations of every task that ended after it.
        await asyncio.gather(*(self.notify_ended(t.id) for t in ending))
        if ending:
            await self.store.mark_ended(t.id for t in ending)

    # -- enforcement ----------------------------------------------------------
    def check(self, caller: Caller) -> None:
        """Raise if the caller's task no longer grants anything (in report mode a spent
        budget does not refuse: the call is recorded ``would_deny`` at ``admit``)."""
        if caller.task is None:
            return
        task = self._live(caller)
        if task.max_calls is not None and task.used >= task.max_calls \
                and not self._reports(task):
            raise Refused(self._spent(task))

    def reporting(self, caller: Caller) -> bool:
        """Is ``caller`` in report mode: its workload's ``mode: report``, or its task's?"""
        wl = self.config.workloads.get(caller.workload)
        if wl is not None and wl.mode == "report":
            return True
        task = self.tasks.get(caller.task) if caller.task is not None else None
        return task is not None and task.mode == "report"

    def _reports(self, task: Task) -> bool:
        wl = self.config.workloads.get(task.workload)
        return task.mode == "report" or (wl is not None and wl.mode == "report")

    def check_client(self, caller: Caller, client: str | None) -> None:
        """Raise (407) if the caller's task is bound to other client addresses."""
        if caller.task is None:
            return
        task = self.tasks.get(caller.task)
        if task is not None and not task.bound_to(client):
            raise InvalidCredential(f"the task token is bound elsewhere: it is good only "
                                    f"from {', '.join(str(n) for n in task.bind)}, not from "
                                    f"{client or 'an unknown address'}")

    def bound_to(self, address: str, workload: str) -> list[Task]:
        """The live tasks of ``workload`` bound to ``address`` (transparent mode judges a
        call from that address against their grants)."""
        now = self._clock()
        return [t for t in self._bound.get(workload, {}).values()
                if t.revoked_at is None and now < t.expires_at and t.bound_to(address)]

    def check_live(self, caller: Caller) -> None:
        """Raise if the caller's task ended; its budget is not looked at (the call asking
        was admitted already, and may have spent the last of it)."""
        if caller.task is not None:
            self._live(caller)

    def _live(self, caller: Caller) -> Task:
        task = self.tasks.get(caller.task or "")
        if task is None or task.workload != caller.workload:
            raise InvalidCredential("task unknown: it ended and was purged, or never existed")
        if task.revoked_at is not None:
            raise InvalidCredential("task revoked")
        if self._clock() >= task.expires_at:
            raise InvalidCredential("task expired")
        return task

    @staticmethod
    def _spent(task: Task) -> str:
        return f"task budget spent: all {task.max_calls} calls used"

    async def admit(self, caller: Caller, decision: Decision, request_id: str) -> Decision:
        """Take one call from the task's budget for an allowed call (see module doc)."""
        if caller.task is None or not decision.allowed:
            return decision
        task = self._live(caller)
        spent = task.max_calls is not None and task.used >= task.max_calls
        if spent and not self._reports(task):
            return Decision(False, self._spent(task), decision.rule)
        task.used += 1  # in report mode past the budget too: counted, not enforced
        try:
            await self.store.add_used(task.id, 1)
        except Exception:
            task.used -= 1
            log.exception("task store: counting a call of task %s failed", task.id)
            raise Unavailable("the task store could not count the call; it was refused"
                              ) from None
        if task.revoked_at is not None or self._clock() >= task.expires_at:
            self._refund(task.id)  # ended while the count was being written
            self._live(caller)
        self._admitted[request_id] = (task.id, time.monotonic())
        if spent:  # report mode: the call goes ahead, recorded would_deny
            return Decision(False, self._spent(task), decision.rule)
        return decision

    def on_record(self, record: dict[str, Any]) -> None:
        """Audit observer: give back the call of an admitted request refused later.

        A ``held`` record is not the call's last (approvals write it when the hold
        starts): the final record, approved or rejected, still follows."""
        if record.get("decision") == "held":
            return
        entry = self._admitted.pop(record.get("request_id") or "", None)
        if entry is not None and record.get("decision") in _REFUND:
            self._refund(entry[0])

    def _refund(self, task_id: str) -> None:
        task = self.tasks.get(task_id)
        if task is not None and task.used > 0:
            task.used -= 1
            self._spawn(self.store.add_used(task_id, -1))

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._settled)

    def _settled(self, t: asyncio.Task[Any]) -> None:
        self._background.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("task store: background write failed: %s", t.exception())

    # -- expiry and purge -----------------------------------------------------
    async def sweep(self, now: float | None = None) -> None:
        """End tasks whose time is up, purge those ended long ago, forget old keys."""
        now = self._clock() if now is None else now
        ended: list[Task] = []
        while self._ends and self._ends[0][0] <= now:
            _, tid = heapq.heappop(self._ends)
            task = self.tasks.get(tid)
            if task is not None and not task.ended and (
                    task.revoked_at is not None or now >= task.expires_at):
                ended.append(task)
        if ended:
            await self._end(ended)
        gone: list[str] = []
        while self._purges and self._purges[0][0] <= now:
            _, tid = heapq.heappop(self._purges)
            task = self.tasks.get(tid)
            if task is not None and task.ended and task.ended_at() + self.retention <= now:
                del self.tasks[tid]
                self._bound.get(task.workload, {}).pop(tid, None)
                self.rulesets.release(task.rules_json)
                gone.append(tid)
        if gone:
            await self.store.delete(gone)
        stale = time.monotonic() - ADMITTED_MAX_AGE
        if self._admitted and next(iter(self._admitted.values()))[1] < stale:
            for rid in [r for r, (_, t) in self._admitted.items() if t < stale]:
                del self._admitted[rid]
        due = {kid for kid, until in self._kid_until.items()
               if until <= now and kid != self.keys.current}
        if due:
            gone = await asyncio.to_thread(self.keys.prune, lambda kid: kid not in due)
            for kid in due:
                del self._kid_until[kid]
            if gone:
                log.info("task keys: forgot retired keys %s (their tokens expired)", gone)

    async def rotate_keys(self) -> str:
        """A new signing key; the old one verifies until its last token expires."""
        old = self.keys.current
        kid = await asyncio.to_thread(self.keys.rotate, self._clock())
        self._kid_until.setdefault(old, 0.0)
        return kid

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must keep running
                FAILURES.add("sweeper")
                self.sweep_failing = True
                log.exception("task sweeper failed; retrying")
            else:
                self.sweep_failing = False

    @property
    def sweeper_ok(self) -> bool:
        """The sweeper runs and its last sweep went through (``/readyz``)."""
        running = self._sweeper is not None and not self._sweeper.done()
        return running and not self.sweep_failing

    def start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
            self._sweeper.add_done_callback(self._sweeper_ended)

    def _sweeper_ended(self, task: asyncio.Task[None]) -> None:
        """The sweeper never ends but at close: if it did, say so, count it, start anew."""
        if self._closing or task is not self._sweeper:
            return
        FAILURES.add("sweeper")
        error = None if task.cancelled() else task.exception()
        log.error("the task sweeper stopped (%s); starting it again",
                  "cancelled" if error is None else f"{type(error).__name__}: {error}")
        self._sweeper = None
        self.start_sweeper()

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.close()


def _check_bind_sources(bind: tuple[Network, ...], workload: str, config: Config) -> None:
    """A task binds to where its own workload's agent runs: an address another workload
    claims in transparent mode (``sources``) is that workload's there, so the task would
    never apply to it (and its token would work only where it can never be used)."""
    for i, net in enumerate(bind):
        for name, other in config.workloads.items():
            if name == workload:
                continue
            for src in other.sources:
                if net.version == src.version and net.overlaps(src):
                    raise InvalidField(("bind", "client_cidrs", i),
                                       f"{str(net)!r} overlaps {str(src)!r}, a source address "
                                       f"of workload {name!r}: a task is bound where its own "
                                       "workload's agent runs")


def _first_breach(rules: tuple[Rule, ...], ceiling: tuple[Rule, ...]
                  ) -> tuple[int, Breach] | None:
    budget = Budget(CEILING_CHECK_STATES)
    for i, rule in enumerate(rules):
        why = breach(rule, ceiling, budget)
        if why is not None:
            return i, why
    return None


async def open_registry(config: Config, identity: Identity) -> TaskRegistry:
    """Open the task store and signing keys under home and load every stored task.

    Task tokens are not accepted until the builder adds the registry's issuer to
    ``identity`` and its policy to the gateway (proxy/gateway/_build.py)."""
    home = config.home
    keys = await asyncio.to_thread(TaskKeys.load_or_create, os.path.join(home, "task-keys.json"))
    registry = TaskRegistry(config, identity, TaskStore(os.path.join(home, "tasks.db")), keys)
    await registry.load()
    # What is loaded now lives as long as the process. Without this, a full cyclic GC
    # walks every stored task: over a second of stalled event loop at 100k tasks.
    gc.collect()
    gc.freeze()
    return registry


def token_issuer(registry: TaskRegistry) -> TaskTokenIssuer:
    """The issuer that accepts the registry's task tokens."""
    return TaskTokenIssuer(registry.keys, registry.get)
