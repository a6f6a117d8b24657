"""Task-scoped state in Redis, shared by every worker and replica.

Key layout (every key under the configured ``key_prefix``, ``P`` below):

- ``P epoch`` — a random id written once into an empty database. A replica that
  finds it gone or changed knows the data was lost (a flush, a restart without
  persistence) and forgets every task it had: their tokens then get 407, never a call.
- ``P task:<id>`` — a hash per task: ``workload owner purpose created_at expires_at
  max_calls rules kid used revoked_at ended terms`` (absent field = null; ``terms``:
  the task's mode and binding, JSON);
  ``P tasks`` — a sorted set of task ids by creation time (loading, listing);
  ``P revoked`` — the revocation log: task ids scored by ``P revoked-seq``, the
  number of the last revocation (a replica back from a lost connection reads only
  what it missed).
- ``P keys`` — the task-token signing keys (the JSON of ``task-keys.json``).
- ``P cred:<id>`` — a hash per minted credential to revoke (handle sealed, as in
  SQLite) and its owner replica; ``P creds`` — their ids; ``P lease:revoke:<id>`` —
  the lease (``SET NX PX``) of the replica revoking it; ``P done:<id>`` — its
  tombstone once revoked (or expired); ``P replica:<owner>`` — a process's heartbeat
  (``PX``; owner: the replica id and a random part), so what a dead process minted
  is taken over.
- ``P approval:<id>`` — a held call (its view, state, owner replica, answer);
  ``P approvals`` — the waiting ones by hold time.
- ``P session:<sha256>`` — review-page sessions (``PX`` = their idle limit).
- channel ``P events`` — JSON events: ``revoked``, ``created``, ``keys``, ``answered``.

Budgets are taken by one Lua script (:data:`_CONSUME`): exists, not revoked, not
expired, under ``max_calls`` → ``HINCRBY used 1``, in one round trip, atomic across
replicas. Refunds (:data:`_REFUND`) never go below zero nor recreate a purged task.

Freshness (the revocation bound, :data:`BOUND_SECONDS`): a watcher PINGs over the
subscribed connection and reads the epoch every :data:`HEARTBEAT_SECONDS`; the state
is ``healthy`` only while both answered within the bound and the replica has resynced
since its last (re)connection. A revocation is published when written, so a replica
either hears it within milliseconds or stops trusting its copy within the bound.

Every Redis failure becomes :class:`~proxy.errors.Unavailable` (503 at the edge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.batching import FAILURES
from proxy.errors import Unavailable
from proxy.store._store import CredentialRow, PinRow, TaskRow

__all__ = ["BOUND_SECONDS", "EXPIRED", "REVOKED", "SPENT", "UNKNOWN", "RedisState",
           "redis_password"]

log = logging.getLogger(__name__)

BOUND_SECONDS = 1.0      # the longest a replica acts on state it has not confirmed fresh
HEARTBEAT_SECONDS = 0.2  # how often the watcher confirms it
OP_TIMEOUT = 0.5         # one Redis command; beyond it the call is refused (503)
RECONNECT_SECONDS = 0.2
REPLICA_TTL_MS = 5000    # a replica silent this long is dead: its credentials are taken over
DONE_TTL_MS = 7 * 86_400_000  # a revoked credential's tombstone (beyond any token's life)
_PIN_SEP = "\x1f"  # between subject and server in a pin field (in neither)

# consume(task, now): 1.. = the new count; -1 unknown, -2 revoked, -3 expired, -4 spent
UNKNOWN, REVOKED, EXPIRED, SPENT = -1, -2, -3, -4
_CONSUME = """
local v = redis.call('HMGET', KEYS[1], 'expires_at', 'revoked_at', 'max_calls', 'used')
if not v[1] then return -1 end
if v[2] then return -2 end
if tonumber(ARGV[1]) >= tonumber(v[1]) then return -3 end
if v[3] and tonumber(v[4] or '0') >= tonumber(v[3]) then return -4 end
return redis.call('HINCRBY', KEYS[1], 'used', 1)
"""
_REFUND = """
local u = redis.call('HGET', KEYS[1], 'used')
if u and tonumber(u) > 0 then return redis.call('HINCRBY', KEYS[1], 'used', -1) end
return -1
"""
# revoke(task, channel, seq, log; at, id): numbered in the revocation log, published
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1]) == 1 then
  local seq = redis.call('INCR', KEYS[3])
  redis.call('ZADD', KEYS[4], seq, ARGV[2])
  redis.call('PUBLISH', KEYS[2], cjson.encode({kind='revoked', task=ARGV[2],
                                               at=tonumber(ARGV[1]), seq=seq}))
end
return 1
"""
# page(task keys...): every hash in one reply (one command, not one per task: start-up)
_PAGE = """
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('HGETALL', k) end
return out
"""
_SET_IF_EXISTS = """
for _, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then redis.call('HSET', k, ARGV[1], ARGV[2]) end
end
return 1
"""
# revoke_lease(cred, lease, done, me, ttl): -1 done elsewhere, 0 leased by another, 1 go.
# "Done" is the tombstone the deletion leaves; a credential merely missing (the data was
# lost) is revoked all the same.
_REVOKE_LEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  return -1
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
_LEASE = """
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
# answer(approval, waiting-set, channel, answer-json, event-json): exactly one answer
_ANSWER = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 0 end
if s ~= 'waiting' then return -1 end
redis.call('HSET', KEYS[1], 'state', 'ended', 'answer', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[2])
return 1
"""


