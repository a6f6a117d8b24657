"""Issue 17.4: a rolled-back audit log no longer verifies.

The head file sits in the log's own folder: cutting the newest records and
putting back an older ``.head`` (or deleting it) left a log that verified. The
writer now also keeps the chain's end in the state store (``AuditAnchor``),
and ``taskgate audit verify`` on the configured log compares with it. Logs are
written by the real :class:`proxy.audit._log.AuditLog` (and by the real gateway),
damaged on disk as an intruder would, and checked with the real CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import AuditAnchor, AuditLog, log_files, new_record, read_anchor, rfc3339, verify
from proxy.audit._head import Head, head_mac, head_path, read_head, write_head
from proxy.cli import main
from proxy.store._store import STORE_FILE, store_path
from tests.support import PYTHON, Gateway, python_env

KEY = b"the-anchor-test-key"


# -- helpers -------------------------------------------------------------------------
def home(log: Path) -> Path:
    return log.parent / "home"


def write(log: Path, n: int, *, key: bytes | None = None, max_bytes: int = 0,
          first: int = 0, anchored: bool = True) -> None:
    """Open the log (continuing it), write ``n`` records, close it: as a gateway run does."""
    async def run() -> None:
        anchor = AuditAnchor(store_path(str(home(log)))) if anchored else None
        audit = AuditLog(str(log), hmac_key=key, max_bytes=max_bytes, anchor=anchor)
        await audit.start()
        for i in range(first, first + n):
            await asyncio.wait_for(audit.write(new_record(
                ts=rfc3339(1_700_000_000 + i), request_id=f"r{i}", workload="spiffe://w/a",
                decision="allow", method="GET", scheme="https", host="api.example",
                port=443, path=f"/items/{i}", status=200)), 5)
        await audit.close()

    asyncio.run(run())


def config(log: Path, key: bytes | None = None) -> Path:
    audit: dict[str, Any] = {"path": str(log)}
    if key is not None:
        key_file = log.parent / "chain.key"
        key_file.write_bytes(key)
        audit["hmac_key_file"] = str(key_file)
    cfg = log.parent / "taskgate.yaml"
    cfg.write_text(json.dumps({"home": str(home(log)), "audit": audit}))
    return cfg


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    return code, capsys.readouterr().out


def keep(log: Path, n: int) -> None:
    """Cut the (single-file) log back to its first ``n`` lines."""
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:n]))


def rollback(log: Path, total: int, cut: int, key: bytes | None) -> None:
    """The attack: a log of ``total`` records, its newest ``cut`` removed, and the head
    the gateway wrote when the log was that long put back in place."""
    write(log, total - cut, key=key)
    old_head = Path(head_path(str(log))).read_bytes()
    write(log, cut, key=key, first=total - cut)
    keep(log, total - cut)
    Path(head_path(str(log))).write_bytes(old_head)


# -- the anchor in the store ------------------------------------------------------
def test_anchor_only_moves_forward(tmp_path: Path) -> None:
    anchor = AuditAnchor(str(tmp_path / "h" / STORE_FILE))
    assert anchor.read() is None
    assert os.stat(tmp_path / "h" / STORE_FILE).st_mode & 0o777 == 0o600
    anchor.advance(5, "a" * 64, None)
    anchor.advance(3, "b" * 64, None)  # older: ignored
    assert anchor.read() == (Head(5, "a" * 64), None)
    anchor.advance(5, "c" * 64, "m", sync=True)
    assert anchor.read() == (Head(5, "c" * 64), "m")
    anchor.advance(2, "d" * 64, None, force=True)  # force: the stored one was not ours
    assert anchor.read() == (Head(2, "d" * 64), None)
    anchor.close()


def test_anchor_read_only_never_creates_the_store(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / STORE_FILE
    assert read_anchor(str(path), None).head is None
    assert not path.parent.exists()
    path.parent.mkdir()
    sqlite3.connect(path).close()  # a store without the table
    state = read_anchor(str(path), None)
    assert state.head is None and state.error is None


@pytest.mark.parametrize(("row", "why"), [
    ((5, "a" * 64, "bad-mac"), "MAC does not match"),
    ((5, "a" * 64, None), "MAC does not match"),  # keyed log, unkeyed anchor
    (("five", "a" * 64, None), "not a chain end"),
    ((1.5, "a" * 64, None), "not a chain end"),
    ((-1, "a" * 64, None), "not a chain end"),
    ((5, b"a blob", None), "not a chain end"),
    ((5, "a" * 64, b"a blob"), "not a chain end"),
])
def test_anchor_that_is_not_ours_is_an_error(tmp_path: Path, row: tuple[Any, ...],
                                             why: str) -> None:
    path = tmp_path / STORE_FILE
    AuditAnchor(str(path)).read()  # creates the table
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO audit_anchor VALUES (1, ?, ?, ?, 0)", row)
    state = read_anchor(str(path), KEY)
    assert state.head is None and state.error is not None and why in state.error


def test_writer_keeps_the_anchor_with_its_head(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 7, key=KEY)
    head = read_head(str(log), KEY)
    assert head is not None and head.seq == 7
    assert read_anchor(store_path(str(home(log))), KEY).head == head
    row = AuditAnchor(store_path(str(home(log))), readonly=True).read()
    assert row is not None and row[1] == head_mac(head, KEY)


# -- rollback: cut the newest records, put back an older head ------------------------
@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("cut", [1, 3, 9])
def test_rolled_back_log_is_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    keyed: bool, cut: int) -> None:
    key = KEY if keyed else None
    log = tmp_path / "audit.jsonl"
    rollback(log, 10, cut, key)
    end = 10 - cut
    # Without the anchor (explicit files): the rollback is a valid log with its head.
    key_args = ["--hmac-key-file", str(config(log, key).parent / "chain.key")] if keyed else []
    code, out = cli(capsys, *key_args, str(log))
    assert code == 0, out
    assert "anchor:  not checked" in out
    # With the config: compared with the state store's anchor.
    code, out = cli(capsys, "-c", str(config(log, key)))
    assert code == 1, out
    missing = f"seq {end + 1}" if cut == 1 else f"seq {end + 1}..10"
    assert f"DAMAGED: removed: {log} line {end} (seq {end + 1}): the log ends here, but the " \
           f"state store's anchor ({store_path(str(home(log)))}) says seq 10: {missing} " \
           "missing" in out
    code, out = cli(capsys, "-c", str(config(log, key)), "--accept-missing-head")
    assert code == 1, out  # records gone are never accepted
    report = verify(str(log), key=key, anchor=read_anchor(store_path(str(home(log))), key))
    assert report.damage is not None and report.damage.kind == "removed"


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_default_config_in_the_current_folder_checks_the_anchor(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        keyed: bool) -> None:
    """``taskgate audit verify`` without -c reads ./taskgate.yaml: the anchor is checked
    too, and so it is when the configured log is given as a file."""
    key = KEY if keyed else None
    log = tmp_path / "audit.jsonl"
    rollback(log, 6, 2, key)
    config(log, key)  # ./taskgate.yaml
    monkeypatch.chdir(tmp_path)
    code, out = cli(capsys)
    assert code == 1 and "state store's anchor" in out, out
    code, out = cli(capsys, "audit.jsonl")
    assert code == 1 and "state store's anchor" in out, out


def test_edited_end_with_recomputed_head_differs_from_the_anchor(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unkeyed: the last record rewritten with a recomputed hash, and a head to match; the
    anchor still holds the real end."""
    from proxy.audit._log import chain_hash

    log = tmp_path / "audit.jsonl"
    write(log, 5)
    rows = log.read_bytes().splitlines(keepends=True)
    last = json.loads(rows[-1])
    last["decision"], last["status"] = "deny", 403
    last["hash"] = chain_hash(last)
    log.write_bytes(b"".join(rows[:-1]) + json.dumps(last).encode() + b"\n")
    write_head(str(log), Head(5, last["hash"]), None)
    code, out = cli(capsys, str(log))
    assert code == 0, out  # the file and its head agree
    code, out = cli(capsys, "-c", str(config(log)))
    assert code == 1, out
    assert f"DAMAGED: edited: {log} line 5 (seq 5): the record differs from the state " \
           "store's anchor" in out


