"""The benchmark's upstream: an aiohttp app on loopback, HTTP and HTTPS, in its own process.

``python -m bench.upstream CERT KEY BODY_BYTES`` binds two free ports on
127.0.0.1, prints ``ready <http_port> <https_port>`` and serves a fixed body on
every path until it is terminated. A process of its own keeps its CPU apart
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


def app(body: bytes) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    application = web.Application()
    application.router.add_route("GET", "/{tail:.*}", handle)
    return application


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve(cert: str, key: str, body: bytes) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner = web.AppRunner(app(body), access_log=None, handle_signals=False)
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
    cert, key, size = argv
    body = b'{"ok":true,"pad":"' + b"x" * max(0, int(size) - 20) + b'"}'
    uvloop.run(serve(cert, key, body))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
