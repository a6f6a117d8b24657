"""The state interface: what every backend of task-scoped state offers.

Two implementations: :class:`~proxy.store._store.TaskStore` (SQLite under home, one
process; the embedded default) and :class:`~proxy.store._redis.RedisState` (Redis,
shared by every worker and replica). The task registry keeps a copy of the tasks in
memory either way; with a *shared* backend (``shared`` true) it also takes budgets
from the backend atomically, follows its events (revocations, new tasks, key
rotations, answered approvals) and refuses calls while the backend is not ``healthy``
(the copy could be older than the revocation bound).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the rows are defined with the SQLite store (no cycle at run time)
    from proxy.store._store import CredentialRow, TaskRow

__all__ = ["StateStore"]


class StateStore(Protocol):
    """Tasks, their counters and revocations, and minted credentials to revoke."""

    shared: bool  # several processes see the same state (budgets taken atomically there)

    @property
    def healthy(self) -> bool:
        """The last write went through (SQLite) / the state is fresh (Redis): ``/readyz``."""
        ...

    @property
    def alive(self) -> bool:
        """The backend's worker (store thread, Redis watcher) runs."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def insert(self, row: TaskRow) -> None: ...
    async def insert_many(self, rows: Sequence[TaskRow]) -> None: ...
    async def add_used(self, task_id: str, delta: int) -> None: ...
    async def revoke(self, task_id: str, at: float) -> None: ...
    async def mark_ended(self, task_ids: Iterable[str]) -> None: ...
    async def delete(self, task_ids: Iterable[str]) -> None: ...
    async def load(self) -> list[TaskRow]: ...
    def pages(self, size: int = 5000) -> AsyncIterator[list[TaskRow]]: ...

    async def add_credential(self, row: CredentialRow) -> None: ...
    async def update_credentials(self, changes: Sequence[tuple[str, str, int, str | None]]
                                 ) -> None: ...
    async def delete_credentials(self, ids: Iterable[str]) -> None: ...
    async def load_credentials(self) -> list[CredentialRow]:
        """What this process should take over (SQLite: all; Redis: no live replica's)."""
        ...

    async def revoke_lease(self, cred_id: str, ttl_ms: int) -> int:
        """1: revoke it now; 0: another replica is revoking it; -1: revoked elsewhere."""
        ...
