"""proxy/batching.py: one consumer takes everything queued at once; close drains first."""

from __future__ import annotations

import threading

from proxy.batching import WorkQueue


def test_take_returns_all_waiting_items_at_once() -> None:
    q: WorkQueue[int] = WorkQueue()
    for i in range(5):
        q.put(i)
    assert not q.empty()
    assert q.take() == [0, 1, 2, 3, 4]
    assert q.empty()


def test_close_drains_what_is_queued_then_ends() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.put("last")
    q.close()
    assert q.closing
    assert q.take() == ["last"]
    assert q.take() is None


def test_a_blocked_consumer_wakes_for_an_item_and_for_close() -> None:
    q: WorkQueue[int] = WorkQueue()
    seen: list[list[int] | None] = []
    t = threading.Thread(target=lambda: seen.extend([q.take(), q.take()]))
    t.start()
    q.put(7)
    q.close()
    t.join(5)
    assert not t.is_alive()
    assert seen[0] == [7] and seen[-1] is None
