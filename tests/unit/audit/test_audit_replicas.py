"""One audit log per process (proxy/audit/_replicas.py): names, the ``replica`` field,
anchors that do not cross, and readers that merge several logs by time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy.audit import (
    AuditAnchor,
    AuditFilter,
    AuditLog,
    Cursor,
    Replica,
    anchor_log,
    host_logs,
    logs_in,
    merged,
    new_record,
    rfc3339,
)
from proxy.cli import _main as cli
from proxy.control._audit import answer
from proxy.errors import InvalidField
from proxy.store import store_path
from tests.support import PYTHON, python_env
from tests.unit.audit.test_audit_query import seed

T0 = 1_790_000_000.0


@pytest.mark.parametrize(("replica", "path", "label", "log"), [
    (Replica("h-1"), "/a/audit.jsonl", "h-1", "/a/audit.jsonl"),
    (Replica("gw", named=True), "/a/audit.jsonl", "gw", "/a/audit-gw.jsonl"),
    (Replica("h-1", 2), "/a/audit.jsonl", "h-1/w2", "/a/audit-w2.jsonl"),
    (Replica("gw", 2, named=True), "/a/audit.jsonl", "gw/w2", "/a/audit-gw-w2.jsonl"),
    (Replica("gw", 3, named=True), "/a/log", "gw/w3", "/a/log-gw-w3"),
])
def test_each_process_names_its_log(replica: Replica, path: str, label: str, log: str) -> None:
    assert (replica.label, replica.log_path(path)) == (label, log)


def test_a_replica_without_a_name_is_host_and_pid() -> None:
    assert Replica.of(None).label == f"{socket.gethostname()}-{os.getpid()}"
    assert Replica.of(None, 2, pid=7).label == f"{socket.gethostname()}-7/w2"
    assert Replica.of("gw", 1) == Replica("gw", 1, named=True)


def test_host_logs_are_the_processes_logs_not_their_parts(tmp_path: Path) -> None:
    for name in ("audit.jsonl", "audit.jsonl.1", "audit.jsonl.head", "audit-w1.jsonl",
                 "audit-w1.jsonl.1", "audit-w1.jsonl.head", "audit-gw-w2.jsonl",
                 "other.jsonl", "audit-w1.jsonl.head.tmp"):
        (tmp_path / name).write_text("")
    base = str(tmp_path / "audit.jsonl")
    assert [os.path.basename(p) for p in host_logs(base)] == [
        "audit-gw-w2.jsonl", "audit-w1.jsonl", "audit.jsonl"]
    assert [os.path.basename(p) for p in logs_in([str(tmp_path)])] == [
        "audit-gw-w2.jsonl", "audit-w1.jsonl", "audit.jsonl", "other.jsonl"]


async def _write(path: Path, replica: Replica, times: list[float], home: Path,
                 base: Path) -> None:
    log = AuditLog(str(path), replica=replica.label,
                   anchor=AuditAnchor(store_path(str(home)), log=anchor_log(str(base), str(path))))
    await log.start()
    try:
        for i, t in enumerate(times):
            await log.write(new_record(ts=rfc3339(T0 + t), request_id=f"{replica.label}:{i}",
                                       decision="allow"))
    finally:
        await log.close()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def _edit_first(path: Path) -> None:
    lines = path.read_bytes().splitlines()
    rec = orjson.loads(lines[0])
    rec["decision"] = "deny"
    path.write_bytes(b"\n".join([orjson.dumps(rec), *lines[1:]]) + b"\n")


@pytest.fixture
def two_workers(tmp_path: Path) -> tuple[Path, Path]:
    """A home whose config names audit.jsonl, with the logs of workers 1 and 2."""
    home = tmp_path / "home"
    base = tmp_path / "logs" / "audit.jsonl"
    cfg = tmp_path / "taskgate.yaml"
    cfg.write_text(yaml.safe_dump({"home": str(home), "audit": {"path": str(base)}}))
    return cfg, base


async def test_workers_chain_their_own_logs_and_anchors(two_workers: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    """Each worker's records carry its label; its anchor row is its own, so a worker that
    starts again after the other wrote more does not see records "removed"."""
    cfg, base = two_workers
    home = tmp_path / "home"
    w1, w2 = Replica("gw", 1, named=True), Replica("gw", 2, named=True)
    p1, p2 = Path(w1.log_path(str(base))), Path(w2.log_path(str(base)))
    await _write(p1, w1, [0, 2], home, base)
    await _write(p2, w2, [1, 3, 4, 5], home, base)
    await _write(p1, w1, [6], home, base)  # goes on from its own seq 2, not w2's 4
    assert [(r["replica"], r["seq"]) for r in _lines(p1)] == [("gw/w1", 1), ("gw/w1", 2),
                                                               ("gw/w1", 3)]
    assert {r["replica"] for r in _lines(p2)} == {"gw/w2"}
    assert cli.main(["audit", "verify", "-c", str(cfg)]) == 0


async def test_logs_merges_by_time_and_verify_checks_each_chain(
        two_workers: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, base = two_workers
    home = tmp_path / "home"
    w1, w2 = Replica("h-9", 1), Replica("h-9", 2)
    p1, p2 = Path(w1.log_path(str(base))), Path(w2.log_path(str(base)))
    await _write(p1, w1, [0, 2, 4], home, base)
    await _write(p2, w2, [1, 3], home, base)
    capsys.readouterr()
    want = ["h-9/w1:0", "h-9/w2:0", "h-9/w1:1", "h-9/w2:1", "h-9/w1:2"]
    for args in (["-c", str(cfg)], [str(base.parent)], [str(p2), str(p1)]):
        assert cli.main(["logs", "--json", *args]) == 0
        out = capsys.readouterr().out
        assert [orjson.loads(x)["request_id"] for x in out.splitlines()] == want, args
    assert cli.main(["audit", "verify", "--json", str(base.parent)]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["ok"] and [r["records"] for r in report["logs"]] == [3, 2]
    # One damaged log: named, and the other still reported intact.
    _edit_first(p2)
    for args in (["-c", str(cfg)], [str(base.parent)]):
        assert cli.main(["audit", "verify", *args]) == 1
        out = capsys.readouterr().out
        assert out.startswith("DAMAGED: 2 audit logs")
        assert f"== {p1}\nOK:" in out and f"== {p2}\nDAMAGED: edited" in out


async def test_the_control_plane_says_whose_logs_it_read_and_pages_them_all(
        two_workers: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, base = two_workers
    home = tmp_path / "home"
    own = Replica("h-9")
    w1, w2 = Replica("h-9", 1), Replica("h-9", 2)
    p1, p2 = Path(w1.log_path(str(base))), Path(w2.log_path(str(base)))
    await _write(p1, w1, [0, 2, 4, 6], home, base)
    await _write(p2, w2, [1, 3, 5], home, base)
    flt = AuditFilter()
    mine = own.log_path(str(base))
    want = ["h-9/w1:0", "h-9/w2:0", "h-9/w1:1", "h-9/w2:1", "h-9/w1:2", "h-9/w2:2",
            "h-9/w1:3"]

    def ids(recs: list[dict[str, Any]]) -> list[str]:
        return [str(r["request_id"]) for r in recs]

    # Newest first, page by page: every record once, in time order, across both logs.
    recs, cursor, tail, replicas = answer(mine, str(base), flt, 3, None, None, None)
    assert replicas == ["h-9/w1", "h-9/w2"] and ids(recs) == want[::-1][:3]
    assert tail == "audit-w1.jsonl:4,audit-w2.jsonl:3,audit.jsonl:0"  # its own: none yet
    seen = ids(recs)
    while cursor is not None:
        recs, cursor, _, _ = answer(mine, str(base), flt, 3, None,
                                    Cursor.parse(cursor["before"], None), None)
        seen += ids(recs)
    assert seen == want[::-1]
    # Oldest first from 0 (a task's timeline), then the live tail from the cursor given.
    recs, cursor, tail, _ = answer(mine, str(base), flt, 4, Cursor({}, 0), None, None)
    assert ids(recs) == want[:4]
    assert cursor == {"after": "audit-w1.jsonl:2,audit-w2.jsonl:2,audit.jsonl:0"}  # seqs
    await _write(p2, w2, [7], home, base)
    recs, cursor, tail, _ = answer(mine, str(base), flt, 10, Cursor.parse(tail, 0), None,
                                   None)
    # (the record just written is w2's seq 4; its request id counts from 0 again)
    assert ids(recs) == [*want[4:], "h-9/w2:0"] and recs[-1]["seq"] == 4 and cursor is None
    assert tail == "audit-w1.jsonl:4,audit-w2.jsonl:4,audit.jsonl:0"
    recs, _, _, _ = answer(mine, str(base), flt, 10, Cursor.parse(tail, 0), None, None)
    assert recs == []
    # One replica's log: seq cursors, as with one log.
    recs, cursor, tail, replicas = answer(mine, str(base), flt, 2, None, None, "h-9/w2")
    assert replicas == ["h-9/w2"] and [r["seq"] for r in recs] == [4, 3]
    assert cursor == {"before": "3"} and tail == "4"
    with pytest.raises(InvalidField, match="'h-9/w7' has no log on this host"):
        answer(mine, str(base), flt, 10, None, None, "h-9/w7")


@pytest.mark.parametrize("text", ["a:1,a:2", "a", ":1", "a:x", "a:1,", "a:-1"])
def test_a_cursor_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a cursor"):
        Cursor.parse(text, 0)


def test_merged_orders_by_time() -> None:
    a = [{"ts": "2026-01-01T00:00:00.000Z"}, {"ts": "2026-01-01T00:00:02.000Z"}]
    b = [{"ts": "2026-01-01T00:00:01.000Z"}]
    assert [r["ts"][17:19] for r in merged([iter(a), iter(b)])] == ["00", "01", "02"]
    assert [r["ts"][17:19] for r in merged([iter(a[::-1]), iter(b)], newest_first=True)
            ] == ["02", "01", "00"]


def test_logs_follow_reads_every_log_in_a_folder(tmp_path: Path) -> None:
    """``taskgate logs -f DIR``: records new in either log come out (one reader each)."""
    a, b = tmp_path / "audit-w1.jsonl", tmp_path / "audit-w2.jsonl"
    seed(a, [new_record(ts=rfc3339(T0), request_id="old-a", decision="allow")])
    seed(b, [new_record(ts=rfc3339(T0), request_id="old-b", decision="allow")])
    proc = subprocess.Popen(
        [*PYTHON, "-m", "proxy", "logs", "--json", "--follow", str(tmp_path)],
        cwd=tmp_path, env=python_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        old = [orjson.loads(proc.stdout.readline())["request_id"] for _ in range(2)]
        time.sleep(1.0)  # the readers are past what was there (they poll twice a second)
        seed(b, [new_record(ts=rfc3339(T0 + 1), request_id="new-b", decision="allow")])
        seed(a, [new_record(ts=rfc3339(T0 + 2), request_id="new-a", decision="allow")])
        new = {orjson.loads(proc.stdout.readline())["request_id"] for _ in range(2)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert sorted(old) == ["old-a", "old-b"] and new == {"new-a", "new-b"}
