"""Approvals with task grants, end to end: real gateway, tasks made on its control plane,
agents using the task's ``proxy_url``, real upstreams (an echo API and the MCP SDK's server).

What only the two features together can get wrong: the approver is shown the task
(owner, purpose), the task's end refuses what it holds, a held call is counted once
against the budget (and given back if refused), a held MCP tool call is refused as a
JSON-RPC error, and /metrics and the CLI see all of it.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from mcp.client import Client
from mcp.shared.exceptions import MCPError

from proxy.mcp._inspect import TOOL_REFUSED
from tests.conftest import ceiling_config
from tests.e2e.test_approve import control, final_and_held, https, seen
from tests.e2e.test_cli_approvals import clean_env, taskgate
from tests.mcp_server import McpUpstream
from tests.support import WORKLOAD, Gateway, Upstream
from tests.tasks_support import create_task, show
from tests.unit.gateway.test_metrics import scrape, value

PURPOSE = "open the fix PR for issue 42"


@pytest.fixture(scope="module")
def mcp_up() -> Iterator[McpUpstream]:
    up = McpUpstream(json_response=True).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def tgw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
        upstream: Upstream, mcp_up: McpUpstream) -> Iterator[Gateway]:
    cfg = ceiling_config(shared_files, upstream, approval_timeout_seconds=60,
                         mcp={"max_body_bytes": 65536})
    cfg["workloads"][WORKLOAD]["ceiling"].append(
        {"id": "sdk-mcp", "host": "127.0.0.1", "port": mcp_up.port, "scheme": "http",
         "paths": ["/mcp"], "mcp": {"tools": ["add", "search"], "methods": ["resources/*"]}})
    gw = Gateway(tmp_path_factory.mktemp("task-approvals"), cfg).start()
    yield gw
    gw.stop()


@pytest.fixture
async def ctl(tgw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with control(tgw) as c:
        yield c


def approve_rule(up: Upstream) -> dict[str, Any]:
    """Within the ceiling's 'up-approve' rule: POSTs that a person must allow."""
    return {"id": "open-pr", "host": "localhost", "allow_private": True,
            "port": up.https_port, "methods": ["POST"],
            "paths": ["/approve/**"], "approval": "required"}


def new_task(gw: Gateway, up: Upstream, rules: list[dict[str, Any]] | None = None,
             **body: Any) -> dict[str, Any]:
    body = {"owner": "alice@acme.test", "purpose": PURPOSE, **body}
    return create_task(gw, up, rules or [approve_rule(up)], **body)


def agent(gw: Gateway, task: dict[str, Any]) -> httpx.AsyncClient:
    """An agent configured with nothing but the task's proxy_url."""
    return httpx.AsyncClient(proxy=task["proxy_url"], verify=gw.ssl_context(), timeout=30,
                             trust_env=False)


async def held_for(ctl: httpx.AsyncClient, task_id: str, count: int = 1
                   ) -> list[dict[str, Any]]:
    """Wait (10 s at most) until ``count`` calls of the task are waiting."""
    async with asyncio.timeout(10):
        while True:
            r = await ctl.get("/v1/approvals")
            assert r.status_code == 200, r.text
            found = [h for h in r.json()["approvals"] if h["task"] == task_id]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)


def budget(gw: Gateway, task_id: str) -> tuple[int, int | None, str]:
    t = show(gw, task_id)
    return t["calls_used"], t["calls_left"], t["status"]


