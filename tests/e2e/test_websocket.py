"""WebSocket through the real gateway: the `websockets` client, an aiohttp upstream.

Opt-in per rule (``websocket: true``): the upgrade is judged, authorized and gets its
secret like any call; frames then flow, counted into the socket's one audit record
when it ends; the task's end closes the socket (1008 and the reason); on a rule with
``mcp`` each text frame is judged as a JSON-RPC body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket as sockets
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import base_config
from tests.support import WORKLOAD, Gateway, Keys
from tests.tasks_support import create_task, post_task, revoke
from tests.ws_upstream import WsUpstream

SECRET = "ws-secret-value-8d1f"
SCHEMES = ["ws", "wss"]
MAX_MESSAGE = 4096  # proxy.websocket_max_message_bytes of the module's gateway


class Switcher:
    """A plain HTTP origin that answers every request with a switch to WebSocket, asked
    for or not, then sends a text frame: what a colluding upstream would do."""

    def __init__(self) -> None:
        self._sock = sockets.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.heads: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._sock.accept()
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                self.heads.append(data)
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                             b"\x81\x05hello")
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                conn.close()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def switcher() -> Iterator[Switcher]:
    srv = Switcher()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def ws_up(test_ca: trustme.CA) -> Iterator[WsUpstream]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    up = WsUpstream(ctx).start()
    yield up
    up.stop()


def _endpoints(up: WsUpstream) -> dict[str, dict[str, Any]]:
    """Where each scheme's sockets go: plain HTTP on 127.0.0.1, TLS on localhost."""
    return {"ws": {"host": "127.0.0.1", "port": up.http_port, "scheme": "http"},
            "wss": {"host": "localhost", "port": up.https_port, "scheme": "https",
                    "allow_private": True}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
       ws_up: WsUpstream, switcher: Switcher) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("ws"), ws_config(shared_files, ws_up, switcher),
                env={"TG_WS_KEY": SECRET}).start()
    yield g
    g.stop()


def ws_config(shared_files: dict[str, Path], ws_up: WsUpstream,
              switcher: Switcher) -> dict[str, Any]:
    cfg = base_config(shared_files, ws_up)
    cfg["proxy"]["websocket_max_message_bytes"] = MAX_MESSAGE
    ends = _endpoints(ws_up)
    cfg["secrets"] = {"ws-key": {"provider": "env", "var": "TG_WS_KEY",
                                 "inject": {"header": "Authorization",
                                            "value": "Bearer {token}"}}}
    wl = cfg["workloads"][WORKLOAD]
    wl["standing"] = [
        *({"id": f"{s}-echo", **ends[s], "methods": ["GET"], "paths": ["/ws/echo"],
           "websocket": True, "secret": "ws-key"} for s in SCHEMES),
        *({"id": f"{s}-plain", **ends[s], "methods": ["GET"], "paths": ["/ws/plain"]}
          for s in SCHEMES),
        {"id": "wss-mcp", **ends["wss"], "paths": ["/ws/mcp"], "websocket": True,
         "mcp": {"tools": ["search_docs"]}},
        {"id": "switcher", "host": "127.0.0.1", "port": switcher.port, "scheme": "http",
         "methods": ["GET"]},
    ]
    wl["ceiling"] = [*({"id": f"c-{s}", **ends[s], "methods": ["GET"], "paths": ["/ws/**"],
                        "websocket": True} for s in SCHEMES),
                     {"id": "c-http-only", **ends["wss"], "methods": ["GET"],
                      "paths": ["/http-only/**"]}]
    return cfg


def _url(up: WsUpstream, scheme: str, path: str) -> str:
    end = _endpoints(up)[scheme]
    return f"{scheme}://{end['host']}:{end['port']}{path}"


@asynccontextmanager
async def socket(gw: Gateway, token: str, url: str, **kw: Any
                 ) -> AsyncIterator[ClientConnection]:
    tls = gw.ssl_context() if url.startswith("wss:") else None
    async with connect(url, proxy=gw.proxy_url_with(token), ssl=tls, open_timeout=10,
                       compression=None, **kw) as ws:
        yield ws


async def recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), 10)


def request_id(ws: ClientConnection) -> str:
    """The socket's request id: on the 101, as on every answer."""
    assert ws.response is not None
    return ws.response.headers["X-Taskgate-Request-Id"]


