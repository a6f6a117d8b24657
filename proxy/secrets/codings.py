"""Undo an upstream answer's codings, never past a size cap, so it can be scanned.

An answer is scanned for secret echoes decoded: its ``Content-Encoding`` and any
``Transfer-Encoding`` other than ``chunked`` (gzip, deflate, br, zstd, stacked,
at most :data:`MAX_CODINGS`). Decoding stops as soon as the output passes the
cap, so a compression bomb (1.6 KB of brotli that decodes to 1 GiB) costs the
cap, not the gigabyte. Anything that cannot be decoded raises
:class:`Undecodable`; too much output raises :class:`TooLarge` (one of those).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli

try:  # what mitmproxy decodes zstd with, on Python < 3.14
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd

__all__ = ["MAX_CODINGS", "MAX_DECODED_BYTES", "StreamDecoder", "TooLarge", "Undecodable",
           "codings", "decode"]

MAX_CODINGS = 4
MAX_DECODED_BYTES = 32 * 1024 * 1024  # a buffered answer decoded for scanning
MAX_DECODED_CHUNK = 8 * 1024 * 1024  # what one streamed chunk may decode to
_PIECE = 256 * 1024


class Undecodable(ValueError):
    """The answer's codings cannot be undone (unknown, corrupt, truncated)."""


class TooLarge(Undecodable):
    """Decoded, the answer would be larger than the cap."""


def codings(content_encoding: str | None, transfer_encoding: str | None) -> list[str]:
    """The codings to undo, first to last (the last one applied is undone first).
    ``chunked`` (framing, already undone) and ``identity`` are left out."""
    listed = [c.strip().lower() for c in (content_encoding or "").split(",")]
    listed += [c.strip().lower() for c in (transfer_encoding or "").split(",")
               if c.strip().lower() != "chunked"]
    out = [c for c in listed if c and c != "identity"]
    if len(out) > MAX_CODINGS:
        raise Undecodable(f"more than {MAX_CODINGS} codings")
    for c in out:
        if c not in _MAKERS:
            raise Undecodable(f"unsupported coding {c[:32]!r}")
    return out[::-1]


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self.d = zlib.decompressobj(wbits)
        self.raw_ok = wbits == zlib.MAX_WBITS  # deflate: raw data is common (mitmproxy too)
        self.seen = False

    def feed(self, data: bytes, cap: int) -> bytes:
        out = bytearray()
        try:
            if not self.seen and self.raw_ok and data:
                self.seen = True
                try:
                    out += self.d.decompress(data, cap + 1)
                except zlib.error:
                    self.d = zlib.decompressobj(-zlib.MAX_WBITS)
                    out += self.d.decompress(data, cap + 1)
            else:
                self.seen = True
                out += self.d.decompress(data, cap + 1)
            while self.d.unconsumed_tail and len(out) <= cap:
                out += self.d.decompress(self.d.unconsumed_tail, cap + 1 - len(out))
        except zlib.error:
            raise Undecodable("corrupt compressed data") from None
        if len(out) > cap:
            raise TooLarge(f"decodes to more than {cap} bytes")
        if self.d.unused_data:
            raise Undecodable("bytes follow the end of the compressed data")
        return bytes(out)

    def end(self) -> None:
        if not self.d.eof and self.seen:
            raise Undecodable("the compressed data is truncated")


class _Brotli:
    def __init__(self) -> None:
        self.d = brotli.Decompressor()

    def feed(self, data: bytes, cap: int) -> bytes:
        out = bytearray()
        try:
            limit = min(cap + 1, _PIECE)
            piece = self.d.process(data, output_buffer_limit=limit)
            out += piece
            # A full piece may have more behind it, whatever can_accept_more_data says.
            while len(out) <= cap and not self.d.is_finished() and (
                    len(piece) >= limit or not self.d.can_accept_more_data()):
                limit = min(cap + 1 - len(out), _PIECE)
                piece = self.d.process(b"", output_buffer_limit=limit)
                out += piece
                if not piece and self.d.can_accept_more_data():
                    break
        except brotli.error:
            raise Undecodable("corrupt br data") from None
        if len(out) > cap:
            raise TooLarge(f"decodes to more than {cap} bytes")
        return bytes(out)

    def end(self) -> None:
        if not self.d.is_finished():
            raise Undecodable("the br data is truncated")


class _Zstd:
    def __init__(self) -> None:
        self.d = zstd.ZstdDecompressor()

    def feed(self, data: bytes, cap: int) -> bytes:
        out = bytearray()
        try:
            out += self.d.decompress(data, min(cap + 1, _PIECE))
            while not self.d.eof and not self.d.needs_input and len(out) <= cap:
                out += self.d.decompress(b"", min(cap + 1 - len(out), _PIECE))
        except zstd.ZstdError:
            raise Undecodable("corrupt zstd data") from None
        if len(out) > cap:
            raise TooLarge(f"decodes to more than {cap} bytes")
        if self.d.eof and self.d.unused_data:
            raise Undecodable("bytes follow the end of the zstd data")
        return bytes(out)

    def end(self) -> None:
        if not self.d.eof:
            raise Undecodable("the zstd data is truncated")


_MAKERS: dict[str, Callable[[], _Zlib | _Brotli | _Zstd]] = {
    "gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "deflate": lambda: _Zlib(zlib.MAX_WBITS),
    "br": _Brotli,
    "zstd": _Zstd,
}


class StreamDecoder:
    """Undo ``steps`` (from :func:`codings`) chunk by chunk; each chunk's output is
    capped at ``cap`` bytes at every stage."""

    def __init__(self, steps: list[str], cap: int = MAX_DECODED_CHUNK) -> None:
        self.stages = [_MAKERS[s]() for s in steps]
        self.cap = cap
        self.fed = False

    def feed(self, data: bytes) -> bytes:
        self.fed = self.fed or bool(data)
        for stage in self.stages:
            if not data:
                break
            data = stage.feed(data, self.cap)
        return data

    def end(self) -> None:
        if self.fed:  # an empty body (HEAD, 204) carries no coded data
            for stage in self.stages:
                stage.end()


def decode(body: bytes, steps: list[str], cap: int = MAX_DECODED_BYTES) -> bytes:
    """``body`` with ``steps`` undone, never more than ``cap`` bytes."""
    if not steps:
        return body
    d = StreamDecoder(steps, cap)
    out = d.feed(body)
    d.end()
    return out
