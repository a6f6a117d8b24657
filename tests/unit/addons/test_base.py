"""addons/_base.py: the header helpers read and write as mitmproxy's ``Headers`` do."""

from __future__ import annotations

import itertools

from mitmproxy import http

from addons._base import header, set_header

FIELDS = [(b"Content-Length", b"5"), (b"content-length", b"6"), (b"X-Request-Id", b"up"),
          (b"Content-Type", b"text/event-stream; charset=utf-8"), (b"X-Odd", b"\xff\xfe"),
          (b"Host", b"a")]


def test_header_reads_as_headers_get() -> None:
    for n in range(len(FIELDS) + 1):
        for chosen in itertools.permutations(FIELDS, n):
            headers = http.Headers(list(chosen))
            for name in ("content-length", "CONTENT-TYPE", "x-odd", "x-request-id", "absent"):
                assert header(headers, name.lower().encode()) == headers.get(name), chosen


def test_set_header_writes_as_setitem() -> None:
    for n in range(len(FIELDS) + 1):
        for chosen in itertools.combinations(FIELDS, n):
            for name in ("X-Request-Id", "x-request-id", "Content-Length", "X-New"):
                ours, theirs = http.Headers(list(chosen)), http.Headers(list(chosen))
                set_header(ours, name, "abc\u00e9")
                theirs[name] = "abc\u00e9"
                assert ours.fields == theirs.fields, (chosen, name)