def socket_record(gw: Gateway, ws: ClientConnection) -> dict[str, Any]:
    """The one record of socket ``ws`` (written once the gateway saw it close)."""
    def find() -> list[dict[str, Any]]:
        return [r for r in gw.records_for(request_id(ws)) if r["status"] == 101]
    deadline = time.monotonic() + 10
    while not (found := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    (rec,) = found
    return rec


# -- opt-in --------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_an_upgrade_without_websocket_true_is_refused(gw: Gateway, ws_up: WsUpstream,
                                                            keys: Keys, scheme: str) -> None:
    before = len(ws_up.seen)
    with pytest.raises(InvalidStatus) as e:
        async with socket(gw, keys.token(), _url(ws_up, scheme, "/ws/plain")):
            pass
    resp = e.value.response
    assert resp.status_code == 403
    body = json.loads(resp.body)
    assert "websocket: true" in body["reason"] and body["request_id"]
    assert len(ws_up.seen) == before
    (rec,) = gw.records_for(body["request_id"])
    assert rec["decision"] == "deny" and rec["status"] == 403


# -- the upgrade is a call: secret, totals, record ------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_the_secret_goes_on_the_upgrade_and_its_echo_is_masked(
        gw: Gateway, ws_up: WsUpstream, keys: Keys, scheme: str) -> None:
    before = len(ws_up.seen)
    async with socket(gw, keys.token(), _url(ws_up, scheme, "/ws/echo"),
                      additional_headers={"Authorization": "Bearer agents-own"}) as ws:
        await ws.send("auth?")
        answer = await recv(ws)
    (seen,) = ws_up.seen[before:]
    assert seen["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert isinstance(answer, str) and answer.startswith("you sent Bearer ")
    assert SECRET not in answer and "agents-own" not in answer


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_frames_flow_and_the_totals_are_recorded_when_it_ends(
        gw: Gateway, ws_up: WsUpstream, keys: Keys, scheme: str) -> None:
    async with socket(gw, keys.token(), _url(ws_up, scheme, "/ws/echo")) as ws:
        for text in ("one", "two", "three"):
            await ws.send(text)
            assert await recv(ws) == "echo:" + text
        await ws.send(b"\x00\x01")
        assert await recv(ws) == b"echo:\x00\x01"
        async with httpx.AsyncClient(timeout=5) as control:
            metrics = (await control.get(f"{gw.control_url}/metrics")).text
        assert re.search(r"^taskgate_open_websockets [1-9]", metrics, re.MULTILINE), metrics
        assert not gw.records_for(request_id(ws))  # still open: no record yet
    rec = socket_record(gw, ws)
    assert (rec["decision"], rec["rule"], rec["status"]) == ("allow", f"{scheme}-echo", 101)
    assert rec["secret"] and SECRET not in json.dumps(rec)
    assert rec["websocket"] == {"frames_in": 4, "frames_out": 4, "bytes_in": 13,
                                "bytes_out": 13 + 4 * 5, "refused": 0, "close_code": 1000,
                                "closed_by": "agent"}
    assert (rec["bytes_in"], rec["bytes_out"]) == (13, 33)


async def test_the_upstream_closing_is_recorded_with_its_code(gw: Gateway, ws_up: WsUpstream,
                                                               keys: Keys) -> None:
    async with socket(gw, keys.token(), _url(ws_up, "wss", "/ws/echo")) as ws:
        await ws.send("close")
        with pytest.raises(ConnectionClosed) as e:
            await recv(ws)
    assert e.value.rcvd is not None and e.value.rcvd.code == 4000
    rec = socket_record(gw, ws)
    assert rec["websocket"]["close_code"] == 4000
    assert rec["websocket"]["closed_by"] == "upstream"


# -- the task's end closes the socket -------------------------------------------------
def _ws_task(gw: Gateway, ws_up: WsUpstream, **body: Any) -> dict[str, Any]:
    rule = {"id": "t-ws", **_endpoints(ws_up)["wss"], "methods": ["GET"],
            "paths": ["/ws/echo"], "websocket": True}
    return create_task(gw, ws_up, [rule], **body)  # type: ignore[arg-type]


async def _closed_by_gateway(ws: ClientConnection, within: float) -> ConnectionClosed:
    with pytest.raises(ConnectionClosed) as e:
        await asyncio.wait_for(ws.recv(), within)
    return e.value


async def test_revocation_closes_the_socket_with_1008(gw: Gateway, ws_up: WsUpstream) -> None:
    task = _ws_task(gw, ws_up)
    async with socket(gw, task["token"], _url(ws_up, "wss", "/ws/echo")) as ws:
        await ws.send("hello")
        assert await recv(ws) == "echo:hello"
        revoke(gw, task["task_id"])
        closed = await _closed_by_gateway(ws, 5)
    assert closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (1008, "task revoked")
    rec = socket_record(gw, ws)
    assert rec["task"] == task["task_id"] and rec["decision"] == "allow"
    assert rec["websocket"]["close_code"] == 1008
    assert rec["websocket"]["closed_by"] == "gateway"
    assert "task revoked" in rec["reason"]


async def test_expiry_closes_the_socket_with_1008(gw: Gateway, ws_up: WsUpstream) -> None:
    task = _ws_task(gw, ws_up, ttl_seconds=2)
    async with socket(gw, task["token"], _url(ws_up, "wss", "/ws/echo")) as ws:
        await ws.send("hello")
        assert await recv(ws) == "echo:hello"
        closed = await _closed_by_gateway(ws, 8)
    assert closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (1008, "task expired")


async def test_a_task_rule_cannot_open_websockets_its_ceiling_does_not(
        gw: Gateway, ws_up: WsUpstream) -> None:
    rule = {"id": "t-ws", **_endpoints(ws_up)["wss"], "methods": ["GET"],
            "paths": ["/http-only/**"], "websocket": True}
    r = post_task(gw, [rule], up=ws_up)
    assert r.status_code == 422, r.text
    assert "websocket: true" in r.json()["reason"]


# -- MCP over a WebSocket ------------------------------------------------------------
def _call(rpc_id: int, tool: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
                       "params": {"name": tool, "arguments": {}}})


