"""Issue 17.1: no value makes a record unwritable, and the audit writer never dies.

Every string field (and the nested ``tool`` and ``approval``) with strings no
UTF-8 encoder takes; integers, nesting and keys orjson refuses; a record the
writer still cannot encode (replaced, in the chain, by one that says so); a
batch that fails whole; a writer thread that dies; a write that hangs.
Records are written by the real :class:`proxy.audit._log.AuditLog` and checked
with the real ``verify``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.audit import AuditLog, new_record, rfc3339, verify
from proxy.audit import _log as audit_mod
from proxy.audit._log import FIELDS, MAX_DEPTH, TOO_DEEP, clean
from proxy.batching import FAILURES
from proxy.errors import Unavailable
from proxy.gateway import Exchange

# Strings no UTF-8 encoder takes: a `\ud800` JSON escape, the other half, a byte that is
# not UTF-8 kept by surrogateescape (U+DC80..U+DCFF), an emoji's high half alone, and
# lone surrogates beside valid text (emoji, accents, a backslash already there).
BAD = ["\ud800", "\udfff", "a\udc80b", "\ud83d", "😀\ud800é", "x\\ud800\udbff",
       "\udbff\udc00"]
ESCAPED = ["\\ud800", "\\udfff", "a\\udc80b", "\\ud83d", "😀\\ud800é", "x\\ud800\\udbff",
           "\\udbff\\udc00"]
STRING_FIELDS = [f for f in FIELDS if f not in ("seq", "port", "status", "bytes_in",
                                                  "bytes_out", "duration_ms", "tool",
                                                  "approval")]
WRITER_SET = ("seq", "replica", "prev", "hash")  # the writer's own values, whatever was given


def encodes(value: Any) -> bool:
    try:
        orjson.dumps(value)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        return False
    return True


# -- clean: the one rule for every value ------------------------------------------
@pytest.mark.parametrize(("bad", "escaped"), list(zip(BAD, ESCAPED, strict=True)))
def test_clean_escapes_lone_surrogates(bad: str, escaped: str) -> None:
    assert not encodes(bad)
    assert clean(bad) == escaped and encodes(clean(bad))


@pytest.mark.parametrize("ok", ["", "plain", "é", "😀", "\\ud800 as text", "\x00\x1b[2J",
                                "\ufffd", "a" * 10_000])
def test_clean_keeps_encodable_strings(ok: str) -> None:
    assert clean(ok) is ok


@pytest.mark.parametrize(("value", "expected"), [
    (1 << 64, str(1 << 64)),
    (-(1 << 63) - 1, str(-(1 << 63) - 1)),
    ((1 << 64) - 1, (1 << 64) - 1),
    (-(1 << 63), -(1 << 63)),
    (True, True),
    (None, None),
    (1.5, 1.5),
    ((1, "\ud800"), [1, "\\ud800"]),
    ({"\ud800": {"k": ["\udc80"]}}, {"\\ud800": {"k": ["\\udc80"]}}),
    ({1: "a", None: "b"}, {"1": "a", "None": "b"}),
])
def test_clean_values(value: Any, expected: Any) -> None:
    assert clean(value) == expected and encodes(clean(value))


def test_clean_huge_integer_and_deep_nesting() -> None:
    huge = 10 ** 5000  # more digits than str() converts
    assert clean(huge) == f"[an integer of {huge.bit_length()} bits; not recorded]"
    deep: Any = "leaf"
    for _ in range(400):  # orjson refuses past 254 levels
        deep = [deep]
    assert not encodes(deep)
    cleaned = clean({"tool": deep})
    assert encodes(cleaned)
    level, depth = cleaned["tool"], 1
    while isinstance(level, list):
        level, depth = level[0], depth + 1
    assert level == TOO_DEEP and depth == MAX_DEPTH


# -- new_record: every field --------------------------------------------------------
@pytest.mark.parametrize("field", STRING_FIELDS)
@pytest.mark.parametrize(("bad", "escaped"), list(zip(BAD, ESCAPED, strict=True)))
def test_new_record_escapes_every_string_field(field: str, bad: str, escaped: str) -> None:
    rec = new_record(**{field: bad})
    assert rec[field] == escaped
    assert encodes(rec)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("tool", {"protocol": "mcp", "method": "x\ud800", "name": "\udc80",
              "arguments_sha256": None},
     {"protocol": "mcp", "method": "x\\ud800", "name": "\\udc80", "arguments_sha256": None}),
    ("tool", {"protocol": "jsonrpc", "method": "batch", "name": None,
              "batch": [{"method": "\ud800"}, {"name": "ok", "\udfff": 1}]},
     {"protocol": "jsonrpc", "method": "batch", "name": None,
      "batch": [{"method": "\\ud800"}, {"name": "ok", "\\udfff": 1}]}),
    ("approval", {"id": "a1", "outcome": "approved", "by": "\ud800alice",
                  "comment": "ok \udc80", "waited_ms": 12},
     {"id": "a1", "outcome": "approved", "by": "\\ud800alice", "comment": "ok \\udc80",
      "waited_ms": 12}),
    ("approval", {"by": ["\ud83d", ("\udfff",)]}, {"by": ["\\ud83d", ["\\udfff"]]}),
])
def test_new_record_escapes_nested_fields(field: str, value: Any, expected: Any) -> None:
    rec = new_record(**{field: value})
    assert rec[field] == expected and encodes(rec)


# -- the writer -----------------------------------------------------------------------
def lines(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    raw.decode("utf-8")  # strict: the file is valid UTF-8
    return [orjson.loads(x) for x in raw.splitlines() if x.strip()]


async def opened(path: Path) -> AuditLog:
    log = AuditLog(str(path))
    await log.start()
    return log


async def write(log: AuditLog, rec: Any) -> None:
    """``log.write`` that fails the test rather than hang (a dead writer never answers)."""
    await asyncio.wait_for(log.write(rec), 5)


@pytest.mark.parametrize("field", [*STRING_FIELDS, "tool", "approval"])
async def test_writer_writes_every_field_with_lone_surrogates(tmp_path: Path,
                                                              field: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = await opened(path)
    for i, bad in enumerate(BAD):
        value: Any = {"name": bad, "nested": [bad]} if field in ("tool", "approval") else bad
        if field in WRITER_SET:
            rec = new_record(request_id=f"r{i}")
            rec[field] = bad  # the writer sets these: the bad value must not matter
        else:
            rec = new_record(request_id=f"r{i}")
            rec[field] = value  # set after new_record, as record.update() in the gateway does
        await write(log, rec)
    assert log.healthy
    await log.close()
    recs = lines(path)
    assert len(recs) == len(BAD)
    if field not in WRITER_SET:
        for rec, escaped in zip(recs, ESCAPED, strict=True):
            want = ({"name": escaped, "nested": [escaped]} if field in ("tool", "approval")
                    else escaped)
            assert rec[field] == want
    report = verify(str(path))
    assert report.ok and report.records == len(BAD), report.damage


class Text(str):
    """A ``str`` of another type: the writer's inline check takes exact types only."""


