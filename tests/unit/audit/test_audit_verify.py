"""The hash chain: rotation, restarts, crashes, and every kind of tampering located.

Logs are written by the real :class:`proxy.audit._log.AuditLog` (its writer thread,
its files), then damaged on disk the way an intruder or a crash would, then
checked with ``taskgate audit verify`` as a user runs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.audit import AuditAnchor, verify
from proxy.audit._head import Head, head_path, read_head, write_head
from proxy.audit._log import (
    HEAD_LAG_SECONDS,
    AuditLog,
    chain_hash,
    log_files,
    new_record,
    rfc3339,
)
from proxy.cli import main
from proxy.store import store_path
from tests.support import REPO

KEY = b"k3y-for-the-chain"


def write(path: Path, n: int, *, key: bytes | None = None, max_bytes: int = 0,
          first: int = 0) -> None:
    """Open the log (continuing whatever is there), write ``n`` records, close it."""
    asyncio.run(_write(path, n, key, max_bytes, first))


def home_of(log: Path) -> Path:
    """The state store's home of the log at ``log`` in these tests (see :func:`_config`)."""
    return log.parent / "home"


async def _write(path: Path, n: int, key: bytes | None, max_bytes: int, first: int) -> None:
    log = AuditLog(str(path), hmac_key=key, max_bytes=max_bytes,
                   anchor=AuditAnchor(store_path(str(home_of(path)))))
    await log.start()
    for i in range(first, first + n):
        await log.write(new_record(
            ts=rfc3339(1_700_000_000 + i), request_id=f"r{i}", workload="spiffe://w/a",
            task=f"t{i % 3}", decision="allow" if i % 2 else "deny", method="GET",
            scheme="https", host="api.example", port=443, path=f"/items/{i}", status=200))
    await log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def verify_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    return code, capsys.readouterr().out


def damage(path: Path, key: bytes | None = None) -> tuple[str, str, int, int | None]:
    report = verify(str(path), key=key)
    assert report.damage is not None, report
    d = report.damage
    return d.kind, os.path.basename(d.file), d.line, d.seq


# -- intact logs ---------------------------------------------------------------
def test_intact_log_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 10)
    code, out = verify_cli(capsys, str(log))
    assert code == 0, out
    assert "OK: the audit log is intact" in out
    assert "records: 10 (seq 1..10)" in out
    assert f"time:    {rfc3339(1_700_000_000)} .. {rfc3339(1_700_000_009)}" in out
    assert "files:   1" in out and "SHA-256" in out


def test_restart_continues_the_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    for round_ in range(3):
        write(log, 4, first=round_ * 4)
    recs = [json.loads(line) for line in lines(log)]
    assert [r["seq"] for r in recs] == list(range(1, 13))
    assert all(b["prev"] == a["hash"] for a, b in zip(recs, recs[1:], strict=False))
    report = verify(str(log))
    assert report.ok and report.records == 12


def test_rotation_and_restarts_keep_one_chain(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    for round_ in range(3):  # restarts between rotations, each continuing the numbering
        write(log, 30, max_bytes=4096, first=round_ * 30)
    files = log_files(str(log))
    assert len(files) >= 4, files
    assert files[:-1] == [f"{log}.{i}" for i in range(1, len(files))]
    for f in files:
        assert os.path.getsize(f) <= 4096
    # Each file's first record links to the previous file's last one.
    prev_last = None
    for f in files:
        recs = [json.loads(x) for x in Path(f).read_bytes().splitlines()]
        if prev_last is not None:
            assert recs[0]["prev"] == prev_last["hash"]
            assert recs[0]["seq"] == prev_last["seq"] + 1
        prev_last = recs[-1]
    assert prev_last is not None and prev_last["seq"] == 90
    code, out = verify_cli(capsys, "-c", str(_config(tmp_path, log)))
    assert code == 0, out
    assert "records: 90 (seq 1..90)" in out and f"files:   {len(files)}" in out
    # Explicit files in shell-glob order (audit.jsonl, .1, .10, .2 …) are put in chain order.
    code, out = verify_cli(capsys, *sorted(files))
    assert code == 0, out


def test_restart_after_rotation_with_an_empty_current_file(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 30, max_bytes=4096)
    os.rename(log, f"{log}.{len(log_files(str(log)))}")  # as if rotated, then stopped
    log.write_bytes(b"")
    write(log, 3, first=30)
    assert json.loads(lines(log)[0])["seq"] == 31
    assert verify(str(log)).ok


# -- tampering -----------------------------------------------------------------
def test_edited_field_is_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 8)
    data = lines(log)
    data[3] = data[3].replace(b'"decision":"allow"', b'"decision":"deny"')
    assert b'"decision":"deny"' in data[3]
    log.write_bytes(b"".join(data))
    code, out = verify_cli(capsys, str(log))
    assert code == 1
    assert f"DAMAGED: edited: {log} line 4 (seq 4)" in out
    assert "records: 3 (seq 1..3)" in out


