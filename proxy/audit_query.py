"""Read the audit log back: one filter for ``taskgate logs`` and ``GET /v1/audit``.

Reads the files directly (rotated ones too), so it works while the gateway is
down. Plain blocking file I/O: the control plane runs it in a thread. Lines
that are not whole records (a torn write, a line being written right now) are
skipped here; ``taskgate audit verify`` is where damage is reported.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from .audit import DECISIONS, log_files, rfc3339, rotated_files
from .hosts import canonical_host

__all__ = ["FILTER_KEYS", "AuditFilter", "Page", "follow", "parse_time", "query", "records"]

FILTER_KEYS = ("task", "workload", "decision", "host", "tool", "since", "until")
_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, now: datetime | None = None) -> str:
    """RFC 3339 (``2026-11-28T12:00:00Z``, an offset, or a date) or an age (``15m``,
    ``2h``, ``7d``) → the log's own timestamp format, so bounds compare as strings."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if m:
        ago = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        return rfc3339(((now or datetime.now(UTC)) - ago).timestamp())
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time; use RFC 3339 "
                         "(2026-11-28T12:00:00Z) or an age like 15m, 2h, 7d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return rfc3339(when.timestamp())


def _tool_names(tool: Any) -> list[str]:
    """Tool names in a record's ``tool`` field (one call, or a JSON-RPC batch)."""
    if isinstance(tool, str):
        return [tool]
    if isinstance(tool, Mapping):
        name = tool.get("name")
        return [name] if isinstance(name, str) else []
    if isinstance(tool, list):
        return [n for item in tool for n in _tool_names(item)]
    return []


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which records to show; every field given must match (``None`` matches anything)."""

    task: str | None = None
    workload: str | None = None
    decisions: frozenset[str] | None = None
    host: str | None = None
    tool: str | None = None
    since: str | None = None  # inclusive, in the log's timestamp format
    until: str | None = None  # exclusive

    @classmethod
    def parse(cls, values: Mapping[str, str | None], now: datetime | None = None
              ) -> AuditFilter:
        """From CLI options or query parameters; ``ValueError`` names the bad one."""
        kw: dict[str, Any] = {}
        for key in ("task", "workload", "tool"):
            value = values.get(key)
            if value is not None:
                if not value:
                    raise ValueError(f"{key}: must not be empty")
                kw[key] = value
        decision = values.get("decision")
        if decision is not None:
            wanted = frozenset(d.strip() for d in decision.split(","))
            unknown = sorted(wanted - set(DECISIONS))
            if unknown:
                raise ValueError(f"decision: {unknown[0]!r} is not a decision; use one of "
                                 f"{', '.join(DECISIONS)} (comma-separated)")
            kw["decisions"] = wanted
        host = values.get("host")
        if host is not None:
            try:
                kw["host"] = canonical_host(host)
            except ValueError:
                raise ValueError(f"host: {host!r} is not a host name") from None
        for key in ("since", "until"):
            value = values.get(key)
            if value is not None:
                try:
                    kw[key] = parse_time(value, now)
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None
        return cls(**kw)

    def needles(self) -> list[bytes]:
        """Byte strings every matching line contains, to skip most lines unparsed."""
        return [orjson.dumps(v) for v in (self.task, self.workload, self.host, self.tool)
                if v is not None]

    def matches(self, rec: Mapping[str, Any]) -> bool:
        if self.task is not None and rec.get("task") != self.task:
            return False
        if self.workload is not None and rec.get("workload") != self.workload:
            return False
        if self.decisions is not None and rec.get("decision") not in self.decisions:
            return False
        if self.host is not None and str(rec.get("host") or "").lower() != self.host:
            return False
        if self.tool is not None and self.tool not in _tool_names(rec.get("tool")):
            return False
        ts = rec.get("ts")
        if self.since is not None and not (isinstance(ts, str) and ts >= self.since):
            return False
        return self.until is None or (isinstance(ts, str) and ts < self.until)


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and type(rec.get("seq")) is int else None


def _scan(path: str, offset: int = 0, expect: tuple[int, int] | None = None
          ) -> Iterator[tuple[bytes, int]]:
    """(line, offset after it) for each whole line of ``path`` from ``offset``; nothing if
    the file is not the one ``expect`` names (device, inode): it was rotated meanwhile."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the generator may stop early
    except FileNotFoundError:
        return
    with f:
        st = os.fstat(f.fileno())
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            return
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return  # being written right now, or torn: not a record yet
            offset += len(line)
            yield line, offset


