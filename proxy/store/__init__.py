"""The embedded state store (SQLite under home): tasks, their counters and revocations,
credentials to revoke, MCP tool pins.
"""

from __future__ import annotations

from proxy.store._store import CredentialRow, PinRow, TaskRow, TaskStore, store_path

__all__ = [
    "CredentialRow",
    "PinRow",
    "TaskRow",
    "TaskStore",
    "store_path",
]
