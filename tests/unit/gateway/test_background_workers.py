"""Issue 17.1, every other background worker: none dies silently.

The batching loop every worker thread runs, the task store's thread, the
expiry sweeper, the audit head/anchor writer: each failure is logged, counted
(``taskgate_background_failures_total{worker}``), survived or restarted, and
``/readyz`` says not ready while it lasts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.audit import AuditAnchor, AuditLog, new_record, verify
from proxy.batching import FAILURES, WORKERS, Failures, WorkQueue, consume
from proxy.control._app import readyz
from proxy.control._keys import SERVICES, STATE, ControlState
from proxy.errors import Unavailable
from proxy.store import TaskRow, TaskStore
from proxy.tasks import _registry as grants
from tests.unit.tasks.test_grants import open_registry


# -- the loop every worker thread runs ------------------------------------------------
def run_consumer(handle: Any, failed: Any, items: list[Any]) -> list[Any]:
    queue: WorkQueue[Any] = WorkQueue()
    for item in items:
        queue.put(item)
    queue.close()
    consume("store", queue, handle, failed)
    return items


@pytest.mark.parametrize("error", [RuntimeError("x"), ValueError("y"), KeyError("z"),
                                   UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates")])
def test_a_failing_batch_is_handed_over_counted_and_the_loop_goes_on(
        error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []
    failed: list[tuple[list[Any], BaseException]] = []

    def handle(batch: list[Any]) -> None:
        if "bad" in batch:
            raise error
        seen.extend(batch)

    before = FAILURES.counts()["store"]
    queue: WorkQueue[Any] = WorkQueue()
    thread = threading.Thread(target=consume, args=("store", queue, handle,
                                                    lambda b, e: failed.append((b, e))))
    thread.start()
    for item in ("a", "bad", "c"):
        queue.put(item)
        deadline = time.monotonic() + 5
        while not queue.empty() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.02)
    queue.close()
    thread.join(5)
    assert not thread.is_alive()
    assert seen == ["a", "c"]
    assert failed == [(["bad"], error)]
    assert FAILURES.counts()["store"] == before + 1
    assert "background worker store failed" in caplog.text


def test_a_failing_failure_handler_is_survived_too() -> None:
    before = FAILURES.counts()["store"]

    def failed(batch: list[Any], error: BaseException) -> None:
        raise OSError("the loop is gone")

    def handle(batch: list[Any]) -> None:
        raise ValueError("bad batch")

    run_consumer(handle, failed, ["a"])
    assert FAILURES.counts()["store"] == before + 2


def test_failure_counts_take_only_known_workers() -> None:
    counts = Failures()
    assert counts.counts() == dict.fromkeys(WORKERS, 0)
    counts.add("sweeper")
    assert counts.counts()["sweeper"] == 1
    with pytest.raises(ValueError, match="unknown background worker"):
        counts.add("a label an agent chose")


def test_drain_takes_what_waits_without_blocking() -> None:
    queue: WorkQueue[int] = WorkQueue()
    assert queue.drain() == []
    queue.put(1)
    queue.put(2)
    assert queue.drain() == [1, 2] and queue.empty()


# -- the task store's thread -------------------------------------------------------------
def row(task_id: str) -> TaskRow:
    return TaskRow(task_id, "wl", "o", None, 1.0, 2e9, 10, b"[]", "k1")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_dead_store_thread_refuses_at_once_and_is_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    await store.insert(row("a"))
    real = store._apply
    calls = {"n": 0}

    def die_once(conn: Any, batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemExit  # gets past the thread's own handler
        return real(conn, batch)

    monkeypatch.setattr(store, "_apply", die_once)
    before = FAILURES.counts()["store"]
    with pytest.raises(Unavailable, match="task store stopped"):  # its batch: refused
        await asyncio.wait_for(store.add_used("a", 1), 5)
    assert store._thread is not None
    await asyncio.to_thread(store._thread.join, 5)
    assert not store.alive and not store.healthy
    assert FAILURES.counts()["store"] == before + 1
    started = time.monotonic()
    with pytest.raises(Unavailable, match="task store stopped"):
        await store.add_used("a", 1)  # refused at once; a new thread takes over
    assert time.monotonic() - started < 0.1
    assert store.alive
    await asyncio.wait_for(store.add_used("a", 5), 5)
    assert store.healthy
    (stored,) = await store.load()
    await store.close()
    assert stored.used == 5


async def test_store_failures_are_counted(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    before = FAILURES.counts()["store"]

    def broken(conn: Any) -> None:
        conn.execute("COMMIT")  # ends the group's transaction: the commit then fails

    with pytest.raises(Unavailable):
        await store._submit(broken)
    assert FAILURES.counts()["store"] == before + 1 and not store.healthy
    await store.insert(row("b"))
    assert store.healthy
    await store.close()


# -- the expiry sweeper ------------------------------------------------------------
async def until(condition: Any) -> None:
    async with asyncio.timeout(5):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def test_failing_sweeps_are_counted_and_not_ready_until_one_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grants, "SWEEP_SECONDS", 0.02)
    reg = await open_registry(tmp_path)
    state = {"fail": True}
    real = reg.sweep

    async def sweep(now: float | None = None) -> None:
        if state["fail"]:
            raise RuntimeError("the store said no")
        await real(now)

    monkeypatch.setattr(reg, "sweep", sweep)
    before = FAILURES.counts()["sweeper"]
    reg.start_sweeper()
    await until(lambda: FAILURES.counts()["sweeper"] >= before + 2)
    assert not reg.sweeper_ok
    state["fail"] = False
    await until(lambda: reg.sweeper_ok)
    await reg.close()
    assert not reg.sweeper_ok


class Escape(BaseException):
    """Raised past ``except Exception`` (asyncio re-raises SystemExit out of the loop)."""


@pytest.mark.parametrize("ending", ["cancelled", "raised"])
async def test_sweeper_that_ends_is_counted_and_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(grants, "SWEEP_SECONDS", 0.02)
    reg = await open_registry(tmp_path)

    async def gone(now: float | None = None) -> None:
        raise Escape  # not an Exception: past the sweeper's own handler

    reg.start_sweeper()
    first = reg._sweeper
    assert first is not None
    before = FAILURES.counts()["sweeper"]
    if ending == "cancelled":
        first.cancel()
    else:
        monkeypatch.setattr(reg, "sweep", gone)
    await until(lambda: reg._sweeper is not first and FAILURES.counts()["sweeper"] > before)
    monkeypatch.undo()
    assert FAILURES.counts()["sweeper"] == before + 1
    assert "the task sweeper stopped" in caplog.text
    assert reg._sweeper is not None and not reg._sweeper.done()
    await reg.close()


# -- the audit head and anchor -----------------------------------------------------
async def test_head_and_anchor_failures_are_counted_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.head").mkdir()  # the head cannot replace a folder
    (tmp_path / "store").mkdir()
    log = AuditLog(str(path), anchor=AuditAnchor(str(tmp_path / "store")))  # a folder too
    await log.start()
    before = FAILURES.counts()["audit-head"]
    with caplog.at_level(logging.ERROR, logger="proxy.audit._log"):
        for i in range(3):
            await asyncio.wait_for(log.write(new_record(request_id=f"r{i}")), 5)
            await asyncio.sleep(0.12)  # past HEAD_LAG_SECONDS: each batch tries the head
    assert log.healthy  # records go in; the end is not recorded, and that is reported
    assert FAILURES.counts()["audit-head"] >= before + 3
    assert caplog.text.count("audit chain end could not be recorded") == 1  # once a streak
    await log.close()
    assert verify(str(path)).records == 3


# -- /readyz ---------------------------------------------------------------------------
@pytest.mark.parametrize(("audit_ok", "store", "sweeper", "ready"), [
    (True, (True, True), True, True),
    (False, (True, True), True, False),
    (True, (False, True), True, False),
    (True, (True, False), True, False),
    (True, (True, True), False, False),
])
async def test_readyz_checks_every_worker(audit_ok: bool, store: tuple[bool, bool],
                                          sweeper: bool, ready: bool) -> None:
    tasks = SimpleNamespace(store=SimpleNamespace(healthy=store[0], alive=store[1]),
                            sweeper_ok=sweeper)
    app = web.Application()
    app[SERVICES] = SimpleNamespace(audit=SimpleNamespace(healthy=audit_ok),  # type: ignore
                                    tasks=tasks)
    app[STATE] = ControlState(admin_token="t", proxy_listening=True)
    app.router.add_get("/readyz", readyz)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/readyz")
        body = await r.json()
    assert r.status == (200 if ready else 503)
    assert body["status"] == ("ready" if ready else "not ready")
    assert body["checks"] == {"proxy": True, "audit": audit_ok, "store": all(store),
                              "sweeper": sweeper}