async def test_writer_cleans_values_its_inline_check_passes_on(tmp_path: Path) -> None:
    """The writer checks the common values in place of a clean() call per field; what
    it passes on must be what clean() would have returned, and the rest still cleaned."""
    path = tmp_path / "audit.jsonl"
    log = await opened(path)
    rec = new_record(request_id="r", decision="allow")
    rec.update(bytes_in=1 << 70, bytes_out=(1 << 64) - 1, status=-(1 << 63),
               duration_ms=1.5, port=True, reason=Text("caf\u00e9 \ud800"),
               path="/caf\u00e9", host="api.test", tool={"n": 1 << 80, 2: ("a",)})
    await write(log, rec)
    await log.close()
    [got] = lines(path)
    assert got["bytes_in"] == str(1 << 70)  # past 64 bits: text, as clean() makes it
    assert got["bytes_out"] == (1 << 64) - 1 and got["status"] == -(1 << 63)
    assert got["duration_ms"] == 1.5 and got["port"] is True
    assert got["reason"] == "caf\u00e9 \\ud800" and got["path"] == "/caf\u00e9"
    assert got["tool"] == {"n": str(1 << 80), "2": ["a"]}
    assert verify(str(path)).ok


class Opaque:
    """A value JSON has no encoding for (what a bug would put in a record)."""


