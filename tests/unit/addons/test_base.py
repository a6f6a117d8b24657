"""addons/_base.py: the header helpers read and write as mitmproxy's ``Headers`` do."""

from __future__ import annotations

import gc
import itertools

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from addons._base import PerConnection, header, set_header, streams_response

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


def test_per_connection_values_go_with_the_connection() -> None:
    kept: PerConnection[str] = PerConnection()
    first, second = tflow.tflow().client_conn, tflow.tflow().client_conn
    kept[first], kept[second] = "a", "b"
    kept[first] = "a2"  # replaced, still one entry (and one finalizer)
    assert (kept.get(first), kept.get(second), len(kept)) == ("a2", "b", 2)
    del first
    gc.collect()
    assert len(kept) == 1 and kept.get(second) == "b"  # collected: its entry went too
    assert kept.pop(second) == "b" and kept.pop(second) is None and len(kept) == 0
    del second
    gc.collect()  # its finalizer finds nothing left to drop
    assert len(kept) == 0


def test_per_connection_finds_a_connection_by_its_id() -> None:
    """As a WeakKeyDictionary of connections does: mitmproxy's connections are equal
    when their ids are (a copy of a connection, as a replay makes)."""
    kept: PerConnection[int] = PerConnection()
    client = tflow.tflow().client_conn
    kept[client] = 1
    copy = tflow.tflow().client_conn
    copy.id = client.id
    assert copy == client and kept.get(copy) == 1
    assert kept.get(tflow.tflow().client_conn) is None


@pytest.mark.parametrize(("method", "status", "fields", "streams"), [
    ("GET", 200, [(b"Content-Length", b"256")], False),
    ("GET", 200, [(b"content-LENGTH", b"2000")], True),  # past the threshold
    ("GET", 200, [], True),  # no length: chunked or read to the close
    ("HEAD", 200, [], False),
    ("GET", 204, [], False),
    ("GET", 304, [], False),
    ("GET", 200, [(b"Content-Length", b"10"), (b"Content-Type", b"text/event-stream")], True),
    ("GET", 200, [(b"Content-Type", b"text/event-stream; charset=utf-8"),
                  (b"Content-Length", b"10")], True),
    ("GET", 200, [(b"Content-Type", b"application/json"), (b"Content-Length", b"10")], False),
    # two lengths are folded as Headers.get folds them: not a number, so not "long"
    ("GET", 200, [(b"Content-Length", b"2000"), (b"Content-Length", b"2000")], False),
])
def test_streams_response(method: str, status: int, fields: list[tuple[bytes, bytes]],
                          streams: bool) -> None:
    f = tflow.tflow(resp=True)
    f.request.method = method
    assert f.response is not None
    f.response.status_code = status
    f.response.headers.fields = tuple(fields)
    assert streams_response(f, 1000) is streams
