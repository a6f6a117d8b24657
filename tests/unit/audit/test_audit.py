"""proxy/audit/_log.py: every field on every record, values redacted, a chain that holds."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.audit import AuditLog, new_record, redact_target, rfc3339
from proxy.audit._log import FIELDS, GENESIS, canonical, chain_hash
from proxy.errors import Unavailable

SPEC_FIELDS = {
    "ts", "seq", "replica", "request_id", "connect_id", "workload", "task", "owner", "client",
    "method", "scheme", "host", "port", "upstream_ip", "path", "tool", "decision", "rule",
    "reason", "secret",
    "approval",
    "status", "bytes_in", "bytes_out", "websocket", "duration_ms", "prev", "hash",
}


def test_fields_are_the_spec_fields() -> None:
    assert set(FIELDS) == SPEC_FIELDS and len(FIELDS) == len(SPEC_FIELDS)


def test_new_record_has_every_field() -> None:
    rec = new_record(request_id="r1", status=200)
    assert list(rec) == list(FIELDS)
    assert rec["request_id"] == "r1" and rec["status"] == 200
    assert all(rec[k] is None for k in FIELDS if k not in ("request_id", "status"))


def test_new_record_refuses_unknown_fields() -> None:
    with pytest.raises(KeyError, match="unknown audit field 'token'"):
        new_record(token="x")


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1795867200.1234) == "2026-11-28T12:00:00.123Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rfc3339(1e9))


@pytest.mark.parametrize(("path", "query", "logged"), [
    ("/a", "", "/a"),
    ("/a", "q=secret", "/a?q=REDACTED"),
    ("/a", "q=secret&page=2", "/a?q=REDACTED&page=REDACTED"),
    ("/a", "access_token=eyJhbGciOi.x.y", "/a?access_token=REDACTED"),
    ("/a", "flag", "/a?REDACTED"),
    ("/a", "sk-live-TOKEN", "/a?REDACTED"),  # a bare item may be the secret itself
    ("/a", "flag&k=v", "/a?REDACTED&k=REDACTED"),
    ("/a", "k=v&sk-live-TOKEN", "/a?k=REDACTED&REDACTED"),
    ("/a", "k=", "/a?k=REDACTED"),
    ("/a", "k=a=b", "/a?k=REDACTED"),
    ("/a", "=v", "/a?=REDACTED"),
    ("/a", "a=1&&b=2", "/a?a=REDACTED&&b=REDACTED"),
])
def test_redact_target(path: str, query: str, logged: str) -> None:
    assert redact_target(path, query) == logged


def test_chain_hash() -> None:
    rec = new_record(seq=1, prev=GENESIS, request_id="r")
    data = orjson.dumps({k: v for k, v in rec.items() if k != "hash"},
                        option=orjson.OPT_SORT_KEYS)
    assert canonical(rec) == data
    assert chain_hash(rec) == hashlib.sha256(data).hexdigest()
    assert chain_hash(rec, b"k") == hmac.new(b"k", data, hashlib.sha256).hexdigest()
    assert chain_hash({**rec, "hash": "anything"}) == chain_hash(rec)


# -- the log ---------------------------------------------------------------------
def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line.strip()
            and line.startswith(b"{") and line.endswith(b"}")]


def verify(records: list[dict[str, Any]], key: bytes | None = None) -> None:
    """The chain check `audit verify` will make: seq counts, prev links, hash holds."""
    prev = GENESIS
    for i, rec in enumerate(records, 1):
        assert rec["seq"] == i, rec
        assert rec["prev"] == prev, rec
        assert rec["hash"] == chain_hash(rec, key), rec
        prev = rec["hash"]


async def write_n(log: AuditLog, n: int, start: int = 0) -> None:
    await asyncio.gather(*(log.write(new_record(request_id=f"r{start + i}"))
                           for i in range(n)))


async def test_writes_every_record_once_in_a_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    log = AuditLog(str(path))
    await log.start()
    await write_n(log, 100)
    await log.close()
    recs = lines(path)
    assert len(recs) == 100
    assert sorted(r["request_id"] for r in recs) == sorted(f"r{i}" for i in range(100))
    assert all(list(r) == list(FIELDS) for r in recs)
    verify(recs)
    assert os.stat(path).st_mode & 0o777 == 0o600


async def test_write_returns_once_the_record_is_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    await log.start()
    await log.write(new_record(request_id="first"))
    assert lines(path)[0]["request_id"] == "first"  # before close, no flush needed
    await log.close()


async def test_chain_continues_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for run in range(3):
        log = AuditLog(str(path))
        await log.start()
        await write_n(log, 5, start=run * 5)
        await log.close()
    recs = lines(path)
    assert len(recs) == 15
    verify(recs)


async def test_hmac_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), hmac_key=b"audit-key")
    await log.start()
    await write_n(log, 3)
    await log.close()
    verify(lines(path), b"audit-key")
    with pytest.raises(AssertionError):
        verify(lines(path))


async def test_torn_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    await log.start()
    await write_n(log, 3)
    await log.close()
    last = lines(path)[-1]
    torn = b'{"ts": "2026-11-28T00:00:00.000Z", "seq": 4, "req'  # a crash mid-write
    path.write_bytes(path.read_bytes() + torn)
    with caplog.at_level(logging.ERROR, logger="proxy.audit._log"):
        log = AuditLog(str(path))
        await log.start()
    assert "ends in a partial record" in caplog.text
    assert (log.seq, log.last_hash) == (3, last["hash"])
    await log.write(new_record(request_id="after"))
    await log.close()
    raw = path.read_bytes().split(b"\n")
    assert raw[3].startswith(b'{"ts": "2026') and raw[3].endswith(b'"req')  # kept, alone
    after = json.loads(raw[4])
    assert after["request_id"] == "after"
    assert after["seq"] == 4 and after["prev"] == last["hash"]
    assert after["hash"] == chain_hash(after)
    assert raw[5] == b"" and len(raw) == 6


@pytest.mark.parametrize("damaged", [
    b'{"seq": "4", "prev": "x", "hash": "y"}',  # the one reader's rules (proxy/audit/_reader.py)
    b'{"seq": 4.0, "prev": "x", "hash": "y"}',
    b'{"seq": 4, "prev": "x"}',
    b'{"seq": 4, "prev": "x", "hash": 7}',
    b'[4, "x", "y"]',
])
async def test_chain_goes_on_from_the_last_record_not_a_damaged_line(
        tmp_path: Path, damaged: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    await log.start()
    await write_n(log, 3)
    await log.close()
    last = lines(path)[-1]
    path.write_bytes(path.read_bytes() + damaged + b"\n")
    log = AuditLog(str(path))
    await log.start()
    assert (log.seq, log.last_hash) == (3, last["hash"])
    await log.close()


async def test_tail_found_past_a_long_last_record(tmp_path: Path) -> None:
    """The tail is read backwards in blocks; a record longer than one block still counts."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    await log.start()
    await log.write(new_record(request_id="r0"))
    await log.write(new_record(request_id="r1", reason="x" * 200_000))
    await log.close()
    log = AuditLog(str(path))
    await log.start()
    assert log.seq == 2
    await log.write(new_record(request_id="r2"))
    await log.close()
    verify(lines(path))


async def test_failed_write_raises_unavailable(tmp_path: Path) -> None:
    log = AuditLog("/dev/full")  # every write: ENOSPC, as on a full disk
    await log.start()
    with pytest.raises(Unavailable, match="could not be written; the call was refused"):
        await log.write(new_record(request_id="r"))
    assert not log.healthy and log.write_errors == 1
    assert log.seq == 0  # the chain did not advance past what is not in the file
    await log.close()


async def test_write_after_close_raises_unavailable(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    with pytest.raises(Unavailable, match="not open"):
        await log.write(new_record(request_id="r"))
    await log.start()
    await log.close()
    with pytest.raises(Unavailable, match="not open"):
        await log.write(new_record(request_id="r"))


async def test_close_writes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    await log.start()
    pending = [asyncio.create_task(log.write(new_record(request_id=f"r{i}")))
               for i in range(20)]
    await asyncio.sleep(0)
    await log.close()
    await asyncio.gather(*pending)
    assert len(lines(path)) == 20
