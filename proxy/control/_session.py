"""Browser sessions for the review page: a cookie in place of the bearer token.

Signing in with the admin token (a form POST, never a URL) makes a session: a
random id in a cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` under
TLS) and a per-session CSRF token the page reads from its HTML and sends back
as ``X-CSRF-Token`` on every request that is not GET/HEAD. Sessions live in
memory (a restart signs everyone out), expire after :data:`IDLE_SECONDS`
without use or :data:`MAX_AGE_SECONDS` in all, and only a hash of the id is
kept, so the table itself holds nothing a reader could replay.

With shared state (Redis), :class:`SharedSessions` keeps them there too: a sign-in on
one replica works on every replica, a sign-out ends the session everywhere, and Redis
(``P session:<sha256 of the id>``, expiring after :data:`IDLE_SECONDS` unused) is the
source of truth each request is checked against.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.control._errors import json_error
from proxy.store import RedisState

__all__ = ["COOKIE", "CSRF_HEADER", "Session", "Sessions", "SharedSessions"]

COOKIE = "taskgate_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
IDLE_SECONDS = 30 * 60
MAX_AGE_SECONDS = 12 * 3600
MAX_SESSIONS = 256


@dataclass(slots=True)
class Session:
    csrf: str
    created: float
    seen: float


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def same_origin(request: web.Request) -> bool:
    """A browser's ``Origin`` (when it sends one) must be this control plane."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


class Sessions:
    """The signed-in browsers, oldest evicted first beyond :data:`MAX_SESSIONS`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_key: OrderedDict[str, Session] = OrderedDict()

    def create(self) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        session = Session(csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._by_key[_key(session_id)] = session
        while len(self._by_key) > MAX_SESSIONS:
            self._by_key.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        key = _key(session_id)
        session = self._by_key.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > IDLE_SECONDS or now - session.created > MAX_AGE_SECONDS:
            del self._by_key[key]
            return None
        session.seen = now
        return session

    def of(self, request: web.Request) -> Session | None:
        return self.get(request.cookies.get(COOKIE))

    def drop(self, request: web.Request) -> None:
        session_id = request.cookies.get(COOKIE)
        if session_id:
            self._by_key.pop(_key(session_id), None)

    def authenticate(self, request: web.Request) -> web.StreamResponse | None:
        """The /v1/ check for requests without the bearer token (``SESSION_AUTH``)."""
        session = self.of(request)
        if session is None:
            return json_error(401, "unauthorized", "a valid admin bearer token is required")
        if request.method not in SAFE_METHODS:
            given = request.headers.get(CSRF_HEADER, "")
            if not same_origin(request) or not hmac.compare_digest(given.encode(),
                                                                   session.csrf.encode()):
                return json_error(403, "forbidden", f"a request made with the session cookie "
                                  f"needs the page's {CSRF_HEADER} header")
        return None

    @staticmethod
    def set_cookie(response: web.StreamResponse, request: web.Request, session_id: str) -> None:
        response.set_cookie(COOKIE, session_id, path="/", httponly=True, samesite="Strict",
                            secure=request.secure)

    @staticmethod
    def clear_cookie(response: web.StreamResponse, request: web.Request) -> None:
        response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                            secure=request.secure)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SharedSessions(Sessions):
    """Sessions kept in Redis as well; its :meth:`middleware` brings each request's
    session into this replica's table (or drops it there) before anything reads it, and
    writes what the request created or dropped before the response goes out."""

    def __init__(self, state: RedisState, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        super().__init__(clock)
        self.state = state
        self._writes: list[Awaitable[None]] = []

    def create(self) -> tuple[str, Session]:
        session_id, session = super().create()
        doc = orjson.dumps({"csrf": session.csrf, "created": time.time()})
        self._writes.append(self.state.session_put(_key(session_id), doc, IDLE_SECONDS))
        return session_id, session

    def drop(self, request: web.Request) -> None:
        super().drop(request)
        session_id = request.cookies.get(COOKIE)
        if session_id:
            self._writes.append(self.state.session_drop(_key(session_id)))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        session_id = request.cookies.get(COOKIE)
        if session_id and len(session_id) <= 128:
            await self._sync(_key(session_id))
        try:
            return await handler(request)
        finally:
            writes, self._writes = self._writes, []
            if writes:
                await asyncio.gather(*writes)

    async def _sync(self, key: str) -> None:
        doc = await self.state.session_get(key, IDLE_SECONDS)
        if doc is None:
            self._by_key.pop(key, None)  # signed out (or expired) on some replica
            return
        if key in self._by_key:
            return
        d: dict[str, Any] = orjson.loads(doc)
        now = self._clock()
        created = now - max(0.0, time.time() - float(d.get("created", 0.0)))
        self._by_key[key] = Session(csrf=str(d.get("csrf", "")), created=created, seen=now)
        while len(self._by_key) > MAX_SESSIONS:
            self._by_key.popitem(last=False)
