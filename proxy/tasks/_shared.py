"""The task registry over shared state (Redis): every replica enforces the same tasks.

Each replica keeps its in-memory copy of the tasks (so a decision stays a dict
lookup), and :class:`SharedTaskRegistry` keeps that copy honest:

- a task another replica created is fetched on first sight of its token (and
  announced by a ``created`` event before that, usually);
- every admitted call takes its budget in Redis (one Lua script: exists, not
  revoked, not expired, under ``max_calls``), so budgets are exact across replicas
  and a revocation written anywhere refuses the next counted call everywhere;
- a revocation is published; each replica marks the task revoked on the event and
  runs its own task-end hooks (its held approvals, its minted credentials);
- while the state is not confirmed fresh within the bound
  (:data:`proxy.store.BOUND_SECONDS`), every task call is refused with 503;
  after a reconnection the copy is resynced before calls are let through again;
- a database found emptied (flushed, restarted without persistence) forgets every
  task: their tokens get 407.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import logging
import os
import socket
import time

from proxy.config import Config
from proxy.errors import InvalidCredential, Unavailable
from proxy.identity import Caller, Identity, TaskKeys, TaskTokenIssuer
from proxy.policy import Decision
from proxy.store import EXPIRED, REVOKED, SPENT, UNKNOWN, RedisState, redis_password
from proxy.store._redis import Event
from proxy.tasks._model import Task
from proxy.tasks._registry import TaskRegistry

__all__ = ["SharedTaskRegistry", "open_shared_registry", "replica_name", "shared_issuer"]

log = logging.getLogger(__name__)


def replica_name(config: Config) -> str:
    """This process's replica id: configured, else ``hostname-pid``."""
    return config.replica_id or f"{socket.gethostname()}-{os.getpid()}"


