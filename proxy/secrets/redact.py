"""Redact active secret values from what an upstream sends back.

An upstream may echo what it received (a debug endpoint, an error page that
quotes the request, a ``Location`` with the token in it). Every spelling of a
value we know is masked, with ``*`` of the same length so a ``Content-Length``
already sent stays true:

- the value itself, percent-encoded, and with ``/`` JSON-escaped;
- its base64 (standard and URL-safe alphabets) at each of the three byte
  alignments, so it is found inside a larger base64 blob too (``Basic
  base64(user:token)``): only the characters that depend on the value alone are
  matched, the one or two at each edge that mix with neighbours are not.

A streamed body is filtered chunk by chunk. A value split across chunks is
caught by holding back, at the end of each chunk, the shortest tail that could
still be the start of a value (at most ``len(longest) - 1`` bytes). Holding
only what could match — rather than always the last ``len - 1`` bytes —
keeps server-sent events flowing event by event.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote

__all__ = ["MIN_VALUE_BYTES", "Redactor", "variants"]

MASK = b"*"
MIN_VALUE_BYTES = 6  # shorter "secrets" would mask ordinary text; they are refused at use
_MIN_FRAGMENT = 8
_HEAD = 4


def _b64_fragments(value: bytes) -> set[bytes]:
    out = set()
    n = len(value)
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + value)
        start, end = (8 * k + 5) // 6, (8 * (k + n)) // 6
        frag = enc[start:end]
        if len(frag) >= _MIN_FRAGMENT:
            out.add(frag)
            out.add(frag.translate(bytes.maketrans(b"+/", b"-_")))
    return out


def variants(value: bytes) -> set[bytes]:
    """Every spelling of ``value`` that is masked."""
    if len(value) < MIN_VALUE_BYTES:
        return set()
    out = {value, value.replace(b"/", b"\\/"), quote(value, safe="").encode("ascii"),
           quote(value, safe="/").encode("ascii")}
    out |= _b64_fragments(value)
    return out


def _mask(m: re.Match[bytes]) -> bytes:
    return MASK * (m.end() - m.start())


class Redactor:
    """Masks a fixed set of values; build a new one when the set changes."""

    def __init__(self, values: Iterable[bytes]) -> None:
        needles: set[bytes] = set()
        for v in values:
            needles |= variants(v)
        ordered = sorted(needles, key=len, reverse=True)
        self.empty = not ordered
        self.longest = len(ordered[0]) if ordered else 0
        self._re = re.compile(b"|".join(re.escape(n) for n in ordered)) if ordered else None
        self._heads: dict[bytes, list[bytes]] = {}
        self._short: set[bytes] = set()
        for n in ordered:
            self._heads.setdefault(n[:_HEAD], []).append(n)
            self._short.update(n[:i] for i in range(1, _HEAD))

    def redact(self, data: bytes) -> bytes:
        if self._re is None or not data:
            return data
        return self._re.sub(_mask, data)

    def redact_text(self, text: str) -> str:
        if self._re is None:
            return text
        raw = text.encode("utf-8", "surrogateescape")
        out = self.redact(raw)
        return text if out == raw else out.decode("utf-8", "surrogateescape")

    def found_in(self, data: bytes) -> bool:
        return self._re is not None and self._re.search(data) is not None

    def _held(self, buf: bytes) -> int:
        """Length of the shortest tail of ``buf`` that may be the start of a value."""
        for p in range(max(0, len(buf) - self.longest + 1), len(buf)):
            rest = buf[p:]
            if len(rest) < _HEAD:
                if rest in self._short:
                    return len(buf) - p
            elif any(n.startswith(rest) for n in self._heads.get(rest[:_HEAD], ())):
                return len(buf) - p
        return 0

    def stream(self) -> Callable[[bytes], list[bytes]]:
        """A filter for ``flow.response.stream``: called per chunk, ``b""`` at the end.

        Returns the chunks to send — never an empty one, which mitmproxy would
        send as the zero-length chunk that ends an HTTP/1 chunked body.
        """
        tail = b""

        def step(chunk: bytes) -> list[bytes]:
            nonlocal tail
            buf = self.redact(tail + chunk)
            keep = self._held(buf) if chunk else 0  # at the end nothing can complete a value
            tail = buf[len(buf) - keep:] if keep else b""
            out = buf[:len(buf) - keep]
            return [out] if out else []

        return step
