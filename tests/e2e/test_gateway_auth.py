"""Who is calling, end to end: every bad credential is a 407 that says why.

Each case over plain HTTP proxying (the 407 answers the request) and at
CONNECT (the tunnel is never opened), with a record and nothing upstream.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable

import jwt
import pytest

from tests.e2e import assert_refusal, curl
from tests.support import (
    Gateway,
    Keys,
    Upstream,
    claims,
    hs256_token,
    raw_signed_token,
    unsigned_token,
)
from tests.wire import Reply, read_reply, request_bytes, send


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def plain_call(gateway: Gateway, upstream: Upstream, authorization: str | None,
               extra: bytes = b"") -> Reply:
    head = extra
    if authorization is not None:
        head = f"Proxy-Authorization: {authorization}\r\n".encode() + head
    return send(gateway.proxy_port, request_bytes(
        "GET", f"http://127.0.0.1:{upstream.http_port}/allowed/x",
        f"127.0.0.1:{upstream.http_port}", None, extra=head))


def connect_call(gateway: Gateway, upstream: Upstream, authorization: str | None,
                 extra: bytes = b"") -> Reply:
    target = f"localhost:{upstream.https_port}"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode()
    if authorization is not None:
        head += f"Proxy-Authorization: {authorization}\r\n".encode()
    with socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=10) as s:
        s.sendall(head + extra + b"\r\n")
        return read_reply(s, "CONNECT")


TRANSPORTS = {"http": plain_call, "connect": connect_call}


def check_407(gateway: Gateway, upstream: Upstream, reply: Reply, reason: str,
              seen_before: int, decision: str = "deny") -> None:
    data = assert_refusal(reply.status, reply.headers, reply.body, 407, reason)
    assert data["error"]["code"] == "proxy_authentication_required"
    assert len(upstream.seen) == seen_before
    (rec,) = gateway.records_for(data["request_id"])
    assert rec["status"] == 407 and rec["decision"] == decision
    assert rec["workload"] is None and rec["reason"] == data["reason"]


# -- missing and malformed Proxy-Authorization ------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_token(gateway: Gateway, upstream: Upstream, transport: str) -> None:
    before = len(upstream.seen)
    reply = TRANSPORTS[transport](gateway, upstream, None)
    # No credential at all: a challenge (git and libcurl ask first), not a denial.
    check_407(gateway, upstream, reply, "no proxy credential", before, "challenge")


def test_no_token_httpx(gateway: Gateway, upstream: Upstream) -> None:
    with gateway.client(None) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
    assert_refusal(r.status_code, r.headers, r.content, 407, "no proxy credential")


def test_no_token_curl(gateway: Gateway, upstream: Upstream) -> None:
    r = curl(gateway, f"http://127.0.0.1:{upstream.http_port}/allowed/x", None)
    assert_refusal(r.status, r.headers, r.body, 407, "no proxy credential")
    https = curl(gateway, f"https://localhost:{upstream.https_port}/allowed/x", None)
    # curl reports a refused CONNECT as its own failure; the 407 headers are in its dump
    assert "CONNECT tunnel failed, response 407" in https.stderr
    assert https.headers["proxy-authenticate"] == 'Basic realm="taskgate"'
    assert https.headers["x-taskgate-request-id"]


MALFORMED = {
    "not base64": ("Basic !!!not-base64!!!", "malformed Basic"),
    "no password": ("Basic " + _b64(b"agent"), "has no password"),
    "empty password": ("Basic " + _b64(b"agent:"), "empty proxy credential"),
    "not utf-8": ("Basic " + _b64(b"agent:\xff\xfe"), "malformed Basic"),
    "unknown scheme": ("Digest username=agent", "use Basic or Bearer"),
    "bare token": ("eyJhbGciOiJSUzI1NiJ9.e30.x", "use Basic or Bearer"),
    "bearer, not a JWT": ("Bearer not-a-jwt", "not a well-formed JWT"),
    "basic, not a JWT": ("Basic " + _b64(b"agent:hunter2"), "not a well-formed JWT"),
    "folded headers": ("Bearer a.b.c, Bearer d.e.f", "malformed proxy credential"),
    "overlong": ("Bearer " + "a" * 20000, "too long"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_proxy_authorization(gateway: Gateway, upstream: Upstream,
                                       transport: str, case: str) -> None:
    value, reason = MALFORMED[case]
    before = len(upstream.seen)
    reply = TRANSPORTS[transport](gateway, upstream, value)
    check_407(gateway, upstream, reply, reason, before)
    assert "hunter2" not in reply.body.decode()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_proxy_authorization_headers(gateway: Gateway, upstream: Upstream, keys: Keys,
                                         transport: str) -> None:
    """Two credentials, even two valid ones: which one would count? Neither."""
    good = f"Bearer {keys.token()}"
    before = len(upstream.seen)
    reply = TRANSPORTS[transport](gateway, upstream, good,
                                  extra=f"Proxy-Authorization: {good}\r\n".encode())
    check_407(gateway, upstream, reply, "more than one Proxy-Authorization", before)


# -- tokens that do not verify ---------------------------------------------------------
def _raw(keys: Keys, exp: str | None = None, extra: str = "") -> str:
    """A signed token whose claims JSON is written by hand (see raw_signed_token)."""
    c = claims()
    exp_text = exp if exp is not None else str(c["exp"])
    payload = (f'{{"sub":"{c["sub"]}","aud":"{c["aud"]}","iss":"{c["iss"]}",'
               f'"iat":{c["iat"]},"exp":{exp_text}{extra}}}')
    return raw_signed_token(keys.rsa, '{"alg":"RS256","kid":"rsa1"}', payload)



BAD_TOKENS: dict[str, tuple[Callable[[Keys], str], str]] = {
    "expired": (lambda k: k.token(ttl=-120), "token has expired"),
    "not yet valid": (lambda k: k.token(nbf=time.time() + 600), "not valid yet"),
    "wrong audience": (lambda k: k.token(aud="another-gateway"),
                       "audience does not name this gateway"),
    "wrong issuer": (lambda k: k.token(iss="https://evil.test"), "issuer is not trusted"),
    "unknown kid": (lambda k: k.token(kid="not-in-jwks"),
                    "signed with a key this issuer does not publish"),
    "other key, known kid": (lambda k: k.token(key=k.other), "signature does not verify"),
    "alg none": (lambda k: unsigned_token(claims(), {"alg": "none", "kid": "rsa1"}),
                 "algorithm 'none' is not accepted"),
    "HS256 with the RSA public key": (
        lambda k: hs256_token(claims(), {"kid": "rsa1"}, k.rsa_public_pem()),
        "algorithm 'HS256' is not accepted"),
    "ES256 claimed for the RSA key": (lambda k: k.token(alg="ES256", kid="rsa1"),
                                      "is not accepted for this key"),
    "no exp": (lambda k: jwt.encode({key: v for key, v in claims().items() if key != "exp"},
                                    k.rsa, algorithm="RS256", headers={"kid": "rsa1"}),
               "lacks the 'exp' claim"),
    # Validly signed, read strictly (RFC 7519 types, one value per claim).
    "exp as a string": (lambda k: _raw(k, exp='"4102444800"'), "'exp' is not a NumericDate"),
    "exp 1e30": (lambda k: _raw(k, exp="1e30"), "'exp' is out of range"),
    "duplicate sub": (lambda k: _raw(k, extra=',"sub":"spiffe://acme.test/agent/admin"'),
                      "repeats the 'sub'"),
    "duplicate exp": (lambda k: _raw(k, extra=',"exp":4102444800'), "repeats the 'exp'"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", BAD_TOKENS)
def test_bad_token(gateway: Gateway, upstream: Upstream, keys: Keys, transport: str,
                   case: str) -> None:
    make, reason = BAD_TOKENS[case]
    token = make(keys)
    before = len(upstream.seen)
    value = "Basic " + _b64(f"agent:{token}".encode())
    reply = TRANSPORTS[transport](gateway, upstream, value)
    check_407(gateway, upstream, reply, reason, before)
    assert token not in gateway.output()


@pytest.mark.parametrize("case", ["expired", "alg none", "HS256 with the RSA public key"])
def test_bad_token_curl(gateway: Gateway, upstream: Upstream, keys: Keys, case: str) -> None:
    token = BAD_TOKENS[case][0](keys)
    r = curl(gateway, f"http://127.0.0.1:{upstream.http_port}/allowed/x", token)
    assert_refusal(r.status, r.headers, r.body, 407, BAD_TOKENS[case][1])


def test_bearer_and_colon_password(gateway: Gateway, upstream: Upstream, keys: Keys) -> None:
    """The accepted spellings: Bearer, and Basic with any user name."""
    token = keys.token()
    for value in (f"Bearer {token}", "Basic " + _b64(f"task-1:{token}".encode()),
                  "Basic " + _b64(f":{token}".encode())):
        reply = plain_call(gateway, upstream, value)
        assert reply.status == 200, (value[:10], reply.body)