# -- a deleted or older head -------------------------------------------------------
@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_deleted_head_is_damage_unless_accepted(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                keyed: bool) -> None:
    key = KEY if keyed else None
    log = tmp_path / "audit.jsonl"
    write(log, 8, key=key)
    os.remove(head_path(str(log)))
    cfg = str(config(log, key))
    code, out = cli(capsys, "-c", cfg)
    assert code == 1, out
    assert "DAMAGED: removed:" in out and "the chain head is missing" in out
    assert "--accept-missing-head accepts it" in out
    code, out = cli(capsys, "-c", cfg, "--accept-missing-head")
    assert code == 0, out
    assert "warning:" in out and "the chain head is missing" in out


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("cut", [1, 4])
def test_deleted_head_and_cut_records_are_never_accepted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], keyed: bool, cut: int) -> None:
    key = KEY if keyed else None
    log = tmp_path / "audit.jsonl"
    write(log, 8, key=key)
    keep(log, 8 - cut)
    os.remove(head_path(str(log)))
    code, out = cli(capsys, "-c", str(config(log, key)), "--accept-missing-head")
    assert code == 1, out
    assert f"says seq 8: seq {9 - cut}" in out and "DAMAGED: removed:" in out


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_older_head_put_back_over_a_whole_log(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              keyed: bool) -> None:
    key = KEY if keyed else None
    log = tmp_path / "audit.jsonl"
    write(log, 4, key=key)
    old_head = Path(head_path(str(log))).read_bytes()
    write(log, 4, key=key, first=4)
    Path(head_path(str(log))).write_bytes(old_head)
    cfg = str(config(log, key))
    code, out = cli(capsys, "-c", cfg)
    assert code == 1, out
    assert "the chain head says seq 4, older than the state store's anchor (seq 8)" in out
    code, out = cli(capsys, "-c", cfg, "--accept-missing-head")
    assert code == 0 and "warning:" in out, out


