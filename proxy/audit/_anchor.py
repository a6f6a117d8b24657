"""Where the audit chain ends, kept in the state store's file (table ``audit_anchor``;
``audit_anchors``, one row per log, for the logs of named replicas and workers).

The audit writer keeps the last ``seq`` and ``hash`` of its chain here too, on its
own connection, so that a log rolled back together with its ``.head`` file still
shows records cut from its end (``taskgate audit verify``).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from proxy.audit._head import Head

__all__ = ["AuditAnchor"]

_ANCHOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_anchor (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    seq         INTEGER NOT NULL,
    hash        TEXT NOT NULL,
    mac         TEXT,
    updated_at  REAL NOT NULL
)
"""
_ADVANCE = """
INSERT INTO audit_anchor (id, seq, hash, mac, updated_at) VALUES (1, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,
    mac = excluded.mac, updated_at = excluded.updated_at
WHERE ? OR excluded.seq >= audit_anchor.seq
"""
# One row per log, by the log's file name, for processes that are not the one unnamed
# gateway (proxy/audit/_replicas.py): each chain has its own end.
_ANCHORS_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_anchors (
    log         TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    hash        TEXT NOT NULL,
    mac         TEXT,
    updated_at  REAL NOT NULL
)
"""
_ADVANCE_LOG = """
INSERT INTO audit_anchors (log, seq, hash, mac, updated_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (log) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,
    mac = excluded.mac, updated_at = excluded.updated_at
WHERE ? OR excluded.seq >= audit_anchors.seq
"""



class AuditAnchor:
    """Where the audit chain ends, in the state store: one row that only moves forward.

    Its own connection (callable from any one thread at a time: the audit writer
    thread, or ``audit verify``), beside the task store's. ``readonly`` never
    creates the file or the table (``audit verify``). ``log``: the log's file name,
    for a log of its own row (``None``: the one gateway's log, the single row).
    """

    def __init__(self, path: str, *, readonly: bool = False, log: str | None = None) -> None:
        self.path = path
        self.log = log
        self._readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is not None:
            return self._conn
        if self._readonly:
            if not os.path.exists(self.path):
                return None
            uri = f"file:{os.path.abspath(self.path)}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=2000")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700,
                        exist_ok=True)
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=2000")  # the audit writer waits no longer
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_ANCHOR_SCHEMA if self.log is None else _ANCHORS_SCHEMA)
        self._conn = conn
        return conn

    def read(self) -> tuple[Head, str | None] | None:
        """The stored end and its MAC; ``None`` when there is none (no store, no row).

        Raises ``ValueError`` when the row is not an anchor, ``sqlite3.Error`` when
        the store cannot be read.
        """
        with self._lock:
            conn = self._connection()
            if conn is None:
                return None
            try:
                row = (conn.execute("SELECT seq, hash, mac FROM audit_anchor WHERE id = 1")
                       if self.log is None else
                       conn.execute("SELECT seq, hash, mac FROM audit_anchors WHERE log = ?",
                                    (self.log,))).fetchone()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    return None
                raise
        if row is None:
            return None
        seq, digest, mac = row
        if type(seq) is not int or seq < 0 or not isinstance(digest, str) or not (
                mac is None or isinstance(mac, str)):
            raise ValueError(f"{self.path}: the audit anchor is not a chain end")
        return Head(seq, digest), mac

    def advance(self, seq: int, digest: str, mac: str | None, *, sync: bool = False,
                force: bool = False) -> None:
        """Store the chain's end, unless a later one is stored (``force``: anyway);
        ``sync``: flushed to the disk before this returns."""
        with self._lock:
            conn = self._connection()
            assert conn is not None and not self._readonly
            if sync:
                conn.execute("PRAGMA synchronous=FULL")
            try:
                if self.log is None:
                    conn.execute(_ADVANCE, (seq, digest, mac, time.time(), int(force)))
                else:
                    conn.execute(_ADVANCE_LOG, (self.log, seq, digest, mac, time.time(),
                                                int(force)))
            finally:
                if sync:
                    conn.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
