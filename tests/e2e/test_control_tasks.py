"""The task API on the real gateway: create, list, show, revoke; ceilings; bad requests."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import httpx
import pytest

from tests.conftest import OTHER_WORKLOAD
from tests.support import WORKLOAD, Gateway, Keys, Upstream
from tests.tasks_support import admin, client, create_task, http_rule, https_rule, post_task, show


def test_create_returns_token_expiry_and_proxy_url(ceiling_gateway: Gateway,
                                                  upstream: Upstream) -> None:
    gw = ceiling_gateway
    before = time.time()
    r = post_task(gw, up=upstream, ttl_seconds=900, max_calls=200, owner="alice@acme.test",
                  purpose="triage issue 42")
    assert r.status_code == 201, r.text
    task = r.json()
    assert r.headers["location"] == f"/v1/tasks/{task['task_id']}"
    assert r.headers["cache-control"] == "no-store"
    assert task["proxy_url"] == (f"http://{task['task_id']}:{task['token']}"
                                 f"@127.0.0.1:{gw.proxy_port}")
    assert task["workload"] == WORKLOAD and task["owner"] == "alice@acme.test"
    assert task["status"] == "active" and task["calls_used"] == 0
    assert task["calls_left"] == 200 and task["max_calls"] == 200
    assert 899 <= task["expires_in_seconds"] <= 900
    assert task["expires_at"].endswith("Z")
    expires = time.mktime(time.strptime(task["expires_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert abs((expires - time.timezone) - (before + 900)) < 5
    shown = show(gw, task["task_id"])
    assert "token" not in shown and "proxy_url" not in shown
    assert shown["rules"][0]["id"] == "plain" and shown["purpose"] == "triage issue 42"


def test_owner_defaults_to_the_workload_owner(ceiling_gateway: Gateway,
                                             upstream: Upstream) -> None:
    task = create_task(ceiling_gateway, upstream)
    assert task["owner"] == "platform@acme.test" and task["max_calls"] is None
    assert task["calls_left"] is None


def test_proxy_url_works_as_is_in_HTTP_PROXY(ceiling_gateway: Gateway,
                                            upstream: Upstream) -> None:
    """curl with nothing but the returned proxy_url in HTTP_PROXY / HTTPS_PROXY."""
    gw = ceiling_gateway
    task = create_task(gw, upstream)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HTTP_PROXY=task["proxy_url"], HTTPS_PROXY=task["proxy_url"],
               http_proxy=task["proxy_url"], https_proxy=task["proxy_url"])
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
         f"http://127.0.0.1:{upstream.http_port}/allowed/curl"],
        env=env, capture_output=True, text=True, timeout=20)
    assert out.stdout == "200", out.stderr
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(gw.ca), "-o", "/dev/null",
         "-w", "%{http_code}", f"https://localhost:{upstream.https_port}/allowed/curl"],
        env=env, capture_output=True, text=True, timeout=20)
    assert out.stdout == "200", out.stderr
    assert show(gw, task["task_id"])["calls_used"] == 2


def test_list_filters_and_orders_newest_first(ceiling_gateway: Gateway,
                                              upstream: Upstream) -> None:
    gw = ceiling_gateway
    a = create_task(gw, upstream, purpose="list-a")
    b = create_task(gw, upstream, purpose="list-b")
    httpx.delete(f"{gw.control_url}/v1/tasks/{a['task_id']}", headers=admin(gw))
    r = httpx.get(f"{gw.control_url}/v1/tasks", headers=admin(gw))
    assert r.status_code == 200
    ids = [t["task_id"] for t in r.json()["tasks"]]
    assert ids.index(b["task_id"]) < ids.index(a["task_id"])
    r = httpx.get(f"{gw.control_url}/v1/tasks", params={"status": "revoked"},
                  headers=admin(gw))
    assert a["task_id"] in [t["task_id"] for t in r.json()["tasks"]]
    assert all(t["status"] == "revoked" for t in r.json()["tasks"])
    r = httpx.get(f"{gw.control_url}/v1/tasks", params={"workload": OTHER_WORKLOAD},
                  headers=admin(gw))
    assert r.json() == {"tasks": [], "total": 0}
    r = httpx.get(f"{gw.control_url}/v1/tasks", params={"limit": "1"}, headers=admin(gw))
    assert len(r.json()["tasks"]) == 1 and r.json()["total"] >= 2


# -- ceilings -----------------------------------------------------------------
def _beyond(up: Upstream) -> list[tuple[str, dict[str, Any], str, str]]:
    """(name, task rule, field, words the reason must contain)"""
    mcp_ok = {"tools": ["search_docs"], "args": {"limit": {"maximum": 10}}}
    return [
        ("method", http_rule(up, methods=["DELETE"]), "methods", "DELETE"),
        ("path", http_rule(up, paths=["/admin/**"]), "paths", "/admin"),
        ("path-wider", https_rule(up, paths=["/**"]), "paths", "ceiling's paths"),
        ("host", http_rule(up, host="example.com"), "host", "example.com"),
        ("port", https_rule(up, port=up.http_port), "port", str(up.http_port)),
        ("scheme", http_rule(up, scheme="https"), "scheme", "https"),
        ("tool", {"id": "tools", "host": "localhost", "allow_private": True,
                  "port": up.https_port, "paths": ["/mcp"],
                  "mcp": {**mcp_ok, "tools": ["search_docs", "delete_repo"]}},
         "mcp", "delete_repo"),
        ("tool-args", {"id": "args", "host": "localhost", "allow_private": True,
                       "port": up.https_port,
                       "paths": ["/mcp"], "mcp": {**mcp_ok, "args": {"limit": {"maximum": 500}}}},
         "mcp", "limit"),
        ("no-mcp", {"id": "raw", "host": "localhost", "allow_private": True,
                    "port": up.https_port, "paths": ["/mcp"],
                    "methods": ["POST"]}, "mcp", "mcp"),
        ("secret", https_rule(up, secret="demo-key"), "secret", "demo-key"),
        ("approval", {"id": "appr", "host": "localhost", "allow_private": True,
                      "port": up.https_port,
                      "methods": ["POST"], "paths": ["/approve/x"]}, "approval", "approval"),
    ]


@pytest.mark.parametrize("case", range(11), ids=[
    "method", "path", "path-wider", "host", "port", "scheme", "tool", "tool-args", "no-mcp",
    "secret", "approval"])
def test_beyond_ceiling_is_422_naming_rule_and_reason(ceiling_gateway: Gateway,
                                                      upstream: Upstream, case: int) -> None:
    name, rule, key, words = _beyond(upstream)[case]
    rules = [https_rule(upstream, id="fine"), rule]
    r = post_task(ceiling_gateway, rules, up=upstream)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "beyond_ceiling"
    assert body["rule"] == rule["id"] and body["field"] == f"rules[1].{key}"
    assert rule["id"] in body["reason"] and words in body["reason"], body


def test_within_ceiling_variants_are_accepted(ceiling_gateway: Gateway,
                                              upstream: Upstream) -> None:
    rules = [
        http_rule(upstream, paths=["/allowed/x/**"]),
        {"id": "mcp", "host": "localhost", "allow_private": True,
         "port": upstream.https_port, "paths": ["/mcp"],
         "mcp": {"tools": ["search_docs"], "args": {"limit": {"maximum": 10}}}},
        {"id": "appr", "host": "localhost", "allow_private": True,
         "port": upstream.https_port, "methods": ["POST"],
         "paths": ["/approve/x"], "approval": "required"},
        {"id": "sec", "host": "localhost", "allow_private": True,
         "port": upstream.https_port, "methods": ["GET"],
         "paths": ["/secret/a"], "secret": "demo-key"},
    ]
    assert post_task(ceiling_gateway, rules, up=upstream).status_code == 201


def test_workload_without_ceiling_gets_nothing(ceiling_gateway: Gateway,
                                               upstream: Upstream) -> None:
    r = post_task(ceiling_gateway, up=upstream, workload=OTHER_WORKLOAD)
    assert r.status_code == 422 and "no ceiling" in r.json()["reason"]


# -- attested issuance ----------------------------------------------------------
def test_workload_token_attests_the_workload(ceiling_gateway: Gateway, upstream: Upstream,
                                             keys: Keys) -> None:
    payload = {"workload_token": keys.token(), "ttl_seconds": 60,
               "rules": [http_rule(upstream)]}
    r = httpx.post(f"{ceiling_gateway.control_url}/v1/tasks", json=payload,
                   headers=admin(ceiling_gateway))
    assert r.status_code == 201, r.text
    assert r.json()["workload"] == WORKLOAD


@pytest.mark.parametrize("which", ["expired", "wrong-audience", "untrusted-key",
                                   "task-token"])
def test_bad_workload_token_is_refused(ceiling_gateway: Gateway, upstream: Upstream,
                                       keys: Keys, which: str) -> None:
    if which == "expired":
        token = keys.token(ttl=-120)
    elif which == "wrong-audience":
        token = keys.token(aud="someone-else")
    elif which == "untrusted-key":
        token = keys.token(key=keys.other)
    else:
        token = create_task(ceiling_gateway, upstream)["token"]
    payload = {"workload_token": token, "ttl_seconds": 60, "rules": [http_rule(upstream)]}
    r = httpx.post(f"{ceiling_gateway.control_url}/v1/tasks", json=payload,
                   headers=admin(ceiling_gateway))
    assert r.status_code == 403, r.text
    assert r.json()["field"] == "workload_token"
    assert r.json()["error"] == "attestation_failed"
    assert token not in r.text


# -- bad requests -----------------------------------------------------------------
def _good(up: Upstream) -> dict[str, Any]:
    return {"workload": WORKLOAD, "ttl_seconds": 60, "rules": [http_rule(up)]}


BAD: list[tuple[str, Any, int, str | None]] = [
    # (name, change to a good body (None: delete key) or raw bytes, status, field)
    ("not-json", b"{nope", 400, None),
    ("not-an-object", b"[1, 2]", 400, None),
    ("empty-body", b"", 400, None),
    ("unknown-field", {"colour": "blue"}, 422, "colour"),
    ("missing-workload", {"workload": None}, 422, "workload"),
    ("both-workload-and-token", {"workload_token": "x.y.z"}, 422, "workload"),
    ("workload-wrong-type", {"workload": 7}, 422, "workload"),
    ("unknown-workload", {"workload": "spiffe://acme.test/nobody"}, 422, "workload"),
    ("missing-ttl", {"ttl_seconds": None}, 422, "ttl_seconds"),
    ("ttl-string", {"ttl_seconds": "900"}, 422, "ttl_seconds"),
    ("ttl-bool", {"ttl_seconds": True}, 422, "ttl_seconds"),
    ("ttl-float", {"ttl_seconds": 1.5}, 422, "ttl_seconds"),
    ("ttl-zero", {"ttl_seconds": 0}, 422, "ttl_seconds"),
    ("ttl-negative", {"ttl_seconds": -5}, 422, "ttl_seconds"),
    ("ttl-too-long", {"ttl_seconds": 10**9}, 422, "ttl_seconds"),
    ("max-calls-string", {"max_calls": "10"}, 422, "max_calls"),
    ("max-calls-zero", {"max_calls": 0}, 422, "max_calls"),
    ("max-calls-huge", {"max_calls": 10**30}, 422, "max_calls"),
    ("owner-wrong-type", {"owner": ["alice"]}, 422, "owner"),
    ("purpose-too-long", {"purpose": "x" * 5000}, 422, "purpose"),
    ("missing-rules", {"rules": None}, 422, "rules"),
    ("rules-not-list", {"rules": {"id": "x"}}, 422, "rules"),
    ("rules-empty", {"rules": []}, 422, "rules"),
    ("rule-not-object", {"rules": ["GET /"]}, 422, "rules[0]"),
    ("rule-unknown-key", {"rules": [{"id": "r", "host": "127.0.0.1", "methods": ["GET"],
                                     "colour": 1}]}, 422, "rules[0].colour"),
    ("rule-missing-id", {"rules": [{"host": "127.0.0.1", "methods": ["GET"]}]}, 422,
     "rules[0].id"),
    ("rule-bad-host", {"rules": [{"id": "r", "host": "*foo.com", "methods": ["GET"]}]}, 422,
     "rules[0].host"),
    ("rule-bad-port", {"rules": [{"id": "r", "host": "a.test", "port": 70000,
                                  "methods": ["GET"]}]}, 422, "rules[0].port"),
    ("rule-bad-method", {"rules": [{"id": "r", "host": "a.test", "methods": ["FETCH"]}]}, 422,
     "rules[0].methods"),
    ("rule-bad-glob", {"rules": [{"id": "r", "host": "a.test", "methods": ["GET"],
                                  "paths": ["/a/../b"]}]}, 422, "rules[0].paths[0]"),
    ("rule-duplicate-id", {"rules": [{"id": "r", "host": "a.test", "methods": ["GET"]},
                                     {"id": "r", "host": "a.test", "methods": ["GET"]}]}, 422,
     "rules[1].id"),
    ("rule-bad-mcp", {"rules": [{"id": "r", "host": "a.test", "paths": ["/mcp"],
                                 "mcp": {"tools": "all"}}]}, 422, "rules[0].mcp.tools"),
    ("rule-bad-mcp-constraint", {"rules": [{"id": "r", "host": "a.test", "paths": ["/mcp"],
                                            "mcp": {"args": {"n": {"max": 3}}}}]}, 422,
     "rules[0].mcp.args.n.max"),
    ("too-many-rules", {"rules": [{"id": f"r{i}", "host": "a.test", "methods": ["GET"]}
                                  for i in range(65)]}, 422, "rules"),
]


@pytest.mark.parametrize(("change", "status", "field"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_request(ceiling_gateway: Gateway, upstream: Upstream, change: Any, status: int,
                     field: str | None) -> None:
    gw = ceiling_gateway
    if isinstance(change, bytes):
        r = httpx.post(f"{gw.control_url}/v1/tasks", content=change,
                       headers={**admin(gw), "Content-Type": "application/json"})
    else:
        body = _good(upstream)
        for k, v in change.items():
            if v is None:
                body.pop(k)
            else:
                body[k] = v
        r = httpx.post(f"{gw.control_url}/v1/tasks", json=body, headers=admin(gw))
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    assert data["reason"] and data["error"]
    assert data.get("field") == field, data


def test_huge_body_is_413_json(ceiling_gateway: Gateway, upstream: Upstream) -> None:
    gw = ceiling_gateway
    body = _good(upstream)
    body["purpose"] = "x" * (200 * 1024)
    r = httpx.post(f"{gw.control_url}/v1/tasks", json=body, headers=admin(gw))
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_huge_chunked_body_is_413_json(ceiling_gateway: Gateway) -> None:
    gw = ceiling_gateway

    def chunks() -> Any:
        for _ in range(200):
            yield b" " * 1024

    r = httpx.post(f"{gw.control_url}/v1/tasks", content=chunks(), headers=admin(gw))
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic YWRtaW46eA==", "Bearer"])
def test_admin_token_is_required(ceiling_gateway: Gateway, upstream: Upstream,
                                 auth: str | None) -> None:
    gw = ceiling_gateway
    headers = {"Authorization": auth} if auth else {}
    for method, path in (("POST", "/v1/tasks"), ("GET", "/v1/tasks"),
                         ("GET", "/v1/tasks/" + "0" * 32), ("DELETE", "/v1/tasks/" + "0" * 32)):
        r = httpx.request(method, gw.control_url + path, headers=headers,
                          json=_good(upstream) if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "unauthorized"


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("task_id", ["0" * 32, "not-a-task-id", "..%2f..%2fetc"])
def test_unknown_task_is_404_json(ceiling_gateway: Gateway, method: str, task_id: str) -> None:
    gw = ceiling_gateway
    r = httpx.request(method, f"{gw.control_url}/v1/tasks/{task_id}", headers=admin(gw))
    assert r.status_code == 404 and r.json()["error"] in ("not_found", "http_error")


@pytest.mark.parametrize(("method", "path"), [("PUT", "/v1/tasks"), ("PATCH", "/v1/tasks/x"),
                                              ("POST", "/v1/tasks/" + "0" * 32)])
def test_wrong_method_is_405_json(ceiling_gateway: Gateway, method: str, path: str) -> None:
    r = httpx.request(method, ceiling_gateway.control_url + path,
                      headers=admin(ceiling_gateway))
    assert r.status_code == 405 and r.json()["error"] == "http_error"


@pytest.mark.parametrize("query", [{"colour": "x"}, {"status": "sleeping"}, {"limit": "0"},
                                   {"limit": "many"}])
def test_bad_list_query_is_400(ceiling_gateway: Gateway, query: dict[str, str]) -> None:
    r = httpx.get(f"{ceiling_gateway.control_url}/v1/tasks", params=query,
                  headers=admin(ceiling_gateway))
    assert r.status_code == 400 and r.json()["field"] == next(iter(query))


# -- the audit record ---------------------------------------------------------------
def test_audit_records_carry_task_owner_and_rule(ceiling_gateway: Gateway,
                                                 upstream: Upstream) -> None:
    gw = ceiling_gateway
    task = create_task(gw, upstream, owner="alice@acme.test")
    with client(gw, task) as c:
        ok = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/audit")
        no = c.get(f"http://127.0.0.1:{upstream.http_port}/forbidden")
    assert ok.status_code == 200 and no.status_code == 403
    assert no.json()["reason"] == "no rule for this host allows this path"
    rec = gw.records_for(ok.headers["x-taskgate-request-id"])[0]
    assert (rec["task"], rec["owner"], rec["rule"], rec["decision"]) == (
        task["task_id"], "alice@acme.test", "plain", "allow")
    assert rec["workload"] == WORKLOAD
    rec = gw.records_for(no.headers["x-taskgate-request-id"])[0]
    assert (rec["task"], rec["owner"], rec["decision"]) == (task["task_id"], "alice@acme.test",
                                                            "deny")
    assert task["token"] not in gw.audit_path.read_text()
    assert task["token"] not in gw.output()


def test_standing_rules_do_not_apply_to_task_callers(ceiling_gateway: Gateway,
                                                     upstream: Upstream, token: str) -> None:
    """The workload's standing rule allows GET /allowed/** over TLS; a task without it
    does not."""
    gw = ceiling_gateway
    task = create_task(gw, upstream, rules=[http_rule(upstream)])
    with gw.client(token) as c:
        assert c.get(f"https://localhost:{upstream.https_port}/allowed/s").status_code == 200
    with client(gw, task) as c, pytest.raises(httpx.ProxyError, match="403"):
        c.get(f"https://localhost:{upstream.https_port}/allowed/s")
