"""The client-compatibility suite's world: one real gateway for the whole package, one
local HTTPS upstream (trustme CA) that answers like the APIs agents call (OpenAI's chat
completions, Anthropic's messages, an event stream, an echo), and the environment an
agent gets from ``taskgate task create`` and ``taskgate ca``.

Each client is driven the way its users set it up: proxy and CA from the environment
where the client reads them, its own options where it does not (docs/clients.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from aiohttp import web

from tests.conftest import base_config
from tests.support import Gateway, Keys, Upstream

# Paths the standing rule allows on the LLM upstream; anything else is refused (403).
ALLOWED_PATHS = ["/allowed/**", "/sse", "/v1/chat/completions", "/v1/messages",
                 "/repo.git/**", "/simple/**", "/packages/**", "/grpc.Echo/Say"]
REFUSED_REASON = "no rule for this host allows this path"
EVENTS = 3  # events in every streamed answer
GAP = 0.4  # seconds between two events: long enough to tell streaming from buffering


class ApiUpstream(Upstream):
    """The test upstream plus the two LLM APIs, each streaming ``EVENTS`` events
    ``GAP`` seconds apart when asked to (``"stream": true``), and files under
    ``files`` (a git repository served the "dumb" way, a pip simple index)."""

    files: Path

    def app(self) -> web.Application:
        app = web.Application()
        for top in ("repo.git", "simple", "packages"):
            app.router.add_get(f"/{top}/{{tail:.*}}", self.file)
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_post("/v1/messages", self.anthropic)
        app.router.add_route("*", "/sse", self.sse)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def file(self, request: web.Request) -> web.StreamResponse:
        path = (self.files / request.path.lstrip("/")).resolve()
        if path.is_dir():
            path = path / "index.html"
        if not path.is_relative_to(self.files) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _events(self, request: web.Request, events: list[tuple[str | None, Any]]
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, (name, data) in enumerate(events):
            head = f"event: {name}\n" if name else ""
            payload = data if isinstance(data, str) else json.dumps(data)
            await resp.write(f"{head}data: {payload}\n\n".encode())
            if i < len(events) - 1:
                await asyncio.sleep(GAP if name in (None, "content_block_delta") else 0)
        await resp.write_eof()
        return resp

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append({"path": request.path, "headers": dict(request.headers)})
        base = {"id": "chatcmpl-1", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hello"}}]})
        chunks: list[tuple[str | None, Any]] = [
            (None, {**base, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"content": f"w{i} {time.time():.3f}"},
                 "finish_reason": None}]}) for i in range(EVENTS)]
        return await self._events(request, [*chunks, (None, "[DONE]")])

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append({"path": request.path, "headers": dict(request.headers)})
        message = {"id": "msg_1", "type": "message", "role": "assistant",
                   "model": body["model"], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 1, "output_tokens": 1}}
        if not body.get("stream"):
            return web.json_response({**message, "content": [{"type": "text",
                                                              "text": "hello"}]})
        deltas: list[tuple[str | None, Any]] = [
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "text_delta", "text": f"w{i} {time.time():.3f}"}})
            for i in range(EVENTS)]
        return await self._events(request, [
            ("message_start", {"type": "message_start", "message": {**message,
                                                                      "content": []}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            *deltas,
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 3}}),
            ("message_stop", {"type": "message_stop"})])


def grpc_echo(cert: trustme.LeafCert) -> tuple[grpc.Server, int]:
    """A gRPC server over TLS: ``/grpc.Echo/Say`` (allowed by the rules) answers with
    what it got, ``/grpc.Echo/Forbidden`` (no rule) would too, were it reached."""
    def echo(request: bytes, _context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "grpc.Echo", {"Say": handler, "Forbidden": handler})])
    creds = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(),
                                          cert.cert_chain_pems[0].bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


@dataclass
class World:
    """What every client test uses: the gateway, the upstream, an agent's token."""

    gw: Gateway
    upstream: ApiUpstream
    token: str
    upstream_ca: Path
    grpc_port: int

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.upstream.https_port}"

    @property
    def proxy(self) -> str:
        return self.gw.proxy_url_with(self.token)

    def env(self, **extra: str) -> dict[str, str]:
        """An agent's environment: both spellings of the proxy variables (curl reads
        only lower-case ``http_proxy``, grpcio only lower-case) and the CA variables."""
        base = {k: v for k, v in os.environ.items()
                if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        ca = str(self.gw.ca)
        return {**base, "HTTPS_PROXY": self.proxy, "https_proxy": self.proxy,
                "HTTP_PROXY": self.proxy, "http_proxy": self.proxy,
                "NO_PROXY": "", "no_proxy": "",
                "SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca, "CURL_CA_BUNDLE": ca,
                "NODE_EXTRA_CA_CERTS": ca, "GIT_SSL_CAINFO": ca, "PIP_CERT": ca,
                "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": ca, **extra}

    def record(self, request_id: str) -> dict[str, Any]:
        """The one audit record of ``request_id`` (written before the answer ends)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            recs = self.gw.records_for(request_id)
            if recs:
                (rec,) = recs
                return rec
            time.sleep(0.02)
        raise AssertionError(f"no audit record for {request_id}")


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
          test_ca: trustme.CA, keys: Keys) -> Iterator[World]:
    cert = test_ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    up = ApiUpstream(ctx)
    up.files = tmp_path_factory.mktemp("upstream-files").resolve()
    up.start()
    grpc_server, grpc_port = grpc_echo(cert)
    cfg = base_config(shared_files, up)
    cfg["workloads"][next(iter(cfg["workloads"]))]["standing"] = [
        {"id": "api", "host": "localhost", "allow_private": True, "port": up.https_port,
         "methods": ["GET", "POST", "HEAD"], "paths": ALLOWED_PATHS},
        {"id": "grpc", "host": "localhost", "allow_private": True, "port": grpc_port,
         "methods": ["POST"], "paths": ["/grpc.Echo/Say"]},
        {"id": "plain", "host": "127.0.0.1", "port": up.http_port, "scheme": "http",
         "methods": ["GET"], "paths": ["/allowed/**"]},
    ]
    gw = Gateway(tmp_path_factory.mktemp("clients-gw"), cfg).start()
    try:
        yield World(gw, up, keys.token(ttl=3600), shared_files["upstream_ca"], grpc_port)
    finally:
        gw.stop()
        up.stop()
        grpc_server.stop(None)


def incremental(stamps: list[float]) -> bool:
    """Did the events arrive as sent (``GAP`` apart), not all at once at the end? A
    buffered answer delivers them within milliseconds; a loaded machine may delay one
    event onto the next, so one gap's worth of spread is the test."""
    return len(stamps) >= 2 and stamps[-1] - stamps[0] >= GAP * 0.75