# -- 1. held, shown with the task, approved -------------------------------------------
async def test_a_task_call_is_held_shown_with_its_task_and_released_on_approval(
        tgw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream) -> None:
    task = new_task(tgw, upstream, max_calls=5)
    m = uuid.uuid4().hex
    async with agent(tgw, task) as c:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}?sig=s3cret"),
                                          json={"title": "fix"}))
        [h] = await held_for(ctl, task["task_id"])
        assert h["workload"] == WORKLOAD and h["owner"] == "alice@acme.test"
        assert h["purpose"] == PURPOSE
        assert h["method"] == "POST"
        assert h["url"] == https(upstream, f"/approve/{m}?sig=s3cret")
        assert h["age_seconds"] >= 0 and h["state"] == "waiting"
        await asyncio.sleep(0.3)
        assert seen(upstream, m) == [] and not call.done()
        assert (await ctl.get("/v1/approvals")).json()["approvals"][0]["age_seconds"] >= 0.3
        r = await ctl.post(f"/v1/approvals/{h['id']}/approve",
                           json={"by": "carol@acme.test", "comment": "go"})
        assert r.status_code == 200, r.text
        resp = await asyncio.wait_for(call, 10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["path"] == f"/approve/{m}?sig=s3cret"
    assert len(seen(upstream, m)) == 1
    hold, final = final_and_held(tgw, resp.headers["x-taskgate-request-id"])
    for rec in (hold, final):
        assert rec["task"] == task["task_id"] and rec["owner"] == "alice@acme.test"
        assert rec["rule"] == "open-pr" and rec["workload"] == WORKLOAD
    assert final["decision"] == "approved" and final["status"] == 200
    assert final["approval"]["by"] == "carol@acme.test"
    assert final["approval"]["outcome"] == "approved" and final["approval"]["comment"] == "go"


# -- 2. the task ends while a call is held --------------------------------------------
async def test_revoking_the_task_refuses_its_held_call_at_once(
        tgw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream) -> None:
    task = new_task(tgw, upstream)
    m = uuid.uuid4().hex
    async with agent(tgw, task) as c:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held_for(ctl, task["task_id"])
        t0 = time.monotonic()
        r = await ctl.delete(f"/v1/tasks/{task['task_id']}")
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        resp = await asyncio.wait_for(call, 5)
        assert time.monotonic() - t0 < 2
    assert resp.status_code == 403
    assert resp.json()["reason"] == "the task was revoked while the call was held for approval"
    assert seen(upstream, m) == []
    _, final = final_and_held(tgw, resp.json()["request_id"])
    assert final["decision"] == "rejected" and final["task"] == task["task_id"]
    assert final["approval"]["outcome"] == "task_ended"
    r = await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "late"})
    assert r.status_code == 409 and "task ended" in r.json()["reason"]


async def test_the_task_expiring_refuses_its_held_call(
        tgw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream) -> None:
    task = new_task(tgw, upstream, ttl_seconds=2)
    m = uuid.uuid4().hex
    async with agent(tgw, task) as c:
        t0 = time.monotonic()
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held_for(ctl, task["task_id"])
        assert h["expires_at"] <= task["expires_at"]  # the hold cannot outlive the task
        resp = await asyncio.wait_for(call, 10)
        assert time.monotonic() - t0 < 5  # the task's 2 s and the 1 s sweep, not 60 s
    assert resp.status_code == 403
    assert resp.json()["reason"] == "the task expired while the call was held for approval"
    assert seen(upstream, m) == []
    _, final = final_and_held(tgw, resp.json()["request_id"])
    assert final["decision"] == "rejected"
    assert final["approval"]["outcome"] in ("task_ended", "expired")


# -- 3. the budget -----------------------------------------------------------------------
def plain_approve_rule(up: Upstream) -> dict[str, Any]:
    """Plain HTTP (within 'up-http'): a refusal shows as a 403 with its reason, not a
    refused CONNECT."""
    return {"id": "post-plain", "host": "127.0.0.1", "port": up.http_port, "scheme": "http",
            "methods": ["POST"], "paths": ["/allowed/**"], "approval": "required"}