def test_missing_anchor_is_damage_unless_accepted(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 3, anchored=False)  # a log from before anchors: head, no anchor
    cfg = str(config(log))
    code, out = cli(capsys, "-c", cfg)
    assert code == 1 and "the state store has no anchor for this log" in out, out
    code, out = cli(capsys, "-c", cfg, "--accept-missing-head")
    assert code == 0 and "warning:" in out, out
    # The next run of the gateway anchors it.
    write(log, 1, first=3)
    code, out = cli(capsys, "-c", cfg)
    assert code == 0, out
    assert f"anchor:  {store_path(str(home(log)))} seq 4 (the log reaches it)" in out


def test_deleted_store_is_damage_unless_accepted(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    write(log, 3)
    for name in os.listdir(home(log)):
        os.remove(home(log) / name)
    code, out = cli(capsys, "-c", str(config(log)))
    assert code == 1 and "no anchor" in out, out


def test_forged_anchor_of_a_keyed_log(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Lowered in the store by someone without the key: verify says so; the next writer
    says so and replaces it with its own."""
    log = tmp_path / "audit.jsonl"
    write(log, 6, key=KEY)
    old = Path(head_path(str(log))).read_bytes()
    with sqlite3.connect(store_path(str(home(log)))) as conn:
        conn.execute("UPDATE audit_anchor SET seq = 2, hash = ?", ("e" * 64,))
    keep(log, 2)
    Path(head_path(str(log))).write_bytes(old)
    code, out = cli(capsys, "-c", str(config(log, KEY)))
    assert code == 1, out
    assert "the audit anchor in" in out and "MAC does not match" in out
    with caplog.at_level("ERROR", logger="proxy.audit._log"):
        write(log, 1, key=KEY, first=99)
    assert "MAC does not match" in caplog.text


# -- the writer goes on from the anchor ------------------------------------------
@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_writer_goes_on_from_the_anchor_after_a_rollback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        keyed: bool) -> None:
    key = KEY if keyed else None
    log = tmp_path / "audit.jsonl"
    rollback(log, 9, 4, key)
    with caplog.at_level("ERROR", logger="proxy.audit._log"):
        write(log, 2, key=key, first=9)
    assert "ends at seq 5 but its anchor in the state store" in caplog.text
    recs = [json.loads(x) for x in log.read_bytes().splitlines()]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5, 10, 11]
    key_args = ["--hmac-key-file", str(config(log, key).parent / "chain.key")] if keyed else []
    code, out = cli(capsys, *key_args, str(log))  # even without the anchor: the gap shows
    assert code == 1 and "removed:" in out and "seq 6..9 missing" in out, out


# -- rotation boundaries -----------------------------------------------------------
def rotated_run(log: Path, key: bytes | None, n: int = 40) -> dict[int, bytes]:
    """``n`` runs of one record each, rotating every few records; the head after each."""
    heads = {}
    for i in range(n):
        write(log, 1, key=key, max_bytes=4096, first=i)
        heads[i + 1] = Path(head_path(str(log))).read_bytes()
    assert len(log_files(str(log))) >= 4
    return heads


def last_seq(path: str) -> int:
    return json.loads(Path(path).read_bytes().splitlines()[-1])["seq"]


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("how", ["empty-current", "newest-rotated-as-current",
                                 "two-files-back"])
def test_cut_at_a_rotation_boundary(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    keyed: bool, how: str) -> None:
    """The newest records removed exactly where a file ends, and the head of that moment
    put back: every file that is left is whole, and the chain and its head agree."""
    key = KEY if keyed else None
    log = tmp_path / "audit.jsonl"
    heads = rotated_run(log, key)
    rotated = log_files(str(log))[:-1]
    if how == "empty-current":
        end = last_seq(rotated[-1])
        log.write_bytes(b"")
    elif how == "newest-rotated-as-current":
        end = last_seq(rotated[-1])
        os.replace(rotated[-1], log)
    else:
        end = last_seq(rotated[-2])
        os.remove(rotated[-1])
        os.replace(rotated[-2], log)
    Path(head_path(str(log))).write_bytes(heads[end])
    key_args = ["--hmac-key-file", str(config(log, key).parent / "chain.key")] if keyed else []
    code, out = cli(capsys, *key_args, *log_files(str(log)))
    assert code == 0, out  # the rollback is invisible without the anchor
    code, out = cli(capsys, "-c", str(config(log, key)))
    assert code == 1, out
    assert f"says seq 40: seq {end + 1}..40 missing" in out


# -- the real gateway ----------------------------------------------------------------
def wait_head(gw: Gateway, seq: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            doc = json.loads(Path(head_path(str(gw.audit_path))).read_bytes())
        except (OSError, ValueError):
            doc = {}
        if doc.get("seq") == seq:
            return
        time.sleep(0.02)
    raise AssertionError(f"the head never reached seq {seq}")


def verify_process(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYTHON, "-m", "proxy", "audit", "verify", "-c",
                           str(gw.config_path), *args],
                          cwd=gw.dir, env=python_env(), capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_real_gateway_rollback_is_detected(tmp_path: Path, shared_files: dict[str, Path],
                                           upstream: Any, keys: Any, keyed: bool) -> None:
    from tests.conftest import base_config

    cfg = base_config(shared_files, upstream)
    if keyed:
        (tmp_path / "chain.key").write_bytes(KEY)
        cfg["audit"] = {"hmac_key_file": str(tmp_path / "chain.key")}
    gw = Gateway(tmp_path, cfg).start()
    base = f"http://127.0.0.1:{upstream.http_port}"
    try:
        with gw.client(keys.token()) as c:
            for i in range(3):
                assert c.get(f"{base}/allowed/{i}").status_code == 200
            wait_head(gw, 3)
            old_head = Path(head_path(str(gw.audit_path))).read_bytes()
            for i in range(3, 6):
                assert c.get(f"{base}/allowed/{i}").status_code == 200
    finally:
        assert gw.stop() == 0
    full = gw.audit_path.read_bytes()
    run = verify_process(gw)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "anchor:" in run.stdout and "seq 6 (the log reaches it)" in run.stdout
    # Rolled back: three records cut, the head of that moment put back.
    keep(gw.audit_path, 3)
    Path(head_path(str(gw.audit_path))).write_bytes(old_head)
    run = verify_process(gw)
    assert run.returncode == 1, run.stdout
    assert "DAMAGED: removed:" in run.stdout and "seq 4..6 missing" in run.stdout
    run = verify_process(gw, "--accept-missing-head")
    assert run.returncode == 1, run.stdout
    # The head deleted, the records whole: damage unless accepted.
    gw.audit_path.write_bytes(full)
    os.remove(head_path(str(gw.audit_path)))
    run = verify_process(gw)
    assert run.returncode == 1 and "the chain head is missing" in run.stdout, run.stdout
    assert verify_process(gw, "--accept-missing-head").returncode == 0
    # Rolled back again, and the gateway restarted on it: it goes on from the anchor.
    keep(gw.audit_path, 3)
    Path(head_path(str(gw.audit_path))).write_bytes(old_head)
    gw.start()
    try:
        with gw.client(keys.token()) as c:
            assert c.get(f"{base}/allowed/after").status_code == 200
    finally:
        assert gw.stop() == 0
    assert "records were removed from its end" in gw.output()
    seqs = [json.loads(x)["seq"] for x in gw.audit_path.read_bytes().splitlines()]
    assert seqs == [1, 2, 3, 7]
    run = verify_process(gw)
    assert run.returncode == 1 and "seq 4..6 missing" in run.stdout, run.stdout
