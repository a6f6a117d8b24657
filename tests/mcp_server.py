"""A real MCP server (the official SDK's MCPServer, streamable HTTP) on loopback.

Every tool records that it ran in :attr:`McpUpstream.ran`, so a test can prove
a refused tool never ran. One instance serves one response mode: SSE
(``json_response=False``) or plain JSON, over HTTP or HTTPS.
"""

from __future__ import annotations

import ssl
import threading
import time
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer


class McpUpstream:
    """MCPServer + uvicorn in a thread; ``ran`` lists (tool, arguments) per execution."""

    def __init__(self, *, json_response: bool, tls: ssl.SSLContext | None = None,
                 certfile: str | None = None, keyfile: str | None = None) -> None:
        self.ran: list[tuple[str, dict[str, Any]]] = []
        self.port = 0  # uvicorn binds port 0; start() reads back the port it got
        self.scheme = "https" if certfile else "http"
        self.host = "localhost" if certfile else "127.0.0.1"
        server = MCPServer("taskgate-test")
        ran = self.ran

        @server.tool()
        def add(a: int, b: int) -> int:
            """Add two numbers."""
            ran.append(("add", {"a": a, "b": b}))
            return a + b

        @server.tool()
        def search(query: str, limit: int = 10) -> str:
            """Search the docs."""
            ran.append(("search", {"query": query, "limit": limit}))
            return f"{limit} results for {query}"

        @server.tool()
        def danger(target: str) -> str:
            """Never granted: proves a refused call never runs."""
            ran.append(("danger", {"target": target}))
            return f"destroyed {target}"

        @server.tool()
        async def notify(ctx: Context) -> str:
            """Send a notification on the standalone GET stream."""
            ran.append(("notify", {}))
            await ctx.session.send_resource_list_changed()
            return "sent"

        @server.resource("res://doc")
        def doc() -> str:
            return "the document"

        @server.prompt()
        def greet(name: str) -> str:
            return f"Hello {name}"

        app = server.streamable_http_app(json_response=json_response)
        kw: dict[str, Any] = {}
        if certfile:
            kw = {"ssl_certfile": certfile, "ssl_keyfile": keyfile}
        self._server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", **kw))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/mcp"

    def start(self) -> McpUpstream:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the MCP test server did not start")
            time.sleep(0.02)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def names(self) -> list[str]:
        return [name for name, _ in self.ran]
