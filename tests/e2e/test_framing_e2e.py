"""Request framing across HTTP versions, and trailers, through the real gateway.

Issue 10 item 1: an HTTP/2 request with a body and no content-length must reach an
HTTP/1.1 upstream framed (Content-Length or chunked): no byte of its body may be
parsed there as a request head. Such bodies stream with bounded memory, and a
bidirectional stream does not hang. Item 15: chunked trailers from an upstream (and
from an agent) pass through instead of leaving the peer hanging.

Upstreams see raw bytes (tests/framing_servers.py); every wait is bounded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.conftest import base_config
from tests.e2e import CLEAN_ENV, curl
from tests.framing_servers import H2Client, H2Upstream, RawH1
from tests.support import Gateway, Keys, Upstream
from tests.wire import Tunnel, basic

SMUGGLED = [
    b"DELETE /admin/everything HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"DELETE /admin/everything HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    b"GET /admin/again HTTP/1.1\r\nHost: x\r\n\r\n",
    b"0\r\n\r\nDELETE /admin/after-last-chunk HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n\r\nPUT /admin/x HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc" + b"z" * 70_000,
]
SMUGGLE_IDS = ["delete", "pipelined-two", "fake-last-chunk", "padded-large"]


def _server_ctx(test_ca: trustme.CA, alpn: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    ctx.set_alpn_protocols([alpn])
    return ctx


@pytest.fixture(scope="module")
def raw_tls(test_ca: trustme.CA) -> Iterator[RawH1]:
    srv = RawH1(_server_ctx(test_ca, "http/1.1"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def raw_plain() -> Iterator[RawH1]:
    srv = RawH1()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def h2_up(test_ca: trustme.CA) -> Iterator[H2Upstream]:
    srv = H2Upstream(_server_ctx(test_ca, "h2"))
    yield srv
    srv.close()


def _rule(rid: str, port: int, scheme: str = "https") -> dict[str, Any]:
    return {"id": rid, "host": "127.0.0.1", "port": port, "scheme": scheme,
            "methods": ["GET", "POST", "PUT"], "paths": ["/allowed/**", "/bidi/**",
                                                          "/trailers/**"]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
       upstream: Upstream, raw_tls: RawH1, raw_plain: RawH1,
       h2_up: H2Upstream) -> Iterator[Gateway]:
    cfg = base_config(shared_files, upstream)
    (wl,) = cfg["workloads"].values()
    wl["standing"] += [_rule("raw-tls", raw_tls.port), _rule("raw-plain", raw_plain.port, "http"),
                       _rule("h2", h2_up.port)]
    g = Gateway(tmp_path_factory.mktemp("framing"), cfg).start()
    yield g
    g.stop()


@pytest.fixture
def tok(keys: Keys) -> str:
    return keys.token()


def _heads_for(srv: RawH1, marker: str) -> list:
    return [h for h in srv.heads if marker in h.target]


def _no_smuggling(srv: RawH1, since: tuple[int, int]) -> None:
    """Since ``since`` (:func:`_mark`): no line parsed as a head that was none, no
    request the agent did not send as one."""
    assert not srv.bad[since[1]:], srv.bad
    assert not [h for h in srv.heads[since[0]:] if "/admin" in h.target], srv.heads


def _mark(srv: RawH1) -> tuple[int, int]:
    return len(srv.heads), len(srv.bad)


def _curl_h2_stdin(gw: Gateway, url: str, token: str, data: bytes, *extra: str,
                   timeout: float = 30) -> tuple[int, bytes, str, str]:
    cmd = ["curl", "-sS", "--http2", "--max-time", str(int(timeout)), "-x", gw.proxy_url,
           "--proxy-user", f"agent:{token}", "--cacert", str(gw.ca), "-X", "POST",
           "-T", "-", "-o", "-", "-w", "\n%{http_code} %{http_version}", *extra, url]
    out = subprocess.run(cmd, input=data, capture_output=True, env=CLEAN_ENV,
                         timeout=timeout + 10)
    body, _, tail = out.stdout.rpartition(b"\n")
    code, _, version = tail.decode().partition(" ")
    return int(code or 0), body, version, out.stderr.decode(errors="replace")


# -- item 1: HTTP/2 agent, HTTP/1.1 upstream ------------------------------------------
@pytest.mark.parametrize("payload", SMUGGLED, ids=SMUGGLE_IDS)
def test_curl_http2_stdin_body_is_not_a_second_request(gw: Gateway, raw_tls: RawH1,
                                                        tok: str, payload: bytes) -> None:
    mark = _mark(raw_tls)
    marker = f"/allowed/curl-{hashlib.sha256(payload).hexdigest()[:8]}"
    code, body, version, err = _curl_h2_stdin(
        gw, f"https://127.0.0.1:{raw_tls.port}{marker}", tok, payload)
    assert code == 200 and version == "2", (code, version, err, body[:300])
    time.sleep(0.3)
    _no_smuggling(raw_tls, mark)
    (head,) = _heads_for(raw_tls, marker)
    assert head.method == "POST" and head.body == payload
    framing = head.header("content-length") + head.header("transfer-encoding")
    assert len(framing) == 1, head.headers  # exactly one framing header
    (rec,) = [r for r in gw.audit() if r["path"] == marker]
    assert rec["decision"] == "allow" and rec["bytes_in"] == len(payload)


@pytest.mark.parametrize("payload", SMUGGLED[:2], ids=SMUGGLE_IDS[:2])
def test_curl_http2_stdin_to_aiohttp_upstream(gw: Gateway, upstream: Upstream, tok: str,
                                              payload: bytes) -> None:
    before = len(upstream.seen)
    code, body, version, err = _curl_h2_stdin(
        gw, f"https://localhost:{upstream.https_port}/allowed/aio", tok, payload)
    assert code == 200 and version == "2", (code, err, body[:300])
    time.sleep(0.3)
    seen = upstream.seen[before:]
    assert [(s["method"], s["path"], s["body_len"]) for s in seen] == [
        ("POST", "/allowed/aio", len(payload))]


@pytest.mark.parametrize("te", [False, True], ids=["no-te", "te-trailers"])
@pytest.mark.parametrize("frames", [1, 3], ids=["one-frame", "three-frames"])
def test_h2_body_without_length_to_http1(gw: Gateway, raw_tls: RawH1, tok: str, te: bool,
                                         frames: int) -> None:
    mark = _mark(raw_tls)
    marker = f"/allowed/h2-{int(te)}-{frames}"
    body = SMUGGLED[0] * 3
    with H2Client(gw.proxy_port, f"127.0.0.1:{raw_tls.port}", tok, gw.ca) as c:
        sid = c.start("POST", marker, [("te", "trailers")] if te else [])
        step = -(-len(body) // frames)
        for i in range(0, len(body), step):
            c.data(sid, body[i:i + step], end=i + step >= len(body))
        r = c.wait(sid)
    assert r.status == 200 and r.ended, r
    assert r.json()["body_len"] == len(body)
    _no_smuggling(raw_tls, mark)
    (head,) = _heads_for(raw_tls, marker)
    assert head.body == body and head.header("transfer-encoding") == ["chunked"]
    assert head.header("content-length") == []


def test_h2_empty_data_frame_does_not_end_the_body(gw: Gateway, raw_tls: RawH1,
                                                   tok: str) -> None:
    """An empty DATA frame mid-stream would be ``0\\r\\n\\r\\n`` in chunked: the end."""
    mark = _mark(raw_tls)
    marker = "/allowed/h2-empty-frame"
    with H2Client(gw.proxy_port, f"127.0.0.1:{raw_tls.port}", tok, gw.ca) as c:
        sid = c.start("POST", marker)
        c.data(sid, b"first ")
        c.data(sid, b"")
        c.data(sid, b"")
        c.data(sid, SMUGGLED[0], end=True)
        r = c.wait(sid)
    assert r.status == 200, r
    _no_smuggling(raw_tls, mark)
    (head,) = _heads_for(raw_tls, marker)
    assert head.body == b"first " + SMUGGLED[0]


@pytest.mark.parametrize(("method", "framing"), [
    ("GET", []), ("POST", [("content-length", "0")]), ("PUT", [("content-length", "0")])])
def test_h2_no_body_to_http1(gw: Gateway, raw_tls: RawH1, tok: str, method: str,
                             framing: list) -> None:
    """END_STREAM on the HEADERS frame: no body, and a body-bearing method says so."""
    mark = _mark(raw_tls)
    marker = f"/allowed/h2-nobody-{method}"
    with H2Client(gw.proxy_port, f"127.0.0.1:{raw_tls.port}", tok, gw.ca) as c:
        sid = c.start(method, marker, end=True)
        r = c.wait(sid)
    assert r.status == 200 and r.ended, r
    _no_smuggling(raw_tls, mark)
    (head,) = _heads_for(raw_tls, marker)
    assert head.body == b"" and [
        (n, v) for n, v in head.headers
        if n.lower() in ("content-length", "transfer-encoding")] == framing


def test_h2_body_with_length_to_http1(gw: Gateway, raw_tls: RawH1, tok: str) -> None:
    mark = _mark(raw_tls)
    marker = "/allowed/h2-with-length"
    body = SMUGGLED[1]
    with H2Client(gw.proxy_port, f"127.0.0.1:{raw_tls.port}", tok, gw.ca) as c:
        sid = c.start("POST", marker, [("content-length", str(len(body)))])
        c.data(sid, body, end=True)
        r = c.wait(sid)
    assert r.status == 200, r
    _no_smuggling(raw_tls, mark)
    (head,) = _heads_for(raw_tls, marker)
    assert head.body == body and head.header("content-length") == [str(len(body))]
    assert head.header("transfer-encoding") == []


@pytest.mark.parametrize("length", [False, True], ids=["no-length-streamed", "length-held"])
def test_h2_request_trailers_to_http1(gw: Gateway, raw_tls: RawH1, tok: str,
                                      length: bool) -> None:
    """Request trailers go in the last chunk (a body held whole, with its length, is
    sent chunked too); framing, routing and credential fields in them are dropped."""
    mark = _mark(raw_tls)
    marker = f"/allowed/h2-req-trailers-{int(length)}"
    body = SMUGGLED[0]
    extra = [("te", "trailers")] + ([("content-length", str(len(body)))] if length else [])
    with H2Client(gw.proxy_port, f"127.0.0.1:{raw_tls.port}", tok, gw.ca) as c:
        sid = c.start("POST", marker, extra)
        c.data(sid, body)
        c.trailers(sid, [("x-checksum", "abc"), ("content-length", "0"),
                         ("proxy-authorization", basic(tok)), ("host", "evil.test")])
        r = c.wait(sid)
    assert r.status == 200, r
    _no_smuggling(raw_tls, mark)
    (head,) = _heads_for(raw_tls, marker)
    assert head.body == body
    assert head.header("transfer-encoding") == ["chunked"]
    assert head.header("content-length") == []
    assert head.trailers == [("x-checksum", "abc")]


@pytest.mark.parametrize("te", [False, True], ids=["no-te", "te-trailers"])
@pytest.mark.parametrize("trailers", [False, True], ids=["no-trailers", "trailers"])
def test_h2_body_without_length_to_http2(gw: Gateway, h2_up: H2Upstream, tok: str,
                                         te: bool, trailers: bool) -> None:
    path = f"/allowed/h2h2-{int(te)}-{int(trailers)}"
    body = SMUGGLED[1] * 2
    with H2Client(gw.proxy_port, f"127.0.0.1:{h2_up.port}", tok, gw.ca) as c:
        sid = c.start("POST", path, [("te", "trailers")] if te else [])
        c.data(sid, body, end=not trailers)
        if trailers:
            c.trailers(sid, [("x-checksum", "abc"), ("proxy-authorization", basic(tok))])
        r = c.wait(sid)
    assert r.status == 200 and r.ended, r
    got = r.json()
    assert got["body_len"] == len(body) and got["path"] == path
    assert got["trailers"] == ([["x-checksum", "abc"]] if trailers else [])


def _raw_tls(gw: Gateway, port: int, token: str, alpn: list[str] | None) -> ssl.SSLSocket:
    t = Tunnel(gw.proxy_port, f"127.0.0.1:{port}", token)
    assert t.connect.status == 200
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    s = ctx.wrap_socket(t.sock, server_hostname="127.0.0.1")
    s.settimeout(10)
    return s


class _Bounded:
    """Reads from a socket with one deadline for the whole message; EOF is an error."""

    def __init__(self, s: socket.socket, timeout: float = 15) -> None:
        self.s, self.buf = s, b""
        self.deadline = time.monotonic() + timeout

    def more(self) -> None:
        assert time.monotonic() < self.deadline, ("no complete answer in time", self.buf[:200])
        data = self.s.recv(65536)
        assert data, ("the gateway closed the connection", self.buf[:200])
        self.buf += data

    def until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self.more()
        out, _, self.buf = self.buf.partition(sep)
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _read_http1(s: socket.socket) -> tuple[bytes, bytes, list[bytes]]:
    """Status line+headers, the de-chunked body and the raw trailer lines (bounded)."""
    r = _Bounded(s)
    head = r.until(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return head, r.exact(length), []
    body, trailers = b"", []
    while size := int(r.until(b"\r\n").split(b";")[0], 16):
        body += r.exact(size)
        assert r.exact(2) == b"\r\n"
    while line := r.until(b"\r\n"):
        trailers.append(line)
    return head, body, trailers


@pytest.mark.parametrize(("chunked", "trailers"), [(False, False), (True, False), (True, True)],
                         ids=["length", "chunked", "chunked-trailers"])
def test_http1_client_to_http2_upstream(gw: Gateway, h2_up: H2Upstream, tok: str,
                                        chunked: bool, trailers: bool) -> None:
    """An HTTP/1.1 agent (ALPN http/1.1 first, h2 second: mitmproxy offers both
    upstream) reaches an HTTP/2-only upstream with its whole body."""
    s = _raw_tls(gw, h2_up.port, tok, ["http/1.1", "h2"])
    assert s.selected_alpn_protocol() == "http/1.1"
    path = f"/allowed/h1h2-{int(chunked)}-{int(trailers)}"
    framed = (b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n"
              + (b"X-Checksum: abc\r\n" if trailers else b"") + b"\r\n"
              ) if chunked else b"Content-Length: 11\r\n\r\nhello world"
    with s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{h2_up.port}\r\n".encode()
                  + framed)
        head, body, _ = _read_http1(s)
    assert head.startswith(b"HTTP/1.1 200"), head
    (req,) = [r for r in h2_up.requests if r["path"] == path]
    assert req["body"] == b"hello world"
    assert req["trailers"] == ([("x-checksum", "abc")] if trailers else [])


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_http1_client_to_http1_upstream_one_framing(gw: Gateway, raw_tls: RawH1, tok: str,
                                                     chunked: bool) -> None:
    mark = _mark(raw_tls)
    marker = f"/allowed/h1h1-{int(chunked)}"
    s = _raw_tls(gw, raw_tls.port, tok, ["http/1.1"])
    body = SMUGGLED[0]
    framed = (b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nX-Checksum: abc\r\n\r\n"
              % (len(body), body)) if chunked else (
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with s:
        s.sendall(f"POST {marker} HTTP/1.1\r\nHost: 127.0.0.1:{raw_tls.port}\r\n".encode()
                  + framed)
        head, got, _ = _read_http1(s)
    assert head.startswith(b"HTTP/1.1 200"), head
    _no_smuggling(raw_tls, mark)
    (h,) = _heads_for(raw_tls, marker)
    assert h.body == body
    assert len(h.header("content-length") + h.header("transfer-encoding")) == 1
    if chunked:  # an agent's chunked trailers used to raise inside mitmproxy
        assert h.trailers == [("x-checksum", "abc")]


def test_http1_transfer_coding_stays_named(gw: Gateway, raw_tls: RawH1, tok: str) -> None:
    """``gzip, chunked``: re-framed as plain chunked, the upstream would take the
    compressed bytes for the body itself."""
    marker = "/allowed/h1-gzip-chunked"
    s = _raw_tls(gw, raw_tls.port, tok, ["http/1.1"])
    coded = gzip.compress(b"payload " * 100)
    with s:
        s.sendall(f"POST {marker} HTTP/1.1\r\nHost: 127.0.0.1:{raw_tls.port}\r\n".encode()
                  + b"Transfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                  % (len(coded), coded))
        head, _, _ = _read_http1(s)
    assert head.startswith(b"HTTP/1.1 200"), head
    (h,) = _heads_for(raw_tls, marker)
    assert h.body == coded and h.header("transfer-encoding") == ["gzip, chunked"]
    assert h.header("content-length") == []


# -- bounded memory, no hang -------------------------------------------------------
def _hwm_kb(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    field = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
             if line.startswith(("VmRSS", "VmHWM"))}
    return field["VmRSS"], field["VmHWM"]


def test_large_h2_upload_streams_with_bounded_memory(gw: Gateway, raw_plain: RawH1,
                                                     raw_tls: RawH1, tok: str) -> None:
    size = 120 * 1024 * 1024
    assert gw.proc is not None
    rss0, hwm0 = _hwm_kb(gw.proc.pid)
    marker = "/allowed/big-upload"
    chunk = hashlib.sha256(b"x").digest() * 2048  # 64 KiB
    cmd = ["curl", "-sS", "--http2", "--max-time", "120", "-x", gw.proxy_url, "--proxy-user",
           f"agent:{tok}", "--cacert", str(gw.ca), "-X", "POST", "-T", "-", "-o", "/dev/null",
           "-w", "%{http_code} %{http_version}", f"https://127.0.0.1:{raw_tls.port}{marker}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=CLEAN_ENV)
    assert proc.stdin is not None
    digest = hashlib.sha256()
    for _ in range(size // len(chunk)):
        proc.stdin.write(chunk)
        digest.update(chunk)
    proc.stdin.close()
    proc.stdin = None  # communicate() would flush it
    out, err = proc.communicate(timeout=150)
    rss1, hwm1 = _hwm_kb(gw.proc.pid)
    print(f"\ngateway RSS before {rss0 // 1024} MB (peak {hwm0 // 1024} MB), after a "
          f"{size >> 20} MB h2 upload {rss1 // 1024} MB (peak {hwm1 // 1024} MB)")
    assert out.decode() == "200 2", (out, err)
    (head,) = _heads_for(raw_tls, marker)
    assert head.body_len == size and head.digest.hexdigest() == digest.hexdigest()
    assert head.header("transfer-encoding") == ["chunked"]
    assert hwm1 - hwm0 < 64 * 1024, (hwm0, hwm1)  # not the 120 MB body (nor 3x it)


@pytest.mark.parametrize("up", ["h2", "h1"])
def test_bidi_stream_does_not_hang(gw: Gateway, h2_up: H2Upstream, raw_tls: RawH1, tok: str,
                                   up: str) -> None:
    """Each message is echoed before the next is sent: buffered, the first never is."""
    port = h2_up.port if up == "h2" else raw_tls.port
    with H2Client(gw.proxy_port, f"127.0.0.1:{port}", tok, gw.ca) as c:
        sid = c.start("POST", f"/bidi/{up}", [("content-type", "application/grpc"),
                                              ("te", "trailers")])
        expected = b""
        for i in range(3):
            msg = f"message {i};".encode()
            c.data(sid, msg)
            expected += msg
            r = c.wait(sid, timeout=5, body_len=len(expected))
            assert r.body == expected, (i, r)
        c.end(sid)
        r = c.wait(sid)
    assert r.status == 200 and r.ended and not r.reset, r
    rec = [x for x in gw.audit() if x["path"] == f"/bidi/{up}"][-1]
    assert rec["decision"] == "allow" and rec["bytes_in"] == len(expected)


# -- item 15: trailers from an HTTP/1.1 upstream ---------------------------------------
TRAILER_SIZES = [0, 3 * 1024 * 1024]


@pytest.mark.parametrize("size", TRAILER_SIZES, ids=["small", "large"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_upstream_trailers_to_http1_client(gw: Gateway, raw_plain: RawH1, raw_tls: RawH1,
                                           tok: str, scheme: str, size: int) -> None:
    srv = raw_tls if scheme == "https" else raw_plain
    path = f"/trailers/h1-{scheme}?size={size}"
    if scheme == "https":
        s: socket.socket = _raw_tls(gw, srv.port, tok, ["http/1.1"])
        target = path
    else:
        s = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10)
        target = f"http://127.0.0.1:{srv.port}{path}"
    with s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n".encode()
                  + (b"Proxy-Authorization: " + basic(tok).encode() + b"\r\n"
                     if scheme == "http" else b"") + b"TE: trailers\r\n\r\n")
        head, body, trailers = _read_http1(s)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(body) > size and body.startswith(b'{"method": "GET"')
    assert [t.lower() for t in trailers] == [b"x-checksum: abc123", b"grpc-status: 0"]
    rid = [line.split(b": ")[1].decode() for line in head.split(b"\r\n")
           if line.lower().startswith(b"x-taskgate-request-id")][0]
    (rec,) = gw.records_for(rid)
    assert rec["decision"] == "allow" and rec["status"] == 200


@pytest.mark.parametrize("size", TRAILER_SIZES, ids=["small", "large"])
def test_upstream_trailers_to_http2_client(gw: Gateway, raw_tls: RawH1, tok: str,
                                           size: int) -> None:
    with H2Client(gw.proxy_port, f"127.0.0.1:{raw_tls.port}", tok, gw.ca) as c:
        sid = c.start("GET", f"/trailers/h2?size={size}", [("te", "trailers")], end=True)
        r = c.wait(sid, timeout=15)
    assert r.status == 200 and r.ended and not r.reset, r
    assert len(r.body) > size
    assert r.trailers == {"x-checksum": "abc123", "grpc-status": "0"}
    (rec,) = gw.records_for(r.request_id or "")
    assert rec["decision"] == "allow" and rec["status"] == 200


@pytest.mark.parametrize("client", ["httpx", "curl", "curl-h2"])
def test_upstream_trailers_common_clients(gw: Gateway, raw_tls: RawH1, tok: str,
                                          client: str) -> None:
    url = f"https://127.0.0.1:{raw_tls.port}/trailers/{client}?size=1000"
    if client == "httpx":
        with gw.client(tok) as c:
            r = c.get(url)
        status, body = r.status_code, r.content
    else:
        r2 = curl(gw, url, tok, *(["--http2"] if client == "curl-h2" else []), timeout=10)
        status, body = r2.status, r2.body
    assert status == 200 and body.startswith(b'{"method": "GET"') and len(body) > 1000


def test_gateway_healthy_after(gw: Gateway, raw_tls: RawH1, tok: str) -> None:
    assert httpx.get(f"{gw.control_url}/readyz", timeout=5).status_code == 200
    with gw.client(tok) as c:
        assert c.get(f"https://127.0.0.1:{raw_tls.port}/allowed/last").status_code == 200
    assert gw.proc is not None and gw.proc.poll() is None
    assert "Traceback" not in gw.output() and "NotImplementedError" not in gw.output()
    assert os.path.exists(gw.audit_path)


def test_a_tunnel_outlives_the_upstream_connections_it_used(gw: Gateway, raw_tls: RawH1,
                                                             tok: str) -> None:
    """An upstream closes each connection after its answer: the gateway drops the closed
    connection (its TLS state is not kept for the tunnel's life, addons/limits.py) and
    the next call on the same tunnel opens a new one."""
    s = _raw_tls(gw, raw_tls.port, tok, ["http/1.1"])
    try:
        for i in range(3):
            s.sendall(f"GET /allowed/closing-{i}?close=1 HTTP/1.1\r\n"
                      f"Host: 127.0.0.1:{raw_tls.port}\r\n\r\n".encode())
            head, body, _ = _read_http1(s)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert f"closing-{i}" in body.decode()
            time.sleep(0.3)  # the upstream's close reaches the gateway before the next call
    finally:
        s.close()
    assert len({h.conn for h in _heads_for(raw_tls, "/allowed/closing-")}) == 3