async def test_a_held_call_counts_once_if_approved_and_is_given_back_if_denied(
        tgw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream) -> None:
    task = new_task(tgw, upstream, [plain_approve_rule(upstream)], max_calls=1)
    tid = task["task_id"]
    m = uuid.uuid4().hex

    def url(i: int) -> str:
        return f"http://127.0.0.1:{upstream.http_port}/allowed/{m}/{i}"

    async with agent(tgw, task) as c:
        first = asyncio.create_task(c.post(url(1), content=b"1"))
        [h] = await held_for(ctl, tid)
        assert budget(tgw, tid) == (1, 0, "spent")  # taken when the call was admitted
        other = await c.post(url(2), content=b"2")
        assert other.status_code == 403 and "budget spent" in other.json()["reason"]
        await ctl.post(f"/v1/approvals/{h['id']}/deny", json={"by": "bob"})
        assert (await asyncio.wait_for(first, 10)).status_code == 403
        assert budget(tgw, tid) == (0, 1, "active")  # a denied call is given back

        second = asyncio.create_task(c.post(url(3), content=b"3"))
        [h] = await held_for(ctl, tid)
        assert budget(tgw, tid) == (1, 0, "spent")
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
        resp = await asyncio.wait_for(second, 10)
        # The approved call was the task's last: it goes ahead all the same.
        assert resp.status_code == 200, resp.text
        assert budget(tgw, tid) == (1, 0, "spent")  # counted exactly once
        after = await c.post(url(4), content=b"4")
        assert after.status_code == 403 and "budget spent" in after.json()["reason"]
    assert [s["path"] for s in seen(upstream, m)] == [f"/allowed/{m}/3"]
    assert (await ctl.get("/v1/approvals")).json()["approvals"] == []


# -- 4. MCP tool calls ---------------------------------------------------------------------
def sdk_rules(up: McpUpstream) -> list[dict[str, Any]]:
    where = {"host": "127.0.0.1", "port": up.port, "scheme": "http", "paths": ["/mcp"]}
    return [{"id": "mcp-add", **where, "mcp": {"tools": ["add"], "methods": ["resources/*"]},
             "approval": "required"},
            {"id": "mcp-search", **where, "mcp": {"tools": ["search"]}}]


