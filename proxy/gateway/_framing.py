"""How a request is framed on an HTTP/1.1 connection to the upstream (RFC 9112 §6).

An HTTP/2 or HTTP/3 request carries its length in its frames, not in its head: sent
on as HTTP/1.1 with neither ``Content-Length`` nor ``Transfer-Encoding``, its body
would be read by the upstream as the next request. :func:`h1_request_framing` gives
every request that leaves over HTTP/1.1 exactly one framing, chosen by what the
gateway knows when the head goes out:

- no body follows the head: no body (``Content-Length: 0`` where one is expected);
- the body is held whole: ``Content-Length`` of exactly those bytes (chunked if
  trailers follow, the only way HTTP/1.1 carries them, or if the agent applied a
  transfer coding such as ``gzip, chunked``, which stays named);
- the body streams: the one ``Content-Length`` the agent's own framing proved (its
  parser counted the bytes), else ``Transfer-Encoding: chunked``.

Whatever framing headers the request came with are dropped first. Pure: no mitmproxy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Framing", "h1_request_framing", "trailer_fields"]

Fields = Sequence[tuple[bytes, bytes]]

_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# Requests that are commonly sent with no body and no framing header at all.
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})

# Never honoured in a trailer section (RFC 9110 §6.5.1): framing, routing, hop-by-hop
# and the proxy's own credentials. Dropped wherever the gateway passes trailers on.
_NOT_TRAILERS = frozenset({
    b"content-length", b"transfer-encoding", b"content-encoding", b"content-type",
    b"content-range", b"host", b"connection", b"keep-alive", b"proxy-connection", b"te",
    b"trailer", b"upgrade", b"expect", b"proxy-authorization", b"proxy-authenticate",
    b"set-cookie", b"cookie", b"authorization", b"www-authenticate", b"location",
    b"cache-control", b"age", b"expires", b"date", b"retry-after", b"vary", b"range",
    b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since",
    b"if-range", b"max-forwards",
})


@dataclass(frozen=True)
class Framing:
    """The head's header fields with one framing; ``length`` is the Content-Length the
    body must match exactly (None: chunked, or no body)."""

    fields: tuple[tuple[bytes, bytes], ...]
    chunked: bool
    length: int | None


def _single_length(values: list[bytes]) -> int | None:
    """The one Content-Length all values agree on (``5, 5`` is one), else None."""
    parts = {p.strip() for v in values for p in v.split(b",")}
    if len(parts) != 1:
        return None
    (part,) = parts
    if not part or not part.isdigit() or len(part) > 18:
        return None
    return int(part)


def h1_request_framing(fields: Fields, method: str, *, ends: bool, body: bytes | None,
                       trailers: bool = False) -> Framing:
    """The framing of a request head going out over HTTP/1.1.

    ``ends``: no body follows the head. ``body``: the whole body when it is held
    (None while it streams). ``trailers``: a trailer section follows the body.
    """
    kept = tuple((n, v) for n, v in fields if n.lower() not in _FRAMING)
    lengths = [v for n, v in fields if n.lower() == b"content-length"]
    framed = len(kept) != len(fields)
    if ends:
        if framed or method.upper() not in _BODYLESS:
            return Framing((*kept, (b"content-length", b"0")), False, 0)
        return Framing(kept, False, None)
    te = [v for n, v in fields if n.lower() == b"transfer-encoding"]
    codings = [c.strip().lower() for v in te for c in v.split(b",")]
    if codings and codings[-1] == b"chunked" and set(codings[:-1]) - {b"chunked"}:
        # The body carries a transfer coding (``gzip, chunked``): only chunked can
        # frame it, and the coding must stay named or the upstream reads it as is.
        return Framing((*kept, (b"transfer-encoding", b", ".join(codings))), True, None)
    if body is not None and not trailers:
        return Framing((*kept, (b"content-length", b"%d" % len(body))), False, len(body))
    length = _single_length(lengths) if body is None else None
    if length is not None and not te and not trailers:
        return Framing((*kept, (b"content-length", b"%d" % length)), False, length)
    return Framing((*kept, (b"transfer-encoding", b"chunked")), True, None)


def trailer_fields(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields of a trailer section that may be passed on (pseudo-headers, framing,
    routing, hop-by-hop and credential fields are dropped)."""
    return [(n, v) for n, v in fields
            if n and not n.startswith(b":") and n.lower() not in _NOT_TRAILERS
            and not any(c in n + v for c in b"\r\n\0")]
