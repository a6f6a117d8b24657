"""addons/mcp.py: MCP bodies held, read strictly and judged per tool; tools/list filtered."""

from __future__ import annotations

import orjson
from mitmproxy import http
from mitmproxy.test import taddons

from addons._base import exchange
from addons.authorize import Authorize
from addons.identify import Identify
from addons.mcp import Mcp
from proxy.gateway import Services
from proxy.mcp import SESSION_HEADER
from tests.unit.addons.conftest import refusal, request, respond

URL = "http://mcp.example/mcp"
ACCEPT = "application/json, text/event-stream"


def rpc(method: str, rid: int = 1, **params: object) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})


def mcp_call(token: str, body: bytes | None, method: str = "POST", url: str = URL,
             **headers: str) -> http.HTTPFlow:
    return request(method, url, token=token, content=body, Accept=ACCEPT, **headers)


async def through(svc: Services, f: http.HTTPFlow, *, body_hook: bool = True) -> Mcp:
    """identify → authorize → mcp (requestheaders, then request once the body is in)."""
    mcp = Mcp(svc)
    with taddons.context(Identify(svc), Authorize(svc), mcp):
        await Identify(svc).requestheaders(f)
        await Authorize(svc).requestheaders(f)
        await mcp.requestheaders(f)
        if body_hook:
            await mcp.request(f)
    return mcp


async def test_a_granted_tool_call_goes_on(svc: Services, agent_token: str) -> None:
    f = mcp_call(agent_token, rpc("tools/call", name="search", arguments={"q": "x"}))
    await through(svc, f)
    ex = exchange(f)
    assert f.response is None
    assert ex.buffer_body and [r.id for r in ex.mcp_rules] == ["mcp"]
    assert ex.mcp_decision is not None and ex.mcp_decision.allowed
    assert ex.mcp_decision.calls == (("search", b'{"q":"x"}'),)
    assert ex.allowed_by is not None and ex.allowed_by.id == "mcp"
    assert ex.decision == "allow" and ex.rule == "mcp"
    assert ex.tool is not None and ex.tool["name"] == "search"


async def test_an_ungranted_tool_is_a_json_rpc_error(svc: Services, agent_token: str) -> None:
    f = mcp_call(agent_token, rpc("tools/call", rid=7, name="delete_repo", arguments={}))
    await through(svc, f)
    assert f.response is not None and f.response.status_code == 200  # the MCP way
    doc = orjson.loads(f.response.content or b"")
    ex = exchange(f)
    assert doc["id"] == 7 and doc["error"]["message"]
    assert ex.request_id in f.response.text
    assert ex.decision == "deny" and ex.rule is None and ex.status == 200
    assert ex.tool is not None and ex.tool["name"] == "delete_repo"


async def test_an_unreadable_body_is_refused(svc: Services, agent_token: str) -> None:
    f = mcp_call(agent_token, b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "id": 2}')
    await through(svc, f)
    refusal(f, 403)
    assert exchange(f).rule is None


async def test_a_get_with_a_query_is_not_mcp_transport(svc: Services, agent_token: str) -> None:
    f = mcp_call(agent_token, None, "GET", URL + "?x=1")
    await through(svc, f, body_hook=False)
    assert "query" in refusal(f, 403)["reason"]
    assert exchange(f).rule is None


async def test_a_delete_without_a_session_is_refused(svc: Services, agent_token: str) -> None:
    f = mcp_call(agent_token, None, "DELETE")
    await through(svc, f, body_hook=False)
    assert "Mcp-Session-Id" in refusal(f, 403)["reason"]
    allowed = mcp_call(agent_token, None, "DELETE", **{SESSION_HEADER: "s-1"})
    await through(svc, allowed, body_hook=False)
    assert allowed.response is None


async def test_a_body_too_large_to_hold_is_refused_early(svc: Services,
                                                        agent_token: str) -> None:
    f = mcp_call(agent_token, None)
    f.request.headers["Content-Length"] = str(svc.config.max_inspect_bytes + 1)
    await through(svc, f, body_hook=False)
    refusal(f, 413, "payload_too_large")


async def test_a_chunked_body_is_held_within_the_cap(svc: Services,
                                                    agent_token: str) -> None:
    """No length to refuse on early: held as it arrives, refused past the cap (limits)."""
    f = mcp_call(agent_token, None, Transfer_Encoding="chunked")
    await through(svc, f, body_hook=False)
    assert f.response is None and not f.request.stream
    ex = exchange(f)
    assert ex.buffer_body and ex.held_cap is not None
    assert ex.held_cap[0] == svc.config.max_inspect_bytes


async def test_a_call_under_a_rule_without_mcp_is_not_held(svc: Services,
                                                           agent_token: str) -> None:
    f = request(token=agent_token)
    await through(svc, f)
    ex = exchange(f)
    assert f.response is None and ex.mcp_rules == () and not ex.buffer_body
    assert ex.mcp_decision is None and ex.rule == "read"


async def test_a_tools_list_answer_shows_only_granted_tools(svc: Services,
                                                           agent_token: str) -> None:
    f = mcp_call(agent_token, rpc("tools/list"))
    mcp = await through(svc, f)
    assert f.response is None and f.request.headers["accept-encoding"] == "identity"
    answer = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "search", "inputSchema": {"type": "object"}},
        {"name": "delete_repo", "inputSchema": {"type": "object"}}]}})
    resp = respond(f, 200, answer)
    await mcp.responseheaders(f)
    assert callable(resp.stream) and "content-length" not in resp.headers
    out = b"".join([*resp.stream(answer), *resp.stream(b"")])
    tools = orjson.loads(out)["result"]["tools"]
    assert [t["name"] for t in tools] == ["search"]


async def test_a_compressed_tools_list_answer_is_replaced(svc: Services,
                                                         agent_token: str) -> None:
    f = mcp_call(agent_token, rpc("tools/list"))
    mcp = await through(svc, f)
    resp = respond(f, 200, b"\x1f\x8b...", Content_Encoding="gzip")
    await mcp.responseheaders(f)
    assert callable(resp.stream) and "content-encoding" not in resp.headers
    out = b"".join([*resp.stream(b"\x1f\x8b..."), *resp.stream(b"")])
    assert b"compressed" in out and b"delete_repo" not in out
