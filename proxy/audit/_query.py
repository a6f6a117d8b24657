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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from proxy.audit._log import DECISIONS, log_files, rfc3339, rotated_files
from proxy.audit._reader import BadLine, read_record
from proxy.policy import canonical_host

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
    """The record, or ``None`` for a line that is not one: skipped here (see the
    module docstring); ``audit verify`` is where it counts as damage."""
    try:
        return read_record(line)
    except BadLine:
        return None


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
    Otherwise the newest ones (below ``before`` if given), newest first.

    Neither reads more of the log than it must: ``after`` starts in the file and
    at the place (a binary search on ``seq``) where that ``seq`` is; newest-first
    reads the files backwards from their ends and stops once the page is full.
    """
    files = log_files(path)
    out: list[dict[str, Any]] = []
    if after is not None:
        start = 0
        for i, file in enumerate(files):
            first = _first_seq(file)
            if first is not None and first <= after + 1:
                start = i
        for i, file in enumerate(files[start:]):
            offset = _offset_near(file, after) if i == 0 else 0
            for rec, _ in _read_lines(file, flt, offset):
                if rec is None or rec["seq"] <= after:
                    continue
                if len(out) == limit:
                    return Page(out, next_after=out[-1]["seq"])
                out.append(rec)
        return Page(out)
    needles = flt.needles()
    for file in reversed(files):
        first = _first_seq(file)
        if before is not None and first is not None and first >= before:
            continue  # all of it is newer than the cursor
        end = _line_of(file, before) if before is not None else None
        for line in _scan_reverse(file, end):
            if any(n not in line for n in needles):
                continue
            rec = _parse_line(line)
            if rec is None or (before is not None and rec["seq"] >= before) \
                    or not flt.matches(rec):
                continue
            if len(out) == limit:
                return Page(out, next_before=out[-1]["seq"])
            out.append(rec)
    return Page(out)


_BLOCK = 256 * 1024


def _scan_reverse(path: str, end: int | None = None) -> Iterator[bytes]:
    """The whole lines of ``path`` (before offset ``end``, a line start), last first; a
    line still being written is left out."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the generator may stop early
    except FileNotFoundError:
        return
    with f:
        pos = f.seek(0, os.SEEK_END) if end is None else end
        while pos > 0:  # find the end of the last whole line
            size = min(_BLOCK, pos)
            f.seek(pos - size)
            cut = f.read(size).rfind(b"\n")
            if cut >= 0:
                pos = pos - size + cut + 1
                break
            pos -= size
        buf = b""
        while pos > 0:
            size = min(_BLOCK, pos)
            pos -= size
            f.seek(pos)
            parts = (f.read(size) + buf).split(b"\n")
            buf = parts[0]  # the start of this line lies further back
            for line in reversed(parts[1:]):
                if line:
                    yield line
        if buf:
            yield buf


def _line_of(path: str, seq: int) -> int | None:
    """The offset where the first record with ``seq`` or more starts (``None``: none does)."""
    start = _offset_near(path, seq - 1)
    for line, end in _scan(path, start):
        rec = _parse_line(line)
        if rec is not None and rec["seq"] >= seq:
            return end - len(line)
    return None


def _offset_near(path: str, seq: int) -> int:
    """A line start at or before the record after ``seq`` (within a block of it), found by
    a binary search over the file: records in a file are in ``seq`` order."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return 0
    with f:
        lo, hi = 0, f.seek(0, os.SEEK_END)
        while hi - lo > 64 * 1024:
            mid = (lo + hi) // 2
            f.seek(mid)
            f.readline()  # to the next line start
            start = f.tell()
            rec = _parse_line(f.readline()) if start < hi else None
            if rec is not None and rec["seq"] <= seq:
                lo = start
            else:
                hi = mid
        return lo


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
