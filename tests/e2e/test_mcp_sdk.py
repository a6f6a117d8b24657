"""MCP through the real gateway with the official SDK on both ends.

The SDK's MCPServer (streamable HTTP, SSE and JSON response modes, and over
HTTPS) runs on loopback; the SDK's client reaches it only through
``HTTP_PROXY``/``HTTPS_PROXY``. Every tool records that it ran, so a refused
call is proven never to have run.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from mcp.client import Client
from mcp.shared.exceptions import MCPError

from tests.mcp_fixtures import TOOL_REFUSED, mcp_gateway, mcp_servers, records, via_proxy
from tests.mcp_server import McpUpstream
from tests.support import Gateway

__all__ = ["mcp_gateway", "mcp_servers", "via_proxy"]  # fixtures used by name

async def eventually(probe: Any) -> Any:
    """``probe()`` once it returns something truthy (within 5 s)."""
    for _ in range(100):
        if found := probe():
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("not found within 5 s")


@pytest.mark.parametrize("kind", ["sse", "json", "tls"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_allowed_and_refused(via_proxy: Gateway, mcp_servers: dict[str, McpUpstream],
                                       kind: str, mode: str) -> None:
    up = mcp_servers[kind]
    up.ran.clear()
    async with Client(up.url, mode=mode) as client:
        tools = await client.list_tools()
        assert sorted(t.name for t in tools.tools) == ["add", "notify", "search"]
        result = await client.call_tool("add", {"a": 2, "b": 3})
        assert result.structured_content == {"result": 5}
        result = await client.call_tool("search", {"query": "mcp docs", "limit": 5})
        assert not result.is_error
        with pytest.raises(MCPError) as refused:
            await client.call_tool("danger", {"target": "prod"})
        assert refused.value.error.code == TOOL_REFUSED
        assert "'danger' is not granted" in refused.value.error.message
        with pytest.raises(MCPError) as over:
            await client.call_tool("search", {"query": "mcp docs", "limit": 500})
        assert "above the maximum 50" in over.value.error.message
        # The session still works after refusals: they are tool errors, not broken transport.
        assert (await client.call_tool("add", {"a": 1, "b": 1})).structured_content == {
            "result": 2}
    assert up.names() == ["add", "search", "add"]
    denied = records(via_proxy, decision="deny", port=up.port)
    danger = [r for r in denied if (r["tool"] or {}).get("name") == "danger"]
    assert danger and danger[-1]["status"] == 200
    assert danger[-1]["tool"]["protocol"] == "mcp"
    assert len(danger[-1]["tool"]["arguments_sha256"]) == 64
    # A streamed (SSE) answer is recorded when its stream ends, which may be just
    # after the client has read the event it waited for; the SDK client may also
    # hang up before the stream's end, which the audit addon records as an error.
    allowed = await eventually(lambda: [
        r for r in records(via_proxy, port=up.port)
        if r["decision"] in ("allow", "error") and (r["tool"] or {}).get("name") == "search"])
    assert allowed[-1]["rule"] == f"mcp-search-{up.port}"


async def test_get_stream_stays_streamed(via_proxy: Gateway, token: str,
                                         mcp_servers: dict[str, McpUpstream]) -> None:
    """The standalone GET stream passes, and its events arrive while it is open."""
    up = mcp_servers["sse"]
    proxy = via_proxy.proxy_url_with(token)
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(proxy=proxy, trust_env=False, timeout=10) as c:
        r = await c.post(up.url, json=init, headers=accept)
        assert r.status_code == 200, r.text
        sid = {"mcp-session-id": r.headers["mcp-session-id"],
               "mcp-protocol-version": "2025-11-25"}
        r = await c.post(up.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                         headers={**accept, **sid})
        assert r.status_code == 202
        async with c.stream("GET", up.url, headers={"Accept": "text/event-stream", **sid}) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = s.aiter_lines()
            call = asyncio.create_task(c.post(up.url, headers={**accept, **sid}, json={
                "jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "notify", "arguments": {}}}))
            got = ""
            async with asyncio.timeout(10):
                while "notifications/resources/list_changed" not in got:
                    got = await anext(lines)
            assert not s.is_closed
            assert (await call).status_code == 200


async def test_methods_need_listing(via_proxy: Gateway, mcp_servers: dict[str, McpUpstream]
                                    ) -> None:
    """resources/* is listed by a rule on the endpoint; prompts/* is not: 403."""
    up = mcp_servers["json"]
    async with Client(up.url, mode="legacy") as client:
        res = await client.read_resource("res://doc")
        assert res.contents[0].text == "the document"
        with pytest.raises(MCPError):  # the SDK reports the 403 as an error response
            await client.get_prompt("greet", {"name": "x"})
    refused = await eventually(lambda: [
        r for r in records(via_proxy, decision="deny", port=up.port)
        if (r["tool"] or {}).get("method") == "prompts/get"])
    assert refused[-1]["status"] == 403
    assert "'prompts/get' is not granted" in refused[-1]["reason"]
    read = await eventually(lambda: [
        r for r in records(via_proxy, port=up.port)
        if r["decision"] in ("allow", "error")
        and (r["tool"] or {}).get("method") == "resources/read"])
    assert read[-1]["rule"] == f"mcp-search-{up.port}"
