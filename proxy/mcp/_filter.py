"""Filter tools/list results down to the granted tools, in JSON and in SSE responses.

An agent should not be shown tools it may not call (the model would try
them). Responses are rewritten as they stream: an ``application/json`` body
is held (bounded) and rewritten once complete; a ``text/event-stream`` is cut
into events and each event is passed on as soon as it is complete — events
that carry no tool list go through byte for byte, so the stream stays a
stream and is never buffered whole.

A rewritten message is re-serialised from what was checked, so the agent
sees exactly what the gateway judged. Answers are read as strictly as request
bodies (``proxy.mcp._jsonrpc``: duplicate keys at any depth, keys that differ only
by case or Unicode folding, a ``Result`` or ``Tools`` look-alike member, lone
surrogates, a malformed JSON-RPC envelope), since a lenient client would read
such an answer differently from the filter. What cannot be read is not passed
on: an unreadable body, or an unreadable event that is read at all, becomes a
JSON-RPC error.
These filters are plain callables ``bytes -> list[bytes]`` (called with
``b""`` at the end of the body), as mitmproxy's ``Response.stream`` expects.
They return an empty list, never ``b""``, when they hold a chunk back:
mitmproxy writes an empty chunk of a chunked response as the terminating
``0\r\n\r\n``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Set
from typing import Any

import orjson

from proxy.errors import Refused
from proxy.mcp._jsonrpc import check_message, dumps, loads_strict
from proxy.policy import fold

__all__ = ["JsonFilter", "ReplaceFilter", "SseFilter", "error_message", "filter_message"]

_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_LINE = re.compile(rb"\r\n|\n|\r")
INSPECT_ERROR = -32052  # the gateway could not inspect the server's answer


def _out(data: bytes) -> list[bytes]:
    return [data] if data else []


def error_message(why: str) -> bytes:
    """A JSON-RPC error with a null id: the answer could not be passed on."""
    return orjson.dumps({"jsonrpc": "2.0", "id": None,
                         "error": {"code": INSPECT_ERROR, "message": f"taskgate: {why}"}})


class _Unreadable(ValueError):
    """An answer a lenient client could read differently from the filter."""


# Given the granted tools of one answer, the ones that may be shown (tool pinning).
Review = Callable[[list[Any]], list[Any]]


def _filter_one(msg: Any, granted: Set[str], review: Review | None = None) -> bool:
    """Drop ungranted tools from one response message in place; True if it changed."""
    try:
        check_message(msg)
    except Refused as e:
        raise _Unreadable(str(e)) from None
    result = msg.get("result")
    if not isinstance(result, dict):
        return False
    for key in result:
        if key != "tools" and fold(key) == "tools":
            raise _Unreadable(f"the result has a member {key[:32]!r} that differs only by "
                              "case or Unicode folding from 'tools'")
    if "tools" not in result:
        return False
    tools = result["tools"]
    if not isinstance(tools, list):
        result["tools"] = []
        return True
    kept = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)
            and t["name"] in granted]
    if review is not None:
        kept = review(kept)
    if len(kept) == len(tools):
        return False
    result["tools"] = kept
    return True


def filter_message(data: bytes, granted: Set[str], strict: bool,
                   review: Review | None = None) -> bytes | None:
    """``data`` (one JSON-RPC message or a batch) with ungranted tools removed.

    ``None`` means unchanged. Unreadable data is replaced by an error when
    ``strict`` (the answer to a tools/list), else passed unchanged.
    """
    if not data.strip():
        return None
    try:
        doc = loads_strict(data)
        msgs = doc if isinstance(doc, list) else [doc]
        if not msgs:
            raise _Unreadable("an empty batch")
        changed = False
        for m in msgs:
            changed = _filter_one(m, granted, review) or changed
    except (Refused, _Unreadable):
        return error_message("the server's answer could not be inspected") if strict else None
    if not changed:
        return None
    out = dumps(doc)
    return out if out is not None else error_message(
        "the server's answer could not be re-encoded after filtering")


class JsonFilter:
    """A JSON body: held up to ``cap`` bytes, rewritten at its end."""

    def __init__(self, granted: Set[str], cap: int, review: Review | None = None) -> None:
        self.granted, self.cap, self.review = granted, cap, review
        self.buf = bytearray()
        self.over = self.done = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.done:
            return []
        if chunk:
            if not self.over:
                self.buf += chunk
                if len(self.buf) > self.cap:
                    self.over = True
                    self.buf.clear()
            return []
        self.done = True
        if self.over:
            return [error_message(f"the server's answer is larger than {self.cap} bytes")]
        data = bytes(self.buf)
        self.buf.clear()
        new = filter_message(data, self.granted, strict=True, review=self.review)
        return _out(data if new is None else new)


class ReplaceFilter:
    """Swallow the body and send ``body`` instead (an answer that cannot be inspected)."""

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body

    def __call__(self, chunk: bytes) -> list[bytes]:
        if chunk or self.body is None:
            return []
        body, self.body = self.body, None
        return [body]


class SseFilter:
    """An event stream, event by event; at most ``cap`` bytes of one event are held.

    With ``every`` (the stream answers a tools/list), every event is read;
    otherwise (a GET stream, where a tools/list answer only appears when a
    client resumes) only events that mention ``tools``. An event that is read
    and cannot be read strictly is replaced by a JSON-RPC error.
    """

    def __init__(self, granted: Set[str], cap: int, every: bool,
                 review: Review | None = None) -> None:
        self.granted, self.cap, self.every, self.review = granted, cap, every, review
        self.buf = bytearray()
        self.skipping = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        if not chunk:  # the end: a trailing incomplete event is never dispatched
            return []
        self.buf += chunk
        out: list[bytes] = []
        pos = 0
        while True:
            m = _EVENT_END.search(self.buf, pos)
            if m is None:
                break
            raw = bytes(self.buf[pos:m.end()])
            pos = m.end()
            if self.skipping:
                self.skipping = False
                out.append(self._dropped())
            else:
                out.append(self._event(raw))
        del self.buf[:pos]
        if len(self.buf) > self.cap:
            # Keep the tail: an event end may straddle this chunk and the next.
            del self.buf[:-3]
            self.skipping = True
        return out

    def _dropped(self) -> bytes:
        return (b"data: " + error_message(f"an event larger than {self.cap} bytes was "
                                          "dropped; it could not be inspected") + b"\n\n")

    def _event(self, raw: bytes) -> bytes:
        if not self.every and b"tools" not in raw:
            return raw
        data_lines: list[bytes] = []
        other: list[bytes] = []
        for line in _LINE.split(raw):
            if line == b"data":
                data_lines.append(b"")
            elif line.startswith(b"data:"):
                value = line[5:]
                data_lines.append(value[1:] if value.startswith(b" ") else value)
            elif line:
                other.append(line)
        if not data_lines:
            return raw
        # An event that is read at all is read strictly: on a GET stream too, one that
        # mentions tools but cannot be read could hide a tool list from the filter.
        new = filter_message(b"\n".join(data_lines), self.granted, strict=True,
                             review=self.review)
        if new is None:
            return raw
        return b"".join(line + b"\n" for line in other) + b"data: " + new + b"\n\n"
