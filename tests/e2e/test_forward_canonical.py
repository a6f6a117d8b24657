"""What the gateway judges is what it forwards (real gateway, raw HTTP/1 and HTTP/2).

* the host: judged canonical, forwarded canonical (Host, :authority, the target);
* the method: judged upper-case; a method not written upper-case is refused (400),
  never forwarded as written nor silently rewritten (methods are case-sensitive);
* header values: one with a control character other than HTAB is refused (400).
"""

from __future__ import annotations

import itertools

import pytest

from tests.e2e import assert_refusal
from tests.support import Gateway, Upstream
from tests.wire import Reply, Tunnel, h2_request, request_bytes, send

_n = itertools.count()


def unique(prefix: str) -> str:
    return f"/allowed/{prefix}-{next(_n)}"


def seen(up: Upstream, path: str) -> list[dict]:
    return [s for s in up.seen if s["path"] == path]


def plain(gw: Gateway, token: str, method: str, host: str, port: int, path: str,
          extra: bytes = b"") -> Reply:
    target = f"{host}:{port}"
    return send(gw.proxy_port, request_bytes(method, f"http://{target}{path}", target, token,
                                             extra))


def tunnel(gw: Gateway, token: str, method: str, host: str, port: int, path: str,
           extra: bytes = b"", absolute: bool = False) -> Reply:
    target = f"localhost:{port}"
    with Tunnel(gw.proxy_port, target, token) as t:
        assert t.connect.status == 200, t.connect.body
        t.start_tls(gw.ca, "localhost")
        hostport = f"{host}:{port}"
        line = f"https://{hostport}{path}" if absolute else path
        return t.request(request_bytes(method, line, hostport, None, extra), method)


def h2(gw: Gateway, token: str, headers: list[tuple[str, str]], port: int) -> Reply:
    with Tunnel(gw.proxy_port, f"localhost:{port}", token) as t:
        assert t.connect.status == 200
        return h2_request(t, gw.ca, "localhost", headers)


# -- the host ------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["127.0.0.1.", "127.1", "0x7f.0.0.1", "2130706433",
                                      "0177.0.0.1", "127.0.1"])
def test_plain_proxy_forwards_the_canonical_host(gateway: Gateway, upstream: Upstream,
                                                 token: str, spelling: str) -> None:
    path = unique("host-plain")
    rep = plain(gateway, token, "GET", spelling, upstream.http_port, path)
    assert rep.status == 200, rep.body
    (got,) = seen(upstream, path)
    assert got["headers"]["Host"] == f"127.0.0.1:{upstream.http_port}"


@pytest.mark.parametrize("spelling", ["LOCALHOST", "localhost.", "LocalHost.", "LOCALHOST."])
@pytest.mark.parametrize("absolute", [False, True], ids=["origin-form", "absolute-form"])
def test_tunnel_forwards_the_canonical_host(gateway: Gateway, upstream: Upstream, token: str,
                                            spelling: str, absolute: bool) -> None:
    path = unique("host-tunnel")
    rep = tunnel(gateway, token, "GET", spelling, upstream.https_port, path, absolute=absolute)
    assert rep.status == 200, rep.body
    (got,) = seen(upstream, path)
    assert got["headers"]["Host"] == f"localhost:{upstream.https_port}"


@pytest.mark.parametrize("spelling", ["LOCALHOST", "localhost.", "LocalHost."])
def test_h2_forwards_the_canonical_authority(gateway: Gateway, upstream: Upstream, token: str,
                                             spelling: str) -> None:
    path = unique("host-h2")
    rep = h2(gateway, token, [(":method", "GET"), (":scheme", "https"),
                              (":authority", f"{spelling}:{upstream.https_port}"),
                              (":path", path)], upstream.https_port)
    assert rep.status == 200, rep.body
    (got,) = seen(upstream, path)
    assert got["headers"]["Host"] == f"localhost:{upstream.https_port}"


# -- the method -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["get", "Get", "gET", "post", "hEAD"])
@pytest.mark.parametrize("form", ["plain", "tunnel"])
def test_a_method_not_upper_case_is_refused(gateway: Gateway, upstream: Upstream, token: str,
                                            method: str, form: str) -> None:
    path = unique("method")
    if form == "plain":
        rep = plain(gateway, token, method, "127.0.0.1", upstream.http_port, path)
    else:
        rep = tunnel(gateway, token, method, "localhost", upstream.https_port, path)
    data = assert_refusal(rep.status, rep.headers, rep.body, 400, "not upper-case")
    assert repr(method.upper()) in data["reason"]
    assert seen(upstream, path) == []
    (rec,) = gateway.records_for(data["request_id"])
    assert rec["decision"] == "deny" and rec["status"] == 400