def test_edited_record_with_recomputed_hash_is_located(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 8)
    data = lines(log)
    rec = orjson.loads(data[4])
    rec["host"] = "elsewhere.example"
    rec["hash"] = chain_hash(rec)  # an intruder who knows the format
    data[4] = orjson.dumps(rec) + b"\n"
    log.write_bytes(b"".join(data))
    kind, _, line, seq = damage(log)
    assert (kind, line, seq) == ("edited", 5, 5)


def test_deleted_line_is_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 8)
    data = lines(log)
    del data[4]  # seq 5
    log.write_bytes(b"".join(data))
    code, out = verify_cli(capsys, str(log))
    assert code == 1
    assert f"DAMAGED: removed: {log} line 5 (seq 6)" in out
    assert "seq 5 missing" in out


def test_deleted_lines_at_the_start_are_located(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 8)
    log.write_bytes(b"".join(lines(log)[2:]))
    kind, _, line, seq = damage(log)
    assert (kind, line, seq) == ("removed", 1, 3)


def test_swapped_lines_are_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 8)
    data = lines(log)
    data[2], data[3] = data[3], data[2]  # seq 3 and 4
    log.write_bytes(b"".join(data))
    code, out = verify_cli(capsys, str(log))
    assert code == 1
    assert f"DAMAGED: reordered: {log} line 3 (seq 4)" in out
    assert f"seq 3 should come before it but appears later ({log} line 4)" in out


def test_duplicated_line_is_located(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 6)
    data = lines(log)
    data.insert(4, data[1])  # seq 2 again after seq 4
    log.write_bytes(b"".join(data))
    kind, _, line, seq = damage(log)
    assert (kind, line, seq) == ("reordered", 5, 2)


def test_truncated_mid_line_is_located(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 8)
    size = log.stat().st_size
    with open(log, "r+b") as f:
        f.truncate(size - 40)
    code, out = verify_cli(capsys, str(log))
    assert code == 1
    assert f"DAMAGED: truncated: {log} line 8:" in out
    assert "records: 7 (seq 1..7)" in out


@pytest.mark.parametrize("which", ["first", "middle", "last", "current"])
def test_removed_rotated_file_is_detected(tmp_path: Path, which: str) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 60, max_bytes=4096)
    files = log_files(str(log))
    assert len(files) >= 4
    victim = {"first": files[0], "middle": files[1], "last": files[-2],
              "current": files[-1]}[which]
    removed_first = int(json.loads(Path(victim).read_bytes().splitlines()[0])["seq"])
    os.remove(victim)
    report = verify(str(log))
    assert report.damage is not None
    d = report.damage
    assert d.kind == "removed", d
    if which == "current":
        assert d.file == str(log) and "missing" in d.detail
        return
    after = files[files.index(victim) + 1]
    assert (d.file, d.line) == (after, 1)
    assert f"seq {removed_first}.." in d.detail
    if which != "first":
        assert "a rotated file" in d.detail and os.path.basename(victim) not in after


# -- the end of the chain: its head ----------------------------------------------
def test_intact_log_reaches_its_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 5)
    last = json.loads(lines(log)[-1])
    assert read_head(str(log), None) == Head(5, last["hash"])
    code, out = verify_cli(capsys, str(log))
    assert code == 0, out
    assert f"head:    {head_path(str(log))} (the log reaches it)" in out


def test_head_follows_a_burst_before_close(tmp_path: Path) -> None:
    """Under load the head may trail by a batch or two; once the burst is written it
    names the last record, without waiting for close."""
    log = tmp_path / "audit.jsonl"

    async def burst() -> Head | None:
        audit = AuditLog(str(log))
        await audit.start()
        await asyncio.gather(*(audit.write(new_record(ts=rfc3339(0), request_id=str(i),
                                                      decision="allow")) for i in range(500)))
        for _ in range(100):  # the head is written just after the callers are released
            head = read_head(str(log), None)
            if head is not None and head.seq == 500:
                break
            await asyncio.sleep(0.01)
        await audit.close()
        return head

    assert asyncio.run(burst()) == Head(500, json.loads(lines(log)[-1])["hash"])