def _read_lines(path: str, flt: AuditFilter, offset: int = 0,
                expect: tuple[int, int] | None = None
                ) -> Iterator[tuple[dict[str, Any] | None, int]]:
    """(record or ``None`` if it does not match, offset after it) per whole line."""
    needles = flt.needles()
    for line, end in _scan(path, offset, expect):
        rec = None if any(n not in line for n in needles) else _parse_line(line)
        yield (rec if rec is not None and flt.matches(rec) else None), end


def _matching(path: str, flt: AuditFilter) -> Iterator[dict[str, Any]]:
    for rec, _ in _read_lines(path, flt):
        if rec is not None:
            yield rec


def _first_seq(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            for line in f:
                rec = _parse_line(line)
                if rec is not None:
                    return int(rec["seq"])
    except FileNotFoundError:
        pass
    return None


def records(path: str, flt: AuditFilter = AuditFilter()) -> Iterator[dict[str, Any]]:
    """Every matching record of the log at ``path``, oldest first."""
    for file in log_files(path):
        yield from _matching(file, flt)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of records, and where the next one starts (``None``: no more)."""

    records: list[dict[str, Any]]
    next_after: int | None = None
    next_before: int | None = None


def query(path: str, flt: AuditFilter, *, limit: int = 100, after: int | None = None,
          before: int | None = None) -> Page:
    """Matching records. With ``after``: the oldest ones with a greater ``seq``, ascending.
    Otherwise the newest ones (below ``before`` if given), newest first."""
    files = log_files(path)
    if after is not None:
        start = 0
        for i, file in enumerate(files):
            first = _first_seq(file)
            if first is not None and first <= after + 1:
                start = i
        out: list[dict[str, Any]] = []
        for file in files[start:]:
            for rec in _matching(file, flt):
                if rec["seq"] <= after:
                    continue
                if len(out) == limit:
                    return Page(out, next_after=out[-1]["seq"])
                out.append(rec)
        return Page(out)
    newest: deque[dict[str, Any]] = deque(maxlen=limit)
    more = False
    for file in files:
        first = _first_seq(file)
        if before is not None and first is not None and first >= before:
            break
        for rec in _matching(file, flt):
            if before is not None and rec["seq"] >= before:
                continue
            more = more or len(newest) == limit
            newest.append(rec)
    page = list(reversed(newest))
    return Page(page, next_before=page[-1]["seq"] if more and page else None)


def follow(path: str, flt: AuditFilter, *, poll: float = 0.5,
           stop: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """Matching records appended to the log from now on, across rotations, until
    ``stop`` is set (or forever)."""

    def identity(p: str) -> tuple[int, int] | None:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    current = identity(path)
    offset = os.path.getsize(path) if current else 0
    done = {identity(f) for f in rotated_files(path)}  # there before we started
    while stop is None or not stop.is_set():
        now = identity(path)
        if now != current:
            # Rotated (maybe more than once since the last look): finish the file we were
            # reading, now <path>.<n>, read any newer rotated file whole, then the new one.
            for older in rotated_files(path):
                fid = identity(older)
                if fid in done:
                    continue
                done.add(fid)
                for rec, _ in _read_lines(older, flt, offset if fid == current else 0):
                    if rec is not None:
                        yield rec
            current, offset = now, 0
            continue
        start = offset
        for rec, end in _read_lines(path, flt, start, expect=current):
            offset = end
            if rec is not None:
                yield rec
        if offset == start:
            time.sleep(poll)