async def test_an_mcp_frame_for_a_granted_tool_is_forwarded_and_recorded(
        gw: Gateway, ws_up: WsUpstream, keys: Keys) -> None:
    before = len(gw.audit())
    async with socket(gw, keys.token(), _url(ws_up, "wss", "/ws/mcp")) as ws:
        await ws.send(_call(1, "search_docs"))
        answer = json.loads(await recv(ws))
    assert answer["id"] == 1 and answer["result"]["content"][0]["text"] == "search_docs"
    sock = socket_record(gw, ws)
    (call,) = [r for r in gw.audit()[before:] if r["websocket"] and
               r["websocket"].get("socket") == sock["request_id"]]  # by its socket
    assert (call["decision"], call["rule"]) == ("allow", "wss-mcp")
    assert call["tool"]["name"] == "search_docs" and call["request_id"] != sock["request_id"]


async def test_each_tool_call_over_a_websocket_takes_one_from_the_task_budget(
        gw: Gateway, ws_up: WsUpstream) -> None:
    """The upgrade is one call, each tool call another: a socket is no way around
    max_calls."""
    rule = {"id": "t-mcp", **_endpoints(ws_up)["wss"], "methods": ["GET"],
            "paths": ["/ws/mcp"], "websocket": True, "mcp": {"tools": ["search_docs"]}}
    task = create_task(gw, ws_up, [rule], max_calls=3)
    async with socket(gw, task["token"], _url(ws_up, "wss", "/ws/mcp")) as ws:
        for i in (1, 2):
            await ws.send(_call(i, "search_docs"))
            assert "result" in json.loads(await recv(ws))
        await ws.send(_call(3, "search_docs"))
        spent = json.loads(await recv(ws))
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}))
        assert "result" in json.loads(await recv(ws))  # the lifecycle still flows
    assert spent["id"] == 3 and spent["error"]["code"] == -32051
    assert spent["error"]["data"]["reason"].startswith("task budget spent")


async def test_an_mcp_frame_for_another_tool_is_refused_with_a_jsonrpc_error(
        gw: Gateway, ws_up: WsUpstream, keys: Keys) -> None:
    seen = len(ws_up.messages)
    async with socket(gw, keys.token(), _url(ws_up, "wss", "/ws/mcp")) as ws:
        await ws.send(_call(7, "delete_everything"))
        error = json.loads(await recv(ws))
        await ws.send(_call(8, "search_docs"))  # the socket stays usable
        assert json.loads(await recv(ws))["id"] == 8
    assert error["id"] == 7 and error["error"]["code"] == -32051
    assert "delete_everything" in error["error"]["message"]
    assert [m for _, m in ws_up.messages[seen:]] == [_call(8, "search_docs")]
    (rec,) = gw.records_for(error["error"]["data"]["request_id"])
    assert rec["decision"] == "deny" and rec["tool"]["name"] == "delete_everything"
    sock = socket_record(gw, ws)
    assert rec["websocket"]["socket"] == sock["request_id"]
    assert sock["websocket"]["refused"] == 1 and sock["websocket"]["frames_in"] == 2


async def test_tools_list_answers_over_a_websocket_are_filtered(gw: Gateway, ws_up: WsUpstream,
                                                                keys: Keys) -> None:
    async with socket(gw, keys.token(), _url(ws_up, "wss", "/ws/mcp")) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        answer = json.loads(await recv(ws))
    assert [t["name"] for t in answer["result"]["tools"]] == ["search_docs"]


@pytest.mark.parametrize("frame", [b'{"jsonrpc": "2.0"}', "not json", '{"jsonrpc": "2.0", '
                                   '"id": 1, "method": "tools/call", "id": 2}'],
                         ids=["binary", "not-json", "duplicate-member"])
