"""The real gateway, real clients (httpx and curl), real upstreams: the request path.

Allowed and refused calls over plain HTTP proxying and HTTPS through CONNECT,
what reaches the upstream, the request id on every response, and exactly one
audit record per call with no token in it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from proxy.audit._log import FIELDS
from tests.conftest import base_config
from tests.e2e import assert_refusal, audit_text, curl
from tests.support import WORKLOAD, Gateway, Keys, Upstream
from tests.wire import Reply, Tunnel, basic, h2_request, request_bytes, send


def plain(upstream: Upstream, path: str = "/allowed/x") -> str:
    return f"http://127.0.0.1:{upstream.http_port}{path}"


def tls(upstream: Upstream, path: str = "/allowed/x") -> str:
    return f"https://localhost:{upstream.https_port}{path}"


# -- allowed ---------------------------------------------------------------------
@pytest.mark.parametrize("url", [plain, tls], ids=["http", "https"])
def test_allowed_httpx(gateway: Gateway, upstream: Upstream, token: str, url) -> None:
    with gateway.client(token) as c:
        r = c.get(url(upstream) + "?q=1")
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["path"] == "/allowed/x?q=1"
    assert seen["scheme"] == ("https" if url is tls else "http")
    rid = r.headers["x-taskgate-request-id"]
    (rec,) = gateway.records_for(rid)
    assert rec["decision"] == "allow" and rec["status"] == 200
    assert rec["rule"] == ("tls-read" if url is tls else "plain-read")
    assert rec["workload"] == WORKLOAD and rec["owner"] == "platform@acme.test"
    assert rec["path"] == "/allowed/x?q=REDACTED"


@pytest.mark.parametrize("url", [plain, tls], ids=["http", "https"])
def test_allowed_curl(gateway: Gateway, upstream: Upstream, token: str, url) -> None:
    r = curl(gateway, url(upstream), token)
    assert r.status == 200, (r.body, r.stderr)
    assert r.json()["path"] == "/allowed/x"
    (rec,) = gateway.records_for(r.headers["x-taskgate-request-id"])
    assert rec["decision"] == "allow" and rec["bytes_out"] == len(r.body)


def test_allowed_https_http2(gateway: Gateway, upstream: Upstream, token: str) -> None:
    """HTTP/2 from the agent inside the tunnel (the upstream speaks HTTP/1.1)."""
    host = f"localhost:{upstream.https_port}"

    def get(path: str) -> Reply:
        with Tunnel(gateway.proxy_port, host, token) as t:
            return h2_request(t, gateway.ca, "localhost", [
                (":method", "GET"), (":scheme", "https"), (":authority", host),
                (":path", path)])

    ok = get("/allowed/x")
    assert ok.status == 200 and ok.json()["path"] == "/allowed/x", ok.body
    assert len(gateway.records_for(ok.request_id)) == 1
    denied = get("/denied")
    assert_refusal(denied.status, denied.headers, denied.body, 403,
                   "no rule for this host allows this path")


def test_post_with_body_allowed_https(gateway: Gateway, upstream: Upstream,
                                      token: str) -> None:
    body = b"x" * 200_000
    with gateway.client(token) as c:
        r = c.post(tls(upstream, "/allowed/upload"), content=body)
    assert r.status_code == 200 and r.json()["body_len"] == len(body)
    (rec,) = gateway.records_for(r.headers["x-taskgate-request-id"])
    assert rec["bytes_in"] == len(body)


def test_keep_alive_mixes_allowed_and_refused(gateway: Gateway, upstream: Upstream,
                                             token: str) -> None:
    with gateway.client(token) as c:
        statuses = [c.get(tls(upstream, p)).status_code
                    for p in ("/allowed/1", "/nope", "/allowed/2", "/nope", "/allowed/3")]
    assert statuses == [200, 403, 200, 403, 200]


# -- refused by the rules ----------------------------------------------------------
@pytest.mark.parametrize("url", [plain, tls], ids=["http", "https"])
def test_outside_the_rule(gateway: Gateway, upstream: Upstream, token: str, url) -> None:
    before = len(upstream.seen)
    with gateway.client(token) as c:
        r = c.get(url(upstream, "/secret/x"))
    data = assert_refusal(r.status_code, r.headers, r.content, 403,
                          "no rule for this host allows this path")
    assert data["error"]["code"] == "forbidden"
    assert len(upstream.seen) == before
    (rec,) = gateway.records_for(data["request_id"])
    assert rec["decision"] == "deny" and rec["status"] == 403 and rec["rule"] is None
    assert rec["reason"] == data["reason"]


@pytest.mark.parametrize("url", [plain, tls], ids=["http", "https"])
def test_outside_the_rule_curl(gateway: Gateway, upstream: Upstream, token: str,
                               url) -> None:
    r = curl(gateway, url(upstream, "/secret/x"), token)
    assert_refusal(r.status, r.headers, r.body, 403, "no rule for this host allows this path")


@pytest.mark.parametrize(("url", "method"), [(plain, "POST"), (plain, "DELETE"),
                                             (tls, "DELETE"), (tls, "PUT")])
def test_wrong_method(gateway: Gateway, upstream: Upstream, token: str, url,
                      method: str) -> None:
    before = len(upstream.seen)
    with gateway.client(token) as c:
        r = c.request(method, url(upstream), content=b"{}")
    assert_refusal(r.status_code, r.headers, r.content, 403,
                   "no rule for this host and path allows this method")
    assert len(upstream.seen) == before


def test_wrong_method_curl(gateway: Gateway, upstream: Upstream, token: str) -> None:
    r = curl(gateway, tls(upstream), token, "-X", "DELETE")
    assert_refusal(r.status, r.headers, r.body, 403, "allows this method")


def test_wrong_port(gateway: Gateway, upstream: Upstream, token: str) -> None:
    with gateway.client(token) as c:
        r = c.get(f"http://127.0.0.1:{upstream.https_port}/allowed/x")
    assert_refusal(r.status_code, r.headers, r.content, 403,
                   "no rule for this host allows this port")


# -- what reaches the upstream ----------------------------------------------------------
def test_proxy_headers_absent_upstream_http(gateway: Gateway, upstream: Upstream,
                                            token: str) -> None:
    target = plain(upstream)
    reply = send(gateway.proxy_port, request_bytes(
        "GET", target, f"127.0.0.1:{upstream.http_port}", token,
        extra=b"Proxy-Connection: keep-alive\r\nX-Keep: 1\r\n"))
    assert reply.status == 200, reply.body
    seen = {k.lower() for k in reply.json()["headers"]}
    assert "x-keep" in seen
    assert "proxy-authorization" not in seen and "proxy-connection" not in seen


def test_proxy_headers_absent_upstream_https(gateway: Gateway, upstream: Upstream,
                                             token: str) -> None:
    """Inside the tunnel too, even when the agent repeats them on the inner request."""
    host = f"localhost:{upstream.https_port}"
    with Tunnel(gateway.proxy_port, host, token) as t:
        t.start_tls(gateway.ca, "localhost")
        reply = t.request(request_bytes(
            "GET", "/allowed/x", host, None,
            extra=(f"Proxy-Authorization: {basic(token)}\r\n"
                   "Proxy-Connection: keep-alive\r\n").encode()))
    assert reply.status == 200, reply.body
    seen = {k.lower() for k in reply.json()["headers"]}
    assert "proxy-authorization" not in seen and "proxy-connection" not in seen
    with gateway.client(token) as c:
        r = c.get(tls(upstream))
    assert "proxy-authorization" not in {k.lower() for k in r.json()["headers"]}


# -- the request id on every response -------------------------------------------------
def test_request_id_on_every_response(gateway: Gateway, upstream: Upstream,
                                      token: str) -> None:
    https_target = f"localhost:{upstream.https_port}"
    replies = {
        "allowed http": send(gateway.proxy_port, request_bytes(
            "GET", plain(upstream), f"127.0.0.1:{upstream.http_port}", token)),
        "403 http": send(gateway.proxy_port, request_bytes(
            "GET", plain(upstream, "/nope"), f"127.0.0.1:{upstream.http_port}", token)),
        "407 http": send(gateway.proxy_port, request_bytes(
            "GET", plain(upstream), f"127.0.0.1:{upstream.http_port}", None)),
    }
    with Tunnel(gateway.proxy_port, https_target, token) as t:
        replies["CONNECT 200"] = t.connect
        t.start_tls(gateway.ca, "localhost")
        replies["allowed https"] = t.request(request_bytes("GET", "/allowed/x",
                                                           https_target, None))
        replies["403 https"] = t.request(request_bytes("GET", "/nope", https_target, None))
    with Tunnel(gateway.proxy_port, "nowhere.example:443", token) as t:
        replies["CONNECT 403"] = t.connect
    with Tunnel(gateway.proxy_port, https_target, None) as t:
        replies["CONNECT 407"] = t.connect
    ids = {name: r.request_id for name, r in replies.items()}
    assert all(ids.values()), ids
    assert len(set(ids.values())) == len(ids)
    for name, r in replies.items():
        if r.status >= 400:
            assert r.json()["request_id"] == r.request_id, name
    for name in ("CONNECT 403", "CONNECT 407", "403 http", "407 http", "403 https"):
        assert len(gateway.records_for(ids[name])) == 1, name


# -- the audit log ----------------------------------------------------------------
def test_one_audit_line_per_call_and_no_token(gateway: Gateway, upstream: Upstream,
                                             keys: Keys) -> None:
    good = keys.token()
    expired = keys.token(ttl=-300)
    wrong_aud = keys.token(aud="other")
    before = len(gateway.audit())
    ids = []
    with gateway.client(good) as c:
        for url in (plain(upstream), plain(upstream, "/nope?key=hunter2"), tls(upstream),
                    tls(upstream, "/nope"), tls(upstream, "/allowed/x?token=" + good)):
            ids.append(c.get(url).headers["x-taskgate-request-id"])
    for bad in (expired, wrong_aud):
        with gateway.client(bad) as c:
            ids.append(c.get(plain(upstream)).headers["x-taskgate-request-id"])
            with pytest.raises(httpx.ProxyError):
                c.get(tls(upstream))
    ids.append(curl(gateway, tls(upstream), good).headers["x-taskgate-request-id"])
    records = gateway.audit()
    # 8 calls answered + 2 CONNECTs refused with 407
    assert len(records) - before == 10
    for rid in ids:
        assert len(gateway.records_for(rid)) == 1, rid
    text = audit_text(gateway) + gateway.output()
    for secret in (good, expired, wrong_aud, "hunter2"):
        assert secret not in text
    assert good.split(".")[2] not in text  # not even the signature part
    for rec in records:
        assert list(rec) == list(FIELDS)


def test_audit_record_fields(gateway: Gateway, upstream: Upstream, token: str) -> None:
    with gateway.client(token) as c:
        r = c.get(tls(upstream, "/allowed/fields?a=1&b"))
    (rec,) = gateway.records_for(r.headers["x-taskgate-request-id"])
    assert rec["ts"].endswith("Z") and rec["seq"] >= 1 and len(rec["hash"]) == 64
    assert rec["client"] == "127.0.0.1"
    assert (rec["method"], rec["scheme"], rec["host"], rec["port"]) == (
        "GET", "https", "localhost", upstream.https_port)
    assert rec["path"] == "/allowed/fields?a=REDACTED&REDACTED"
    assert rec["decision"] == "allow" and rec["rule"] == "tls-read"
    assert rec["status"] == 200 and rec["bytes_in"] == 0
    assert rec["bytes_out"] == len(r.content) and rec["duration_ms"] >= 0
    assert rec["task"] is None and rec["tool"] is None and rec["secret"] is None


def test_407_record_fields(gateway: Gateway, upstream: Upstream, keys: Keys) -> None:
    with gateway.client(keys.token(aud="nope")) as c:
        r = c.get(f"http://127.1:{upstream.http_port}/allowed/x?k=v")
    data = assert_refusal(r.status_code, r.headers, r.content, 407, "audience")
    (rec,) = gateway.records_for(data["request_id"])
    assert rec["decision"] == "deny" and rec["status"] == 407
    assert rec["reason"] == data["reason"]
    assert rec["workload"] is None and rec["owner"] is None
    assert (rec["method"], rec["scheme"], rec["host"], rec["port"], rec["path"]) == (
        "GET", "http", "127.0.0.1", upstream.http_port, "/allowed/x?k=REDACTED")
    assert rec["bytes_out"] == len(r.content)


def test_connect_407_record_fields(gateway: Gateway, upstream: Upstream) -> None:
    with Tunnel(gateway.proxy_port, f"LOCALHOST.:{upstream.https_port}", None) as t:
        reply = t.connect
    data = assert_refusal(reply.status, reply.headers, reply.body, 407, "no proxy credential")
    (rec,) = gateway.records_for(data["request_id"])
    assert (rec["method"], rec["scheme"], rec["host"], rec["port"], rec["path"]) == (
        "CONNECT", None, "localhost", upstream.https_port, None)
    assert rec["decision"] == "challenge" and rec["status"] == 407  # no credential shown
    assert rec["bytes_out"] == len(reply.body)


# -- upstream TLS ------------------------------------------------------------------
def test_upstream_with_an_untrusted_certificate_is_refused(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream, token: str) -> None:
    """Without upstream.ca_file the test CA is not trusted: the gateway's TLS handshake
    with the upstream fails, so no request (and no secret) ever reaches it."""
    cfg = base_config(shared_files, upstream)
    del cfg["upstream"]
    gw = Gateway(tmp_path, cfg).start()
    try:
        before = len(upstream.seen)
        with gw.client(token) as c:
            r = c.get(tls(upstream))
        assert r.status_code == 502, r.text
        assert len(upstream.seen) == before
        (rec,) = [x for x in gw.audit() if x["path"] == "/allowed/x"]
        assert rec["decision"] == "error" and "certificate" in rec["reason"].lower(), rec
    finally:
        gw.stop()