def test_head_trails_a_quiet_log_by_at_most_the_lag(tmp_path: Path) -> None:
    """The head is not rewritten after every batch (it cost more than the records),
    but a record written inside the lag still reaches it with no write after it."""
    log = tmp_path / "audit.jsonl"

    async def two() -> tuple[Head | None, Head | None, float]:
        audit = AuditLog(str(log))
        await audit.start()
        await audit.write(new_record(ts=rfc3339(0), request_id="1", decision="allow"))
        await audit.write(new_record(ts=rfc3339(0), request_id="2", decision="allow"))
        written = time.monotonic()
        first = read_head(str(log), None)  # the second record is inside the lag
        head = first
        while (head is None or head.seq < 2) and time.monotonic() - written < 2:
            await asyncio.sleep(0.005)
            head = read_head(str(log), None)
        took = time.monotonic() - written
        await audit.close()
        return first, head, took

    first, head, took = asyncio.run(two())
    assert first is not None and first.seq in (1, 2)  # 2 only if the machine stalled
    assert head == Head(2, json.loads(lines(log)[-1])["hash"])
    assert took <= HEAD_LAG_SECONDS + 0.5  # the lag, and room for a loaded machine


def test_records_cut_from_the_end_are_detected_across_a_restart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 8)
    data = lines(log)
    log.write_bytes(b"".join(data[:-2]))  # seq 7 and 8 gone: what is left is a valid chain
    code, out = verify_cli(capsys, str(log))
    assert code == 1
    assert f"DAMAGED: removed: {log} line 6 (seq 7)" in out
    assert "seq 7..8 missing (cut from the end)" in out
    # A restart does not chain over the gap: it goes on from the head, and says so.
    with caplog.at_level("ERROR", logger="proxy.audit._log"):
        write(log, 2, first=8)
    assert "ends at seq 6 but its chain head says seq 8" in caplog.text
    after = [json.loads(x) for x in lines(log)]
    assert [r["seq"] for r in after] == [1, 2, 3, 4, 5, 6, 9, 10]
    assert after[6]["prev"] == json.loads(data[-1])["hash"]
    code, out = verify_cli(capsys, str(log))
    assert code == 1
    assert f"DAMAGED: removed: {log} line 7 (seq 9): after line 6: seq 7..8 missing" in out


def test_replaced_last_records_are_detected(tmp_path: Path) -> None:
    """Cut the end and append records with recomputed hashes: a valid unkeyed chain,
    but its last record is not the one the head names."""
    log = tmp_path / "audit.jsonl"
    write(log, 6)
    data = lines(log)
    rec = orjson.loads(data[-1])
    rec["decision"], rec["status"] = "deny", 403
    rec["hash"] = chain_hash(rec)
    log.write_bytes(b"".join(data[:-1]) + orjson.dumps(rec) + b"\n")
    assert damage(log) == ("edited", "audit.jsonl", 6, 6)
    assert "differs from the chain head" in str(verify(str(log)).damage)


def test_records_cut_from_the_end_after_rotation(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 60, max_bytes=4096)
    assert len(log_files(str(log))) >= 3
    end = read_head(str(log), None)
    assert end is not None and end.seq == 60
    log.write_bytes(b"")  # the whole current file emptied
    d = verify(str(log)).damage
    assert d is not None and d.kind == "removed" and d.seq is not None
    assert f"seq {d.seq}..60 missing (cut from the end)" in d.detail
    code = main(["audit", "verify", *log_files(str(log))])  # explicit files: same head
    assert code == 1


def test_keyed_head_cannot_be_forged_without_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "audit.jsonl"
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    write(log, 6, key=KEY)
    code, out = verify_cli(capsys, "--hmac-key-file", str(key_file), str(log))
    assert code == 0, out
    data = lines(log)
    log.write_bytes(b"".join(data[:-2]))
    last = json.loads(data[-3])
    write_head(str(log), Head(4, last["hash"]), b"not the key")  # agrees with the cut log
    code, out = verify_cli(capsys, "--hmac-key-file", str(key_file), str(log))
    assert code == 1 and "edited" in out and "MAC does not match" in out
    write_head(str(log), Head(4, last["hash"]), None)  # no MAC at all
    code, out = verify_cli(capsys, "--hmac-key-file", str(key_file), str(log))
    assert code == 1 and "MAC does not match" in out
    with caplog.at_level("ERROR", logger="proxy.audit._log"):
        write(log, 1, key=KEY, first=6)
    assert "MAC does not match" in caplog.text