async def test_an_mcp_frame_that_cannot_be_judged_is_refused(gw: Gateway, ws_up: WsUpstream,
                                                             keys: Keys,
                                                             frame: str | bytes) -> None:
    seen = len(ws_up.messages)
    async with socket(gw, keys.token(), _url(ws_up, "wss", "/ws/mcp")) as ws:
        await ws.send(frame)
        error = json.loads(await recv(ws))
    assert error["error"]["code"] == -32051 and error["error"]["data"]["request_id"]
    if isinstance(frame, bytes):
        assert "binary frames" in error["error"]["data"]["reason"]
    assert ws_up.messages[seen:] == []


# -- what the gateway closes itself ---------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_a_message_over_the_cap_closes_the_socket_with_1009(
        gw: Gateway, ws_up: WsUpstream, keys: Keys, scheme: str) -> None:
    seen = len(ws_up.messages)
    async with socket(gw, keys.token(), _url(ws_up, scheme, "/ws/echo")) as ws:
        await ws.send("x" * (MAX_MESSAGE + 1))
        closed = await _closed_by_gateway(ws, 5)
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    assert "proxy.websocket_max_message_bytes" in closed.rcvd.reason
    assert ws_up.messages[seen:] == []
    rec = socket_record(gw, ws)
    assert rec["websocket"]["closed_by"] == "gateway" and rec["websocket"]["close_code"] == 1009


async def test_a_fragmented_message_is_cut_while_it_grows_past_the_cap(
        gw: Gateway, ws_up: WsUpstream, keys: Keys) -> None:
    """The message never ends: the gateway closes the socket once what it holds of it
    passes the cap, rather than wait for the last fragment."""
    seen = len(ws_up.messages)

    async def endless() -> AsyncIterator[str]:
        for _ in range(3):
            yield "x" * (MAX_MESSAGE // 2)
            await asyncio.sleep(0.2)
        await asyncio.sleep(30)
        yield "never"

    async with socket(gw, keys.token(), _url(ws_up, "wss", "/ws/echo")) as ws:
        sending = asyncio.create_task(ws.send(endless()))
        closed = await _closed_by_gateway(ws, 5)
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await sending
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    assert ws_up.messages[seen:] == []
    rec = socket_record(gw, ws)
    assert rec["websocket"]["close_code"] == 1009


def test_a_switch_to_websocket_nobody_asked_for_is_cut(gw: Gateway, switcher: Switcher,
                                                       keys: Keys) -> None:
    """No Upgrade header, but WebSocket's version header: a colluding upstream answers
    101. The frames that would follow are never relayed."""
    target = f"127.0.0.1:{switcher.port}"
    auth = base64.b64encode(f"agent:{keys.token()}".encode()).decode()
    head = (f"GET http://{target}/unasked HTTP/1.1\r\nHost: {target}\r\n"
            f"Proxy-Authorization: Basic {auth}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()
    got = b""
    with sockets.create_connection(("127.0.0.1", gw.proxy_port), timeout=10) as s:
        s.sendall(head)
        with contextlib.suppress(OSError):
            while chunk := s.recv(4096):
                got += chunk
    assert switcher.heads and b"/unasked" in switcher.heads[-1]  # it did reach the upstream
    assert not got.startswith(b"HTTP/1.1 101") and b"hello" not in got
    recs = [r for r in gw.audit() if r["path"] == "/unasked"]
    assert len(recs) == 1 and recs[0]["decision"] == "error"
    assert "switched protocols" in recs[0]["reason"]


async def test_stopping_the_gateway_closes_its_sockets_with_1001(
        tmp_path: Path, shared_files: dict[str, Path], ws_up: WsUpstream,
        switcher: Switcher, keys: Keys) -> None:
    """Open sockets do not hold the shutdown for its whole grace period: they are closed
    (1001) and recorded."""
    g = Gateway(tmp_path, ws_config(shared_files, ws_up, switcher),
                env={"TG_WS_KEY": SECRET}).start()
    try:
        async with socket(g, keys.token(), _url(ws_up, "wss", "/ws/echo")) as ws:
            await ws.send("hello")
            assert await recv(ws) == "echo:hello"
            started = time.monotonic()
            stopping = asyncio.create_task(asyncio.to_thread(g.stop))
            closed = await _closed_by_gateway(ws, 8)
            assert await stopping == 0
    finally:
        g.stop()
    assert time.monotonic() - started < 8  # the grace period is 10 s
    assert closed.rcvd is not None and closed.rcvd.code == 1001
    rec = socket_record(g, ws)
    assert rec["websocket"]["closed_by"] == "gateway" and rec["websocket"]["close_code"] == 1001
