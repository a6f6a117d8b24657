"""The SQLite task store: persistence, group commit, isolation of failing operations."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import Unavailable
from proxy.store import TaskRow, TaskStore


def row(task_id: str, **kw: object) -> TaskRow:
    base: dict[str, object] = dict(id=task_id, workload="wl", owner="o", purpose=None,
                                   created_at=1.0, expires_at=2e9, max_calls=10,
                                   rules=b'[{"id":"r"}]', kid="k1")
    base.update(kw)
    return TaskRow(**base)  # type: ignore[arg-type]


async def test_tasks_counters_and_revocations_survive_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "home" / "tasks.db")
    store = TaskStore(path)
    await store.start()
    assert await store.load() == []
    await store.insert(row("a"))
    await store.insert(row("b", max_calls=None, purpose="p"))
    await asyncio.gather(*(store.add_used("a", 1) for _ in range(37)))
    await store.add_used("a", -2)
    await store.revoke("b", 123.5)
    await store.revoke("b", 999.0)  # the first revocation time stays
    await store.mark_ended(["b"])
    await store.close()

    again = TaskStore(path)
    await again.start()
    rows = {r.id: r for r in await again.load()}
    await again.close()
    assert rows["a"].used == 35 and rows["a"].revoked_at is None and not rows["a"].ended
    assert rows["b"].revoked_at == 123.5 and rows["b"].ended and rows["b"].purpose == "p"
    assert rows["b"].max_calls is None and rows["a"].rules == b'[{"id":"r"}]'


async def test_database_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    store = TaskStore(str(path))
    await store.start()
    await store.insert(row("a"))
    await store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_concurrent_increments_share_commits(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    await store.insert(row("a"))
    before = store.commits
    await asyncio.gather(*(store.add_used("a", 1) for _ in range(300)))
    commits = store.commits - before
    rows = await store.load()
    await store.close()
    assert rows[0].used == 300
    assert commits < 100, f"{commits} commits for 300 increments: no group commit"


async def test_a_failing_operation_fails_alone(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    await store.insert(row("a"))
    results = await asyncio.gather(store.add_used("a", 1), store.add_used("missing", 1),
                                   store.insert(row("a")), store.add_used("a", 1),
                                   return_exceptions=True)
    rows = await store.load()
    await store.close()
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], LookupError)
    assert isinstance(results[2], sqlite3.IntegrityError)
    assert rows[0].used == 2


async def test_statements_run_off_the_event_loop(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    seen: list[str] = []

    def op(conn: sqlite3.Connection) -> None:
        seen.append(threading.current_thread().name)

    await store._submit(op)
    await store.close()
    assert seen == ["taskgate-store"]


async def test_pages_come_oldest_first(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    await store.insert_many([row(f"t{i:03}") for i in range(25)])
    pages = [[r.id for r in page] async for page in store.pages(size=10)]
    await store.close()
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sum(pages, []) == [f"t{i:03}" for i in range(25)]


async def test_delete(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    await store.insert_many([row("a"), row("b"), row("c")])
    await store.delete(["a", "c"])
    ids = [r.id for r in await store.load()]
    await store.close()
    assert ids == ["b"]


async def test_unopenable_store_fails_closed(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = TaskStore(str(blocker / "tasks.db"))
    with pytest.raises(Unavailable):
        await store.start()
    assert not store.healthy
    await store.close()
    with pytest.raises(Unavailable):
        await store.add_used("a", 1)


async def test_revocations_are_fsynced_counters_are_not(tmp_path: Path) -> None:
    """Creation, revocation, ending and purge commit with synchronous=FULL; counters NORMAL."""
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    flags: list[bool] = []
    submit = store._submit

    async def spy(op: Any, *, durable: bool = False) -> Any:
        flags.append(durable)
        return await submit(op, durable=durable)

    store._submit = spy  # type: ignore[method-assign]
    await store.insert(row("a"))
    await store.add_used("a", 1)
    await store.revoke("a", 1.0)
    await store.mark_ended(["a"])
    await store.delete(["a"])
    assert flags == [True, False, True, True, True]
    modes: list[int] = []

    def mode(conn: sqlite3.Connection) -> None:
        modes.append(conn.execute("PRAGMA synchronous").fetchone()[0])

    await submit(mode, durable=True)
    await submit(mode)
    await store.close()
    assert modes == [2, 1]  # 2 = FULL, 1 = NORMAL
