"""addons/websocket.py (and the upgrade's judging in addons/authorize.py): hooks driven
as mitmproxy drives them, on test flows. The frames' path end to end, the task's end and
the close frames sent are tested in tests/e2e/test_websocket.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from mitmproxy import http
from mitmproxy.test import taddons
from mitmproxy.websocket import WebSocketData, WebSocketMessage
from wsproto.frame_protocol import Opcode

from addons._base import exchange
from addons.authorize import Authorize
from addons.identify import Identify
from addons.websocket import WebSocket
from proxy.gateway import Services
from tests.unit.addons.conftest import refusal, request

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec_WebSocket_Version": "13",
           "Sec_WebSocket_Key": "dGhlIHNhbXBsZSBub25jZQ=="}


async def records(svc: Services) -> list[dict[str, Any]]:
    text = await asyncio.to_thread(Path(svc.audit.path).read_bytes)
    return [orjson.loads(line) for line in text.splitlines()]


async def upgrade(svc: Services, token: str, path: str = "/ws", **headers: str
                  ) -> http.HTTPFlow:
    f = request(url=f"http://rt.example{path}", token=token, **{**UPGRADE, **headers})
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).requestheaders(f)
        await Authorize(svc).requestheaders(f)
    return f


async def opened(svc: Services, token: str, path: str = "/ws"
                 ) -> tuple[http.HTTPFlow, WebSocket]:
    """An allowed upgrade, answered 101, its socket started."""
    f = await upgrade(svc, token, path)
    assert f.response is None, f.response and f.response.content
    f.response = http.Response.make(101, b"", {"Upgrade": "websocket"})
    f.websocket = WebSocketData()
    ws = WebSocket(svc)
    with taddons.context(ws):
        ws.responseheaders(f)
        await ws.websocket_start(f)
    return f, ws


async def message(ws: WebSocket, f: http.HTTPFlow, content: bytes, from_client: bool = True,
                  text: bool = True) -> WebSocketMessage:
    assert f.websocket is not None
    msg = WebSocketMessage(Opcode.TEXT if text else Opcode.BINARY, from_client, content)
    f.websocket.messages.append(msg)
    with taddons.context(ws):
        await ws.websocket_message(f)
    return msg


async def end(ws: WebSocket, f: http.HTTPFlow, code: int = 1000, by_agent: bool = True
              ) -> None:
    assert f.websocket is not None
    f.websocket.close_code, f.websocket.closed_by_client = code, by_agent
    with taddons.context(ws):
        await ws.websocket_end(f)


async def test_an_upgrade_on_a_rule_with_websocket_true_is_allowed(
        svc: Services, agent_token: str) -> None:
    f = await upgrade(svc, agent_token)
    ex = exchange(f)
    assert f.response is None and ex.decision == "allow" and ex.rule == "socket"
    assert ex.websocket is not None


async def test_an_upgrade_on_a_rule_without_it_is_refused(svc: Services,
                                                          agent_token: str) -> None:
    f = await upgrade(svc, agent_token, "/plain")
    reason = refusal(f, 403)["reason"]
    assert "'no-socket'" in reason and "websocket: true" in reason
    assert exchange(f).websocket is None


async def test_other_upgrades_stay_refused_on_a_websocket_rule(svc: Services,
                                                               agent_token: str) -> None:
    f = await upgrade(svc, agent_token, Upgrade="h2c")
    assert "other than WebSocket" in refusal(f, 403)["reason"]


async def test_a_101_to_a_call_that_asked_for_none_is_killed(svc: Services,
                                                             agent_token: str) -> None:
    f = request(url="http://rt.example/plain", token=agent_token)
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).requestheaders(f)
        await Authorize(svc).requestheaders(f)
    f.response = http.Response.make(101, b"", {"Upgrade": "websocket"})
    ws = WebSocket(svc)
    with taddons.context(ws):
        ws.responseheaders(f)
    assert f.error is not None and f.error.msg == "Connection killed."
    assert exchange(f).decision == "error"


async def test_a_101_goes_through_only_if_the_websocket_addon_took_it_on(
        svc: Services, agent_token: str) -> None:
    """Authorize loaded without this addon (mitmdump -s): the socket would go unjudged
    and unrecorded, so the 101 is cut."""
    f = await upgrade(svc, agent_token)
    f.response = http.Response.make(101, b"", {"Upgrade": "websocket"})
    with taddons.context(Authorize(svc)):
        Authorize(svc).response(f)
    assert f.error is not None and exchange(f).decision == "error"
    taken = (await opened(svc, agent_token))[0]
    with taddons.context(Authorize(svc)):
        Authorize(svc).response(taken)
    assert taken.error is None and exchange(taken).decision == "allow"


async def test_frames_are_counted_into_one_record_when_the_socket_ends(
        svc: Services, agent_token: str) -> None:
    f, ws = await opened(svc, agent_token)
    await message(ws, f, b"hello")
    await message(ws, f, b"\x00\x01\x02", text=False)
    await message(ws, f, b"echo:hello", from_client=False)
    assert f.websocket is not None and f.websocket.messages == []  # not kept on the flow
    assert await records(svc) == []  # nothing until it ends
    await end(ws, f, 1000)
    [rec] = await records(svc)
    assert rec["request_id"] == exchange(f).request_id and rec["decision"] == "allow"
    assert rec["websocket"] == {"frames_in": 2, "frames_out": 1, "bytes_in": 8,
                                "bytes_out": 10, "refused": 0, "close_code": 1000,
                                "closed_by": "agent"}
    assert (rec["bytes_in"], rec["bytes_out"]) == (8, 10)


async def test_each_mcp_tool_call_frame_is_judged_and_recorded(svc: Services,
                                                               agent_token: str) -> None:
    f, ws = await opened(svc, agent_token, "/mcp")
    init = await message(ws, f, orjson.dumps({"jsonrpc": "2.0", "id": 0,
                                              "method": "initialize", "params": {}}))
    ok = await message(ws, f, orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                            "params": {"name": "search", "arguments": {}}}))
    bad = await message(ws, f, orjson.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                             "params": {"name": "pay", "arguments": {}}}))
    binary = await message(ws, f, b"{}", text=False)
    assert not init.dropped and not ok.dropped and bad.dropped and binary.dropped
    frames = await records(svc)  # the tool calls and the refusals; not the lifecycle
    assert [(r["decision"], r["rule"]) for r in frames] == [
        ("allow", "socket-mcp"), ("deny", None), ("deny", None)]
    assert [r["tool"]["name"] for r in frames[:2]] == ["search", "pay"]
    assert {r["websocket"]["socket"] for r in frames} == {exchange(f).request_id}
    await end(ws, f)
    rec = (await records(svc))[-1]
    assert rec["websocket"]["refused"] == 2 and rec["websocket"]["frames_in"] == 4


async def test_a_tools_list_answer_is_filtered(svc: Services, agent_token: str) -> None:
    f, ws = await opened(svc, agent_token, "/mcp")
    answer = await message(ws, f, orjson.dumps(
        {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "search"},
                                                         {"name": "pay"}]}}),
        from_client=False)
    tools = orjson.loads(answer.content)["result"]["tools"]
    assert [t["name"] for t in tools] == ["search"]


async def test_a_message_over_the_cap_closes_the_socket(svc: Services,
                                                        agent_token: str) -> None:
    f, ws = await opened(svc, agent_token)
    big = await message(ws, f, b"x" * (svc.config.websocket_max_message_bytes + 1))
    assert big.dropped
    ex = exchange(f)
    assert ex.websocket is not None and ex.websocket.closed_by == "gateway"
    assert ex.reason is not None and "websocket_max_message_bytes" in ex.reason


async def test_nothing_passes_once_the_gateway_closed_the_socket(svc: Services,
                                                                agent_token: str) -> None:
    """The close is sent after the message being handled; what arrives meanwhile from
    either side is dropped."""
    f, ws = await opened(svc, agent_token)
    ws.close(f, 1008, "task revoked")
    late = [await message(ws, f, b"more"), await message(ws, f, b"late", from_client=False)]
    assert all(m.dropped for m in late)
    ex = exchange(f)
    assert ex.websocket is not None and ex.websocket.frames_in == 0
    assert ex.reason == "task revoked: the gateway closed the WebSocket (1008)"
