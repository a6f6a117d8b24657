"""Task tokens bound to where the agent runs, on the real gateway: a call with a bound
task's token from another client address is refused (407, audited as bound elsewhere),
from the bound address it passes (the client socket bound to 127.0.0.2)."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import OTHER_WORKLOAD, ceiling_config
from tests.support import PYTHON, WORKLOAD, Gateway, Upstream
from tests.tasks_support import create_task, http_rule, post_task

BOUND = {"client_cidrs": ["127.0.0.2/32"]}


@pytest.fixture(scope="module")
def bind_gateway(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
                 upstream: Upstream) -> Iterator[Gateway]:
    cfg = ceiling_config(shared_files, upstream)
    cfg["workloads"][OTHER_WORKLOAD]["require_binding"] = True
    gw = Gateway(tmp_path_factory.mktemp("gw-bind"), cfg).start()
    yield gw
    gw.stop()


def _credential(task: dict[str, Any]) -> str:
    return "Basic " + base64.b64encode(f"{task['task_id']}:{task['token']}".encode()).decode()


def _get_from(gw: Gateway, task: dict[str, Any], address: str, url: str
              ) -> tuple[int, dict[str, str], Any]:
    """GET ``url`` through the gateway with the task's token, the client socket bound to
    ``address`` (httpx does not bind a proxy connection's socket: http.client does)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.proxy_port, timeout=10,
                                      source_address=(address, 0))
    try:
        conn.request("GET", url, headers={"Proxy-Authorization": _credential(task)})
        resp = conn.getresponse()
        return resp.status, dict(resp.headers), json.loads(resp.read())
    finally:
        conn.close()


def test_bound_token_refused_from_elsewhere(bind_gateway: Gateway, upstream: Upstream) -> None:
    gw = bind_gateway
    task = create_task(gw, upstream, [http_rule(upstream)], bind=BOUND)
    assert task["bind"] == BOUND
    url = f"http://127.0.0.1:{upstream.http_port}/allowed/bound"
    before = sum(1 for s in upstream.seen if s["path"] == "/allowed/bound")
    status, _, body = _get_from(gw, task, "127.0.0.1", url)
    assert status == 407, body
    reason = body["reason"]
    assert "the task token is bound elsewhere" in reason
    assert "127.0.0.2/32" in reason and "127.0.0.1" in reason
    assert task["token"] not in json.dumps(body)
    rec = gw.records_for(body["request_id"])[0]
    assert (rec["decision"], rec["status"], rec["task"], rec["client"]) == (
        "deny", 407, task["task_id"], "127.0.0.1")
    assert "bound elsewhere" in rec["reason"]
    assert sum(1 for s in upstream.seen if s["path"] == "/allowed/bound") == before
    status, headers, body = _get_from(gw, task, "127.0.0.2", url)
    assert status == 200, body
    assert body["path"] == "/allowed/bound"
    rec = gw.records_for(headers["X-Taskgate-Request-Id"])[0]
    assert (rec["decision"], rec["client"]) == ("allow", "127.0.0.2")


def test_bound_token_cannot_open_a_tunnel_from_elsewhere(bind_gateway: Gateway,
                                                        upstream: Upstream) -> None:
    gw = bind_gateway
    task = create_task(gw, upstream, bind=BOUND)
    target = f"localhost:{upstream.https_port}"
    head = (f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            f"Proxy-Authorization: {_credential(task)}\r\n\r\n").encode()
    statuses = {}
    for address in ("127.0.0.1", "127.0.0.2"):
        with socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10,
                                      source_address=(address, 0)) as s:
            s.sendall(head)
            statuses[address] = s.recv(4096).split(b"\r\n", 1)[0]
    assert b" 407 " in statuses["127.0.0.1"]
    assert b" 200 " in statuses["127.0.0.2"]


def test_require_binding_refuses_unbound_task(bind_gateway: Gateway,
                                              upstream: Upstream) -> None:
    r = post_task(bind_gateway, [http_rule(upstream)], up=upstream, workload=OTHER_WORKLOAD)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "bind" and "requires its tasks to be bound" in r.json()["reason"]


@pytest.mark.parametrize(("bind", "field"), [
    ({"client_cidrs": ["127.0.0.2"]}, "bind.client_cidrs[0]"),
    ({"client_cidrs": []}, "bind.client_cidrs"),
    ({"addresses": ["127.0.0.2/32"]}, "bind.addresses"),
])
def test_bad_binding_names_the_field(bind_gateway: Gateway, upstream: Upstream,
                                     bind: dict[str, Any], field: str) -> None:
    r = post_task(bind_gateway, [http_rule(upstream)], up=upstream, bind=bind)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_cli_creates_a_bound_task(bind_gateway: Gateway, upstream: Upstream,
                                  tmp_path: Path) -> None:
    gw = bind_gateway
    rules = tmp_path / "rules.yaml"
    rules.write_text(json.dumps([http_rule(upstream)]))  # JSON is YAML
    base = [*PYTHON, "-m", "proxy", "task", "create", "-c", str(gw.config_path),
            "--workload", WORKLOAD, "--rules", str(rules)]
    ok = subprocess.run([*base, "--bind", "127.0.0.2/32", "--bind", "10.77.0.0/24"],
                        cwd=gw.dir, env=gw.env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "bound to  127.0.0.2/32, 10.77.0.0/24" in ok.stdout
    bad = subprocess.run([*base, "--bind", "127.0.0.2"], cwd=gw.dir, env=gw.env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "[bind.client_cidrs[0]]" in bad.stderr
    report = subprocess.run([*base, "--mode", "report"], cwd=gw.dir, env=gw.env,
                            capture_output=True, text=True, timeout=30)
    assert report.returncode == 1 and "[mode]" in report.stderr
