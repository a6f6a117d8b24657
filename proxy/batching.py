"""Work handed from the event loop to one worker thread, taken in batches.

The audit log and the task store both keep disk I/O off the event loop the same
way: callers queue an item (with a future), one thread takes everything queued
at once, writes it in one go (a group commit), and settles the futures.
"""

from __future__ import annotations

import threading

__all__ = ["WorkQueue"]

class WorkQueue[T]:
    """A closable queue whose consumer takes all waiting items at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[T] = []
        self.closing = False

    def put(self, item: T) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()

    def close(self) -> None:
        """No more items; the consumer drains what is queued, then ``take`` gives None."""
        with self._cond:
            self.closing = True
            self._cond.notify()

    def take(self) -> list[T] | None:
        """Block until items wait (all of them), or ``None`` once closed and drained."""
        with self._cond:
            while not self._items and not self.closing:
                self._cond.wait()
            batch, self._items = self._items, []
        return batch or None

    def empty(self) -> bool:
        with self._cond:
            return not self._items
