"""A WebSocket upstream for the end-to-end tests: aiohttp, on loopback HTTP and HTTPS.

``/ws/echo`` answers every message (``echo:`` before it); ``auth?`` is answered with
the upgrade request's Authorization header (an echo of a secret), ``close`` with a
close of code 4000. ``/ws/mcp`` speaks JSON-RPC: tools/list names two tools, a
tools/call is answered with its tool's name. Every upgrade request and every message
received is kept (``seen``, ``messages``) so tests can assert what got through.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import WSMsgType, web

from tests.support import Upstream

TOOLS = [{"name": "search_docs", "inputSchema": {"type": "object"}},
         {"name": "delete_everything", "inputSchema": {"type": "object"}}]


class WsUpstream(Upstream):
    def __init__(self, tls_ctx: Any = None) -> None:
        super().__init__(tls_ctx)
        self.messages: list[tuple[str, str | bytes]] = []  # (path, message) as received

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws/echo", self.echo_ws)
        app.router.add_get("/ws/mcp", self.mcp_ws)
        return app

    async def _open(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append({"method": request.method, "path": request.raw_path,
                          "headers": dict(request.headers)})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        return ws

    async def echo_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = await self._open(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                self.messages.append((request.path, msg.data))
                if msg.data == "auth?":
                    await ws.send_str(f"you sent {request.headers.get('Authorization')}")
                elif msg.data == "close":
                    await ws.close(code=4000, message=b"asked to")
                else:
                    await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.messages.append((request.path, msg.data))
                await ws.send_bytes(b"echo:" + msg.data)
        return ws

    async def mcp_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = await self._open(request)
        async for msg in ws:
            self.messages.append((request.path, msg.data))
            if msg.type != WSMsgType.TEXT:
                continue
            rpc = json.loads(msg.data)
            if rpc.get("method") == "tools/list":
                result: dict[str, Any] = {"tools": TOOLS}
            elif rpc.get("method") == "tools/call":
                result = {"content": [{"type": "text", "text": rpc["params"]["name"]}]}
            else:
                result = {}
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": rpc.get("id"),
                                          "result": result}))
        return ws