def test_missing_head_is_reported_on_start(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 3)
    os.remove(head_path(str(log)))
    report = verify(str(log))
    assert report.ok and report.head is None  # an older log: nothing to compare with
    with caplog.at_level("ERROR", logger="proxy.audit._log"):
        write(log, 1, first=3)
    assert "has no chain head" in caplog.text
    assert read_head(str(log), None) == Head(4, json.loads(lines(log)[-1])["hash"])


# -- crashes -------------------------------------------------------------------
def test_crash_mid_write_is_reported_precisely(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 5)
    whole = lines(log)[-1]
    with open(log, "ab") as f:  # what a crash mid-write leaves: part of the next record
        f.write(whole[: len(whole) // 2].replace(b'"seq":5', b'"seq":6'))
    code, out = verify_cli(capsys, str(log))
    assert code == 1 and f"DAMAGED: truncated: {log} line 6:" in out
    assert "cut-off record" in out
    write(log, 3, first=5)  # the restart: the chain goes on, on a line of its own
    data = lines(log)
    assert len(data) == 9 and json.loads(data[6])["seq"] == 6
    code, out = verify_cli(capsys, str(log))
    assert code == 1
    assert f"DAMAGED: truncated: {log} line 6:" in out and "continues intact" in out
    code, out = verify_cli(capsys, "--accept-torn", str(log))
    assert code == 0, out
    assert "records: 8 (seq 1..8)" in out and f"warning: truncated: {log} line 6" in out


def test_garbage_line_that_breaks_the_chain_is_an_edit(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 6)
    data = lines(log)
    data[2] = b'{"seq": "x"}\n'
    log.write_bytes(b"".join(data))
    kind, _, line, seq = damage(log)
    assert (kind, line, seq) == ("edited", 3, None)


def test_failed_write_leaves_no_merged_line(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that stops half-way (disk full) is refused; the next one starts on a line of
    its own and the chain takes in whatever reached the disk."""
    from proxy.errors import Unavailable

    log = tmp_path / "audit.jsonl"
    write(log, 3)
    real_write = os.write
    state = {"fail": True}

    async def scenario() -> AuditLog:
        audit = AuditLog(str(log))
        await audit.start()

        def half_then_fail(fd: int, data: Any) -> int:
            if state["fail"] and fd == audit._fd:
                state["fail"] = False
                real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", half_then_fail)
        with pytest.raises(Unavailable):
            await audit.write(new_record(ts=rfc3339(time.time()), request_id="lost",
                                         decision="allow"))
        assert audit.write_errors == 1 and not audit.healthy
        await audit.write(new_record(ts=rfc3339(time.time()), request_id="next",
                                     decision="allow"))
        await audit.close()
        return audit

    audit = asyncio.run(scenario())
    assert audit.healthy and not state["fail"]
    data = lines(log)
    assert json.loads(data[-1])["request_id"] == "next" and json.loads(data[-1])["seq"] == 4
    report = verify(str(log), accept_torn=True)
    assert report.ok and report.records == 4 and len(report.torn) == 1


# -- the keyed chain -------------------------------------------------------------
def test_hmac_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    write(log, 6, key=KEY)
    first = json.loads(lines(log)[0])
    assert first["hash"] != hashlib.sha256(b"").hexdigest()
    assert first["hash"] == chain_hash(first, KEY) != chain_hash(first)
    code, out = verify_cli(capsys, "--hmac-key-file", str(key_file), str(log))
    assert code == 0 and "HMAC-SHA-256" in out, out
    code, out = verify_cli(capsys, "-c", str(_config(tmp_path, log, key_file)))
    assert code == 0, out
    code, out = verify_cli(capsys, str(log))  # no key: says so
    assert code == 1 and "line 1 (seq 1)" in out and "--hmac-key-file" in out
    # Someone who can write the file but lacks the key cannot recompute the chain.
    data = lines(log)
    rec = orjson.loads(data[3])
    rec["status"] = 500
    rec["hash"] = chain_hash(rec)
    data[3] = orjson.dumps(rec) + b"\n"
    log.write_bytes(b"".join(data))
    code, out = verify_cli(capsys, "--hmac-key-file", str(key_file), str(log))
    assert code == 1 and f"DAMAGED: edited: {log} line 4 (seq 4)" in out


def test_verify_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "nope.jsonl")]) == 2
    empty_key = tmp_path / "key"
    empty_key.write_bytes(b"\n")
    log = tmp_path / "audit.jsonl"
    write(log, 1)
    assert main(["audit", "verify", "--hmac-key-file", str(empty_key), str(log)]) == 2
    assert main(["audit", "verify", "-c", str(_config(tmp_path, tmp_path / "none.jsonl"))]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "empty" in err and "no audit log" in err


def test_verify_json_and_exit_code_from_a_process(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 4)
    run = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", "--json", str(log)],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["ok"] and out["records"] == 4 and out["last_seq"] == 4 and out["damage"] is None
    data = lines(log)
    log.write_bytes(b"".join(data[:1] + data[2:]))
    run = subprocess.run([sys.executable, "-m", "proxy", "audit", "verify", "--json", str(log)],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, timeout=60)
    assert run.returncode == 1
    assert json.loads(run.stdout)["damage"] == {
        "kind": "removed", "file": str(log), "line": 2, "seq": 3,
        "detail": "after line 1: seq 2 missing"}


def _config(tmp_path: Path, log: Path, key_file: Path | None = None) -> Path:
    audit: dict[str, Any] = {"path": str(log)}
    if key_file is not None:
        audit["hmac_key_file"] = str(key_file)
    cfg = tmp_path / "taskgate.yaml"
    cfg.write_text(json.dumps({"home": str(home_of(log)), "audit": audit}))
    return cfg


def test_config_rotation_key() -> None:
    from proxy.config._model import parse_config
    from proxy.errors import ConfigError

    assert parse_config({"audit": {"max_bytes": 0}}).audit_max_bytes == 0
    assert parse_config({"audit": {"max_bytes": 1 << 20}}).audit_max_bytes == 1 << 20
    assert parse_config({}).audit_max_bytes == 100 * 1024 * 1024
    for bad in (100, "10MB", True, -1):
        with pytest.raises(ConfigError, match="audit.max_bytes"):
            parse_config({"audit": {"max_bytes": bad}})


def test_real_gateway_killed_mid_write(tmp_path: Path, shared_files: dict[str, Path],
                                       upstream: Any, keys: Any,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the real gateway, cut its last record as a crash mid-write would, restart it:
    the torn line stays on a line of its own and verify names it; the chain goes on."""
    import signal

    from tests.conftest import base_config
    from tests.support import Gateway

    gw = Gateway(tmp_path, base_config(shared_files, upstream)).start()
    base = f"http://127.0.0.1:{upstream.http_port}"
    try:
        with gw.client(keys.token()) as c:
            for i in range(4):
                assert c.get(f"{base}/allowed/{i}").status_code == 200
        gw.stop(signal.SIGKILL)
        data = lines(gw.audit_path)
        # The four calls are recorded; under load the log may hold a record of the
        # gateway's own too, so the test counts what is there rather than assuming 4.
        paths = [json.loads(x).get("path") for x in data]
        assert [f"/allowed/{i}" for i in range(4)] == [p for p in paths if p and
                                                      p.startswith("/allowed/")]
        n = len(data)
        gw.audit_path.write_bytes(b"".join(data[:-1]) + data[-1][:70])  # the last one, cut
        # A crash mid-write comes before the chain head and the store's anchor name the
        # batch: both name n - 1 (the kill itself may have come after either moved on).
        end = json.loads(data[-2])["hash"]
        write_head(str(gw.audit_path), Head(n - 1, end), None)
        anchor = AuditAnchor(store_path(str(gw.home)))
        anchor.advance(n - 1, end, None, force=True)
        anchor.close()
        gw.start()
        with gw.client(keys.token()) as c:
            assert c.get(f"{base}/allowed/after").status_code == 200
    finally:
        gw.stop()
    after = lines(gw.audit_path)
    assert after[n - 1] == data[-1][:70] + b"\n"
    resumed = json.loads(after[n])
    assert resumed["seq"] == n and resumed["path"] == "/allowed/after"
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED: truncated: {gw.audit_path.relative_to(tmp_path)} line {n}:" in out
    assert main(["audit", "verify", "--accept-torn"]) == 0
    assert f"records: {len(after) - 1} (seq 1..{len(after) - 1})" in capsys.readouterr().out
