"""Report mode on the real gateway: calls the rules refuse go through, recorded
``would_deny`` with the reason; identity still refuses (407); secrets only where a rule
really allows; budgets counted, not enforced; logs, the review page and /metrics."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import OTHER_WORKLOAD, ceiling_config
from tests.support import PYTHON, WORKLOAD, Gateway, Keys, Upstream
from tests.tasks_support import (
    Tunnel,
    admin,
    client,
    create_task,
    http_rule,
    post_task,
    show,
)

WATCHED = "spiffe://acme.test/agent/watched"
SECRET = "report-mode-secret-value-1234"


@pytest.fixture(scope="module")
def report_gateway(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
                   upstream: Upstream) -> Iterator[Gateway]:
    cfg = ceiling_config(shared_files, upstream)
    cfg["workloads"][WORKLOAD]["report_allowed"] = True
    plain = {"host": "127.0.0.1", "port": upstream.http_port, "scheme": "http"}
    cfg["workloads"][WATCHED] = {
        "owner": "watch@acme.test", "mode": "report",
        "standing": [
            {"id": "watch-read", **plain, "methods": ["GET"], "paths": ["/allowed/**"]},
            {"id": "watch-secret", **plain, "methods": ["GET"], "paths": ["/secret/**"],
             "secret": "demo-key"},
            {"id": "watch-mcp", **plain, "paths": ["/mcp-echo"], "mcp": {"tools": ["add"]}},
            {"id": "watch-tls", "host": "localhost", "allow_private": True,
             "port": upstream.https_port, "methods": ["GET"], "paths": ["/allowed/**"]},
        ]}
    gw = Gateway(tmp_path_factory.mktemp("gw-report"), cfg,
                 env={"TASKGATE_TEST_SECRET": SECRET}).start()
    yield gw
    gw.stop()


@pytest.fixture
def watched(keys: Keys) -> str:
    return keys.token(sub=WATCHED)


def _record(gw: Gateway, resp: httpx.Response) -> dict[str, Any]:
    recs = gw.records_for(resp.headers["X-Taskgate-Request-Id"])
    assert len(recs) == 1, recs
    return recs[0]


def test_refused_calls_go_through_as_would_deny(report_gateway: Gateway, upstream: Upstream,
                                                watched: str) -> None:
    gw, base = report_gateway, f"http://127.0.0.1:{upstream.http_port}"
    with gw.client(watched) as c:
        allowed = c.get(f"{base}/allowed/ok")
        no_path = c.get(f"{base}/not-granted/report-1")
        no_method = c.delete(f"{base}/allowed/report-2")
    assert allowed.status_code == 200 and _record(gw, allowed)["decision"] == "allow"
    assert no_path.status_code == 200 and no_path.json()["path"] == "/not-granted/report-1"
    rec = _record(gw, no_path)
    assert (rec["decision"], rec["status"], rec["workload"]) == ("would_deny", 200, WATCHED)
    assert rec["reason"] == "no rule for this host allows this path"
    assert rec["rule"] is None
    assert no_method.status_code == 200 and no_method.json()["method"] == "DELETE"
    assert _record(gw, no_method)["reason"] == \
        "no rule for this host and path allows this method"


def test_https_in_a_tunnel_and_the_ssrf_guard(report_gateway: Gateway, upstream: Upstream,
                                              watched: str) -> None:
    """Inside a tunnel too; but a would_deny call reaches a private address only where a
    rule naming that host and port opts in: the SSRF guard is not in report mode."""
    gw = report_gateway
    named = Tunnel(gw, watched, "localhost", upstream.https_port)
    try:
        status, body = named.get("/not-granted/tls")
    finally:
        named.close()
    assert status == 200 and body["path"] == "/not-granted/tls"
    recs = [r for r in gw.audit() if r["path"] == "/not-granted/tls"]
    assert [r["decision"] for r in recs] == ["would_deny"] and recs[0]["scheme"] == "https"
    unnamed = Tunnel(gw, watched, "127.0.0.1", upstream.https_port)  # no rule names it
    try:
        status, body = unnamed.get("/anything/tls")
    finally:
        unnamed.close()
    assert status == 403 and "private" in body["reason"]
    rec = gw.records_for(body["request_id"])[0]
    assert rec["decision"] == "deny"
    assert not any(s["path"] == "/anything/tls" for s in upstream.seen)


def test_identity_failures_stay_407(report_gateway: Gateway, upstream: Upstream,
                                    keys: Keys) -> None:
    gw, url = report_gateway, f"http://127.0.0.1:{upstream.http_port}/allowed/x"
    before = len(upstream.seen)
    with gw.client(None) as c:
        assert c.get(url).status_code == 407
    with gw.client(keys.token(sub=WATCHED, key=keys.other)) as c:
        r = c.get(url)
    assert r.status_code == 407
    assert _record(gw, r)["decision"] == "deny"
    assert len(upstream.seen) == before


def test_secret_only_where_a_rule_allows(report_gateway: Gateway, upstream: Upstream,
                                         watched: str) -> None:
    gw, base = report_gateway, f"http://127.0.0.1:{upstream.http_port}"
    with gw.client(watched) as c:
        allowed = c.get(f"{base}/secret/read")
        refused = c.post(f"{base}/secret/write", content=b"x")
    seen = {s["path"]: s for s in upstream.seen}  # what the upstream itself received
    assert allowed.status_code == 200
    assert seen["/secret/read"]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert _record(gw, allowed)["secret"] is not None
    assert refused.status_code == 200 and refused.json()["method"] == "POST"
    assert "Authorization" not in seen["/secret/write"]["headers"]
    rec = _record(gw, refused)
    assert (rec["decision"], rec["secret"]) == ("would_deny", None)


def test_mcp_tool_would_deny_names_tool_and_arguments(report_gateway: Gateway,
                                                      upstream: Upstream,
                                                      watched: str) -> None:
    gw = report_gateway
    args = {"path": "/etc/passwd"}
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": {"name": "delete_file", "arguments": args}}).encode()
    with gw.client(watched) as c:
        r = c.post(f"http://127.0.0.1:{upstream.http_port}/mcp-echo", content=body,
                   headers={"Content-Type": "application/json",
                            "Accept": "application/json, text/event-stream"})
    assert r.status_code == 200 and r.json()["body_len"] == len(body)  # reached upstream
    rec = _record(gw, r)
    assert rec["decision"] == "would_deny"
    assert "delete_file" in rec["reason"]
    assert rec["tool"]["name"] == "delete_file"
    canonical = json.dumps(args, separators=(",", ":"), sort_keys=True).encode()
    assert rec["tool"]["arguments_sha256"] == hashlib.sha256(canonical).hexdigest()


def test_report_task_counts_budget_without_enforcing(report_gateway: Gateway,
                                                     upstream: Upstream) -> None:
    gw, base = report_gateway, f"http://127.0.0.1:{upstream.http_port}"
    task = create_task(gw, upstream, [http_rule(upstream)], mode="report", max_calls=1)
    assert task["mode"] == "report"
    with client(gw, task) as c:
        first = c.get(f"{base}/allowed/budget-1")
        second = c.get(f"{base}/allowed/budget-2")
        beyond = c.get(f"{base}/outside-ceiling")
    assert [first.status_code, second.status_code, beyond.status_code] == [200, 200, 200]
    assert _record(gw, first)["decision"] == "allow"
    rec = _record(gw, second)
    assert (rec["decision"], rec["reason"]) == ("would_deny",
                                                "task budget spent: all 1 calls used")
    assert _record(gw, beyond)["decision"] == "would_deny"
    state = show(gw, task["task_id"])
    assert state["calls_used"] == 2  # counted past the budget


def test_enforced_task_of_same_workload_still_refuses(report_gateway: Gateway,
                                                      upstream: Upstream) -> None:
    gw = report_gateway
    task = create_task(gw, upstream, [http_rule(upstream)])
    assert task["mode"] == "enforce"
    with client(gw, task) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/not-granted")
    assert r.status_code == 403 and _record(gw, r)["decision"] == "deny"


@pytest.mark.parametrize(("workload", "mode", "why"), [
    (OTHER_WORKLOAD, "report", "does not allow report-mode tasks"),
    (WORKLOAD, "shadow", "mode must be 'enforce'"),
    (WORKLOAD, True, "mode must be 'enforce'"),
])
def test_report_task_refused(report_gateway: Gateway, upstream: Upstream, workload: str,
                             mode: Any, why: str) -> None:
    r = post_task(report_gateway, [http_rule(upstream)], up=upstream, workload=workload,
                  mode=mode)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "mode" and why in r.json()["reason"]


def test_logs_review_and_metrics_show_would_deny(report_gateway: Gateway, upstream: Upstream,
                                                 watched: str) -> None:
    gw = report_gateway
    with gw.client(watched) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/not-granted/shown")
    rid = r.headers["X-Taskgate-Request-Id"]
    out = subprocess.run([*PYTHON, "-m", "proxy", "logs", "-c", str(gw.config_path),
                          "--decision", "would_deny", "--json"], cwd=gw.dir, env=gw.env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    shown = [json.loads(line) for line in out.splitlines() if line]
    assert rid in {x["request_id"] for x in shown}
    assert {x["decision"] for x in shown} == {"would_deny"}
    page = httpx.get(f"{gw.control_url}/v1/audit", params={"decision": "would_deny"},
                     headers=admin(gw), timeout=10)
    assert page.status_code == 200
    assert rid in {x["request_id"] for x in page.json()["records"]}
    script = httpx.get(f"{gw.control_url}/ui/static/app.js", timeout=10)
    assert script.status_code == 200 and '"would_deny"' in script.text  # marked on the page
    metrics = httpx.get(f"{gw.control_url}/metrics", timeout=10).text
    line = next(x for x in metrics.splitlines()
                if x.startswith("taskgate_calls_total{") and 'decision="would_deny"' in x)
    assert float(line.rsplit(" ", 1)[1]) >= 1
