"""addons/approve.py: calls whose rule asks for a person are held whole, shown, then
checked once more before they leave (the endings of a hold: tests/unit/approvals)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from mitmproxy import http
from mitmproxy.test import taddons

from addons._base import exchange
from addons.approve import Approve, ApprovedAsShown, held_request, replaced_by_secret
from addons.authorize import Authorize
from addons.identify import Identify
from addons.mcp import Mcp
from proxy.gateway import Services
from tests.unit.addons.conftest import refusal, request


async def authorized(svc: Services, f: http.HTTPFlow) -> Approve:
    approve = Approve(svc)
    with taddons.context(Identify(svc), Authorize(svc), approve):
        await Identify(svc).requestheaders(f)
        await Authorize(svc).requestheaders(f)
        await approve.requestheaders(f)
    return approve


async def answered(svc: Services, approve: Approve, f: http.HTTPFlow, yes: bool) -> None:
    """Run the request hook until the call is held, then answer it."""
    task = asyncio.create_task(approve.request(f))
    async with asyncio.timeout(5):
        while True:
            if svc.approvals.waiting():
                break
            await asyncio.sleep(0.005)
    [held] = svc.approvals.waiting()
    if yes:
        svc.approvals.approve(held.id, "alice")
    else:
        svc.approvals.deny(held.id, "bob")
    await asyncio.wait_for(task, 5)


def pay(token: str, body: bytes = b'{"amount": 10}') -> http.HTTPFlow:
    return request("POST", "http://api.example/approve/pay", token=token, content=body,
                   Authorization="Bearer agent-own")


async def test_a_call_to_hold_is_buffered(svc: Services, agent_token: str) -> None:
    f = pay(agent_token)
    await authorized(svc, f)
    ex = exchange(f)
    assert f.response is None and ex.buffer_body
    assert ex.allowed_by is not None and ex.allowed_by.approval


async def test_a_call_without_approval_is_left_alone(svc: Services, agent_token: str) -> None:
    f = request(token=agent_token)
    approve = await authorized(svc, f)
    await approve.request(f)
    assert f.response is None and not exchange(f).buffer_body
    assert svc.approvals.waiting() == [] and exchange(f).approved_as is None


async def test_a_body_too_large_to_hold_is_refused_before_it_is_read(
        svc: Services, agent_token: str) -> None:
    f = pay(agent_token, body=b"")
    f.request.headers["Content-Length"] = str(svc.config.max_inspect_bytes + 1)
    await authorized(svc, f)
    assert "held for approval" in refusal(f, 413, "payload_too_large")["reason"]


async def test_a_streamed_call_cannot_be_held(svc: Services, agent_token: str) -> None:
    f = pay(agent_token)
    approve = await authorized(svc, f)
    f.request.stream = True
    await approve.request(f)
    assert "streamed" in refusal(f, 403)["reason"]
    assert svc.approvals.waiting() == []


async def test_an_approved_call_goes_on_as_it_was_shown(svc: Services,
                                                       agent_token: str) -> None:
    f = pay(agent_token)
    approve = await authorized(svc, f)
    await answered(svc, approve, f, yes=True)
    ex = exchange(f)
    assert f.response is None and ex.decision == "approved"
    assert ex.approved_as is not None and ex.approval is not None
    assert ex.approval["digest"] == ex.approved_as.shown.digest
    assert ex.approved_as.hidden == {b"proxy-authorization", b"proxy-connection"}
    await ApprovedAsShown(svc).request(f)
    assert f.response is None
    f.request.content = b'{"amount": 990000}'  # changed after the approval
    await ApprovedAsShown(svc).request(f)
    assert refusal(f, 500, "changed_after_approval")


async def test_a_denied_call_is_refused(svc: Services, agent_token: str) -> None:
    f = pay(agent_token)
    approve = await authorized(svc, f)
    await answered(svc, approve, f, yes=False)
    assert "bob" in refusal(f, 403, "forbidden")["reason"]
    assert exchange(f).decision == "rejected" and exchange(f).approved_as is None
    assert exchange(f).approval is not None


async def test_a_denied_tool_call_is_a_json_rpc_error(svc: Services, agent_token: str) -> None:
    body = orjson.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                         "params": {"name": "pay", "arguments": {"amount": 10}}})
    f = request("POST", "http://mcp.example/pay", token=agent_token, content=body,
                Accept="application/json, text/event-stream")
    mcp, approve = Mcp(svc), Approve(svc)
    with taddons.context(Identify(svc), Authorize(svc), mcp, approve):
        await Identify(svc).requestheaders(f)
        await Authorize(svc).requestheaders(f)
        await mcp.requestheaders(f)
        await approve.requestheaders(f)
        await mcp.request(f)
    ex = exchange(f)
    assert ex.mcp_decision is not None and ex.mcp_decision.calls
    await answered(svc, approve, f, yes=False)
    [held_record] = [orjson.loads(line) for line in
                     (await asyncio.to_thread(Path(svc.audit.path).read_bytes)).splitlines()]
    assert held_record["decision"] == "held" and held_record["rule"] == "mcp-approve"
    assert f.response is not None and f.response.status_code == 200
    doc = orjson.loads(f.response.content or b"")
    assert doc["id"] == 3 and "bob" in doc["error"]["message"]
    assert ex.decision == "rejected" and ex.approval is not None


async def test_the_approver_does_not_see_what_the_secret_replaces(svc: Services) -> None:
    rule = next(r for w in svc.config.workloads.values() for r in w.standing
                if r.id == "secret-approve")
    hidden, params = replaced_by_secret(svc.secrets, rule)
    assert hidden >= {b"authorization", b"cookie", b"accept-encoding",
                      b"proxy-authorization", b"proxy-connection"}
    f = request("POST", "http://api.example/pay/x", content=b"{}", Authorization="Bearer a",
                Cookie="c=1", X_Trace="t1", Proxy_Authorization="Basic x")
    names = {n.lower() for n, _ in held_request(f, hidden, params, rule.secret).headers}
    assert b"x-trace" in names
    assert not names & {b"authorization", b"cookie", b"proxy-authorization"}