Event = dict[str, Any]


def redis_password(path: str | None, env: dict[str, str]) -> str | None:
    """The Redis password: ``state.redis_password_file``, else ``TASKGATE_REDIS_PASSWORD``."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    return env.get("TASKGATE_REDIS_PASSWORD") or None


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"1" if value else b"0"
    return str(value).encode()


def _row(task_id: str, h: dict[bytes, bytes]) -> TaskRow:
    def s(name: str) -> str | None:
        v = h.get(name.encode())
        return v.decode() if v is not None else None

    def f(name: str) -> float | None:
        v = h.get(name.encode())
        return float(v) if v is not None else None

    max_calls = h.get(b"max_calls")
    return TaskRow(task_id, s("workload") or "", s("owner"), s("purpose"),
                   f("created_at") or 0.0, f("expires_at") or 0.0,
                   int(max_calls) if max_calls is not None else None, h.get(b"rules", b"[]"),
                   s("kid") or "", int(h.get(b"used", b"0")), f("revoked_at"),
                   h.get(b"ended") == b"1", h.get(b"terms"))


class RedisState:
    """The shared state store (see the module doc); one per process."""

    shared = True

    def __init__(self, url: str, *, password: str | None, prefix: str, replica: str,
                 bound: float = BOUND_SECONDS, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.prefix = prefix
        self.replica = replica
        # This process in Redis (heartbeat, owner of credentials and held calls): the
        # replica id and a random part, so two processes never pass for one (workers
        # given one replica_id, a container restarted as pid 1 under the same hostname).
        self.owner = f"{replica}.{secrets.token_hex(4)}"
        self.bound = bound
        self.heartbeat = heartbeat
        self.redis = aioredis.Redis.from_url(
            url, password=password, socket_timeout=OP_TIMEOUT,
            socket_connect_timeout=OP_TIMEOUT, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)
        self.channel = f"{prefix}events"
        self._consume = self.redis.register_script(_CONSUME)
        self._refund = self.redis.register_script(_REFUND)
        self._revoke = self.redis.register_script(_REVOKE)
        self._set_if = self.redis.register_script(_SET_IF_EXISTS)
        self._page = self.redis.register_script(_PAGE)
        self._lease = self.redis.register_script(_LEASE)
        self._revoke_lease = self.redis.register_script(_REVOKE_LEASE)
        self._answer = self.redis.register_script(_ANSWER)
        # Set by the registry and approvals: events, a lost database, a (re)connection.
        self.listeners: list[Callable[[Event], None]] = []
        self.on_reset: Callable[[], Awaitable[None]] | None = None
        self.on_resync: list[Callable[[], Awaitable[None]]] = []
        self._epoch: bytes | None = None
        self._last_ok = 0.0
        self._synced = False
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = asyncio.Event()

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- freshness ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """The state was confirmed within the bound (and resynced since connecting)."""
        return self._synced and time.monotonic() - self._last_ok <= self.bound

    @property
    def alive(self) -> bool:
        return self._watcher is None or not self._watcher.done() or self._closing

    def fresh(self) -> None:
        """Raise :class:`Unavailable` unless :attr:`healthy` (a call needs the state)."""
        if not self.healthy:
            raise Unavailable("the shared state (Redis) cannot be reached or is not yet "
                              "confirmed current; the call was refused")

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Start watching; waits (briefly) for a first connection, but a gateway starts
        without Redis too — not ready, refusing calls that need state, until it comes."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), 3.0)

    async def close(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()

    async def _watch(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await self._session(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the watcher must outlive any failure
                if self._synced or self.connected.is_set():
                    FAILURES.add("store")  # the state store: /metrics counts it so
                    log.error("shared state: Redis lost (%s: %s); calls that need state are "
                              "refused until it is back", type(e).__name__, e)
                self._synced = False
                self.connected.clear()
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), OP_TIMEOUT)
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _session(self, pubsub: aioredis.client.PubSub) -> None:
        """One connection's life: subscribe, check the epoch, resync, then heartbeat."""
        await asyncio.wait_for(pubsub.subscribe(self.channel), OP_TIMEOUT)
        await self._check_epoch()
        for resync in self.on_resync:
            await resync()
        self._last_ok = time.monotonic()
        self._synced = True
        self.connected.set()
        log.info("shared state: Redis connected and resynced")
        # Each PONG vouches for what was published before its PING reached Redis (one
        # connection delivers in order): the state is fresh as of when the PING was sent.
        pings: deque[float] = deque()
        next_beat = time.monotonic()
        while True:
            msg = await pubsub.get_message(timeout=min(self.heartbeat, 0.1))
            while msg is not None:  # everything already here first (after a stalled loop)
                if msg["type"] == "pong":
                    self._last_ok = pings.popleft() if pings else self._last_ok
                elif msg["type"] == "message":
                    self._dispatch(msg["data"])
                msg = await pubsub.get_message(timeout=0)
            now = time.monotonic()
            if now < next_beat:
                continue
            if pings and now > pings[0] + self.bound:
                raise TimeoutError("no PONG on the subscription within the bound")
            pings.append(now)
            await asyncio.wait_for(pubsub.ping(), OP_TIMEOUT)
            await self._check_epoch()
            await self.redis.set(self.key("replica", self.owner), b"1", px=REPLICA_TTL_MS)
            next_beat = now + self.heartbeat

    async def _check_epoch(self) -> None:
        key = self.key("epoch")
        await self.redis.set(key, secrets.token_hex(16).encode(), nx=True)
        epoch: Any = await self.redis.get(key)
        if self._epoch is not None and epoch != self._epoch:
            log.error("shared state: the Redis database was emptied (flushed, or restarted "
                      "without persistence); every task is forgotten")
            self._epoch = epoch
            self._synced = False
            if self.on_reset is not None:
                await self.on_reset()
            for resync in self.on_resync:
                await resync()
            self._synced = True
        self._epoch = epoch

    def _dispatch(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("shared state: an event that is not JSON was ignored")
            return
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - one listener never stops the others
                log.exception("shared state: an event listener failed")

    async def publish(self, event: Event) -> None:
        await self._call(self.redis.publish(self.channel, orjson.dumps(event)))

    async def _call(self, op: Awaitable[Any]) -> Any:
        try:
            return await op
        except (RedisError, OSError, TimeoutError) as e:
            raise Unavailable(f"the shared state (Redis) could not be reached "
                              f"({type(e).__name__}); the call was refused") from None

    # -- tasks ------------------------------------------------------------------------
    def _task_map(self, row: TaskRow) -> dict[Any, bytes]:
        values = {"workload": row.workload, "owner": row.owner, "purpose": row.purpose,
                  "created_at": repr(row.created_at), "expires_at": repr(row.expires_at),
                  "max_calls": row.max_calls, "rules": row.rules, "kid": row.kid,
                  "used": row.used, "revoked_at": None if row.revoked_at is None
                  else repr(row.revoked_at), "ended": row.ended, "terms": row.terms}
        return {k: _b(v) for k, v in values.items() if v is not None}

    async def insert(self, row: TaskRow) -> None:
        await self.insert_many([row])

    async def insert_many(self, rows: Sequence[TaskRow]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for row in rows:
            pipe.hset(self.key("task", row.id), mapping=self._task_map(row))
            pipe.zadd(self.key("tasks"), {row.id: row.created_at})
        for row in rows[:1000]:  # others find a task on first use anyway
            pipe.publish(self.channel, orjson.dumps({"kind": "created", "task": row.id}))
        await self._call(pipe.execute())

    async def get(self, task_id: str) -> TaskRow | None:
        h = await self._call(self.redis.hgetall(self.key("task", task_id)))
        return _row(task_id, h) if h else None

    async def consume(self, task_id: str, now: float) -> int:
        """Take one call from the task's budget (see the module doc for the codes)."""
        return int(await self._call(self._consume(keys=[self.key("task", task_id)],
                                                  args=[repr(now)])))

    async def refund(self, task_id: str) -> None:
        await self._call(self._refund(keys=[self.key("task", task_id)]))

    async def add_used(self, task_id: str, delta: int) -> None:
        for _ in range(-delta):
            await self.refund(task_id)
        if delta > 0:
            await self._call(self.redis.hincrby(self.key("task", task_id), "used", delta))

    async def revoke(self, task_id: str, at: float) -> None:
        done = await self._call(self._revoke(
            keys=[self.key("task", task_id), self.channel, self.key("revoked-seq"),
                  self.key("revoked")], args=[repr(at), task_id]))
        if not done:
            raise LookupError("no such task")

    async def mark_ended(self, task_ids: Iterable[str]) -> None:
        keys = [self.key("task", tid) for tid in task_ids]
        if keys:
            await self._call(self._set_if(keys=keys, args=["ended", "1"]))

    async def delete(self, task_ids: Iterable[str]) -> None:
        ids = list(task_ids)
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(*(self.key("task", t) for t in ids))
        pipe.zrem(self.key("tasks"), *ids)
        pipe.zrem(self.key("revoked"), *ids)
        await self._call(pipe.execute())

    async def revocation_seq(self) -> int:
        """The number of the last revocation written (0: none yet)."""
        return int(await self._call(self.redis.get(self.key("revoked-seq"))) or 0)

    async def revoked_since(self, seq: int) -> list[tuple[str, int]]:
        """``(task id, number)`` of every revocation numbered after ``seq``, in order: what
        a replica missed while its subscription was down."""
        found = await self._call(self.redis.zrangebyscore(self.key("revoked"), f"({seq}",
                                                          "+inf", withscores=True))
        return [(tid.decode(), int(score)) for tid, score in found]

    async def load(self) -> list[TaskRow]:
        return [row async for page in self.pages() for row in page]

    async def pages(self, size: int = 5000) -> AsyncIterator[list[TaskRow]]:
        """Every task, oldest first, a page at a time (one pipeline per page)."""
        start = 0
        while True:
            ids = await self._call(self.redis.zrange(self.key("tasks"), start,
                                                     start + size - 1))
            if not ids:
                return
            start += len(ids)
            flat = await self._call(self._page(keys=[self.key("task", t.decode())
                                                     for t in ids]))
            yield [_row(tid.decode(), dict(zip(h[::2], h[1::2], strict=True)))
                   for tid, h in zip(ids, flat, strict=True) if h]

    # -- signing keys -----------------------------------------------------------------
    async def load_keys(self) -> bytes | None:
        doc: bytes | None = await self._call(self.redis.get(self.key("keys")))
        return doc

    async def offer_keys(self, doc: bytes) -> bytes:
        """Store ``doc`` unless keys are stored already; the stored keys either way."""
        await self._call(self.redis.set(self.key("keys"), doc, nx=True))
        stored = await self.load_keys()
        return stored if stored is not None else doc

    async def save_keys(self, doc: bytes) -> None:
        """A rotation: every replica reloads the keys."""
        await self._call(self.redis.set(self.key("keys"), doc))
        await self.publish({"kind": "keys"})

    # -- credentials to revoke ----------------------------------------------------------
    async def add_credential(self, row: CredentialRow) -> None:
        values = {"secret": row.secret, "kind": row.kind, "task": row.task,
                  "workload": row.workload, "issued_at": repr(row.issued_at),
                  "expires_at": None if row.expires_at is None else repr(row.expires_at),
                  "state": row.state, "attempts": row.attempts, "last_error": row.last_error,
                  "handle": row.handle, "replica": self.owner}
        pipe = self.redis.pipeline(transaction=True)
        fields: dict[Any, bytes] = {k: _b(v) for k, v in values.items() if v is not None}
        pipe.hset(self.key("cred", row.id), mapping=fields)
        pipe.sadd(self.key("creds"), row.id)
        await self._call(pipe.execute())

    async def update_credentials(self, changes: Sequence[tuple[str, str, int, str | None]]
                                 ) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for cid, state, attempts, error in changes:
            pipe.hset(self.key("cred", cid), mapping={"state": state, "attempts": attempts})
            if error is None:
                pipe.hdel(self.key("cred", cid), "last_error")
            else:
                pipe.hset(self.key("cred", cid), "last_error", error)
        await self._call(pipe.execute())

    async def delete_credentials(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(*(self.key("cred", c) for c in ids))
            pipe.srem(self.key("creds"), *ids)
            for c in ids:  # the tombstone: no other replica revokes it again
                pipe.set(self.key("done", c), b"1", px=DONE_TTL_MS)
            await self._call(pipe.execute())

    async def load_credentials(self) -> list[CredentialRow]:
        """The credentials no live process holds (those of processes that died, this
        replica's earlier runs included). Each is claimed (its ``replica`` set to this
        one) so that exactly one replica takes it over."""
        ids = sorted(c.decode() for c in await self._call(
            self.redis.smembers(self.key("creds"))))
        rows: list[CredentialRow] = []
        for cid in ids:
            h = await self._call(self.redis.hgetall(self.key("cred", cid)))
            if not h:
                continue
            owner = h.get(b"replica", b"").decode()
            if owner != self.owner and await self._call(
                    self.redis.exists(self.key("replica", owner))):
                continue  # a live replica revokes its own
            if not await self.lease(f"claim:{cid}", REPLICA_TTL_MS):
                continue
            await self._call(self.redis.hset(self.key("cred", cid), "replica", self.owner))

            def s(n: str, h: dict[bytes, bytes] = h) -> str | None:
                v = h.get(n.encode())
                return v.decode() if v is not None else None

            exp = s("expires_at")
            rows.append(CredentialRow(cid, s("secret") or "", s("kind") or "", s("task"),
                                      s("workload"), float(s("issued_at") or 0.0),
                                      float(exp) if exp is not None else None,
                                      s("state") or "live", int(s("attempts") or 0),
                                      s("last_error"), h.get(b"handle", b"")))
        return rows

    async def revoke_lease(self, cred_id: str, ttl_ms: int) -> int:
        """May this replica revoke ``cred_id`` now? 1 yes (leased for ``ttl_ms``), 0 another
        replica is at it, -1 it is no longer stored (revoked elsewhere)."""
        return int(await self._call(self._revoke_lease(
            keys=[self.key("cred", cred_id), self.key("lease", "revoke", cred_id),
                  self.key("done", cred_id)],
            args=[self.owner, ttl_ms])))

    async def lease(self, name: str, ttl_ms: int) -> bool:
        """Take the lease ``name`` for ``ttl_ms`` (SET NX PX): exactly one taker."""
        return bool(await self._call(self._lease(keys=[self.key("lease", name)],
                                                 args=[self.owner, ttl_ms])))

    # -- approvals ----------------------------------------------------------------------
    async def hold(self, hid: str, created: float, view: dict[str, Any], ttl: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        key = self.key("approval", hid)
        pipe.hset(key, mapping={"state": "waiting", "replica": self.owner,
                                "created": repr(created), "view": orjson.dumps(view)})
        pipe.pexpire(key, int((ttl + 3600) * 1000))
        pipe.zadd(self.key("approvals"), {hid: created})
        await self._call(pipe.execute())

    async def answer(self, hid: str, answer: dict[str, Any]) -> int:
        """1: this answer ended the hold; 0: no such hold; -1: it had ended already."""
        event = orjson.dumps({"kind": "answered", "id": hid, "answer": answer})
        return int(await self._call(self._answer(
            keys=[self.key("approval", hid), self.key("approvals"), self.channel],
            args=[orjson.dumps(answer), event, hid])))

    async def approval(self, hid: str) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = await self._call(self.redis.hgetall(self.key("approval",
                                                                                  hid)))
        return found

    async def waiting(self) -> list[dict[bytes, bytes]]:
        ids = await self._call(self.redis.zrange(self.key("approvals"), 0, -1))
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for hid in ids:
            pipe.hgetall(self.key("approval", hid.decode()))
        found = await self._call(pipe.execute())
        gone = [hid for hid, h in zip(ids, found, strict=True) if not h]
        if gone:  # expired holds
            await self._call(self.redis.zrem(self.key("approvals"), *gone))
        held = [h for h in found if h and h.get(b"state") == b"waiting"]
        owners = sorted({h.get(b"replica", b"").decode() for h in held})
        pipe = self.redis.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(self.key("replica", owner))
        alive = {o for o, up in zip(owners, await self._call(pipe.execute()), strict=True)
                 if up}
        # A hold whose replica died can never be released: not listed (it expires).
        return [h for h in held if h.get(b"replica", b"").decode() in alive]

    # -- MCP tool pins ----------------------------------------------------------------
    # One hash, field "<subject>\x1f<server>": read at start by each replica (a change
    # seen or accepted on one reaches another at its next start, see docs/spec.md).
    async def save_pins(self, row: PinRow) -> None:
        doc = orjson.dumps({"pins": row.pins.decode(), "changes": row.changes.decode(),
                            "updated_at": row.updated_at})
        await self._call(self.redis.hset(self.key("pins"), _PIN_SEP.join((row.subject,
                                                                          row.server)), doc))

    async def delete_pins(self, subject: str) -> None:
        fields = [f for f in await self._call(self.redis.hkeys(self.key("pins")))
                  if f.decode().partition(_PIN_SEP)[0] == subject]
        if fields:
            await self._call(self.redis.hdel(self.key("pins"), *fields))

    async def load_pins(self) -> list[PinRow]:
        rows = []
        for field, doc in (await self._call(self.redis.hgetall(self.key("pins")))).items():
            subject, _, server = field.decode().partition(_PIN_SEP)
            d = orjson.loads(doc)
            rows.append(PinRow(subject, server, d["pins"].encode(), d["changes"].encode(),
                               float(d["updated_at"])))
        return rows

    # -- review-page sessions -------------------------------------------------------------
    async def session_put(self, key: str, doc: bytes, ttl: float) -> None:
        await self._call(self.redis.set(self.key("session", key), doc, px=int(ttl * 1000)))

    async def session_get(self, key: str, idle: float) -> bytes | None:
        """The session, its idle clock restarted (``GETEX PX``)."""
        doc: bytes | None = await self._call(self.redis.getex(self.key("session", key),
                                                              px=int(idle * 1000)))
        return doc

    async def session_drop(self, key: str) -> None:
        await self._call(self.redis.delete(self.key("session", key)))
