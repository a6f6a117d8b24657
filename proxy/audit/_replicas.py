"""Which process writes which audit log: one hash-chained log per process.

Several processes never share a chain (each would have to read the others' last
hash before every write). So every process — a gateway, the control process of a
host running workers, each worker — writes a log of its own, named after it, in
``audit.path``'s folder:

==============================  =========================  ===========================
process                         ``replica`` in its records  its log (``audit.path`` =
                                                            ``/a/audit.jsonl``)
==============================  =========================  ===========================
one process, no ``replica_id``  ``<hostname>-<pid>``        ``/a/audit.jsonl``
one process, ``replica_id: gw``  ``gw``                      ``/a/audit-gw.jsonl``
worker 2, no ``replica_id``     ``<hostname>-<pid>/w2``     ``/a/audit-w2.jsonl``
worker 2, ``replica_id: gw``     ``gw/w2``                   ``/a/audit-gw-w2.jsonl``
==============================  =========================  ===========================

(``<pid>`` is the control process's: its workers share the replica's name.) A
generated name never goes into a file name — it changes with every start, and the
chain goes on across restarts in the same file.

Readers merge several logs by time (:func:`merged`); each log's chain is verified
on its own.
"""

from __future__ import annotations

import heapq
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.audit._log import log_files
from proxy.audit._query import AuditFilter, Page, query
from proxy.audit._reader import BadLine, read_record

__all__ = ["Cursor", "LogsPage", "Replica", "anchor_log", "host_logs", "log_replica",
           "log_tail", "logs_in", "merged", "query_logs"]

_ROTATED = re.compile(r"(.+)\.([0-9]+)")


@dataclass(frozen=True, slots=True)
class Replica:
    """Who this process is in the audit records: a replica's name and, in a worker,
    its number (1…N)."""

    name: str
    worker: int | None = None
    named: bool = False  # the name was configured (replica_id): it goes in the file name

    @classmethod
    def of(cls, replica_id: str | None, worker: int | None = None,
           pid: int | None = None) -> Replica:
        """``replica_id`` if configured, else ``<hostname>-<pid>`` (``pid``: the control
        process's, for a worker)."""
        if replica_id:
            return cls(replica_id, worker, named=True)
        return cls(f"{socket.gethostname()}-{pid or os.getpid()}", worker)

    @property
    def label(self) -> str:
        """The ``replica`` field of this process's records."""
        return self.name if self.worker is None else f"{self.name}/w{self.worker}"

    def log_path(self, audit_path: str) -> str:
        """This process's log: ``audit.path`` with the configured name and the worker
        number added before the extension (unchanged for one unnamed process)."""
        parts = ([self.name] if self.named else []) + (
            [f"w{self.worker}"] if self.worker is not None else [])
        if not parts:
            return audit_path
        stem, ext = os.path.splitext(audit_path)
        return f"{stem}-{'-'.join(parts)}{ext}"


def anchor_log(audit_path: str, log: str) -> str | None:
    """The state store's anchor row of ``log``: ``None`` (the single row) for
    ``audit.path`` itself, else the log's file name."""
    return None if os.path.abspath(log) == os.path.abspath(audit_path) else \
        os.path.basename(log)


def _is_log(name: str, names: set[str]) -> bool:
    if name.endswith((".head", ".tmp")):
        return False
    m = _ROTATED.fullmatch(name)
    return not (m and m.group(1) in names)  # <log>.<n> is a rotated part of <log>


def host_logs(audit_path: str) -> list[str]:
    """Every process's log on this host: ``audit.path`` and its ``<stem>-…<ext>``
    siblings (current files; each one's rotated files come with :func:`log_files`)."""
    folder = os.path.dirname(audit_path) or "."
    stem, ext = os.path.splitext(os.path.basename(audit_path))
    try:
        names = set(os.listdir(folder))
    except FileNotFoundError:
        return []
    sibling = re.compile(re.escape(stem) + r"-[A-Za-z0-9._-]+" + re.escape(ext))
    found = sorted(n for n in names if (n == os.path.basename(audit_path) or sibling.fullmatch(n))
                   and _is_log(n, names))
    return [os.path.join(os.path.dirname(audit_path), n) for n in found]


