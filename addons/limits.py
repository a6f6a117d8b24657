"""Cap what agents can make the gateway hold before a call is judged.

Runs before any credential is seen:

- connections per client address and in all: a connection past a cap is closed
  as it opens (mitmproxy closes a client whose ``error`` is set in
  ``client_connected``), so idle or trickling connections from one address
  cannot use up the gateway's file descriptors for everyone else;
- the time to a request head (``proxy.header_timeout_seconds``): mitmproxy has
  no such clock (its ``tcp_timeout`` is inactivity, which a client trickling a
  byte at a time keeps resetting). A timer starts when a connection opens (again
  after a CONNECT, and when an HTTP/1 connection starts its next request head)
  and stops when the head is read; when it fires the connection is closed, with
  a JSON 408 where the connection is plain HTTP/1;
- the size of an HTTP/1 request head (``proxy.max_header_bytes``): mitmproxy
  buffers an unterminated head without bound; past the cap the client gets a
  JSON 431 and the connection is closed (HTTP/2 heads are bounded by the h2
  library: 64 KiB decoded, 64 CONTINUATION frames);
- a body held whole to be judged (MCP, approval) that arrives without a length
  (chunked, HTTP/2): counted as it arrives; past its cap (``Exchange.held_cap``) the
  call is refused (413) at once, the rest never read, as below;
- a call refused in ``requestheaders`` (407, 403, …) while its body is still to
  come: mitmproxy would read the whole body into memory before sending the
  refusal. Here the refusal goes out at once and the body is never read: an
  HTTP/1 connection is answered with ``Connection: close``, half-closed, and
  closed for good :data:`LINGER_SECONDS` later (bytes that arrive meanwhile are
  dropped as they come); an HTTP/2 stream is reset after its answer;
- what an idle agent connection keeps: mitmproxy's HTTP layer keeps the layers of
  every upstream connection it opened for the agent connection's whole life, closed
  or not — for TLS upstreams their OpenSSL state, about half of what an idle
  tunnel held (bench/memory.py). Once an upstream connection is closed its layers
  are dropped; a later call opens a new one, as it would anyway. Every layer's queue
  of events that came while it waited on a hook is made when an event comes, not
  with the layer (a deque allocates 760 bytes at once; an idle tunnel keeps ~11
  layers, their queues empty).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Generator, Iterator
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpLayer,
    HttpStream,
    RequestData,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
    _http1,
)

from addons._base import EXCHANGE, GatewayAddon, refuse_for
from addons._errors import h1_refusal
from proxy.errors import PayloadTooLarge
from proxy.gateway import ConnectionLimits, Services, client_key

log = logging.getLogger("taskgate")

LOG_EVERY_SECONDS = 10.0  # a flood of refused connections is one log line per interval
LINGER_SECONDS = 2.0  # after a refusal whose body was not read: then the connection closes
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
_HEAD_END = re.compile(rb"\n\r?\n")


class Limits(GatewayAddon):
    """client_connected: take a slot or close, start the head clock;
    http_connect/requestheaders: the head arrived; client_disconnected: give it back."""

    def __init__(self, services: Services | None = None) -> None:
        super().__init__(services)
        self._limits: ConnectionLimits | None = None
        self._holding: dict[str, str] = {}  # client connection id → its client key
        self._timers: dict[str, asyncio.TimerHandle] = {}  # client id → its close
        self._clients: dict[str, connection.Client] = {}
        self._refused = 0
        self._logged = 0.0
        install_patches(self)

    # -- settings (defaults until the gateway is known) -------------------------------
    @property
    def max_header_bytes(self) -> int:
        return self._services.config.max_header_bytes if self._services else \
            DEFAULT_MAX_HEADER_BYTES

    @property
    def header_timeout(self) -> float:
        return float(self._services.config.header_timeout_seconds) if self._services else 30.0

    # -- connections --------------------------------------------------------------
    def client_connected(self, client: connection.Client) -> None:
        if not self.started:
            return
        if self._limits is None:
            config = self.gateway.config
            self._limits = ConnectionLimits(config.max_connections,
                                            config.max_connections_per_client)
        key = client_key(client.peername[0] if client.peername else None)
        why = self._limits.admit(key)
        if why is None:
            self._holding[client.id] = key
            self._clients[client.id] = client
            self.arm(client, self.header_timeout, "its request head took too long")
            return
        client.error = f"connection refused: {why}"
        self._refused += 1
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_SECONDS:
            log.warning("taskgate: %d connections refused; the last: %s", self._refused, why)
            self._logged, self._refused = now, 0

    def client_disconnected(self, client: connection.Client) -> None:
        self.disarm(client)
        self._clients.pop(client.id, None)
        key = self._holding.pop(client.id, None)
        if key is not None and self._limits is not None:
            self._limits.release(key)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # The CONNECT head is in; the tunnel's first request head gets a clock of its own.
        if self.started and flow.client_conn.id in self._clients:
            self.arm(flow.client_conn, self.header_timeout, "its request head took too long")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.disarm(flow.client_conn)

    # -- the clock ------------------------------------------------------------------
    def arm(self, client: connection.Client, seconds: float, why: str) -> None:
        """Close ``client`` in ``seconds`` unless :meth:`disarm` comes first."""
        if client.id not in self._clients:
            return
        self.disarm(client)
        loop = asyncio.get_running_loop()
        self._timers[client.id] = loop.call_later(seconds, self._expire, client.id, why)

    def start_head_clock(self, client: connection.Client) -> None:
        """A request head begins: time it, unless a clock already runs (from the
        connect or a CONNECT: a slow first byte does not buy more time)."""
        if client.id not in self._timers:
            self.arm(client, self.header_timeout, "its request head took too long")

    def disarm(self, client: connection.Client) -> None:
        timer = self._timers.pop(client.id, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, client_id: str, why: str) -> None:
        self._timers.pop(client_id, None)
        client = self._clients.get(client_id)
        handler = _connection_handler(client_id)
        if client is None or handler is None:
            return
        io = handler.transports.get(handler.client)
        if io is None or io.handler is None:
            return
        if why.startswith("its request head") and not client.tls and io.writer is not None:
            with contextlib.suppress(Exception):  # plain HTTP/1 only: it can read a 408
                io.writer.write(h1_refusal(408, "request_timeout",
                                         f"the request head did not arrive within "
                                         f"{self.header_timeout:g} seconds "
                                         "(proxy.header_timeout_seconds)"))
        log.info("taskgate: closing %s: %s", client_key(
            client.peername[0] if client.peername else None), why)
        io.handler.cancel(why)


def _connection_handler(client_id: str) -> Any:
    with contextlib.suppress(Exception):
        ps = ctx.master.addons.get("proxyserver")
        return ps.connections.get(client_id) if ps is not None else None
    return None


# -- mitmproxy patches ---------------------------------------------------------------
_active: list[Limits] = []  # the Limits addon the patches report to (the latest made)


def install_patches(addon: Limits) -> None:
    """Patch mitmproxy's HTTP/1 server (head size, head clock) and HTTP stream (refuse
    without reading the body). Idempotent; the patches ask the latest addon."""
    _active[:] = [addon]
    if getattr(HttpStream, "_taskgate_limits", False):
        return
    HttpStream._taskgate_limits = True  # type: ignore[attr-defined]
    _patch_read_headers()
    _patch_request_headers()
    _patch_consume_request_body()
    _patch_forget_closed_servers()
    _patch_layer_queue()


def _patch_read_headers() -> None:
    server = _http1.Http1Server
    original = server.read_headers

    def read_headers(self: Any, event: events.ConnectionEvent
                     ) -> Generator[commands.Command, Any, None]:
        # A plain function handing back mitmproxy's own generator (see _h1_framing).
        addon = _active[0] if _active else None
        if isinstance(event, events.DataReceived) and addon is not None:
            cap = addon.max_header_bytes
            if len(self.buf) > cap:
                data = bytes(self.buf)
                end = _HEAD_END.search(data)
                if end is None or end.start() > cap:
                    return _head_too_large(self, cap)
            if len(self.buf) == len(event.data) and _HEAD_END.search(event.data) is None:
                # The first bytes of a new head, not all of it (a head that came whole
                # is read now: no clock to set and cancel on every keep-alive call).
                addon.start_head_clock(self.conn)
        return original(self, event)

    server.read_headers = read_headers  # type: ignore[method-assign]


def _patch_request_headers() -> None:
    original = HttpStream.state_wait_for_request_headers

    def state_wait_for_request_headers(self: Any, event: Any
                                       ) -> Generator[commands.Command, Any, None]:
        gen = original(self, event)
        sent: Any = None
        try:
            while True:
                command = gen.send(sent)
                if (isinstance(command, SendHttp) and isinstance(command.event, ResponseHeaders)
                        and command.event.response.status_code == 100
                        and self.flow.response is not None):
                    sent = None  # refused: no "100 Continue" to invite the body
                    continue
                sent = yield command
        except StopIteration:
            pass
        if (self.flow.response is not None and not event.end_stream
                and self.client_state == self.state_consume_request_body):
            yield from _refuse_unread(self)

    HttpStream.state_wait_for_request_headers = state_wait_for_request_headers  # type: ignore[method-assign]


def _patch_consume_request_body() -> None:
    original = HttpStream.state_consume_request_body

    def state_consume_request_body(self: Any, event: Any
                                   ) -> Generator[commands.Command, Any, None]:
        yield from original(self, event)
        if not isinstance(event, RequestData) or \
                self.client_state != self.state_consume_request_body:
            return
        ex = self.flow.metadata.get(EXCHANGE)
        cap = ex.held_cap if ex is not None else None
        if cap is not None and len(self.request_body_buf) > cap[0] and \
                self.flow.response is None:
            self.request_body_buf.clear()
            refuse_for(self.flow, PayloadTooLarge(cap[1]))
            yield from _refuse_unread(self)

    HttpStream.state_consume_request_body = state_consume_request_body  # type: ignore[method-assign]


def _head_too_large(conn: Any, cap: int) -> Generator[commands.Command, Any, None]:
    conn.buf = _http1.ReceiveBuffer()
    yield commands.SendData(conn.conn, h1_refusal(
        431, "request_header_fields_too_large",
        f"the request head is larger than {cap} bytes (proxy.max_header_bytes)"))
    yield commands.CloseConnection(conn.conn)
    conn.state = conn.done


def _patch_forget_closed_servers() -> None:
    original = HttpLayer._handle_event

    def _handle_event(self: Any, event: events.Event) -> Generator[commands.Command, Any, None]:
        # Only a close needs more than mitmproxy's own generator (see _h1_framing).
        if isinstance(event, events.ConnectionClosed):
            return _forgetting_closed(self, event, original(self, event))
        return original(self, event)

    HttpLayer._handle_event = _handle_event  # type: ignore[method-assign]


def _forgetting_closed(self: Any, event: events.ConnectionClosed,
                       commands_: Generator[commands.Command, Any, None]
                       ) -> Generator[commands.Command, Any, None]:
    yield from commands_
    # The layers have answered the close (the server handler marks the connection
    # CLOSED as it runs their CloseConnection); nothing is routed to a closed
    # connection again, and a new call opens a new one.
    conn = event.connection
    if (conn is not self.context.client and conn.state is ConnectionState.CLOSED
            and isinstance(self.connections.get(conn), layer.Layer)):
        del self.connections[conn]


class _EventQueue:
    """A layer's queue of the events that came while it was paused, as mitmproxy uses
    it (append, popleft, iterate, test). Empty on nearly every layer nearly always: a
    deque is made for the first event and dropped when the last is taken, so an idle
    layer holds 40 bytes, not a deque's 760, and a long queue (an agent sending on
    while a call is held for approval) still takes O(1) per event."""

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: collections.deque[events.Event] | None = None

    def append(self, event: events.Event) -> None:
        if self._events is None:
            self._events = collections.deque()
        self._events.append(event)

    def popleft(self) -> events.Event:
        if self._events is None:
            raise IndexError("pop from an empty queue")
        event = self._events.popleft()
        if not self._events:
            self._events = None
        return event

    def __bool__(self) -> bool:
        return self._events is not None

    def __len__(self) -> int:
        return 0 if self._events is None else len(self._events)

    def __iter__(self) -> Iterator[events.Event]:
        return iter(()) if self._events is None else iter(self._events)


def _patch_layer_queue() -> None:
    original = layer.Layer.__init__

    def __init__(self: layer.Layer, context: Any) -> None:
        original(self, context)
        self._paused_event_queue = _EventQueue()  # type: ignore[assignment]

    layer.Layer.__init__ = __init__  # type: ignore[method-assign]


def _refuse_unread(stream: Any) -> Generator[commands.Command, Any, None]:
    """Send the refusal set in ``requestheaders`` now; the body is never read."""
    flow: http.HTTPFlow = stream.flow
    assert flow.response is not None
    h1 = not (flow.request.is_http2 or flow.request.is_http3)
    if h1:
        flow.response.headers["Connection"] = "close"
    stream.client_state = stream.state_done  # so send_response ends the stream (flow_done)
    yield from stream.send_response()  # response hook (the audit record), then the answer
    # Body bytes that arrived while the hook ran are replayed to this stream after it:
    # dropped silently (state_done would take them for a protocol error).
    stream.client_state = stream.state_errored
    client = stream.context.client
    if h1:
        yield commands.CloseTcpConnection(client, half_close=True)
        addon = _active[0] if _active else None
        if addon is not None:
            addon.arm(client, LINGER_SECONDS, "refused before its body was read")
    else:
        yield SendHttp(ResponseProtocolError(stream.stream_id, "refused before its body was read",
                                             ErrorCode.CANCEL), client)


addons = [Limits()]
