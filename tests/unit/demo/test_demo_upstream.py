"""The demo's upstreams on their own: the MCP server speaks MCP, the API keeps its secret.

The MCP server is driven by the official SDK client (both of its connect modes)
and by hand for every transport error the MCP specification names; the API is
asked with no, a wrong and the right credential.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from mcp.client import Client
from mcp.shared.exceptions import MCPError

from proxy.demo._upstream import PROTOCOL_VERSIONS, ApiUpstream, McpUpstream

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
              "all_proxy")
SECRET = "demo_unit_secret_value"
JSON_HEADERS = {"Accept": "application/json, text/event-stream",
                "Content-Type": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}}}


async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
def server() -> McpUpstream:
    return McpUpstream()


@pytest.fixture
async def mcp_url(server: McpUpstream, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[str]:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    async for base in serve(server.app()):
        yield f"{base}/mcp"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        yield client


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_client_lists_and_calls_tools(server: McpUpstream, mcp_url: str,
                                                mode: str) -> None:
    async with Client(mcp_url, mode=mode) as client:
        tools = await client.list_tools()
        assert sorted(t.name for t in tools.tools) == ["delete_repo", "search_docs"]
        result = await client.call_tool("search_docs", {"query": "rate limits", "limit": 2})
        assert not result.is_error
        assert result.structured_content == {"results": ["docs/rate-limits-1.md",
                                                         "docs/rate-limits-2.md"]}
        bad = await client.call_tool("search_docs", {"query": "x", "limit": "many"})
        assert bad.is_error  # an input error is a tool execution error, and nothing ran
        with pytest.raises(MCPError, match="Unknown tool: drop_tables"):
            await client.call_tool("drop_tables", {})
        await client.call_tool("delete_repo", {"repo": "acme/old"})
    assert server.ran == {"search_docs": 1, "delete_repo": 1}
    assert server.deleted == ["acme/old"]


async def initialize(http: httpx.AsyncClient, url: str, version: str = "2025-06-18"
                     ) -> tuple[httpx.Response, str]:
    body = {**INIT, "params": {**INIT["params"], "protocolVersion": version}}
    resp = await http.post(url, content=orjson.dumps(body), headers=JSON_HEADERS)
    assert resp.status_code == 200, resp.text
    return resp, resp.headers["Mcp-Session-Id"]


@pytest.mark.parametrize(("asked", "agreed"), [
    ("2025-06-18", "2025-06-18"), ("2025-03-26", "2025-03-26"),
    ("2024-01-01", PROTOCOL_VERSIONS[-1])])
async def test_initialize_negotiates_the_version(mcp_url: str, http: httpx.AsyncClient,
                                                 asked: str, agreed: str) -> None:
    resp, sid = await initialize(http, mcp_url, asked)
    assert resp.headers["Content-Type"].startswith("application/json")
    result = resp.json()["result"]
    assert result["protocolVersion"] == agreed
    assert result["capabilities"] == {"tools": {"listChanged": False}}
    assert len(sid) == 32 and sid.isascii()


def call(method: str = "tools/list", **extra: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": method, **extra})


# (what is wrong, headers over the session's, body, status, JSON-RPC code or None)
BAD = [
    ("no session id", {"Mcp-Session-Id": None}, call(), 400, -32600),
    ("unknown session id", {"Mcp-Session-Id": "0" * 32}, call(), 404, -32600),
    ("unsupported protocol version", {"MCP-Protocol-Version": "1999-01-01"}, call(), 400,
     -32600),
    ("not JSON", {}, b"{nope", 400, -32700),
    ("a batch", {}, b"[" + call() + b"]", 400, -32600),
    ("not JSON-RPC 2.0", {}, orjson.dumps({"jsonrpc": "1.0", "id": 1, "method": "ping"}), 400,
     -32600),
    ("a null id", {}, orjson.dumps({"jsonrpc": "2.0", "id": None, "method": "ping"}), 400,
     -32600),
    ("wrong Content-Type", {"Content-Type": "text/plain"}, call(), 415, -32600),
    ("Accept without JSON", {"Accept": "text/event-stream"}, call(), 406, -32600),
    ("a foreign Origin", {"Origin": "https://evil.example"}, call(), 403, -32600),
    ("an unknown method", {}, call("resources/list"), 200, -32601),
    ("params not an object", {}, call("tools/list", params=[1]), 200, -32602),
]


@pytest.mark.parametrize(("what", "headers", "body", "status", "code"), BAD,
                         ids=[b[0] for b in BAD])
async def test_bad_messages_are_refused(server: McpUpstream, mcp_url: str,
                                        http: httpx.AsyncClient, what: str,
                                        headers: dict[str, str | None], body: bytes,
                                        status: int, code: int) -> None:
    _, sid = await initialize(http, mcp_url)
    sent = {**JSON_HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"}
    sent.update(headers)
    resp = await http.post(mcp_url, content=body,
                           headers={k: v for k, v in sent.items() if v is not None})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert not server.ran


async def test_notifications_get_202_and_sessions_end(mcp_url: str,
                                                      http: httpx.AsyncClient) -> None:
    _, sid = await initialize(http, mcp_url)
    headers = {**JSON_HEADERS, "Mcp-Session-Id": sid}
    note = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
    resp = await http.post(mcp_url, content=note, headers=headers)
    assert resp.status_code == 202 and resp.content == b""
    assert (await http.get(mcp_url, headers=headers)).status_code == 405  # no server stream
    assert (await http.delete(mcp_url, headers=headers)).status_code == 200
    resp = await http.post(mcp_url, content=call("ping"), headers=headers)
    assert resp.status_code == 404  # the session is gone: initialize again


@pytest.fixture
async def api() -> AsyncIterator[tuple[ApiUpstream, str]]:
    up = ApiUpstream(SECRET)
    async for base in serve(up.app()):
        yield up, base


@pytest.mark.parametrize(("authorization", "status", "verdict"), [
    (None, 401, "missing"), (f"Bearer {SECRET}x", 401, "wrong"),
    (f"bearer {SECRET}", 401, "wrong"), (f"Bearer {SECRET}", 200, "valid")])
async def test_api_says_whether_the_credential_is_right_never_what_it_is(
        api: tuple[ApiUpstream, str], http: httpx.AsyncClient, authorization: str | None,
        status: int, verdict: str) -> None:
    up, base = api
    headers = {"Authorization": authorization} if authorization else {}
    resp = await http.get(f"{base}/repos/acme/widgets/issues", headers=headers)
    assert resp.status_code == status
    assert resp.json()["authorization"] == verdict
    assert SECRET not in resp.text and SECRET not in str(resp.headers)
    assert [(s.method, s.path, s.authorization) for s in up.seen] == [
        ("GET", "/repos/acme/widgets/issues", verdict)]


async def test_api_records_what_it_does_not_serve(api: tuple[ApiUpstream, str],
                                                  http: httpx.AsyncClient) -> None:
    up, base = api
    resp = await http.get(f"{base}/admin", headers={"Authorization": f"Bearer {SECRET}"})
    assert resp.status_code == 404
    assert [(s.method, s.path) for s in up.seen] == [("GET", "/admin")]