class SharedTaskRegistry(TaskRegistry):
    """A :class:`TaskRegistry` whose tasks, budgets, revocations and keys live in Redis."""

    store: RedisState

    _loaded = False  # every task read once (then only missed revocations are)
    _seq = 0  # the last revocation of the log seen

    async def load(self) -> None:
        """Start watching Redis; the tasks are loaded on the first connection."""
        self.store.listeners.append(self._event)
        self.store.on_reset = self._reset
        self.store.on_resync.append(self._resync)
        await self.store.start()

    async def _resync(self) -> None:
        """Bring the copy in line with Redis: the keys, then every task (first time, or
        after the database was emptied) or only the revocations missed meanwhile."""
        stored = await self.store.offer_keys(self.keys.doc())
        if stored != self.keys.doc():
            self.keys.adopt(stored)
        for kid in self.keys.kids():
            self._kid_until.setdefault(kid, 0.0)
        if self._loaded:
            missed = await self.store.revoked_since(self._seq)
            ended = []
            for tid, seq in missed:
                self._seq = max(self._seq, seq)
                task = self.tasks.get(tid)
                row = await self.store.get(tid) if task is not None else None
                if task is not None and row is not None and row.revoked_at is not None \
                        and task.revoked_at is None:
                    self._mark_revoked(task, row.revoked_at)
                    ended.append(task)
            if ended:
                self._spawn(self._end(ended))
            return
        self._seq = await self.store.revocation_seq()  # before the pages: none is missed
        seen: set[str] = set()
        newly_ended: list[Task] = []
        async for page in self.store.pages():
            for row in page:
                seen.add(row.id)
                task = self.tasks.get(row.id)
                if task is None:
                    self._index(self._from_row(row))
                    continue
                task.used = row.used
                if row.revoked_at is not None and task.revoked_at is None:
                    self._mark_revoked(task, row.revoked_at)
                    newly_ended.append(task)
        self._drop([t for tid, t in self.tasks.items() if tid not in seen])
        self._loaded = True
        if newly_ended:
            self._spawn(self._end(newly_ended))

    async def _reset(self) -> None:
        """The database was emptied: every task is unknown from now on (407)."""
        self._drop(list(self.tasks.values()))
        self._loaded, self._seq = False, 0

    def _drop(self, tasks: list[Task]) -> None:
        """Forget tasks Redis no longer has; their held calls and credentials end."""
        if not tasks:
            return
        ids = {t.id for t in tasks}
        for t in tasks:
            del self.tasks[t.id]
            self.rulesets.release(t.rules_json)
        self._active = None
        self.identity.forget(lambda c: c.task in ids)
        log.warning("shared state: %d task(s) no longer in Redis were forgotten", len(ids))
        self._spawn(self._notify_all([t.id for t in tasks if not t.ended]))

    async def _notify_all(self, task_ids: list[str]) -> None:
        await asyncio.gather(*(self.notify_ended(tid) for tid in task_ids))

    def _mark_revoked(self, task: Task, at: float) -> None:
        task.revoked_at = at
        self._active = None
        heapq.heappush(self._purges, (task.ended_at() + self.retention, task.id))
        self.identity.forget(lambda c: c.task == task.id)

    def _event(self, event: Event) -> None:
        kind = event.get("kind")
        tid = event.get("task")
        if not isinstance(tid, str):
            if kind == "keys":
                self._spawn(self.reload_keys())
            return
        task = self.tasks.get(tid)
        if kind == "revoked" and isinstance(event.get("seq"), int):
            self._seq = max(self._seq, event["seq"])
        if kind == "revoked" and task is not None and task.revoked_at is None:
            at = event.get("at")
            self._mark_revoked(task, float(at) if isinstance(at, (int, float)) else
                               self._clock())
            self._spawn(self._end([task]))
        elif kind == "created" and task is None:
            self._spawn(self.fetch(tid))

    async def reload_keys(self) -> None:
        """Take the keys in Redis (another replica rotated them)."""
        doc = await self.store.load_keys()
        if doc is not None:
            self.keys.adopt(doc)
            for kid in self.keys.kids():
                self._kid_until.setdefault(kid, 0.0)

    async def fetch(self, task_id: str) -> Task | None:
        """A task not (yet) in the copy: read it from Redis (a token minted elsewhere)."""
        task = self.tasks.get(task_id)
        if task is not None:
            return task
        self.store.fresh()
        row = await self.store.get(task_id)
        if row is None:
            return None
        task = self.tasks.get(task_id)  # fetched meanwhile by the event
        if task is None:
            task = self._from_row(row)
            self._index(task)
        return task

    async def current(self, task_id: str) -> Task | None:
        """Re-read the task: its count moves on every replica."""
        self.store.fresh()
        row = await self.store.get(task_id)
        task = self.tasks.get(task_id)
        if row is None:
            return None
        if task is None:
            return await self.fetch(task_id)
        task.used = row.used
        if row.revoked_at is not None and task.revoked_at is None:
            self._mark_revoked(task, row.revoked_at)
            self._spawn(self._end([task]))
        return task

    async def revoke(self, task_id: str) -> Task | None:
        """Revoke a task made on any replica (the event tells every other one)."""
        if self.tasks.get(task_id) is None:
            await self.fetch(task_id)
        self.store.fresh()
        return await super().revoke(task_id)

    # -- enforcement ------------------------------------------------------------------
    def _live(self, caller: Caller) -> Task:
        if caller.task is not None:
            self.store.fresh()  # never decide on a copy older than the bound
        return super()._live(caller)

    async def admit(self, caller: Caller, decision: Decision, request_id: str) -> Decision:
        """Take the call from the budget in Redis (exact across replicas)."""
        if caller.task is None or not decision.allowed:
            return decision
        task = self._live(caller)
        used = await self.store.consume(task.id, self._clock())
        if used == SPENT:
            if task.max_calls is not None:
                task.used = max(task.used, task.max_calls)
            if not self._reports(task):
                return Decision(False, self._spent(task), decision.rule)
            # Report mode: counted past the budget too, and let through as would_deny.
            await self.store.add_used(task.id, 1)
            task.used += 1
            self._admitted[request_id] = (task.id, time.monotonic())
            return Decision(False, self._spent(task), decision.rule)
        if used == REVOKED:
            if task.revoked_at is None:
                self._mark_revoked(task, self._clock())
                self._spawn(self._end([task]))
            raise InvalidCredential("task revoked")
        if used == EXPIRED:
            raise InvalidCredential("task expired")
        if used == UNKNOWN:
            raise InvalidCredential("task unknown: it ended and was purged, or never existed")
        task.used = used
        self._admitted[request_id] = (task.id, time.monotonic())
        return decision

    def _refund(self, task_id: str) -> None:
        task = self.tasks.get(task_id)
        if task is not None and task.used > 0:
            task.used -= 1
        self._spawn(self.store.refund(task_id))

    async def rotate_keys(self) -> str:
        """Rotate, and hand the new keys to every replica."""
        self.store.fresh()
        kid = await super().rotate_keys()
        await self.store.save_keys(self.keys.doc())
        return kid

    async def sweep(self, now: float | None = None) -> None:
        try:
            await super().sweep(now)
        except Unavailable:
            pass  # Redis away: /readyz says so already; the next sweep tries again


async def open_shared_registry(config: Config, identity: Identity) -> SharedTaskRegistry:
    """Connect to Redis (``state.redis_url``) and load the shared tasks and keys."""
    assert config.redis_url is not None
    password = await asyncio.to_thread(redis_password, config.redis_password_file,
                                       dict(os.environ))
    store = RedisState(config.redis_url, password=password, prefix=config.redis_key_prefix,
                       replica=replica_name(config))
    keys = await asyncio.to_thread(TaskKeys.load_or_create,
                                   os.path.join(config.home, "task-keys.json"))
    registry = SharedTaskRegistry(config, identity, store, keys)
    await registry.load()
    gc.collect()
    gc.freeze()
    return registry


def shared_issuer(registry: SharedTaskRegistry) -> TaskTokenIssuer:
    """The issuer that accepts task tokens of every replica."""
    return TaskTokenIssuer(registry.keys, registry.get, registry.fetch, registry.reload_keys)
