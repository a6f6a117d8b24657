"""One unambiguous framing for every message the gateway writes over HTTP/1.1.

mitmproxy 12 loses framing where it converts between HTTP versions, at the
HTTP/1 connection that writes the message (``proxy/layers/http/_http1.py``):

- ``Http1Client.send`` turns an HTTP/2 (or /3) request into an HTTP/1.1 head as it
  is: with no ``content-length`` (HTTP/2 needs none) its body goes out unframed and
  the upstream reads it as the next request (smuggling past every rule and the
  audit log). Request trailers there are an ``AssertionError``.
- ``Http1Connection.read_body`` raises ``NotImplementedError`` on a chunked body
  with trailers (from an upstream or an agent), leaving the peer hanging, and
  ``Http1Server.send`` cannot write response trailers.

:func:`install` wraps those three methods (idempotent): the request head gets the
framing :func:`proxy.gateway._framing.h1_request_framing` chooses, a body that does not match
its Content-Length is never sent past it (the connection closes), and trailers pass
as mitmproxy's trailer events, filtered by :func:`proxy.gateway._framing.trailer_fields`.
The Framing addon (addons/framing.py) installs it when loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

import h11
from h11._readers import ChunkedReader
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestTrailers,
    ResponseData,
    ResponseEndOfMessage,
    ResponseTrailers,
)

from proxy.gateway import h1_request_framing, trailer_fields

log = logging.getLogger("taskgate")

Commands = Generator[Any, Any, None]


class _KeepTrailers:
    """A chunked body reader that hands its trailer section over instead of ending the
    message with it (mitmproxy raises on an ``EndOfMessage`` that carries headers)."""

    def __init__(self, inner: ChunkedReader) -> None:
        self.inner = inner
        self.trailers: list[tuple[bytes, bytes]] = []

    def __call__(self, buf: Any) -> Any:
        event = self.inner(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            self.trailers = trailer_fields(event.headers)  # names lower-cased (HTTP/2)
            return h11.EndOfMessage()
        return event

    def read_eof(self) -> Any:
        return self.inner.read_eof()


def _make_body_reader(original: Any) -> Any:
    def make_body_reader(expected_size: int | None) -> Any:
        reader = original(expected_size)
        return _KeepTrailers(reader) if isinstance(reader, ChunkedReader) else reader

    return make_body_reader


# The wrappers below are plain functions that hand mitmproxy its own generator
# whenever they have nothing to add (the usual event): a generator of ours around it
# would run for every command of every event. A pipelined next message is read by a
# nested call of the (patched) method, which decides for itself.


def _nothing() -> Commands:
    """No commands (an event the wrapper consumed)."""
    yield from ()


def _read_body(original: Any) -> Any:
    def read_body(self: Any, event: Any) -> Commands:
        if not isinstance(getattr(self, "body_reader", None), _KeepTrailers):
            return original(self, event)  # no chunked reader: no trailers to hand over
        return _handing_over_trailers(self, original(self, event))

    return read_body


def _handing_over_trailers(self: Any, commands_: Commands) -> Commands:
    for command in commands_:
        if isinstance(command, ReceiveHttp) and isinstance(
                command.event, (RequestEndOfMessage, ResponseEndOfMessage)):
            trailers = getattr(self.body_reader, "trailers", None)
            if trailers:
                self.body_reader.trailers = []
                kind = (RequestTrailers if isinstance(command.event, RequestEndOfMessage)
                        else ResponseTrailers)
                yield ReceiveHttp(kind(command.event.stream_id, http.Headers(trailers)))
        yield command


def _last_chunk(trailers: http.Headers) -> bytes:
    return b"0\r\n" + bytes(trailers) + b"\r\n"


def _client_send(original: Any) -> Any:
    """``Http1Client.send``: frame the request head; hold the body to its length;
    write request trailers into the last chunk."""

    def send(self: Any, event: Any) -> Commands:
        if isinstance(event, RequestHeaders):
            req = event.request
            self._tg_left = self._tg_trailers = None
            self._tg_chunked = False
            if req.method.upper() != "CONNECT":
                framing = h1_request_framing(
                    req.headers.fields, req.method, ends=event.end_stream,
                    body=req.data.content, trailers=bool(req.trailers))
                req.headers.fields = framing.fields
                self._tg_left, self._tg_chunked = framing.length, framing.chunked
        elif isinstance(event, RequestData):
            if not event.data:  # chunked, an empty chunk would end the body here
                return _nothing()
            left = getattr(self, "_tg_left", None)
            if left is not None:
                if len(event.data) > left:
                    return _desync(self, "more body than its Content-Length")
                self._tg_left = left - len(event.data)
        elif isinstance(event, RequestTrailers):
            # Only chunked carries trailers in HTTP/1.1; otherwise they are dropped.
            self._tg_trailers = event.trailers if getattr(self, "_tg_chunked", False) else None
            return _nothing()
        elif isinstance(event, RequestEndOfMessage):
            if getattr(self, "_tg_left", None):
                return _desync(self, "less body than its Content-Length")
            trailers = getattr(self, "_tg_trailers", None)
            if trailers and self._tg_chunked:
                self._tg_trailers = None
                return _last_chunk_then(self, trailers, self.mark_done(request=True))
        return original(self, event)

    return send


def _last_chunk_then(conn: Any, trailers: http.Headers, done: Commands) -> Commands:
    """End a chunked body with ``trailers`` in its last chunk, then the message
    (``done``: the connection's ``mark_done``, run only once the chunk is out)."""
    yield commands.SendData(conn.conn, _last_chunk(trailers))
    yield from done


def _desync(conn: Any, what: str) -> Commands:
    """Never let a body's bytes be read as something else: close the connection."""
    log.warning("taskgate: a request carried %s; its upstream connection was closed", what)
    conn._tg_left = None
    yield commands.CloseConnection(conn.conn)


def _server_send(original: Any) -> Any:
    """``Http1Server.send``: write response trailers into the last chunk (a response
    that is not chunked cannot carry them: they are dropped)."""

    def send(self: Any, event: Any) -> Commands:
        if isinstance(event, ResponseData) and not event.data:
            return _nothing()  # chunked, an empty chunk would end the body here
        if isinstance(event, ResponseTrailers):
            self._tg_trailers = event.trailers
            return _nothing()
        if isinstance(event, ResponseEndOfMessage):
            trailers, self._tg_trailers = getattr(self, "_tg_trailers", None), None
            if (trailers and self.request is not None and self.response is not None
                    and self.request.method.upper() != "HEAD"
                    and "chunked" in self.response.headers.get("transfer-encoding", "").lower()):
                return _last_chunk_then(self, trailers, self.mark_done(response=True))
        return original(self, event)

    return send


def install() -> None:
    """Patch mitmproxy's HTTP/1 connections as described above. Idempotent."""
    if getattr(_http1, "_taskgate_framing", False):
        return
    _http1.make_body_reader = _make_body_reader(_http1.make_body_reader)
    # Patching methods of mitmproxy's classes is the point here (see the docstring).
    _http1.Http1Connection.read_body = _read_body(  # type: ignore[method-assign]
        _http1.Http1Connection.read_body)
    _http1.Http1Client.send = _client_send(_http1.Http1Client.send)  # type: ignore[method-assign]
    _http1.Http1Server.send = _server_send(_http1.Http1Server.send)  # type: ignore[method-assign]
    _http1._taskgate_framing = True  # type: ignore[attr-defined]
