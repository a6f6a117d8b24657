"""The embedded state store: tasks, their call counters and revocations, in SQLite.

One SQLite file under home (``tasks.db``, mode 0600) in WAL mode. Every
statement runs on one dedicated thread, never on the event loop; callers await
a future that settles once their change is committed.

Durability: task creation, revocation, ending and purging commit with
``synchronous=FULL`` (fsync'd: a revocation survives even a power cut).
Counter updates commit with ``synchronous=NORMAL``: in the WAL before the
call is admitted, so they survive any crash or restart of the gateway
process; only an operating-system crash or power loss can drop the last
few milliseconds of counts (the next FULL commit fsyncs them too). An fsync
per counted call would cost every budgeted call several milliseconds.

Group commit: the thread takes everything queued since its last commit and
runs it as one transaction (each operation inside its own savepoint, so one
failing operation fails alone), then commits once and settles all the
futures. Under load, hundreds of counter increments share one commit and one
fsync; idle, an increment costs one small commit.

Counters are persisted as deltas (``used = used + ?``). The gateway awaits the
increment before it lets a call through, so a call that reached an upstream
was counted on disk; a restart can neither forget it nor count it twice. (A
crash between commit and forwarding leaves a call counted that never went
out: the budget errs on the side of less.)

Several replicas share their state through Redis instead
(:class:`~proxy.store._redis.RedisState`); both implement
:class:`~proxy.store._state.StateStore`.

The store thread never dies silently: a batch that fails is refused (503 for
its callers), logged and counted (``taskgate_background_failures_total``); a
thread that is gone anyway is noticed by the next caller, which gets a 503 at
once while a new thread takes over.

The audit chain's anchor lives in this file too, in a table of its own on its own
connection (proxy/audit/_anchor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import astuple, dataclass
from typing import Any

from proxy.batching import FAILURES, WorkQueue
from proxy.errors import Unavailable

__all__ = ["STORE_FILE", "CredentialRow", "PinRow", "TaskRow", "TaskStore", "store_path"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the tasks' terms column (mode, binding)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id          TEXT PRIMARY KEY,
    workload    TEXT NOT NULL,
    owner       TEXT,
    purpose     TEXT,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    max_calls   INTEGER,
    rules       BLOB NOT NULL,
    kid         TEXT NOT NULL,
    used        INTEGER NOT NULL DEFAULT 0,
    revoked_at  REAL,
    ended       INTEGER NOT NULL DEFAULT 0,
    terms       BLOB
)
"""
_COLUMNS = ("id, workload, owner, purpose, created_at, expires_at, max_calls, rules, kid, "
            "used, revoked_at, ended, terms")
# Credentials the secret broker minted and must revoke (proxy/secrets/revocation.py):
# ``live`` while in use, ``pending`` once due for revocation; the row goes when the
# revocation succeeded or the credential expired. ``handle`` (what revokes it: a lease
# id, a token) is sealed by the broker; the store never sees it in the clear.
_CREDENTIALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS secret_credentials (
    id          TEXT PRIMARY KEY,
    secret      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    task        TEXT,
    workload    TEXT,
    issued_at   REAL NOT NULL,
    expires_at  REAL,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    handle      BLOB NOT NULL
)
"""
_CREDENTIAL_COLUMNS = ("id, secret, kind, task, workload, issued_at, expires_at, state, "
                       "attempts, last_error, handle")

# MCP tool pins (proxy/mcp/_pins.py): per subject (a task, or a workload) and server,
# the pinned definitions and the changes waiting for an admin, as JSON.
_PINS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tool_pins (
    subject     TEXT NOT NULL,
    server      TEXT NOT NULL,
    pins        BLOB NOT NULL,
    changes     BLOB NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (subject, server)
)
"""

Op = Callable[[sqlite3.Connection], Any]


@dataclass(slots=True)
class TaskRow:
    """A task as stored: the rules as canonical JSON, times as epoch seconds."""

    id: str
    workload: str
    owner: str | None
    purpose: str | None
    created_at: float
    expires_at: float
    max_calls: int | None
    rules: bytes
    kid: str
    used: int = 0
    revoked_at: float | None = None
    ended: bool = False
    terms: bytes | None = None  # the task's mode and binding (JSON), None: enforced, unbound


@dataclass(slots=True)
class CredentialRow:
    """A minted credential to revoke, as stored (``handle`` sealed)."""

    id: str
    secret: str
    kind: str
    task: str | None
    workload: str | None
    issued_at: float
    expires_at: float | None
    state: str
    attempts: int
    last_error: str | None
    handle: bytes


@dataclass(slots=True)
class PinRow:
    """The tool pins of one subject on one server (JSON, as proxy/gateway/_pins.py
    writes them)."""

    subject: str
    server: str
    pins: bytes
    changes: bytes
    updated_at: float


