"""What the control plane's handlers share: the app's typed keys (errors: _errors.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from proxy.gateway import Services

__all__ = ["SERVICES", "SESSION_AUTH", "STATE", "ControlState", "SessionAuth"]


@dataclass(slots=True)
class ControlState:
    """What the control plane needs to know about the process it runs in."""

    admin_token: str
    proxy_listening: bool = False
    proxy_address: str = ""
    # With workers (proxy/supervisor.py): their /metrics texts, merged into this one's.
    peer_metrics: Callable[[], Awaitable[list[bytes]]] | None = None
    # With workers: after this process applied a reload, the workers reload too.
    reloaded: Callable[[], None] | None = None
    extras: dict[str, object] = field(default_factory=dict)


SERVICES = web.AppKey("services", Services)
STATE = web.AppKey("state", ControlState)
# The other way into /v1/: a browser session (proxy/control/_session.py). Returns None when the
# request is authenticated by it, else the refusal to send.
SessionAuth = Callable[[web.Request], web.StreamResponse | None]
SESSION_AUTH: web.AppKey[SessionAuth] = web.AppKey("session_auth")