def logs_in(paths: Iterable[str]) -> list[str]:
    """The logs that command-line paths name: a file is one log (its rotated files
    come with it); a folder holds one per ``*.jsonl`` file."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            names = set(os.listdir(path))
            out.extend(os.path.join(path, n) for n in sorted(names)
                       if n.endswith(".jsonl") and _is_log(n, names))
        else:
            out.append(path)
    return out


def log_tail(path: str) -> tuple[str | None, int]:
    """The ``replica`` and ``seq`` of the newest record in the log at ``path``
    (``(None, 0)``: none)."""
    for file in reversed(log_files(path)):
        try:
            with open(file, "rb") as f:
                f.seek(max(0, os.path.getsize(file) - 64 * 1024))
                lines = f.read().split(b"\n")
        except OSError:
            continue
        for line in reversed(lines):
            try:
                rec = read_record(line)
            except BadLine:
                continue
            rid = rec.get("replica")
            return (rid if isinstance(rid, str) else None), rec["seq"]
    return None, 0


def log_replica(path: str) -> str | None:
    """The ``replica`` of the newest record in the log at ``path`` (``None``: none)."""
    return log_tail(path)[0]


def _ts(rec: dict[str, Any]) -> str:
    ts = rec.get("ts")
    return ts if isinstance(ts, str) else ""


def merged(streams: Iterable[Iterator[dict[str, Any]]], *, newest_first: bool = False
           ) -> Iterator[dict[str, Any]]:
    """Records of several logs (each in its own order) as one stream ordered by ``ts``
    (RFC 3339 UTC with milliseconds: text order is time order)."""
    return heapq.merge(*streams, key=_ts, reverse=newest_first)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where paging stands in each of several logs: ``seq`` by the log's file name
    (``audit-gw-w1.jsonl:12,audit-gw-w2.jsonl:40``); ``default`` for a log not named
    (a plain number: the same ``seq`` in every log)."""

    at: Mapping[str, int] = field(default_factory=dict)
    default: int | None = None

    @classmethod
    def parse(cls, text: str, default: int | None) -> Cursor:
        """A plain ``seq``, or ``name:seq`` pairs joined by commas; ``ValueError``."""
        if text.isdigit():
            return cls({}, int(text))
        at: dict[str, int] = {}
        for part in text.split(","):
            name, sep, seq = part.rpartition(":")
            if not sep or not name or not seq.isdigit() or name in at:
                raise ValueError(f"{text[:80]!r} is not a cursor: a seq, or log:seq pairs "
                                 "separated by commas")
            at[name] = int(seq)
        return cls(at, default)

    def of(self, log: str) -> int | None:
        return self.at.get(os.path.basename(log), self.default)

    def __str__(self) -> str:
        return ",".join(f"{name}:{seq}" for name, seq in sorted(self.at.items()))


@dataclass(frozen=True, slots=True)
class LogsPage:
    """A page merged from several logs: ``next`` pages on (``None``: no more), ``tail``
    is where a live tail goes on from (after the newest record returned, or the end of
    every log for a newest-first page)."""

    records: list[dict[str, Any]]
    next: Cursor | None
    tail: Cursor


def query_logs(logs: list[str], flt: AuditFilter, *, limit: int = 100,
               after: Cursor | None = None, before: Cursor | None = None) -> LogsPage:
    """Matching records of several logs merged by time: with ``after`` the oldest ones
    past each log's position, ascending; else the newest ones (below each log's
    ``before`` position), newest first. Each log is read as :func:`query` reads one."""
    names = [os.path.basename(log) for log in logs]
    ascending = after is not None
    pages: list[Page | None] = []
    for log in logs:
        if ascending:
            assert after is not None
            pages.append(query(log, flt, limit=limit, after=after.of(log) or 0))
        else:
            bound = before.of(log) if before is not None else None
            pages.append(query(log, flt, limit=limit, before=bound)
                         if bound is None or bound > 0 else None)
    streams = [iter([(name, r) for r in page.records]) for name, page in
               zip(names, pages, strict=True) if page is not None]
    taken = list(heapq.merge(*streams, key=lambda nr: _ts(nr[1]), reverse=not ascending))
    more = len(taken) > limit or any(
        p is not None and (p.next_after is not None or p.next_before is not None)
        for p in pages)
    taken = taken[:limit]
    where: dict[str, int] = {}
    start = after if ascending else before
    for log, name in zip(logs, names, strict=True):
        pos = start.of(log) if start is not None else None
        if pos is not None:
            where[name] = pos
    for name, rec in taken:  # ascending: the newest taken; descending: the oldest taken
        where[name] = rec["seq"]
    nxt = Cursor(dict(where), None if not ascending else 0) if more else None
    if ascending:
        tail = Cursor({**{n: 0 for n in names}, **where}, 0)
    else:
        tail = Cursor({os.path.basename(log): log_tail(log)[1] for log in logs}, 0)
    return LogsPage([rec for _, rec in taken], nxt, tail)
