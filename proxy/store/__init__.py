"""Task-scoped state: the interface (:class:`StateStore`), the embedded SQLite store
under home (:class:`TaskStore`, the default: tasks, their counters and revocations,
credentials to revoke, MCP tool pins) and the shared Redis one (:class:`RedisState`,
for several workers and replicas).
"""

from __future__ import annotations

from proxy.store._redis import (
    BOUND_SECONDS,
    EXPIRED,
    REVOKED,
    SPENT,
    UNKNOWN,
    RedisState,
    redis_password,
)
from proxy.store._state import StateStore
from proxy.store._store import CredentialRow, PinRow, TaskRow, TaskStore, store_path

__all__ = [
    "BOUND_SECONDS",
    "EXPIRED",
    "REVOKED",
    "SPENT",
    "UNKNOWN",
    "CredentialRow",
    "RedisState",
    "StateStore",
    "PinRow",
    "TaskRow",
    "TaskStore",
    "redis_password",
    "store_path",
]
