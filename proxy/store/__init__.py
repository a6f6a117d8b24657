"""The embedded state store (SQLite under home): tasks, their counters and revocations,
credentials to revoke.
"""

from __future__ import annotations

from proxy.store._store import CredentialRow, TaskRow, TaskStore, store_path

__all__ = [
    "CredentialRow",
    "TaskRow",
    "TaskStore",
    "store_path",
]
