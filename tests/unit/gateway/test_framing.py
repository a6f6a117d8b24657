"""proxy.gateway._framing: one framing for each request head sent over HTTP/1.1; trailer fields."""

from __future__ import annotations

import pytest

from proxy.gateway import h1_request_framing, trailer_fields

H = [(b"host", b"api.test"), (b"x-a", b"1")]
CL = (b"content-length", b"5")
CHUNKED = (b"transfer-encoding", b"chunked")


def framing_of(fields):
    return [(n.lower(), v) for n, v in fields if n.lower() in (b"content-length",
                                                                b"transfer-encoding")]


@pytest.mark.parametrize(("fields", "method", "ends", "body", "trailers", "want", "length"), [
    # no body after the head
    (H, "GET", True, b"", False, [], None),
    (H, "HEAD", True, None, False, [], None),
    (H, "DELETE", True, b"", False, [], None),
    (H, "POST", True, b"", False, [(b"content-length", b"0")], 0),
    (H, "PUT", True, None, False, [(b"content-length", b"0")], 0),
    ([*H, CHUNKED], "GET", True, b"", False, [(b"content-length", b"0")], 0),
    ([*H, (b"Content-Length", b"0")], "GET", True, b"", False, [(b"content-length", b"0")], 0),
    # the body is held: its exact length, whatever the request said
    (H, "POST", False, b"hello", False, [(b"content-length", b"5")], 5),
    ([*H, (b"content-length", b"99")], "POST", False, b"hello", False,
     [(b"content-length", b"5")], 5),
    ([*H, CHUNKED], "POST", False, b"hello", False, [(b"content-length", b"5")], 5),
    ([*H, CL, CHUNKED], "POST", False, b"hi", False, [(b"content-length", b"2")], 2),
    (H, "GET", False, b"x" * 70000, False, [(b"content-length", b"70000")], 70000),
    # held with trailers: chunked, the only way HTTP/1.1 carries them
    (H, "POST", False, b"hello", True, [CHUNKED], None),
    ([*H, CL], "POST", False, b"", True, [CHUNKED], None),
    # streamed: the one length proven by the agent's own framing, else chunked
    (H, "POST", False, None, False, [CHUNKED], None),
    ([*H, CL], "POST", False, None, False, [CL], 5),
    ([*H, (b"Content-Length", b"5"), (b"content-length", b"5")], "POST", False, None, False,
     [CL], 5),
    ([*H, (b"content-length", b"5, 5")], "PUT", False, None, False, [CL], 5),
    ([*H, (b"content-length", b"5"), (b"content-length", b"6")], "POST", False, None, False,
     [CHUNKED], None),
    ([*H, (b"content-length", b"-5")], "POST", False, None, False, [CHUNKED], None),
    ([*H, (b"content-length", b"0x5")], "POST", False, None, False, [CHUNKED], None),
    ([*H, (b"content-length", b"")], "POST", False, None, False, [CHUNKED], None),
    ([*H, (b"content-length", b"1" * 40)], "POST", False, None, False, [CHUNKED], None),
    ([*H, CL, CHUNKED], "POST", False, None, False, [CHUNKED], None),
    ([*H, CL], "POST", False, None, True, [CHUNKED], None),
    # a transfer coding besides chunked stays named, held or streamed
    ([*H, (b"Transfer-Encoding", b"gzip, chunked")], "POST", False, b"\x1f\x8b", False,
     [(b"transfer-encoding", b"gzip, chunked")], None),
    ([*H, (b"transfer-encoding", b"GZIP,chunked")], "POST", False, None, False,
     [(b"transfer-encoding", b"gzip, chunked")], None),
    ([*H, (b"transfer-encoding", b"deflate, chunked")], "POST", False, b"x", True,
     [(b"transfer-encoding", b"deflate, chunked")], None),
    ([*H, (b"transfer-encoding", b"chunked, chunked")], "POST", False, b"x", False,
     [(b"content-length", b"1")], 1),
])
def test_h1_request_framing(fields, method, ends, body, trailers, want, length) -> None:
    f = h1_request_framing(fields, method, ends=ends, body=body, trailers=trailers)
    assert framing_of(f.fields) == want
    assert f.length == length
    assert f.chunked == bool(want and want[0][0] == b"transfer-encoding")
    # every other field is kept, in order, framing always last
    assert [x for x in f.fields if x not in want] == [x for x in fields
                                                      if x[0].lower() not in (
                                                          b"content-length",
                                                          b"transfer-encoding")]


@pytest.mark.parametrize(("fields", "kept"), [
    ([(b"grpc-status", b"0"), (b"grpc-message", b"ok")],
     [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]),
    ([(b"x-checksum", b"abc"), (b"Content-Length", b"5")], [(b"x-checksum", b"abc")]),
    ([(b"transfer-encoding", b"chunked"), (b"host", b"evil")], []),
    ([(b"proxy-authorization", b"Basic x"), (b"authorization", b"Bearer y")], []),
    ([(b"set-cookie", b"a=b"), (b"connection", b"close"), (b"te", b"trailers")], []),
    ([(b":status", b"200"), (b":path", b"/x")], []),
    ([(b"x-a", b"1\r\nInjected: yes"), (b"x-b", b"nul\0"), (b"x\nc", b"1")], []),
    ([(b"", b"empty name")], []),
])
def test_trailer_fields(fields, kept) -> None:
    assert trailer_fields(fields) == kept
