"""Responses mitmproxy writes itself are taskgate refusals: JSON, with a request id.

A malformed request (400) and an upstream that cannot be reached or fails TLS
(502) are answered inside mitmproxy's HTTP layers, before or after every
addon; proxy/server.py replaces its HTML error page, over HTTP/1 and HTTP/2.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import base_config
from tests.e2e import CLEAN_ENV
from tests.support import Gateway, Keys, Upstream, dead_port
from tests.wire import Reply, Tunnel, request_bytes, send

CANARY = "c4nary-v4lue-in-the-request-line"


@pytest.fixture(scope="module")
def closed_port() -> int:
    return dead_port()  # nothing listens there


@pytest.fixture(scope="module")
def egw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
        upstream: Upstream, closed_port: int) -> Iterator[Gateway]:
    cfg = base_config(shared_files, upstream)
    cfg["workloads"][next(iter(cfg["workloads"]))]["standing"] += [
        {"id": "nowhere-http", "host": "127.0.0.1", "port": closed_port, "scheme": "http",
         "methods": ["GET"], "paths": ["/allowed/**"]},
        {"id": "nowhere-https", "host": "localhost", "allow_private": True, "port": closed_port,
         "methods": ["GET"], "paths": ["/allowed/**"]},
        # TLS to the upstream's plain-HTTP port: the handshake fails.
        {"id": "no-tls", "host": "localhost", "allow_private": True, "port": upstream.http_port,
         "methods": ["GET"], "paths": ["/allowed/**"]},
    ]
    gw = Gateway(tmp_path_factory.mktemp("gw-errors"), cfg).start()
    yield gw
    gw.stop()


def refusal(status: int, headers: Any, body: bytes, code: int, error: str) -> dict[str, Any]:
    assert status == code, body
    assert headers["content-type"] == "application/json"
    data = orjson.loads(body)
    assert data["error"]["code"] == error and data["reason"]
    assert data["request_id"] == headers["x-taskgate-request-id"]
    assert b"<html" not in body
    return data


def record_of(gw: Gateway, port: int, path: str = "/allowed/x") -> dict[str, Any]:
    """The call's audit record (the id mitmproxy's own response carries is a fresh one)."""
    for _ in range(50):
        found = [r for r in gw.audit() if r["port"] == port and r["path"] == path]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no record for port {port} {path}")


def test_unreachable_upstream_is_a_json_502_and_recorded(
        egw: Gateway, keys: Keys, closed_port: int) -> None:
    target = f"127.0.0.1:{closed_port}"
    reply = send(egw.proxy_port, request_bytes("GET", f"http://{target}/allowed/x", target,
                                               keys.token()))
    data = refusal(reply.status, reply.headers, reply.body, 502, "bad_gateway")
    assert "upstream" in data["reason"] and "refused" in data["reason"].lower()
    rec = record_of(egw, closed_port)
    assert (rec["decision"], rec["status"], rec["rule"]) == ("error", 502, "nowhere-http")


def test_upstream_tls_failure_is_a_json_502_and_recorded(
        egw: Gateway, keys: Keys, upstream: Upstream) -> None:
    with Tunnel(egw.proxy_port, f"localhost:{upstream.http_port}", keys.token()) as t:
        t.start_tls(egw.ca, "localhost")
        reply = t.request(request_bytes("GET", "/allowed/tls", f"localhost:{upstream.http_port}",
                                        None))
    data = refusal(reply.status, reply.headers, reply.body, 502, "bad_gateway")
    assert "TLS" in data["reason"]
    rec = record_of(egw, upstream.http_port, "/allowed/tls")
    assert (rec["decision"], rec["status"]) == ("error", 502)


def test_unreachable_upstream_over_http2(egw: Gateway, keys: Keys, closed_port: int,
                                        tmp_path: Path) -> None:
    """curl offers h2 first inside the tunnel (httpx offers http/1.1 first)."""
    head, body = tmp_path / "head", tmp_path / "body"
    out = subprocess.run(
        ["curl", "-sS", "--http2", "--max-time", "15", "-x", egw.proxy_url,
         "--proxy-user", f"agent:{keys.token()}", "--cacert", str(egw.ca),
         "-D", str(head), "-o", str(body), "-w", "%{http_version}",
         f"https://localhost:{closed_port}/allowed/h2"],
        capture_output=True, env=CLEAN_ENV, timeout=30, check=False)
    assert out.stdout.decode() == "2", out  # the answer came over HTTP/2
    final = head.read_text("latin-1").replace("\r\n", "\n").strip().split("\n\n")[-1]
    status = int(final.split("\n")[0].split()[1])
    headers = dict(line.split(": ", 1) for line in final.split("\n")[1:])
    refusal(status, {k.lower(): v for k, v in headers.items()}, body.read_bytes(), 502,
            "bad_gateway")
    rec = record_of(egw, closed_port, "/allowed/h2")
    assert (rec["decision"], rec["status"]) == ("error", 502)


MALFORMED = {
    "content-length and transfer-encoding": (
        b"POST", b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"0\r\n\r\n"),
    "bad header name": (b"GET", b"Bad Header: x\r\n", b""),
}


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.parametrize("with_token", [True, False])
def test_malformed_request_is_a_json_400(egw: Gateway, keys: Keys, upstream: Upstream,
                                         case: str, with_token: bool) -> None:
    method, extra, body = MALFORMED[case]
    target = f"127.0.0.1:{upstream.http_port}"
    seen = len(upstream.seen)
    reply = send(egw.proxy_port, request_bytes(
        method.decode(), f"http://{target}/allowed/x", target,
        keys.token() if with_token else None, extra=extra) + body)
    refusal(reply.status, reply.headers, reply.body, 400, "bad_request")
    assert len(upstream.seen) == seen


def test_what_mitmproxy_quotes_is_not_echoed(egw: Gateway) -> None:
    reply: Reply = send(egw.proxy_port,
                        f"GET /x?key={CANARY} HTTP/1.1 trailing\r\nHost: a\r\n\r\n".encode())
    data = refusal(reply.status, reply.headers, reply.body, 400, "bad_request")
    assert CANARY not in reply.body.decode() and "malformed request" in data["reason"]
