"""The control plane: an aiohttp app on its own listener.

Open endpoints: ``/healthz`` (the process answers), ``/readyz`` (the proxy
listens, the audit log takes writes, the task store and the expiry sweeper
run). Everything under ``/v1/`` requires
the admin bearer token, or the review page's session cookie (with its CSRF
header on anything but GET/HEAD, see proxy/control/_session.py); the routes of
each feature come from its module (tasks, approvals, audit, review page, metrics).
Every error is JSON with a reason and a request id (proxy/control/_errors.py): handlers
raise, one middleware answers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.control import _approvals, _audit, _metrics, _reload, _review, _tasks, _tools
from proxy.control._errors import json_error, json_errors
from proxy.control._keys import SERVICES, SESSION_AUTH, STATE, ControlState
from proxy.gateway import REQUEST_ID_HEADER, Services, new_request_id

__all__ = ["ControlSite", "make_app", "make_worker_app"]

log = logging.getLogger("taskgate")


@web.middleware
async def admin_auth(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
    """Every /v1/ endpoint needs ``Authorization: Bearer <admin token>`` (constant-time),
    or a review-page session."""
    if request.path.startswith("/v1/"):
        expected = request.app[STATE].admin_token.encode()
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 expected):
            session_auth = request.app.get(SESSION_AUTH)
            refusal = session_auth(request) if session_auth is not None else json_error(
                401, "unauthorized", "a valid admin bearer token is required")
            if refusal is not None:
                return refusal
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    services = request.app[SERVICES]
    tasks = services.tasks  # the task store's thread and the expiry sweeper
    checks = {"proxy": state.proxy_listening, "audit": services.audit.healthy,
              "store": bool(tasks.store.healthy and tasks.store.alive),
              "sweeper": bool(tasks.sweeper_ok)}
    ok = all(checks.values())
    return web.json_response({"status": "ready" if ok else "not ready", "checks": checks},
                             status=200 if ok else 503)


# Each feature's routes (and middlewares, response hooks), in this order.
ROUTES = (_tasks.routes, _audit.routes, _approvals.routes, _tools.routes, _review.routes,
          _metrics.routes, _reload.routes)


def make_app(services: Services, state: ControlState) -> web.Application:
    # The error middleware is outermost: it also answers for what admin_auth raises.
    app = web.Application(middlewares=[json_errors, admin_auth], client_max_size=1024 * 1024)
    app[SERVICES] = services
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for add_routes in ROUTES:
        add_routes(app)
    return app


def make_worker_app(services: Services, state: ControlState) -> web.Application:
    """What a worker process answers its supervisor, on a Unix socket in home (see
    proxy/supervisor.py): ``/readyz`` and ``/metrics``, nothing under ``/v1/``."""
    app = web.Application(middlewares=[json_errors], client_max_size=1024)
    app[SERVICES] = services
    app[STATE] = state
    app.router.add_get("/readyz", readyz)
    _metrics.routes(app)
    return app


# -- connection limits ------------------------------------------------------------------
def _refusal_bytes(status: int, reason_phrase: str, error: str, reason: str) -> bytes:
    """A refusal written before aiohttp sees the connection; the same shape as
    :func:`~proxy.control._errors.json_error`'s."""
    request_id = new_request_id()
    body = json.dumps({"error": error, "reason": reason, "request_id": request_id}).encode()
    return (f"HTTP/1.1 {status} {reason_phrase}\r\nContent-Type: application/json\r\n"
            f"{REQUEST_ID_HEADER}: {request_id}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _Refuse(asyncio.Protocol):
    """A connection past the cap: one JSON 503, then closed; nothing is read."""

    def connection_made(self, transport: Any) -> None:
        transport.write(_refusal_bytes(
            503, "Service Unavailable", "unavailable",
            "the control plane has too many connections open (control.max_connections)"))
        transport.close()


class _Counted(asyncio.Protocol):
    """Wraps aiohttp's request handler: counts the connection, and closes it when no
    request head arrived within the head timeout (aiohttp has no such clock of its own
    for a client that trickles a head in; its keep-alive timeout is the idle bound)."""

    def __init__(self, site: ControlSite, inner: Any) -> None:
        self._site, self._inner = site, inner
        self._timer: asyncio.TimerHandle | None = None
        self._transport: Any = None

    def connection_made(self, transport: Any) -> None:  # uvloop's is no asyncio.Transport
        self._transport = transport
        self._site.open += 1
        self._timer = asyncio.get_running_loop().call_later(
            self._site.header_timeout, self._head_late)
        self._inner.connection_made(transport)

    def _head_late(self) -> None:
        self._timer = None
        if getattr(self._inner, "_request_count", 1) == 0 and self._transport is not None:
            self._transport.write(_refusal_bytes(
                408, "Request Timeout", "request_timeout",
                f"the request head did not arrive within {self._site.header_timeout:g} "
                "seconds (control.header_timeout_seconds)"))
            self._transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._site.open -= 1
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ControlSite(web.TCPSite):
    """The control plane's listener, with a budget of its own: at most ``max_connections``
    open at once (more are answered 503 and closed as they open), a request head within
    ``header_timeout`` seconds of connecting; the runner's ``keepalive_timeout`` closes a
    connection idle between requests. Agents' connections are counted by the proxy."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 max_connections: int, header_timeout: float) -> None:
        super().__init__(runner, host, port)
        self.max_connections, self.header_timeout = max_connections, header_timeout
        self.open = 0
        self.refused = 0

    def _protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        if self.open >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("taskgate: control plane: %d connections refused: %d are open "
                            "(control.max_connections)", self.refused, self.open)
            return _Refuse()
        return _Counted(self, server())

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