@pytest.mark.parametrize("method", ["get", "Get"])
def test_h2_method_not_upper_case_is_refused(gateway: Gateway, upstream: Upstream,
                                             token: str, method: str) -> None:
    path = unique("method-h2")
    rep = h2(gateway, token, [(":method", method), (":scheme", "https"),
                              (":authority", f"localhost:{upstream.https_port}"),
                              (":path", path)], upstream.https_port)
    assert rep.status == 400, rep.body
    assert seen(upstream, path) == []


# -- control characters in header values ----------------------------------------------------
CONTROL = [b"a\x00b", b"\x01", b"x\x1b[31mred", b"del\x7f", b"v\x0bt", b"f\x0cf", b"\x08"]


@pytest.mark.parametrize("value", CONTROL, ids=[repr(v) for v in CONTROL])
@pytest.mark.parametrize("form", ["plain", "tunnel"])
def test_a_control_character_in_a_header_value_is_refused(
        gateway: Gateway, upstream: Upstream, token: str, value: bytes, form: str) -> None:
    path = unique("ctl")
    extra = b"X-Note: " + value + b"\r\n"
    if form == "plain":
        rep = plain(gateway, token, "GET", "127.0.0.1", upstream.http_port, path, extra)
    else:
        rep = tunnel(gateway, token, "GET", "localhost", upstream.https_port, path, extra)
    assert_refusal(rep.status, rep.headers, rep.body, 400, "control character")
    assert seen(upstream, path) == []


@pytest.mark.parametrize("form", ["plain", "tunnel"])
def test_a_tab_in_a_header_value_is_forwarded(gateway: Gateway, upstream: Upstream,
                                              token: str, form: str) -> None:
    path = unique("tab")
    extra = b"X-Note: a\tb\r\n"
    if form == "plain":
        rep = plain(gateway, token, "GET", "127.0.0.1", upstream.http_port, path, extra)
    else:
        rep = tunnel(gateway, token, "GET", "localhost", upstream.https_port, path, extra)
    assert rep.status == 200, rep.body
    (got,) = seen(upstream, path)
    assert got["headers"]["X-Note"] == "a\tb"


@pytest.mark.parametrize(("value", "statuses"), [
    ("\x01", {400}), ("x\x1b[0m", {400}), ("del\x7f", {400}), ("v\x0bt", {400}),
    # NUL, CR and LF are malformed HTTP/2 (RFC 9113 8.2.1): the h2 layer resets the
    # stream itself (no status), or taskgate refuses; never forwarded either way.
    ("a\x00b", {0, 400}), ("a\rb", {0, 400}), ("a\nX-Injected: 1", {0, 400}),
])
def test_h2_control_character_in_a_header_value_is_refused(
        gateway: Gateway, upstream: Upstream, token: str, value: str,
        statuses: set[int]) -> None:
    path = unique("ctl-h2")
    rep = h2(gateway, token, [(":method", "GET"), (":scheme", "https"),
                              (":authority", f"localhost:{upstream.https_port}"),
                              (":path", path), ("x-note", value)], upstream.https_port)
    assert rep.status in statuses, (rep.status, rep.body)
    if rep.status == 400:
        assert_refusal(rep.status, rep.headers, rep.body, 400, "control character")
    assert seen(upstream, path) == []




def h2_with_trailers(gw: Gateway, token: str, port: int, path: str,
                     trailers: list[tuple[str, str]]) -> int:
    """POST with a 5-byte body and trailers over HTTP/2; the status (0: stream reset)."""
    import ssl

    import h2.config
    import h2.connection
    import h2.events

    with Tunnel(gw.proxy_port, f"localhost:{port}", token) as t:
        ctx = ssl.create_default_context(cafile=str(gw.ca))
        ctx.set_alpn_protocols(["h2"])
        sock = ctx.wrap_socket(t.sock, server_hostname="localhost")
        t.sock = sock
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "https"),
                              (":authority", f"localhost:{port}"), (":path", path),
                              ("content-length", "5")])
        conn.send_data(1, b"hello")
        conn.send_headers(1, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        sock.settimeout(10)
        status = 0
        for _ in range(100):
            data = sock.recv(65536)
            if not data:
                break
            events = conn.receive_data(data)
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[":status"])
            sock.sendall(conn.data_to_send())
            if any(isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset,
                                   h2.events.ConnectionTerminated)) for ev in events):
                break
        return status


@pytest.mark.parametrize(("value", "statuses"), [
    ("a\x01b", {400}), ("x\x1b[0m", {400}), ("del\x7f", {400}),
    ("a\x00b", {0, 400}),  # malformed HTTP/2: reset by the h2 layer, or refused
    ("fine", {200}),
])
def test_h2_request_trailers_are_held_to_the_header_rule(
        gateway: Gateway, upstream: Upstream, token: str, value: str,
        statuses: set[int]) -> None:
    path = unique("trailer-h2")
    status = h2_with_trailers(gateway, token, upstream.https_port, path, [("x-t", value)])
    assert status in statuses
    assert len(seen(upstream, path)) == (1 if status == 200 else 0)
