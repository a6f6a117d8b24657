"""``taskgate logs`` and ``GET /v1/audit``: the same filters, exactly the matching records.

The log holds seeded records (tasks, MCP tools, every decision: what other
features write) followed by real calls through the real gateway. Expected
results come from a plain reading of the file with the test's own predicate.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.audit import DECISIONS, AuditLog, log_files, new_record, rfc3339
from proxy.cli import main
from tests.conftest import base_config
from tests.support import REPO, WORKLOAD, Gateway, Keys, Upstream

OTHER = "spiffe://acme.test/agent/other"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC).timestamp()
TOOLS: list[Any] = [None, {"name": "search_docs", "args_digest": "ab12"},
                    [{"name": "list_issues"}, {"name": "search_docs"}], {"name": "open_pr"}]
HOSTS = ["api.example.com", "mcp.example.com", "other.example"]


def seed_records() -> list[dict[str, Any]]:
    return [new_record(
        ts=rfc3339(T0 + i * 60), request_id=f"seed{i}", workload=[WORKLOAD, OTHER][i % 2],
        task=["t-1", "t-2", None][i % 3], decision=DECISIONS[i % len(DECISIONS)],
        method="POST", scheme="https", host=HOSTS[i % 3], port=443, path="/mcp",
        tool=TOOLS[i % 4], status=200, rule="docs") for i in range(30)]


def seed(path: Path, records: list[dict[str, Any]]) -> None:
    async def go() -> None:
        log = AuditLog(str(path))
        await log.start()
        for rec in records:
            await log.write(rec)
        await log.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    # In a thread of its own: the browser tests' Playwright runs a loop in this one.
    worker = threading.Thread(target=asyncio.run, args=(go(),))
    worker.start()
    worker.join(30)


def wanted(rec: dict[str, Any], f: dict[str, str]) -> bool:
    """The test's own reading of each filter."""
    tool = rec["tool"]
    names = ([tool["name"]] if isinstance(tool, dict)
             else [t["name"] for t in tool] if isinstance(tool, list) else [])
    ts = datetime.fromisoformat(rec["ts"])
    return all((
        "task" not in f or rec["task"] == f["task"],
        "workload" not in f or rec["workload"] == f["workload"],
        "decision" not in f or rec["decision"] in f["decision"].split(","),
        "host" not in f or rec["host"] == f["host"].lower().rstrip("."),
        "tool" not in f or f["tool"] in names,
        "since" not in f or ts >= datetime.fromisoformat(f["since"]),
        "until" not in f or ts < datetime.fromisoformat(f["until"]),
    ))


CASES: list[dict[str, str]] = [
    {"task": "t-1"},
    {"workload": OTHER},
    {"decision": "deny"},
    {"decision": "rejected,approved"},
    {"host": "MCP.Example.com."},
    {"host": "127.0.0.1"},
    {"tool": "search_docs"},
    {"tool": "open_pr", "workload": OTHER},
    {"since": rfc3339(T0 + 5 * 60), "until": rfc3339(T0 + 11 * 60)},
    {"task": "t-2", "decision": "allow,deny,held"},
    {"workload": WORKLOAD, "decision": "deny", "since": "2026-01-01T00:00:00Z"},
    {"tool": "no_such_tool"},
]


def case_id(case: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in case.items())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
           upstream: Upstream, keys: Keys) -> Iterator[Gateway]:
    """A gateway whose log holds the seed records, then real calls of two workloads."""
    cfg = base_config(shared_files, upstream)
    cfg["workloads"][OTHER] = {"standing": [
        {"id": "other-read", "host": "127.0.0.1", "port": upstream.http_port, "scheme": "http",
         "methods": ["GET"], "paths": ["/allowed/other/**"]}]}
    gw = Gateway(tmp_path_factory.mktemp("query"), cfg)
    seed(gw.audit_path, seed_records())
    gw.start()
    base = f"http://127.0.0.1:{upstream.http_port}"
    with gw.client(keys.token()) as c:
        assert c.get(f"{base}/allowed/a").status_code == 200
        assert c.get(f"{base}/nope").status_code == 403
        assert c.get(f"https://localhost:{upstream.https_port}/allowed/b").status_code == 200
    with gw.client(keys.token(sub=OTHER)) as c:
        assert c.get(f"{base}/allowed/other/x").status_code == 200
        assert c.get(f"{base}/allowed/a").status_code == 403
    yield gw
    gw.stop()


