"""Check the audit log's hash chain, across its rotated files, and say where it breaks.

Reads line by line (constant memory, whatever the size) and stops at the first
damage, naming the file, the line, the ``seq`` and the kind:

- ``edited``: a record no longer matches its hash, or no longer links to the
  record before it (one of the two was rewritten with a recomputed hash);
- ``removed``: ``seq`` jumps: lines, a rotated file, or the start of the log
  are gone;
- ``reordered``: a record appears before one that should precede it, or twice;
- ``truncated``: a line is a cut-off record (a crash mid-write, or the file was
  cut). A cut-off record the chain continues intact around is a *torn write*,
  which ``accept_torn`` turns into a warning.

Records cut from the very end leave a valid chain; the chain head the writer
keeps beside the log (``<path>.head``, proxy/audit/_head.py) names the last
seq and hash, so they show as ``removed`` at the end, and a last record that
differs from the head as ``edited``. The head sits in the log's own folder,
so whoever can cut the log can also delete the head or put an older one back
(a keyed head proves who wrote it, not that it is the latest). The writer
therefore keeps the same end in the state store (the *anchor*, proxy/store/_store.py),
which only moves forward; given it (``anchor``: ``audit verify`` on the
configured log), the chain must reach the anchor (else ``removed``), its
record there must match (else ``edited``), and the head must exist and not be
older than the anchor, nor the anchor be missing while the log has records:
those three are damage unless ``accept_missing_head`` (a log written before
heads or anchors existed), which makes them warnings. A rewrite that
recomputes every later hash (and the head and anchor) is only detected when
the chain is keyed (``audit.hmac_key_file``), which is what the key is for.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.audit._anchor import AuditAnchor
from proxy.audit._head import Head, check_mac, head_path, read_head
from proxy.audit._log import GENESIS, chain_hash, log_files, rotated_files
from proxy.audit._reader import BadLine, read_record

__all__ = ["AnchorState", "Damage", "Report", "read_anchor", "verify", "verify_files"]


@dataclass(frozen=True, slots=True)
class AnchorState:
    """The state store's anchor as read for a check: where the chain ended."""

    source: str  # the store file
    head: Head | None  # None: no anchor stored (or it could not be used: ``error``)
    error: str | None = None


def read_anchor(store: str, key: bytes | None, log: str | None = None) -> AnchorState:
    """The anchor in the state store at ``store``, read-only (never creates the file);
    ``log``: of that log's own row (:class:`~proxy.audit._anchor.AuditAnchor`)."""
    anchor = AuditAnchor(store, readonly=True, log=log)
    try:
        found = anchor.read()
    except (sqlite3.Error, ValueError, OSError) as e:
        return AnchorState(store, None, f"{store}: the audit anchor cannot be read: {e}")
    finally:
        anchor.close()
    if found is None:
        return AnchorState(store, None)
    head, mac = found
    try:
        check_mac(head, mac, key, f"the audit anchor in {store}")
    except ValueError as e:
        return AnchorState(store, None, str(e))
    return AnchorState(store, head)


@dataclass(frozen=True, slots=True)
class Damage:
    """The first place the chain breaks."""

    kind: str  # edited | removed | reordered | truncated
    file: str
    line: int
    seq: int | None
    detail: str

    def __str__(self) -> str:
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{self.kind}: {self.file} line {self.line}{seq}: {self.detail}"


@dataclass(slots=True)
class Report:
    """What verify found: a summary, and the damage if any."""

    files: list[str]
    keyed: bool
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_ts: str | None = None
    last_ts: str | None = None
    last_hash: str = GENESIS
    damage: Damage | None = None
    torn: list[Damage] = field(default_factory=list)
    per_file: dict[str, tuple[int, int]] = field(default_factory=dict)  # file → (first, last)
    head: str | None = None  # the chain head file compared with the end, if there was one
    anchor: str | None = None  # the state store whose anchor was compared, if checked
    anchor_seq: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.damage is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "records": self.records, "files": self.files,
            "first_seq": self.first_seq, "last_seq": self.last_seq,
            "first_ts": self.first_ts, "last_ts": self.last_ts, "last_hash": self.last_hash,
            "chain": "hmac-sha256" if self.keyed else "sha256",
            "damage": None if self.damage is None else {
                "kind": self.damage.kind, "file": self.damage.file, "line": self.damage.line,
                "seq": self.damage.seq, "detail": self.damage.detail},
            "torn": [str(t) for t in self.torn],
            "head": self.head,
            "anchor": self.anchor, "anchor_seq": self.anchor_seq,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True, slots=True)
class _Line:
    file: str
    number: int
    raw: bytes
    complete: bool  # ended with a newline