class TaskStore:
    """Tasks in SQLite, every statement on the store's own thread."""

    shared = False  # one process: the registry's own memory decides budgets

    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: WorkQueue[tuple[Op, asyncio.Future[Any], bool]] = WorkQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_error: BaseException | None = None
        self._inflight: list[tuple[Op, asyncio.Future[Any], bool]] | None = None
        self.commits = 0
        self.healthy = True
        self._sync = "NORMAL"

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Open (creating) the database; raises :class:`Unavailable` if it cannot."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="taskgate-store", daemon=True)
        self._thread.start()
        await self._submit(lambda c: None)

    async def close(self) -> None:
        """Commit what is queued, then close the database."""
        self._queue.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- operations -----------------------------------------------------------
    async def insert(self, row: TaskRow) -> None:
        await self._submit(lambda c: _insert(c, [astuple(row)]), durable=True)

    async def insert_many(self, rows: Sequence[TaskRow]) -> None:
        await self._submit(lambda c: _insert(c, [astuple(r) for r in rows]), durable=True)

    async def add_used(self, task_id: str, delta: int) -> None:
        """Add ``delta`` to a task's counter; returns once committed."""
        await self._submit(lambda c: _update_one(
            c, "UPDATE tasks SET used = used + ? WHERE id = ?", (delta, task_id)))

    async def revoke(self, task_id: str, at: float) -> None:
        await self._submit(lambda c: _update_one(
            c, "UPDATE tasks SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
            (at, task_id)), durable=True)

    async def mark_ended(self, task_ids: Iterable[str]) -> None:
        ids = [(t,) for t in task_ids]
        await self._submit(lambda c: _many(c, "UPDATE tasks SET ended = 1 WHERE id = ?", ids),
                           durable=True)

    async def delete(self, task_ids: Iterable[str]) -> None:
        ids = [(t,) for t in task_ids]
        await self._submit(lambda c: _many(c, "DELETE FROM tasks WHERE id = ?", ids),
                           durable=True)

    async def load(self) -> list[TaskRow]:
        """Every stored task, oldest first."""
        return [row async for page in self.pages() for row in page]

    async def pages(self, size: int = 5000) -> AsyncIterator[list[TaskRow]]:
        """Every stored task, oldest first, a page at a time (a small peak at start-up)."""
        after = 0
        while True:
            page: list[tuple[int, TaskRow]] = await self._submit(
                functools.partial(_page, after=after, size=size))
            if not page:
                return
            after = page[-1][0]
            yield [row for _, row in page]

    # -- credentials to revoke (the secret broker's) ----------------------------
    async def add_credential(self, row: CredentialRow) -> None:
        await self._submit(lambda c: c.execute(
            f"INSERT INTO secret_credentials ({_CREDENTIAL_COLUMNS}) "  # noqa: S608
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)", astuple(row)), durable=True)

    async def update_credentials(self, changes: Sequence[tuple[str, str, int, str | None]]
                                 ) -> None:
        """``(id, state, attempts, last_error)`` each; a state change is fsync'd."""
        rows = [(state, attempts, error, cid) for cid, state, attempts, error in changes]
        await self._submit(lambda c: _many(
            c, "UPDATE secret_credentials SET state = ?, attempts = ?, last_error = ? "
               "WHERE id = ?", rows), durable=True)

    async def delete_credentials(self, ids: Iterable[str]) -> None:
        rows = [(i,) for i in ids]
        await self._submit(lambda c: _many(c, "DELETE FROM secret_credentials WHERE id = ?",
                                           rows), durable=True)

    async def revoke_lease(self, cred_id: str, ttl_ms: int) -> int:
        """One process holds its credentials alone: always its own to revoke."""
        return 1

    async def load_credentials(self) -> list[CredentialRow]:
        return await self._submit(lambda c: [
            CredentialRow(*r[:10], bytes(r[10]))  # type: ignore[call-arg]  # 10 + handle
            for r in c.execute(
                f"SELECT {_CREDENTIAL_COLUMNS} FROM secret_credentials "  # noqa: S608
                "ORDER BY issued_at")])

    # -- MCP tool pins --------------------------------------------------------------
    async def save_pins(self, row: PinRow) -> None:
        """Replace the pins of ``row``'s subject and server; fsync'd (an admin's accept,
        a detected change, must survive a crash)."""
        await self._submit(lambda c: c.execute(
            "INSERT OR REPLACE INTO tool_pins (subject, server, pins, changes, updated_at) "
            "VALUES (?,?,?,?,?)", astuple(row)), durable=True)

    async def delete_pins(self, subject: str) -> None:
        await self._submit(lambda c: c.execute("DELETE FROM tool_pins WHERE subject = ?",
                                               (subject,)), durable=True)

    async def load_pins(self) -> list[PinRow]:
        return await self._submit(lambda c: [
            PinRow(r[0], r[1], bytes(r[2]), bytes(r[3]), r[4]) for r in c.execute(
                "SELECT subject, server, pins, changes, updated_at FROM tool_pins")])

    # -- the thread -----------------------------------------------------------
    @property
    def alive(self) -> bool:
        """The store thread runs (or was never started, or is closing)."""
        return self._thread is None or self._thread.is_alive() or self._queue.closing

    def _revive(self) -> None:
        """The thread is gone (it never should be; it refused what waited): start anew."""
        log.error("the task store thread stopped; a new one takes over")
        self._thread = threading.Thread(target=self._run, name="taskgate-store", daemon=True)
        self._thread.start()

    async def _submit(self, op: Op, *, durable: bool = False) -> Any:
        """Run ``op`` on the store thread in the next group commit (fsync'd if durable)."""
        if self._loop is None or self._queue.closing:
            raise Unavailable("the task store is not open")
        if not self.alive:
            self._revive()
            raise Unavailable("the task store stopped; the call was refused")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((op, fut, durable))
        return await fut

    def _connect(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: written by a newer taskgate (schema {version})")
        conn.execute(_SCHEMA)
        if version == 1:  # a store from before task terms: the column is added, empty
            conn.execute("ALTER TABLE tasks ADD COLUMN terms BLOB")
        conn.execute(_CREDENTIALS_SCHEMA)
        conn.execute(_PINS_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return conn

    def _run(self) -> None:
        try:
            self._serve()
        finally:  # the thread ends at close only; anything else is a failure
            if not self._queue.closing:
                self._died()

    def _died(self) -> None:
        """On the dying thread: count it, and refuse its batch and what is queued."""
        FAILURES.add("store")
        log.error("the task store thread stopped; waiting calls are refused (the next "
                  "call starts a new thread)")
        self.healthy = False
        waiting, self._inflight = list(self._inflight or ()) + self._queue.drain(), None
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone already
                self._loop.call_soon_threadsafe(
                    _settle, waiting,
                    [Unavailable("the task store stopped; the call was refused")
                     for _ in waiting])

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError, RuntimeError) as e:
            log.error("task store %s cannot be opened: %s", self.path, e)
            self._open_error = e
            self.healthy = False
        while (batch := self._queue.take()) is not None:
            self._inflight = batch
            try:
                results = self._apply(conn, batch)
            except Exception:  # noqa: BLE001 - the thread must outlive any one batch
                FAILURES.add("store")
                log.exception("task store batch failed")
                self.healthy = False
                results = [Unavailable("the task store could not be written")] * len(batch)
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(_settle, batch, results)
            except RuntimeError:  # the loop is gone (interpreter shutting down)
                break
            finally:
                self._inflight = None
        if conn is not None:
            conn.close()

    def _apply(self, conn: sqlite3.Connection | None,
               batch: list[tuple[Op, asyncio.Future[Any], bool]]) -> list[Any]:
        if conn is None:
            return [Unavailable("the task store could not be opened")] * len(batch)
        results: list[Any] = []
        durable = any(d for _, _, d in batch)
        try:
            want = "FULL" if durable else "NORMAL"
            if want != self._sync:
                conn.execute(f"PRAGMA synchronous={want}")
                self._sync = want
            conn.execute("BEGIN IMMEDIATE")
            for op, _, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append(op(conn))
                    conn.execute("RELEASE op")
                except Exception as e:  # noqa: BLE001 - handed to the caller's future
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append(e)
            conn.execute("COMMIT")
            self.commits += 1
            self.healthy = True
        except sqlite3.Error as e:
            FAILURES.add("store")
            log.error("task store commit failed: %s", e)
            self.healthy = False
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("task store rollback failed")
            return [Unavailable("the task store could not be written")] * len(batch)
        return results


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        f"INSERT INTO tasks ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)  # noqa: S608


def _many(conn: sqlite3.Connection, sql: str, params: list[tuple[Any, ...]]) -> None:
    conn.executemany(sql, params)


def _update_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
    if conn.execute(sql, params).rowcount != 1:
        raise LookupError("no such task")


def _page(conn: sqlite3.Connection, after: int, size: int) -> list[tuple[int, TaskRow]]:
    rows = conn.execute(f"SELECT rowid, {_COLUMNS} FROM tasks WHERE rowid > ? "  # noqa: S608
                        "ORDER BY rowid LIMIT ?", (after, size))
    return [(r[0], TaskRow(r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]), r[9], r[10],
                           r[11], bool(r[12]), bytes(r[13]) if r[13] is not None else None))
            for r in rows]


def _settle(batch: list[tuple[Op, asyncio.Future[Any], bool]], results: list[Any]) -> None:
    for (_, fut, _), result in zip(batch, results, strict=True):
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)


# -- the audit chain's anchor ------------------------------------------------------
STORE_FILE = "tasks.db"
def store_path(home: str) -> str:
    """The state store's file under ``home``."""
    return os.path.join(home, STORE_FILE)
