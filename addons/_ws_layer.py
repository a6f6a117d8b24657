"""mitmproxy's WebSocket layer, taught what taskgate needs (addons/websocket.py uses it).

mitmproxy relays a WebSocket's messages and lets an addon drop or change one, or
inject one; it has no way to close a socket from outside the layer, and it reads a
whole message, however long, before any hook sees it. :func:`install` patches the
layer: an injected :class:`GatewayClose` closes both sides with a code and a reason
(the end hook runs as when a peer closes), and a message that grows past the cap
while it arrives closes the socket (1009).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from typing import Any

import wsproto.events
from mitmproxy import ctx, http, websocket
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.websocket import (
    WebsocketEndHook,
    WebsocketLayer,
    WebSocketMessageInjected,
)
from wsproto import ConnectionState
from wsproto.frame_protocol import Opcode

from addons._base import exchange
from proxy.gateway import close_reason

__all__ = ["TOO_BIG", "close", "closed_by_gateway", "install", "max_message", "send",
           "set_max_message", "too_big"]

log = logging.getLogger("taskgate")

TOO_BIG = 1009  # RFC 6455 7.4.1: a message longer than proxy.websocket_max_message_bytes
# The longest message the layer may hold (proxy.websocket_max_message_bytes), set from
# the config when a socket starts.
_max_message = [16 * 1024 * 1024]


def set_max_message(size: int) -> None:
    _max_message[0] = size


def max_message() -> int:
    return _max_message[0]


def too_big() -> str:
    return f"a message over {_max_message[0]} bytes (proxy.websocket_max_message_bytes)"


class GatewayClose(websocket.WebSocketMessage):
    """Injected into a socket's layer: close both sides with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(Opcode.TEXT, False, b"")
        self.code, self.reason = code, close_reason(reason)


def closed_by_gateway(flow: http.HTTPFlow, code: int, reason: str) -> None:
    """Say in the socket's record that the gateway closed it, and why (the first time)."""
    ex = exchange(flow)
    if ex.websocket is not None and ex.websocket.closed_by is None:
        ex.websocket.closed_by = "gateway"
        ex.reason = f"{reason}: the gateway closed the WebSocket ({code})"


def _inject_event(flow: http.HTTPFlow, message: websocket.WebSocketMessage) -> None:
    server = ctx.master.addons.get("proxyserver")
    if server is None:  # not inside a proxy (the addon's unit tests): nothing to send on
        log.warning("taskgate: no proxy server to send a WebSocket message through")
        return
    try:
        server.inject_event(WebSocketMessageInjected(flow, message))
    except ValueError:  # the connection is gone already
        pass


def send(flow: http.HTTPFlow, reply: bytes) -> None:
    """Send ``reply`` to the agent as a text message (after the current one is handled)."""
    _inject_event(flow, websocket.WebSocketMessage(Opcode.TEXT, False, reply))


def close(flow: http.HTTPFlow, code: int, reason: str) -> None:
    """Close ``flow``'s socket on both sides (after the message being handled, if any)."""
    _inject_event(flow, GatewayClose(code, reason))


def install() -> None:
    """Patch mitmproxy's WebSocket layer: act on :class:`GatewayClose`, and close a socket
    whose next message grows past the cap while it is read. Idempotent."""
    if getattr(WebsocketLayer, "_taskgate_close", False):
        return
    WebsocketLayer._taskgate_close = True  # type: ignore[attr-defined]
    original = WebsocketLayer.relay_messages

    def relay_messages(self: Any, event: events.Event
                       ) -> Generator[commands.Command, Any, None]:
        if isinstance(event, WebSocketMessageInjected) and isinstance(event.message,
                                                                      GatewayClose):
            yield from _close_layer(self, event.message)
            return
        yield from original(self, event)
        if self._handle_event != self.relay_messages:
            return  # closed by this event
        cap = _max_message[0]
        for ws in (self.client_ws, self.server_ws):
            if sum(map(len, ws.frame_buf)) > cap:
                reason = too_big()
                closed_by_gateway(self.flow, TOO_BIG, reason)
                yield from _close_layer(self, GatewayClose(TOO_BIG, reason))
                return

    WebsocketLayer.relay_messages = relay_messages  # type: ignore[method-assign]


def _close_layer(layer: Any, request: GatewayClose) -> Generator[commands.Command, Any, None]:
    """What the layer does when a peer closes, done by the gateway: a close frame to
    both sides, both connections closed, the end hook."""
    flow: http.HTTPFlow = layer.flow
    assert flow.websocket is not None
    flow.websocket.timestamp_end = time.time()
    flow.websocket.closed_by_client = False
    flow.websocket.close_code, flow.websocket.close_reason = request.code, request.reason
    for ws in (layer.client_ws, layer.server_ws):
        if ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            yield ws.send2(wsproto.events.CloseConnection(request.code, request.reason))
        yield commands.CloseConnection(ws.conn)
    yield WebsocketEndHook(flow)
    flow.live = False
    layer._handle_event = layer.done