def _lines(files: list[str], start: tuple[int, int] = (0, 0)) -> Iterator[_Line]:
    """Non-blank lines of ``files`` in order, from (file index, line number) on."""
    for i, path in enumerate(files[start[0]:], start[0]):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if i == start[0] and number < start[1]:
                    continue
                body = raw.rstrip(b"\r\n")
                if body.strip():
                    yield _Line(path, number, body, raw.endswith(b"\n"))


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The record, or ``None`` for a line that is not one: the caller decides whether
    it is a torn write or damage, from what follows it."""
    try:
        return read_record(raw)
    except BadLine:
        return None


def _find_seq(files: list[str], start: tuple[int, int], seq: int) -> _Line | None:
    for line in _lines(files, start):
        rec = _parse(line.raw)
        if rec is not None and rec["seq"] == seq:
            return line
    return None


def verify_files(files: list[str], *, key: bytes | None = None, partial: bool = False,
                 accept_torn: bool = False, current: str | None = None,
                 head_of: str | None = None, anchor: AnchorState | None = None,
                 accept_missing_head: bool = False) -> Report:
    """Verify ``files`` as one chain, in the order given.

    ``partial``: the first file may continue a chain whose start is not given
    (its first record's ``prev`` is trusted). ``current``: the live file, which
    must exist when rotated files do. ``head_of``: the log whose chain head
    (``<head_of>.head``), when there is one, the end of the chain must reach.
    ``anchor``: the state store's anchor of this log (see the module docstring);
    ``accept_missing_head`` turns a missing head or anchor, or a head older than
    the anchor, into warnings.
    """
    report = Report(files=list(files), keyed=key is not None)
    head: Head | None = None
    head_error: str | None = None
    if head_of is not None:
        try:
            head = read_head(head_of, key)
        except (OSError, ValueError) as e:
            head_error = str(e)
        report.head = head_path(head_of) if head is not None or head_error else None
    pinned: Head | None = None  # the anchor's end, which the chain must reach
    if anchor is not None:
        report.anchor = anchor.source
        if anchor.error is not None:
            report.damage = Damage("edited", anchor.source, 0, None, anchor.error)
            return report
        pinned = anchor.head
        report.anchor_seq = pinned.seq if pinned is not None else None
    if current is not None and not os.path.exists(current) and files:
        report.damage = Damage("removed", current, 0, None,
                               "the current log file is missing, though rotated files exist")
        return report
    expect_seq: int | None = None if partial else 1
    expect_prev = GENESIS
    last: _Line | None = None  # the last good record's line
    torn: _Line | None = None  # an unreadable line waiting to see whether the chain goes on
    index = {path: i for i, path in enumerate(files)}

    def fail(kind: str, line: _Line, seq: int | None, detail: str) -> Report:
        report.damage = Damage(kind, line.file, line.number, seq, detail)
        return report

    for line in _lines(files):
        rec = _parse(line.raw)
        if rec is None:
            if torn is not None:
                return fail("truncated", torn, None, "a cut-off or unreadable record")
            torn = line
            continue
        seq = rec["seq"]
        if chain_hash(rec, key) != rec["hash"]:
            detail = "the record does not match its hash: a field was changed"
            if last is None:
                detail += _key_hint(rec, key)
            return fail("edited", line, seq, detail)
        if expect_seq is None:
            expect_seq, expect_prev = seq, rec["prev"]
        if torn is not None:
            if seq == expect_seq and rec["prev"] == expect_prev:
                damage = Damage("truncated", torn.file, torn.number, None,
                                "a record cut off mid-write (a crash?); "
                                "the chain continues intact after it")
                if not accept_torn:
                    report.damage = damage
                    return report
                report.torn.append(damage)
                torn = None
            else:
                return fail("edited", torn, None, "not a valid audit record, and the chain "
                            "does not continue after it")
        if seq > expect_seq:
            later = _find_seq(files, (index[line.file], line.number + 1), expect_seq)
            if later is not None:
                return fail("reordered", line, seq,
                            f"seq {expect_seq} should come before it but appears later "
                            f"({later.file} line {later.number})")
            missing = (f"seq {expect_seq}" if seq == expect_seq + 1
                       else f"seq {expect_seq}..{seq - 1}")
            if last is None:
                where = "the log starts here: the records before it"
            elif last.file != line.file:
                where = (f"between {last.file} and {line.file}: a rotated file or its "
                         f"records are gone:")
            else:
                where = f"after line {last.number}:"
            return fail("removed", line, seq, f"{where} {missing} missing")
        if seq < expect_seq:
            return fail("reordered", line, seq, f"seq {seq} comes after seq {expect_seq - 1}: "
                        "a record was moved or duplicated")
        if rec["prev"] != expect_prev:
            if last is None:
                return fail("edited", line, seq, "the first record does not start the chain "
                            "(its prev is not the genesis hash)")
            return fail("edited", last, seq - 1,
                        f"{line.file} line {line.number} (seq {seq}) does not link to it: "
                        "this record or the next was rewritten with a recomputed hash")
        if head is not None and seq == head.seq and rec["hash"] != head.hash:
            return fail("edited", line, seq, f"the record differs from the chain head "
                        f"({report.head}): records at the end were replaced")
        if pinned is not None and seq == pinned.seq and rec["hash"] != pinned.hash:
            return fail("edited", line, seq, f"the record differs from the state store's "
                        f"anchor ({report.anchor}): records at the end were replaced")
        report.records += 1
        first, _ = report.per_file.get(line.file, (seq, seq))
        report.per_file[line.file] = (first, seq)
        if report.first_seq is None:
            report.first_seq, report.first_ts = seq, rec.get("ts")
        report.last_seq, report.last_ts, report.last_hash = seq, rec.get("ts"), rec["hash"]
        expect_seq, expect_prev, last = seq + 1, rec["hash"], line
    if torn is not None:
        detail = ("the log ends in a cut-off record (a crash mid-write, or the file was cut)"
                  if not torn.complete else "the last line is not a valid audit record")
        damage = Damage("truncated", torn.file, torn.number, None, detail)
        if accept_torn and not torn.complete:
            report.torn.append(damage)
        else:
            report.damage = damage
    if report.damage is None:
        _check_head(report, head, head_error, last, files)
    if report.damage is None and anchor is not None:
        _check_anchor(report, head, pinned, last, files, accept_missing_head)
    return report


def _check_anchor(report: Report, head: Head | None, pinned: Head | None,
                  last: _Line | None, files: list[str], accept: bool) -> None:
    """The chain must reach the state store's anchor; the head and the anchor must be
    there and agree (else, with ``accept``, a warning)."""
    end = report.last_seq or 0
    if pinned is not None and pinned.seq > end:
        missing = (f"seq {pinned.seq}" if pinned.seq == end + 1
                   else f"seq {end + 1}..{pinned.seq}")
        where, number = ((last.file, last.number) if last is not None
                         else (files[-1] if files else report.anchor or "", 0))
        report.damage = Damage("removed", where, number, end + 1,
                               f"the log ends here, but the state store's anchor "
                               f"({report.anchor}) says seq {pinned.seq}: {missing} missing "
                               "(cut from the end, the head put back or deleted)")
        return
    problems: list[tuple[str, str, str]] = []  # (kind, file, detail)
    if pinned is None and end:
        problems.append(("removed", report.anchor or "", "the state store has no anchor for "
                         "this log: records cut from its end cannot be ruled out (a log "
                         "written by an older taskgate, or the store was replaced)"))
    if head is None and end:
        problems.append(("removed", report.head or (files[-1] + ".head" if files else ""),
                         "the chain head is missing (the gateway writes one after every "
                         "batch): it was deleted"))
    elif head is not None and pinned is not None and head.seq < pinned.seq:
        problems.append(("edited", report.head or "", f"the chain head says seq {head.seq}, "
                         f"older than the state store's anchor (seq {pinned.seq}): an old "
                         "head was put back"))
    for kind, file, detail in problems:
        if accept:
            report.warnings.append(f"{file}: {detail}")
        else:
            report.damage = Damage(kind, file, 0, None, f"{detail} (--accept-missing-head "
                                   "accepts it)")
            return


def _check_head(report: Report, head: Head | None, head_error: str | None,
                last: _Line | None, files: list[str]) -> None:
    """The chain must reach the head the writer recorded: else records were cut off."""
    assert report.head is not None or (head is None and head_error is None)
    if head_error is not None:
        report.damage = Damage("edited", report.head or "", 1, None, head_error)
        return
    end = report.last_seq or 0
    if head is None or head.seq <= end:
        return
    missing = f"seq {head.seq}" if head.seq == end + 1 else f"seq {end + 1}..{head.seq}"
    where, number = ((last.file, last.number) if last is not None
                     else (files[-1] if files else report.head or "", 0))
    report.damage = Damage("removed", where, number, end + 1,
                           f"the log ends here, but its chain head ({report.head}) says "
                           f"seq {head.seq}: {missing} missing (cut from the end)")


def _key_hint(rec: dict[str, Any], key: bytes | None) -> str:
    if key is None:
        return (" (or the log is keyed: give the key with --hmac-key-file or a config "
                "with audit.hmac_key_file)")
    if chain_hash(rec) == rec["hash"]:
        return " (it matches an unkeyed hash: the log was written without this key)"
    return " (or the key given is not the one the log was written with)"


def verify(path: str, *, key: bytes | None = None, accept_torn: bool = False,
           partial: bool = False, anchor: AnchorState | None = None,
           accept_missing_head: bool = False) -> Report:
    """Verify the configured log: its rotated files, oldest first, then the current one."""
    files = log_files(path)
    rotated = rotated_files(path)
    report = verify_files(files, key=key, accept_torn=accept_torn, partial=partial,
                          current=path if rotated else None, head_of=path, anchor=anchor,
                          accept_missing_head=accept_missing_head)
    if report.damage is not None and report.damage.kind == "removed" and rotated:
        numbers = {int(f.rsplit(".", 1)[1]) for f in rotated}
        gone = [f"{os.path.basename(path)}.{n}" for n in range(1, max(numbers))
                if n not in numbers]
        if gone:
            report.damage = replace(report.damage, detail=f"{report.damage.detail} "
                                    f"(missing: {', '.join(gone)})")
    return report
