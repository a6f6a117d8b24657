"""The benchmark's upstream: an aiohttp app on loopback, HTTP and HTTPS, in its own process.

``python -m bench.upstream CERT KEY BODY_BYTES [KEEPALIVE_SECONDS]`` binds two free
ports on 127.0.0.1, prints ``ready <http_port> <https_port>`` and serves a fixed body
on every ``GET`` path until it is terminated; for the memory benchmark
(bench/memory.py) also ``POST /bench/upload`` (reads the body as it comes and drops
it) and ``GET /bench/download/<n>`` (``n`` bytes, written as they are made), and it
closes connections idle for KEEPALIVE_SECONDS (aiohttp's default otherwise), as
servers do. A process of its own keeps its CPU apart
from the client's, and uvloop keeps it from being the slowest thing measured.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import sys

import uvloop
from aiohttp import web

__all__ = ["main"]


CHUNK = 256 * 1024


def app(body: bytes) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def upload(request: web.Request) -> web.Response:
        size = 0
        while chunk := await request.content.read(CHUNK):
            size += len(chunk)
        return web.json_response({"bytes": size})

    async def download(request: web.Request) -> web.StreamResponse:
        left = int(request.match_info["size"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = left
        await resp.prepare(request)
        block = b"x" * CHUNK
        while left > 0:
            await resp.write(block[:left])
            left -= min(left, CHUNK)
        await resp.write_eof()
        return resp

    application = web.Application(client_max_size=1 << 40)
    application.router.add_route("POST", "/bench/upload", upload)
    application.router.add_route("GET", "/bench/download/{size:[0-9]+}", download)
    application.router.add_route("GET", "/{tail:.*}", handle)
    return application


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve(cert: str, key: str, body: bytes, keepalive: float | None) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    extra = {} if keepalive is None else {"keepalive_timeout": keepalive}
    runner = web.AppRunner(app(body), access_log=None, handle_signals=False, **extra)
    await runner.setup()
    socks = [_listen() for _ in range(2)]
    await web.SockSite(runner, socks[0]).start()
    await web.SockSite(runner, socks[1], ssl_context=tls).start()
    print(f"ready {socks[0].getsockname()[1]} {socks[1].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str]) -> int:
    cert, key, size, *rest = argv
    body = b'{"ok":true,"pad":"' + b"x" * max(0, int(size) - 20) + b'"}'
    uvloop.run(serve(cert, key, body, float(rest[0]) if rest else None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