def admin(gw: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {(gw.home / 'admin-token').read_text().strip()}"}


def all_records(gw: Gateway) -> list[dict[str, Any]]:
    return [json.loads(x) for x in gw.audit_path.read_text().splitlines() if x.strip()]


def api_pages(gw: Gateway, params: dict[str, str]) -> list[dict[str, Any]]:
    """Every page of a /v1/audit query, following ``next`` to the end."""
    out: list[dict[str, Any]] = []
    url: str | None = f"/v1/audit?{httpx.QueryParams(params)}"
    for _ in range(100):
        if url is None:
            return out
        r = httpx.get(gw.control_url + url, headers=admin(gw), timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["records"]) <= int(params.get("limit", 100))
        out.extend(body["records"])
        url = body["next"]
    raise AssertionError("paging did not end")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_api_filters_newest_first(served: Gateway, case: dict[str, str]) -> None:
    expected = [r["seq"] for r in all_records(served) if wanted(r, case)]
    got = api_pages(served, {**case, "limit": "4"})
    assert [r["seq"] for r in got] == expected[::-1]
    if case != {"tool": "no_such_tool"}:
        assert expected, "a case that matches nothing proves little"


@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_api_filters_oldest_first_from_a_cursor(served: Gateway, case: dict[str, str]) -> None:
    expected = [r["seq"] for r in all_records(served) if wanted(r, case)]
    got = api_pages(served, {**case, "limit": "3", "after": "0"})
    assert [r["seq"] for r in got] == expected
    tail = api_pages(served, {**case, "after": str(expected[1])})
    assert [r["seq"] for r in tail] == expected[2:]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cli_filters(served: Gateway, case: dict[str, str], capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [r["seq"] for r in all_records(served) if wanted(r, case)]
    monkeypatch.chdir(served.dir)
    args = [x for k, v in case.items() for x in (f"--{k}", v)]
    assert main(["logs", "--json", *args]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in got] == expected


def test_cli_table_and_last(served: Gateway, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(served.dir)
    assert main(["logs", "--workload", OTHER, "--decision", "deny", "--last", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "DECISION", "ST"]
    assert len(lines) == 2
    assert "deny" in lines[1] and "403" in lines[1] and OTHER in lines[1]
    assert f"GET http://127.0.0.1:{served.config['workloads'][OTHER]['standing'][0]['port']}" \
           "/allowed/a" in lines[1]


def test_cli_works_while_the_gateway_is_down(tmp_path: Path) -> None:
    log = tmp_path / ".taskgate" / "audit.jsonl"
    seed(log, seed_records())
    run = subprocess.run([sys.executable, "-m", "proxy", "logs", "--json", "--task", "t-1",
                          "--tool", "search_docs"], cwd=tmp_path, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert run.returncode == 0, run.stderr
    got = [json.loads(x)["request_id"] for x in run.stdout.splitlines()]
    assert got == [f"seed{i}" for i in range(30) if i % 3 == 0 and i % 4 in (1, 2)]


@pytest.mark.parametrize(("args", "message"), [
    (["--decision", "maybe"], "'maybe' is not a decision"),
    (["--since", "yesterday"], "since: 'yesterday' is not a time"),
    (["--until", "2026-13-01"], "until:"),
    (["--host", "bad host"], "host:"),
    (["--task", ""], "task: must not be empty"),
])
def test_cli_bad_filters(tmp_path: Path, args: list[str], message: str,
                         capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["logs", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("query", "message"), [
    ("decision=maybe", "'maybe' is not a decision"),
    ("since=soon", "since: 'soon' is not a time"),
    ("until=2026-02-30T00:00:00Z", "until:"),
    ("host=a%20b", "host:"),
    ("task=", "task: must not be empty"),
    ("limit=0", "limit: '0' is not a whole number from 1 to 1000"),
    ("limit=1001", "limit:"),
    ("limit=ten", "limit:"),
    ("after=-1", "after:"),
    ("before=0", "before:"),
    ("after=1&before=9", "give after or before, not both"),
    ("task=a&task=b", "task: given more than once"),
    ("token=x", "unknown parameter 'token'"),
])
def test_api_bad_parameters(served: Gateway, query: str, message: str) -> None:
    r = httpx.get(f"{served.control_url}/v1/audit?{query}", headers=admin(served), timeout=10)
    assert r.status_code == 400, r.text
    assert message in r.json()["reason"]


def test_api_needs_the_admin_token(served: Gateway) -> None:
    assert httpx.get(f"{served.control_url}/v1/audit", timeout=10).status_code == 401
    r = httpx.get(f"{served.control_url}/v1/audit", timeout=10,
                  headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


# -- follow, rotation and restarts on a real gateway ---------------------------
class Follower:
    """``taskgate logs --follow --json`` as a process; its lines arrive on a queue."""

    def __init__(self, gw: Gateway, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "logs", "--follow", "--json", *args],
            cwd=gw.dir, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def take(self, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            out.append(json.loads(self.lines.get(timeout=max(0.1, deadline - time.monotonic()))))
        return out

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_follow_across_rotation_and_restart(tmp_path: Path, shared_files: dict[str, Path],
                                            upstream: Upstream, keys: Keys,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = base_config(shared_files, upstream, audit={"path": "logs/audit.jsonl",
                                                     "max_bytes": 4096})
    gw = Gateway(tmp_path, cfg).start()
    base = f"http://127.0.0.1:{upstream.http_port}"
    follower: Follower | None = None
    try:
        with gw.client(keys.token()) as c:
            assert c.get(f"{base}/allowed/before").status_code == 200
        follower = Follower(gw, "--decision", "deny")
        time.sleep(1.5)  # let it start at the end of the log
        with gw.client(keys.token()) as c:
            for i in range(24):
                path = f"/allowed/{i}" if i % 3 else f"/denied/{i}"
                c.get(f"{base}{path}")
        got = follower.take(8)
        assert [r["path"] for r in got] == [f"/denied/{i}" for i in range(0, 24, 3)]
        assert len(log_files(str(gw.audit_path))) >= 3, "the log should have rotated"
        gw.stop()
        gw.start()  # a restart continues the chain in the current file
        with gw.client(keys.token()) as c:
            assert c.get(f"{base}/denied/after-restart").status_code == 403
        assert follower.take(1)[0]["path"] == "/denied/after-restart"
        assert follower.lines.empty()
    finally:
        if follower is not None:
            follower.stop()
        gw.stop()
    records = [json.loads(x) for f in log_files(str(gw.audit_path))
               for x in Path(f).read_text().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, 27))
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert "records: 26 (seq 1..26)" in out and "OK" in out


@pytest.fixture(scope="module")
def big_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3000 records over several rotated files, each much larger than a search block."""
    path = tmp_path_factory.mktemp("big") / "audit.jsonl"
    recs = [new_record(ts=rfc3339(T0 + i), request_id=f"r{i}", workload=WORKLOAD,
                       task=f"t-{i % 7}", decision=DECISIONS[i % 3], host="api.example.com",
                       method="GET", scheme="https", port=443, path=f"/{'x' * 300}/{i}")
            for i in range(3000)]

    async def go() -> None:
        log = AuditLog(str(path), max_bytes=400_000)
        await log.start()
        for rec in recs:
            await log.write(rec)
        await log.close()

    worker = threading.Thread(target=asyncio.run, args=(go(),))
    worker.start()
    worker.join(60)
    with open(path, "ab") as f:
        f.write(b'{"seq": 3001, "ts": "2030-')  # a record being written right now
    assert len(log_files(str(path))) >= 4
    return path


@pytest.mark.parametrize("flt", [{}, {"task": "t-3"}, {"decision": "deny,error"}],
                         ids=["all", "task", "decision"])
def test_cursors_on_a_big_rotated_log(big_log: Path, flt: dict[str, str]) -> None:
    from proxy.audit import AuditFilter, query, records

    f = AuditFilter.parse(flt)
    every = [r["seq"] for r in records(str(big_log), f)]
    assert every == sorted(every) and every
    for after in (0, 1, 499, 1234, 2100, 2998, 3000):
        page = query(str(big_log), f, limit=50, after=after)
        want = [s for s in every if s > after]
        assert [r["seq"] for r in page.records] == want[:50], after
        assert page.next_after == (want[49] if len(want) > 50 else None)
    for before in (None, 1, 2, 700, 1500, 2999, 3001, 9999):
        page = query(str(big_log), f, limit=50, before=before)
        want = [s for s in every if before is None or s < before][::-1]
        assert [r["seq"] for r in page.records] == want[:50], before
        assert page.next_before == (want[49] if len(want) > 50 else None)