@pytest.mark.parametrize(("values", "dropped"), [
    ({"tool": {"x": Opaque()}}, "tool"),
    ({"approval": {"by": {1, 2}}}, "approval"),
    ({"reason": b"\xff bytes"}, "reason"),
    ({"tool": Opaque(), "approval": Opaque()}, "tool, approval"),
    ({"status": complex(1, 2)}, "status"),
])
async def test_unencodable_record_is_replaced_in_the_chain(tmp_path: Path, values: dict[str, Any],
                                                           dropped: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = await opened(path)
    before = FAILURES.counts()["audit"]
    await write(log, new_record(request_id="before", decision="allow"))
    with pytest.raises(Unavailable, match="could not be encoded; the call was refused"):
        await write(log, new_record(ts=rfc3339(1e9), request_id="bad\ud800",
                                    decision="allow", workload="w", **values))
    await write(log, new_record(request_id="after", decision="allow"))
    assert log.healthy  # the log works: only that call was refused
    await log.close()
    assert FAILURES.counts()["audit"] == before + 1
    recs = lines(path)
    assert [r["request_id"] for r in recs] == ["before", "bad\\ud800", "after"]
    sub = recs[1]
    assert list(sub) == list(FIELDS)
    assert sub["decision"] == "error" and sub["status"] is None
    assert sub["workload"] == "w" and sub["ts"] == rfc3339(1e9)
    assert f"fields dropped: {dropped};" in sub["reason"]
    assert "the call was refused (it had been decided: allow)" in sub["reason"]
    for name in dropped.split(", "):
        assert name == "reason" or sub[name] is None
    report = verify(str(path))
    assert report.ok and report.records == 3


async def test_unknown_top_level_key_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = await opened(path)
    rec: dict[Any, Any] = new_record(request_id="r")
    rec[("not", "a", "str")] = 1  # orjson refuses non-string keys
    with pytest.raises(Unavailable):
        await write(log, rec)
    await log.close()
    (sub,) = lines(path)
    assert "fields dropped: ('not', 'a', 'str')" in sub["reason"]
    assert verify(str(path)).ok


async def test_one_bad_record_in_a_batch_fails_only_its_call(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = await opened(path)
    recs = [new_record(request_id=f"r{i}", tool={"x": Opaque()} if i == 7 else None)
            for i in range(20)]
    results = await asyncio.wait_for(asyncio.gather(*(log.write(r) for r in recs),
                                                    return_exceptions=True), 5)
    await log.close()
    assert [i for i, r in enumerate(results) if isinstance(r, Unavailable)] == [7]
    assert all(r is None for i, r in enumerate(results) if i != 7)
    assert len(lines(path)) == 20 and verify(str(path)).ok


@pytest.mark.parametrize("junk", [None, 42, "a string", ["a", "list"]])
async def test_batch_that_fails_whole_refuses_its_calls_and_the_writer_goes_on(
        tmp_path: Path, junk: Any) -> None:
    """Not a record at all: the whole batch fails (503 for each caller), is counted, and the
    next batch is written by the same thread."""
    path = tmp_path / "audit.jsonl"
    log = await opened(path)
    thread = log._thread
    before = FAILURES.counts()["audit"]
    results = await asyncio.wait_for(asyncio.gather(
        log.write(junk), log.write(new_record(request_id="same-batch")),
        return_exceptions=True), 5)
    assert all(isinstance(r, Unavailable) for r in results), results
    assert FAILURES.counts()["audit"] == before + 1
    assert not log.healthy  # until a write goes through
    await asyncio.wait_for(log.write(new_record(request_id="next")), 5)
    assert log.healthy and log._thread is thread and thread.is_alive()
    await log.close()
    assert [r["request_id"] for r in lines(path)] == ["next"]
    assert verify(str(path)).ok


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_dead_writer_thread_fails_waiters_at_once_and_is_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread ends (SystemExit gets past any handler): the waiting call gets a 503
    within the watchdog's period, new calls are refused at once until a new writer
    runs, and that writer writes the next record in the same chain."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    real = log._write_and_settle
    calls = {"n": 0}

    def die_once(batch: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit  # what no `except Exception` catches
        real(batch)

    monkeypatch.setattr(log, "_write_and_settle", die_once)
    await log.start()
    await write(log, new_record(request_id="first"))
    before = FAILURES.counts()["audit"]
    dying = log._thread
    started = time.monotonic()
    with pytest.raises(Unavailable, match="writer stopped"):
        await asyncio.wait_for(log.write(new_record(request_id="lost")), 5)
    assert time.monotonic() - started < audit_mod.WATCH_SECONDS + 1.5
    assert FAILURES.counts()["audit"] == before + 1
    async with asyncio.timeout(5):  # the watchdog starts a new writer
        while True:
            if log._thread is not dying and log.healthy:
                break
            await asyncio.sleep(0.02)
    await asyncio.wait_for(log.write(new_record(request_id="after")), 5)
    assert log.healthy
    await log.close()
    assert [r["request_id"] for r in lines(path)] == ["first", "after"]
    assert verify(str(path)).ok


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_write_after_the_writer_died_is_refused_at_once(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    path = tmp_path / "audit.jsonl"
    monkeypatch.setattr(audit_mod, "WATCH_SECONDS", 30.0)  # no restart during this test
    log = AuditLog(str(path))

    def die(batch: Any) -> None:
        raise SystemExit

    monkeypatch.setattr(log, "_write_and_settle", die)
    await log.start()
    pending = asyncio.ensure_future(log.write(new_record(request_id="lost")))
    assert log._thread is not None
    await asyncio.to_thread(log._thread.join, 5)
    assert not log._thread.is_alive() and not log.healthy
    started = time.monotonic()
    with pytest.raises(Unavailable, match="not answering"):
        await log.write(new_record(request_id="refused"))
    assert time.monotonic() - started < 0.1
    log.check_writer()  # what the watchdog does: the waiting call is refused too
    with pytest.raises(Unavailable, match="writer stopped"):
        await asyncio.wait_for(pending, 1)
    await log.close()


async def test_stalled_write_fails_every_waiter_at_once_then_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log is a pipe nobody reads (a disk that stopped answering): once a write hangs
    for STALL_SECONDS, the waiting calls and every new one are refused at once and the log
    reports unhealthy; when the write goes through, records are taken again."""
    monkeypatch.setattr(audit_mod, "STALL_SECONDS", 0.5)
    monkeypatch.setattr(audit_mod, "WATCH_SECONDS", 0.1)
    path = tmp_path / "audit.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    drained = bytearray()
    try:
        log = await opened(path)
        big = "x" * 300_000  # more than a pipe holds: the write blocks
        stuck = asyncio.ensure_future(log.write(new_record(request_id="big", reason=big)))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(log.write(new_record(request_id="queued")))
        with pytest.raises(Unavailable, match="not answering"):
            await asyncio.wait_for(stuck, 3)
        with pytest.raises(Unavailable, match="not answering"):
            await asyncio.wait_for(queued, 1)
        assert not log.healthy and log.stalled
        started = time.monotonic()
        with pytest.raises(Unavailable, match="not answering"):
            await log.write(new_record(request_id="new"))
        assert time.monotonic() - started < 0.1

        def drain() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(reader, 1 << 16)
                except BlockingIOError:
                    if not log.stalled and log._busy_since is None:
                        return
                    time.sleep(0.01)
                    continue
                drained.extend(chunk)

        await asyncio.to_thread(drain)
        assert log.healthy
        done = asyncio.ensure_future(log.write(new_record(request_id="again")))
        await asyncio.to_thread(drain)
        await asyncio.wait_for(done, 5)
        await log.close()
        await asyncio.to_thread(drain)
    finally:
        os.close(reader)
    recs = [orjson.loads(x) for x in bytes(drained).splitlines() if x.strip()]
    # The hung write went through in the end: its record stands, though its call was refused.
    assert [r["request_id"] for r in recs] == ["big", "again"]
    assert [r["seq"] for r in recs] == [1, 2]


def test_writer_thread_is_never_left_waiting_forever_at_shutdown(tmp_path: Path) -> None:
    """close() returns while records are queued; every one is written, none left pending."""
    async def main() -> list[BaseException | None]:
        log = await opened(tmp_path / "audit.jsonl")
        pending = [asyncio.ensure_future(log.write(new_record(request_id=f"r{i}\ud800")))
                   for i in range(50)]
        await asyncio.sleep(0)
        await log.close()
        return await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)

    results = asyncio.run(main())
    assert results == [None] * 50
    assert len(lines(tmp_path / "audit.jsonl")) == 50


async def test_a_calls_record_has_every_field_in_order_and_is_cleaned_by_the_writer(
        tmp_path: Path) -> None:
    """The gateway builds a call's record as it stands (no clean per call); the writer
    makes it encodable, in place, before it is chained and observed."""
    ex = Exchange(request_id="r1", client="127.0.0.1", method="GET", host="example.test",
                  path=f"/a{BAD[0]}", reason=BAD[1], tool={"name": BAD[2], "args": [BAD[3]]})
    ex.deny(BAD[1])
    rec = ex.record()
    assert tuple(rec) == FIELDS
    path = tmp_path / "audit.jsonl"
    log = await opened(path)
    await write(log, rec)
    await log.close()
    (written,) = lines(path)
    assert written["path"] == f"/a{ESCAPED[0]}" and written["reason"] == ESCAPED[1]
    assert written["tool"] == {"name": ESCAPED[2], "args": [ESCAPED[3]]}
    assert rec["reason"] == ESCAPED[1]  # cleaned in place: what observers see after the write
    assert verify(str(path)).ok
