"""mitmproxy's own error responses (400 malformed, 413, 502 unreachable…) as taskgate refusals.

mitmproxy answers some errors itself, with an HTML page and no request id; these
patches make them the JSON refusal every other refusal is, over HTTP/1 and HTTP/2.
"""

from __future__ import annotations

import re
from typing import Any

from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2

from proxy.gateway import REQUEST_ID_HEADER, new_request_id, refusal_body

__all__ = ["error_body", "json_error_responses"]

_ERROR_CODES = {400: ("bad_request", "malformed request"),
                413: ("payload_too_large", "request body too large"),
                502: ("bad_gateway", "the upstream failed")}
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')
_h2_error_id: list[str] = []  # the id send_headers put on an h2 error, for its body


def error_body(status: int, message: str, request_id: str) -> bytes:
    """taskgate's JSON refusal for an error mitmproxy answers itself. Its message loses
    what it quotes (a request line, an upstream's header: bytes that may hold a secret)."""
    error, what = _ERROR_CODES.get(status, ("error", "the call failed"))
    detail = "".join(c if c.isprintable() else " " for c in _QUOTED.sub("[...]", message))
    reason = f"{what}: {detail.strip()[:300]}" if detail.strip() else what
    return refusal_body(error, reason, request_id)


def _error_response(status_code: int, message: str = "") -> bytes:
    """Replaces ``mitmproxy.proxy.layers.http._http1.make_error_response`` (HTML, no id).

    A fresh request id: mitmproxy makes this response where the flow (and the id of
    its audit record) is out of reach."""
    request_id = new_request_id()
    resp = http.Response.make(status_code, error_body(status_code, message, request_id),
                              {"Content-Type": "application/json", "Connection": "close",
                               REQUEST_ID_HEADER: request_id})
    return bytes(http1.assemble_response(resp))


def json_error_responses() -> None:
    """Make mitmproxy's own error responses (400 for a malformed request, 502 for an
    unreachable upstream, …) taskgate refusals, over HTTP/1 and HTTP/2. Idempotent."""
    _http1.make_error_response = _error_response
    conn = _http_h2.BufferedH2Connection
    if getattr(conn, "_taskgate_errors", False):
        return
    send_headers = conn.send_headers
    server = (b"server", version.MITMPROXY.encode())

    def headers_of_errors(self: Any, stream_id: int, headers: Any, *args: Any,
                          **kw: Any) -> None:
        # mitmproxy's h2 error response is exactly these three headers, then its body.
        if (isinstance(headers, list) and len(headers) == 3 and headers[1] == server
                and headers[2] == (b"content-type", b"text/html")):
            request_id = new_request_id()
            _h2_error_id[:] = [request_id]
            headers = [headers[0], (b"content-type", b"application/json"),
                       (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
        send_headers(self, stream_id, headers, *args, **kw)

    def body_of_errors(status_code: int, message: str) -> bytes:
        request_id = _h2_error_id.pop() if _h2_error_id else new_request_id()
        return error_body(status_code, message, request_id)

    conn.send_headers = headers_of_errors  # type: ignore[method-assign]
    conn._taskgate_errors = True  # type: ignore[attr-defined]
    _http2.format_error = body_of_errors
