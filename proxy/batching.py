"""Work handed from the event loop to one worker thread, taken in batches.

The audit log and the task store both keep disk I/O off the event loop the same
way: callers queue an item (with a future), one thread takes everything queued
at once, writes it in one go (a group commit), and settles the futures.

Background workers never die silently: :func:`consume` runs a worker's loop so
that a batch that raises is handed to the worker's ``failed`` callback (which
settles that batch's futures with an error) and the loop goes on; every such
failure is logged and counted in :data:`FAILURES`, which ``/metrics`` exports as
``taskgate_background_failures_total{worker=...}``. The worker names are a
fixed set (:data:`WORKERS`), so the label stays bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["FAILURES", "WORKERS", "Failures", "WorkQueue", "consume"]

log = logging.getLogger(__name__)

# Every background thread or task of the gateway, by the name /metrics labels it with.
WORKERS = ("audit", "audit-head", "store", "sweeper")


class Failures:
    """How often each background worker failed (thread-safe; read at scrape time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(WORKERS, 0)

    def add(self, worker: str) -> None:
        if worker not in self._counts:
            raise ValueError(f"unknown background worker {worker!r}")
        with self._lock:
            self._counts[worker] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


FAILURES = Failures()


class WorkQueue[T]:
    """A closable queue whose consumer takes all waiting items at once.

    Built on :class:`queue.SimpleQueue` (C): a put and the consumer's wake-up cost no
    Python-level lock dance (``threading.Condition`` was a measurable part of every
    audited call: bench/README.md). Each put is one entry (a list of items);
    ``None`` marks the close and stays queued once seen, so every later ``take``
    sees it too."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[list[T] | None] = queue.SimpleQueue()
        self.closing = False

    def put(self, item: T) -> None:
        self._q.put([item])

    def put_all(self, items: list[T]) -> None:
        """Queue ``items`` with one wake-up of the consumer."""
        if items:
            self._q.put(list(items))

    def close(self) -> None:
        """No more items; the consumer drains what is queued, then ``take`` gives None."""
        self.closing = True
        self._q.put(None)

    def take(self, timeout: float | None = None) -> list[T] | None:
        """Block until items wait (all of them), or ``None`` once closed and drained;
        with ``timeout``, an empty list when nothing came in that many seconds."""
        try:
            if timeout is not None and timeout <= 0:
                first = self._q.get_nowait()
            else:
                first = self._q.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = self._gather(first)
        if batch:
            return batch
        return None if self.closing else []

    def _gather(self, first: list[T] | None) -> list[T]:
        """``first`` and every entry queued after it, as one list; the close mark, if
        seen, is put back (after whatever is still queued behind it: nothing is)."""
        closed = first is None
        batch = [] if first is None else first
        while True:
            try:
                more = self._q.get_nowait()
            except queue.Empty:
                break
            if more is None:
                closed = True
            else:
                batch.extend(more)
        if closed:
            self._q.put(None)
        return batch

    def drain(self) -> list[T]:
        """Everything queued, taken without waiting (to fail it when the consumer is gone)."""
        try:
            first = self._q.get_nowait()
        except queue.Empty:
            return []
        return self._gather(first)

    def empty(self) -> bool:
        """No item waits (once closed, the close mark is the one entry left)."""
        return self._q.qsize() <= (1 if self.closing else 0)


def consume[T](worker: str, queue: WorkQueue[T], handle: Callable[[list[T]], None],
               failed: Callable[[list[T], BaseException], None],
               idle: Callable[[], float | None] | None = None) -> None:
    """A worker thread's loop: ``handle`` each batch until the queue is closed and drained.

    A batch whose ``handle`` raises is logged, counted, and given to ``failed``
    (which must settle its futures with an error); the loop goes on with the
    next batch. ``failed`` raising too is logged and counted, never fatal.
    ``idle`` (work left over from the batches, such as the audit head) runs before
    each wait and says how long the queue may stay quiet before it runs again
    (``None``: until the next batch); its exceptions are logged and counted too.
    """
    while True:
        timeout = None
        if idle is not None:
            try:
                timeout = idle()
            except Exception:  # noqa: BLE001 - the worker outlives its own bugs
                FAILURES.add(worker)
                log.exception("background worker %s failed between batches; it goes on",
                              worker)
        batch = queue.take(timeout)
        if batch is None:
            return
        if not batch:
            continue
        try:
            handle(batch)
        except Exception as e:  # noqa: BLE001 - the worker outlives any one batch
            FAILURES.add(worker)
            log.exception("background worker %s failed on a batch of %d; it goes on",
                          worker, len(batch))
            try:
                failed(batch, e)
            except Exception:  # noqa: BLE001
                FAILURES.add(worker)
                log.exception("background worker %s could not report its failure", worker)
