"""The control plane: an aiohttp app on its own listener.

Open endpoints: ``/healthz`` (the process answers), ``/readyz`` (the proxy
listens, the audit log takes writes, the task store and the expiry sweeper
run). Everything under ``/v1/`` requires
the admin bearer token, or the review page's session cookie (with its CSRF
header on anything but GET/HEAD, see proxy/ui_session.py); later features add
their routes through :data:`ROUTE_PLUGINS`.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from .gateway import Gateway

__all__ = ["ControlState", "GATEWAY", "ROUTE_PLUGINS", "SESSION_AUTH", "STATE", "make_app"]


@dataclass(slots=True)
class ControlState:
    """What the control plane needs to know about the process it runs in."""

    admin_token: str
    proxy_listening: bool = False
    proxy_address: str = ""
    extras: dict[str, object] = field(default_factory=dict)


GATEWAY = web.AppKey("gateway", Gateway)
STATE = web.AppKey("state", ControlState)
# The other way into /v1/: a browser session (proxy/ui_session.py). Returns None when the
# request is authenticated by it, else the refusal to send.
SessionAuth = Callable[[web.Request], web.StreamResponse | None]
SESSION_AUTH: web.AppKey[SessionAuth] = web.AppKey("session_auth")

# Each plugin adds routes (and cleanup_ctx entries) to the app: tasks, audit, ui…
ROUTE_PLUGINS: list[Callable[[web.Application], None]] = []
# Modules that append to ROUTE_PLUGINS when imported (one per feature). Each is
# part of the product: one that fails to import stops the start (they import this
# module, so they are imported when the app is made, not at the top).
PLUGIN_MODULES = ("proxy.control_tasks", "proxy.control_audit", "proxy.control_approvals",
                  "proxy.ui", "proxy.metrics")


def load_plugins() -> None:
    import importlib

    for mod in PLUGIN_MODULES:
        importlib.import_module(mod)


def json_error(status: int, error: str, reason: str, **extra: object) -> web.Response:
    return web.json_response({"error": error, "reason": reason, **extra}, status=status)


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
    gw = request.app[GATEWAY]
    checks = {"proxy": state.proxy_listening, "audit": gw.audit.healthy}
    tasks = gw.components.get("tasks")
    if tasks is not None:  # the task store's thread and the expiry sweeper (proxy/grants.py)
        checks["store"] = bool(tasks.store.healthy and tasks.store.alive)
        checks["sweeper"] = bool(tasks.sweeper_ok)
    ok = all(checks.values())
    return web.json_response({"status": "ready" if ok else "not ready", "checks": checks},
                             status=200 if ok else 503)


def make_app(gateway: Gateway, state: ControlState) -> web.Application:
    app = web.Application(middlewares=[admin_auth], client_max_size=1024 * 1024)
    app[GATEWAY] = gateway
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    load_plugins()
    for plugin in ROUTE_PLUGINS:
        plugin(app)
    return app
