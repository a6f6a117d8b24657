"""The review page at ``/ui``: tasks, each task's calls, refusals and approvals, live.

Everything it needs is served from here (``proxy/control/ui_static/``, read once at
start-up): gateways run air-gapped, so no CDN. The page is a static shell and a
script that reads the control plane's own JSON endpoints (``/v1/tasks``,
``/v1/approvals``, ``/v1/audit``) with the session cookie; a feature that is
not in this build answers 404 and the page says "not available".

Sign-in: ``GET /ui`` without a session shows a form; ``POST /ui/login`` takes
the admin token from the form body (never a URL), makes a session
(proxy/control/_session.py) and redirects to ``/ui``. ``POST /ui/logout`` needs the
CSRF header. Every control-plane response carries strict security headers; the
CSP allows no inline script or style.
"""

from __future__ import annotations

import hmac
import html
from importlib import resources

from aiohttp import web

from proxy.control._errors import json_error
from proxy.control._keys import SERVICES, SESSION_AUTH, STATE
from proxy.control._session import CSRF_HEADER, Sessions, SharedSessions, same_origin
from proxy.gateway import FailureThrottle, client_key
from proxy.store import RedisState

__all__ = ["SECURITY_HEADERS", "SESSIONS"]

SESSIONS = web.AppKey("ui_sessions", Sessions)
ASSETS = web.AppKey("ui_assets", dict)
FAILURES = web.AppKey("ui_login_failures", FailureThrottle)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make form posts say Origin: null
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".svg": "image/svg+xml"}
LOGIN_FAILURES_PER_MINUTE = 10


def _load_assets() -> dict[str, bytes]:
    folder = resources.files("proxy.control") / "ui_static"
    return {item.name: item.read_bytes() for item in folder.iterdir()
            if item.is_file() and "." + item.name.rsplit(".", 1)[-1] in _TYPES}


def _page(request: web.Request, name: str, status: int = 200, **values: str) -> web.Response:
    text = request.app[ASSETS][name].decode()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def ui_page(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].of(request)
    if session is None:
        return _page(request, "login.html", error="")
    return _page(request, "index.html", csrf=session.csrf)


async def ui_redirect(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/ui")


async def login(request: web.Request) -> web.Response:
    """Sign in. Failures are throttled per client address, and the right token is
    checked first: nobody else's failures (not even from a shared address) lock the
    admin out. The throttle only slows guessing from one address; the token is 256
    random bits unless TASKGATE_ADMIN_TOKEN sets a weaker one."""
    if not same_origin(request):
        return _page(request, "login.html", 403, error="Sign in from this page.")
    form = await request.post() if request.content_type == "application/x-www-form-urlencoded" \
        else {}
    given = form.get("token")
    expected = request.app[STATE].admin_token
    if not isinstance(given, str) or not hmac.compare_digest(given.strip().encode(),
                                                             expected.encode()):
        failures, client = request.app[FAILURES], client_key(request.remote)
        if failures.blocked(client):
            return _page(request, "login.html", 429,
                         error="Too many failed sign-ins; wait a minute and try again.")
        failures.failed(client)
        return _page(request, "login.html", 401, error="That is not the admin token.")
    sessions = request.app[SESSIONS]
    sessions.drop(request)
    session_id, _ = sessions.create()
    resp = web.HTTPSeeOther("/ui")
    sessions.set_cookie(resp, request, session_id)
    raise resp


async def logout(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    session = sessions.of(request)
    if session is not None:
        given = request.headers.get(CSRF_HEADER, "")
        if not same_origin(request) or not hmac.compare_digest(given.encode(),
                                                               session.csrf.encode()):
            return json_error(403, "forbidden", f"sign-out needs the page's {CSRF_HEADER} "
                                                "header")
        sessions.drop(request)
    resp = web.json_response({"signed_out": True})
    sessions.clear_cookie(resp, request)
    return resp


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    data = request.app[ASSETS].get(name)
    suffix = "." + name.rsplit(".", 1)[-1]
    if data is None or suffix not in (".js", ".css", ".svg"):
        raise web.HTTPNotFound()
    return web.Response(body=data, content_type=_TYPES[suffix],
                        headers={"Cache-Control": "no-cache"})


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def routes(app: web.Application) -> None:
    state = app[SERVICES].tasks.store
    sessions = SharedSessions(state) if isinstance(state, RedisState) else Sessions()
    if isinstance(sessions, SharedSessions):  # inside json_errors, before admin_auth
        app.middlewares.insert(1, sessions.middleware)
    app[SESSIONS] = sessions
    app[SESSION_AUTH] = sessions.authenticate
    app[ASSETS] = _load_assets()
    app[FAILURES] = FailureThrottle(LOGIN_FAILURES_PER_MINUTE)
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/ui", ui_page)
    app.router.add_get("/ui/", ui_redirect)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)
    app.router.add_get("/ui/static/{name}", asset)