async def test_mcp_sdk_tool_call_held_with_its_arguments_approved_and_denied(
        tgw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, mcp_up: McpUpstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    task = new_task(tgw, upstream, sdk_rules(mcp_up))
    tid = task["task_id"]
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                "no_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", task["proxy_url"])
    mcp_up.ran.clear()
    async with Client(mcp_up.url, mode="legacy") as client:  # initialize is never held
        call = asyncio.create_task(client.call_tool("add", {"a": 20, "b": 22}))
        [h] = await held_for(ctl, tid)
        assert h["calls"] == [{"name": "add", "arguments": {"a": 20, "b": 22}}]
        assert h["tool"]["name"] == "add" and h["purpose"] == PURPOSE
        assert h["url"] == mcp_up.url and mcp_up.ran == []
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
        result = await asyncio.wait_for(call, 10)
        assert result.structured_content == {"result": 42}

        call = asyncio.create_task(client.call_tool("add", {"a": 1, "b": 1}))
        [h] = await held_for(ctl, tid)
        await ctl.post(f"/v1/approvals/{h['id']}/deny",
                       json={"by": "bob", "comment": "not today"})
        with pytest.raises(MCPError) as refused:
            await asyncio.wait_for(call, 10)
        assert refused.value.error.code == TOOL_REFUSED
        assert "denied by bob: not today" in refused.value.error.message

        # A method the rule grants through mcp.methods is an action too: held.
        read = asyncio.create_task(client.read_resource("res://doc"))
        [h] = await held_for(ctl, tid)
        assert h["tool"]["method"] == "resources/read" and h["calls"] == []
        rc, out, err = await taskgate("approvals", "list", "-c", "taskgate.yaml",
                                      cwd=tgw.dir, env=clean_env())
        assert rc == 0 and "rpc:      resources/read" in out, err
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
        doc = await asyncio.wait_for(read, 10)
        assert doc.contents[0].text == "the document"
        # The session survived the refusal; a tool without approval is not held.
        assert (await client.call_tool("search", {"query": "x"})).is_error is False
        # Ending the session (the SDK's DELETE on close) is not provably inert: held too.
        closing = asyncio.create_task(approve_delete(ctl, tid))
    assert await asyncio.wait_for(closing, 10) == "DELETE"
    assert mcp_up.names() == ["add", "search"]
    rejected = [r for r in tgw.audit() if r["task"] == tid and r["decision"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["status"] == 200
    assert rejected[0]["rule"] == "mcp-add" and rejected[0]["tool"]["name"] == "add"


async def approve_delete(ctl: httpx.AsyncClient, task_id: str) -> str:
    [h] = await held_for(ctl, task_id)
    await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
    return h["method"]


def echo_mcp_rule(up: Upstream) -> dict[str, Any]:
    """Within the ceiling's 'up-mcp' rule (the echo upstream shows what was forwarded)."""
    return {"id": "read-approve", "host": "localhost", "allow_private": True, "port": up.https_port,
            "paths": ["/mcp"], "approval": "required",
            "mcp": {"tools": ["read_file"], "args": {"limit": {"maximum": 50}}}}


async def test_gzip_tool_call_is_held_and_a_denial_is_a_jsonrpc_error_with_its_id(
        tgw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream) -> None:
    task = new_task(tgw, upstream, [echo_mcp_rule(upstream)])
    m = uuid.uuid4().hex
    url = https(upstream, "/mcp")
    before = len(seen(upstream, "/mcp"))
    body = orjson.dumps({"jsonrpc": "2.0", "id": "req-7", "method": "tools/call",
                         "params": {"name": "read_file",
                                    "arguments": {"path": f"/etc/{m}", "limit": 5}}})
    async with agent(tgw, task) as c:
        call = asyncio.create_task(c.post(url, content=gzip.compress(body), headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"}))
        [h] = await held_for(ctl, task["task_id"])
        assert h["calls"] == [{"name": "read_file",
                               "arguments": {"path": f"/etc/{m}", "limit": 5}}]
        await ctl.post(f"/v1/approvals/{h['id']}/deny", json={"by": "bob", "comment": "no"})
        resp = await asyncio.wait_for(call, 10)

        batch = [{"jsonrpc": "2.0", "id": i, "method": "tools/call",
                  "params": {"name": "read_file", "arguments": {"path": f"/{i}", "limit": 1}}}
                 for i in (1, 2)]
        call = asyncio.create_task(c.post(url, json=batch))
        [h] = await held_for(ctl, task["task_id"])
        assert [x["arguments"]["path"] for x in h["calls"]] == ["/1", "/2"]
        await ctl.post(f"/v1/approvals/{h['id']}/deny", json={"by": "bob"})
        batch_resp = await asyncio.wait_for(call, 10)
    assert resp.status_code == 200, resp.text
    rid = resp.headers["x-taskgate-request-id"]
    assert resp.json() == {"jsonrpc": "2.0", "id": "req-7", "error": {
        "code": TOOL_REFUSED, "message": "taskgate refused this call: denied by bob: no",
        "data": {"reason": "denied by bob: no", "request_id": rid}}}
    assert batch_resp.status_code == 200
    assert [(e["id"], e["error"]["code"]) for e in batch_resp.json()] == [
        (1, TOOL_REFUSED), (2, TOOL_REFUSED)]
    assert len(seen(upstream, "/mcp")) == before  # nothing reached the upstream
    _, final = final_and_held(tgw, rid)
    assert final["decision"] == "rejected" and final["status"] == 200
    assert final["tool"]["name"] == "read_file" and final["approval"]["by"] == "bob"


# -- 6. metrics ----------------------------------------------------------------------------
def calls(samples: Any, decision: str) -> float:
    return sum(v for (name, labels), v in samples.items()
               if name == "taskgate_calls_total" and ("decision", decision) in labels)


async def test_metrics_follow_tasks_and_approvals(
        tgw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream) -> None:
    s0, _ = scrape(tgw)
    task = new_task(tgw, upstream)
    s1, _ = scrape(tgw)
    assert value(s1, "taskgate_active_tasks") == value(s0, "taskgate_active_tasks") + 1
    m = uuid.uuid4().hex
    async with agent(tgw, task) as c:
        for verb, status in (("deny", 403), ("approve", 200)):
            call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
            [h] = await held_for(ctl, task["task_id"])
            s, _ = scrape(tgw)
            assert value(s, "taskgate_pending_approvals") == value(
                s0, "taskgate_pending_approvals") + 1
            await ctl.post(f"/v1/approvals/{h['id']}/{verb}", json={"by": "carol"})
            assert (await asyncio.wait_for(call, 10)).status_code == status
            s, _ = scrape(tgw)
            assert value(s, "taskgate_pending_approvals") == value(
                s0, "taskgate_pending_approvals")
    s2, text = scrape(tgw)
    assert calls(s2, "rejected") == calls(s1, "rejected") + 1
    assert calls(s2, "approved") == calls(s1, "approved") + 1
    assert value(s2, "taskgate_calls_total", decision="approved", rule="open-pr") >= 1
    assert task["task_id"] not in text and task["token"] not in text
    await ctl.delete(f"/v1/tasks/{task['task_id']}")
    s3, _ = scrape(tgw)
    assert value(s3, "taskgate_active_tasks") == value(s0, "taskgate_active_tasks")


# -- 7. the CLI ----------------------------------------------------------------------------
async def test_cli_task_create_then_approvals_list_and_approve(
        tgw: Gateway, upstream: Upstream, tmp_path: Path) -> None:
    env = clean_env()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [approve_rule(upstream)]}))
    rc, out, err = await taskgate(
        "task", "create", "--workload", WORKLOAD, "--ttl", "15m", "--max-calls", "3",
        "--rules", str(rules), "--purpose", "release notes for 1.2", "--owner", "dana@acme.test",
        "-c", "taskgate.yaml", cwd=tgw.dir, env=env)
    assert rc == 0, err
    tid = next(line.split()[1] for line in out.splitlines() if line.startswith("task "))
    proxy_url = next(line.removeprefix("export HTTP_PROXY=") for line in out.splitlines()
                     if line.startswith("export HTTP_PROXY="))
    assert proxy_url.startswith(f"http://{tid}:")
    m = uuid.uuid4().hex
    async with agent(tgw, {"proxy_url": proxy_url}) as c, control(tgw) as ctl:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held_for(ctl, tid)
        rc, out, err = await taskgate("approvals", "list", "-c", "taskgate.yaml",
                                      cwd=tgw.dir, env=env)
        assert rc == 0, err
        assert h["id"] in out and f"task: {tid}" in out
        assert "purpose: release notes for 1.2" in out and "owner: dana@acme.test" in out
        assert f"POST {https(upstream, f'/approve/{m}')}" in out
        rc, out, err = await taskgate("approvals", "approve", h["id"], "--by", "alice",
                                      "-c", "taskgate.yaml", cwd=tgw.dir, env=env)
        assert rc == 0, err
        assert out.startswith(f"approved {h['id']} ") and "by alice" in out
        resp = await asyncio.wait_for(call, 10)
    assert resp.status_code == 200 and resp.json()["path"] == f"/approve/{m}"
    final = tgw.records_for(resp.headers["x-taskgate-request-id"])[-1]
    assert final["decision"] == "approved" and final["approval"]["by"] == "alice"
    assert final["task"] == tid and final["owner"] == "dana@acme.test"
    assert budget(tgw, tid) == (1, 2, "active")
