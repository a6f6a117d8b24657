"""Calls held for approval, end to end: real gateway, real clients, real upstream."""

from __future__ import annotations

import asyncio
import base64
import random
import signal
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from tests.conftest import base_config
from tests.support import Gateway, Keys, Upstream, dead_port

CAP = 4096  # mcp.max_body_bytes: the most a held call may buffer


def approval_config(shared_files: dict[str, Path], upstream: Upstream, **extra: Any
                    ) -> dict[str, Any]:
    cfg = base_config(shared_files, upstream, mcp={"max_body_bytes": CAP}, **extra)
    wl = next(iter(cfg["workloads"].values()))
    wl["standing"] = [*wl["standing"],
        {"id": "open-pr", "host": "localhost", "allow_private": True, "port": upstream.https_port,
         "methods": ["GET", "POST"], "paths": ["/approve/**"], "approval": "required"},
        {"id": "plain-pr", "host": "127.0.0.1", "port": upstream.http_port, "scheme": "http",
         "methods": ["GET", "POST"], "paths": ["/approve/**"], "approval": "required"},
        {"id": "pay-tool", "host": "localhost", "allow_private": True, "port": upstream.https_port,
         "paths": ["/mcp"], "mcp": {"tools": ["pay"]}, "approval": "required"},
        {"id": "gone-upstream", "host": "127.0.0.1", "port": DEAD_PORT, "scheme": "http",
         "methods": ["POST"], "paths": ["/approve/**"], "approval": "required"},
    ]
    return cfg


DEAD_PORT = dead_port()


@pytest.fixture(scope="module")
def agw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
        upstream: Upstream) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("approve"),
                 approval_config(shared_files, upstream, approval_timeout_seconds=60)).start()
    yield gw
    gw.stop()


def admin_token(gw: Gateway) -> str:
    return (gw.home / "admin-token").read_text().strip()


@pytest.fixture
async def ctl(agw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with control(agw) as c:
        yield c


def control(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.control_url, timeout=10, trust_env=False,
                             headers={"Authorization": f"Bearer {admin_token(gw)}"})


class H2First(ssl.SSLContext):
    """httpcore offers ALPN ``http/1.1, h2`` in that order and mitmproxy honours the
    client's order, so httpx alone would never speak HTTP/2 through the gateway;
    offer ``h2`` first, as curl and browsers do."""

    def set_alpn_protocols(self, protocols: Iterable[str]) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def agent(gw: Gateway, token: str, **kw: Any) -> httpx.AsyncClient:
    if kw.get("http2"):
        verify: ssl.SSLContext = H2First(ssl.PROTOCOL_TLS_CLIENT)
        verify.load_verify_locations(cafile=str(gw.ca))
    else:
        verify = gw.ssl_context()
    return httpx.AsyncClient(proxy=gw.proxy_url_with(token), verify=verify,
                             timeout=30, trust_env=False, **kw)


async def held(ctl: httpx.AsyncClient, marker: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait (10 s at most) until ``count`` calls naming ``marker`` are listed as waiting."""
    async with asyncio.timeout(10):
        while True:
            r = await ctl.get("/v1/approvals")
            assert r.status_code == 200, r.text
            found = [h for h in r.json()["approvals"]
                     if marker in h["url"] or marker in str(h["calls"])]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)


async def gone(ctl: httpx.AsyncClient, marker: str) -> None:
    """Wait (10 s at most) until no call naming ``marker`` is waiting."""
    async with asyncio.timeout(10):
        while True:
            waiting = (await ctl.get("/v1/approvals")).json()["approvals"]
            if not any(marker in h["url"] for h in waiting):
                return
            await asyncio.sleep(0.05)


def seen(upstream: Upstream, marker: str) -> list[dict[str, Any]]:
    return [s for s in upstream.seen if marker in s["path"]]


def https(upstream: Upstream, path: str) -> str:
    return f"https://localhost:{upstream.https_port}{path}"


def final_and_held(gw: Gateway, request_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    recs = gw.records_for(request_id)
    assert len(recs) == 2, recs
    hold, final = recs
    assert hold["decision"] == "held" and hold["seq"] < final["seq"]
    return hold, final


async def test_approve_releases_the_call_with_the_upstreams_response(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    async with agent(agw, token) as c:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}?token=s3cret"),
                                          json={"title": "fix"}))
        [h] = await held(ctl, m)
        assert h["workload"] == "spiffe://acme.test/agent/triage"
        assert h["owner"] == "platform@acme.test"
        assert h["task"] is None and h["purpose"] is None
        assert h["method"] == "POST"
        assert h["url"] == https(upstream, f"/approve/{m}?token=s3cret")  # query values shown
        assert h["age_seconds"] >= 0 and h["state"] == "waiting" and h["calls"] == []
        await asyncio.sleep(0.3)
        assert seen(upstream, m) == [] and not call.done()
        r = await ctl.post(f"/v1/approvals/{h['id']}/approve",
                           json={"by": "alice@acme.test", "comment": "ok to open"})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "approved"
        resp = await asyncio.wait_for(call, 10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["path"] == f"/approve/{m}?token=s3cret"
    assert resp.json()["body_len"] == len(b'{"title":"fix"}')
    assert len(seen(upstream, m)) == 1
    rid = resp.headers["x-taskgate-request-id"]
    hold, final = final_and_held(agw, rid)
    assert hold["approval"]["id"] == h["id"] and hold["approval"]["outcome"] == "waiting"
    assert hold["status"] is None and "s3cret" not in str(hold)
    assert final["decision"] == "approved" and final["status"] == 200
    assert final["rule"] == "open-pr"
    approval = final["approval"]
    assert approval["by"] == "alice@acme.test" and approval["comment"] == "ok to open"
    assert approval["outcome"] == "approved" and approval["waited_ms"] >= 300
    assert approval["at"].endswith("Z")


async def test_deny_refuses_the_call(agw: Gateway, ctl: httpx.AsyncClient,
                                     upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    async with agent(agw, token) as c:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held(ctl, m)
        r = await ctl.post(f"/v1/approvals/{h['id']}/deny",
                           json={"by": "bob", "comment": "use a draft"})
        assert r.status_code == 200 and r.json()["state"] == "denied"
        resp = await asyncio.wait_for(call, 10)
    assert resp.status_code == 403
    body = resp.json()
    assert body["reason"] == "denied by bob: use a draft"
    assert body["request_id"] == resp.headers["x-taskgate-request-id"]
    assert seen(upstream, m) == []
    _, final = final_and_held(agw, body["request_id"])
    assert final["decision"] == "rejected" and final["status"] == 403
    assert final["approval"]["by"] == "bob" and final["approval"]["outcome"] == "denied"


async def test_an_approval_covers_exactly_one_request(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    url = https(upstream, f"/approve/{m}")
    async with agent(agw, token) as c:
        first = asyncio.create_task(c.post(url, content=b"same"))
        [h] = await held(ctl, m)
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
        assert (await asyncio.wait_for(first, 10)).status_code == 200
        again = asyncio.create_task(c.post(url, content=b"same"))
        [h2] = await held(ctl, m)
        assert h2["id"] != h["id"]
        await asyncio.sleep(0.2)
        assert not again.done() and len(seen(upstream, m)) == 1
        await ctl.post(f"/v1/approvals/{h2['id']}/deny", json={"by": "alice"})
        assert (await asyncio.wait_for(again, 10)).status_code == 403
    assert len(seen(upstream, m)) == 1


async def test_ten_held_at_once_answered_out_of_order(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    async with agent(agw, token) as c:
        calls = [asyncio.create_task(c.post(https(upstream, f"/approve/{m}/{i}"),
                                            content=f"call {i}".encode()))
                 for i in range(10)]
        waiting = await held(ctl, m, 10)
        by_index = {int(h["url"].rsplit("/", 1)[1]): h["id"] for h in waiting}
        assert sorted(by_index) == list(range(10))
        order = list(range(10))
        random.Random(7).shuffle(order)
        for i in order:
            verb = "approve" if i % 2 == 0 else "deny"
            r = await ctl.post(f"/v1/approvals/{by_index[i]}/{verb}", json={"by": f"ap{i}"})
            assert r.status_code == 200, r.text
        results = await asyncio.wait_for(asyncio.gather(*calls), 20)
    for i, resp in enumerate(results):
        if i % 2 == 0:
            assert resp.status_code == 200, resp.text
            assert resp.json()["path"] == f"/approve/{m}/{i}"
            assert resp.json()["body_len"] == len(f"call {i}")
        else:
            assert resp.status_code == 403 and resp.json()["reason"] == f"denied by ap{i}"
        final = agw.records_for(resp.headers["x-taskgate-request-id"])[-1]
        assert final["approval"]["by"] == f"ap{i}"
    assert sorted(s["path"] for s in seen(upstream, m)) == sorted(
        f"/approve/{m}/{i}" for i in range(0, 10, 2))


async def test_other_calls_flow_while_one_is_held(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    async with agent(agw, token) as c, agent(agw, token) as other:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held(ctl, m)
        t0 = time.monotonic()
        for _ in range(5):
            r = await other.get(https(upstream, "/allowed/meanwhile"))
            assert r.status_code == 200
        r = await other.get(f"http://127.0.0.1:{upstream.http_port}/allowed/meanwhile")
        assert r.status_code == 200 and time.monotonic() - t0 < 5
        assert not call.done()
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
        assert (await asyncio.wait_for(call, 10)).status_code == 200


async def test_other_streams_on_the_same_http2_connection_flow(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    # One connection at most: every request below must be a stream on the same one.
    async with agent(agw, token, http2=True,
                     limits=httpx.Limits(max_connections=1)) as c:
        warm = await c.get(https(upstream, "/allowed/warm"))
        assert warm.http_version == "HTTP/2"
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held(ctl, m)
        others = await asyncio.wait_for(asyncio.gather(
            *(c.get(https(upstream, f"/allowed/stream{i}")) for i in range(3))), 5)
        assert [(r.status_code, r.http_version) for r in others] == [(200, "HTTP/2")] * 3
        assert not call.done() and seen(upstream, m) == []
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
        resp = await asyncio.wait_for(call, 10)
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"


async def test_disconnect_while_held_cancels_the_approval(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    cred = base64.b64encode(f"agent:{token}".encode()).decode()
    target = f"http://127.0.0.1:{upstream.http_port}/approve/{m}"
    sock = socket.create_connection(("127.0.0.1", agw.proxy_port), timeout=5)
    sock.sendall(f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.http_port}\r\n"
                 f"Proxy-Authorization: Basic {cred}\r\nContent-Length: 2\r\n\r\nhi".encode())
    [h] = await held(ctl, m)
    sock.close()
    await gone(ctl, m)
    r = await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
    assert r.status_code == 409 and "client disconnected" in r.json()["reason"]
    await asyncio.sleep(0.2)
    assert seen(upstream, m) == []
    _, final = final_and_held(agw, h["request_id"])
    assert final["decision"] == "rejected"
    assert final["approval"]["outcome"] == "client_disconnected"
    assert final["reason"] == "the client disconnected while the call was held for approval"
    assert f"approval {h['id']} for request {h['request_id']} cancelled" in agw.output()


async def test_http2_connection_closed_while_held_cancels_the_approval(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    c = agent(agw, token, http2=True)
    call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
    [h] = await held(ctl, m)
    call.cancel()
    await c.aclose()
    await gone(ctl, m)
    r = await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
    assert r.status_code == 409
    _, final = final_and_held(agw, h["request_id"])
    assert final["approval"]["outcome"] == "client_disconnected"
    assert seen(upstream, m) == []


def raw_h2_post(gw: Gateway, token: str, port: int, path: str
                ) -> tuple[ssl.SSLSocket, H2Connection]:
    """POST over HTTP/2 with the h2 library itself, to control every frame (RST_STREAM)."""
    cred = base64.b64encode(f"agent:{token}".encode()).decode()
    sock = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=5)
    sock.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n"
                 f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(sock, server_hostname="localhost")
    assert tls.selected_alpn_protocol() == "h2"
    conn = H2Connection(H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "https"),
                          (":authority", f"localhost:{port}"), (":path", path),
                          ("content-length", "1")])
    conn.send_data(1, b"x", end_stream=True)
    tls.sendall(conn.data_to_send())
    return tls, conn


@pytest.mark.xfail(strict=True, reason=(
    "mitmproxy queues an HTTP/2 RST_STREAM for a stream paused in a hook and tells no "
    "addon; the held call stays listed and, if approved, still goes upstream"))
async def test_http2_stream_reset_while_held_cancels_the_approval(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    tls, conn = raw_h2_post(agw, token, upstream.https_port, f"/approve/{m}")
    try:
        await held(ctl, m)
        conn.reset_stream(1, error_code=ErrorCodes.CANCEL)  # the connection stays open
        tls.sendall(conn.data_to_send())
        async with asyncio.timeout(2):
            await gone(ctl, m)
    finally:
        tls.close()


async def test_answering_twice_is_409_and_unknown_is_404(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    async with agent(agw, token) as c:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held(ctl, m)
        first = await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
        assert first.status_code == 200
        again = await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
        deny = await ctl.post(f"/v1/approvals/{h['id']}/deny", json={"by": "mallory"})
        assert (await asyncio.wait_for(call, 10)).status_code == 200
    for r in (again, deny):
        assert r.status_code == 409
        body = r.json()  # every control-plane refusal names its request id
        assert body.pop("request_id") == r.headers["X-Taskgate-Request-Id"]
        assert body == {"error": "conflict", "reason":
                        f"approval '{h['id']}' has already ended (approved by alice)"}
    shown = (await ctl.get(f"/v1/approvals/{h['id']}")).json()
    assert shown["state"] == "approved" and shown["answer"]["by"] == "alice"
    for path in ("/v1/approvals/0123456789abcdef/approve", "/v1/approvals/nope/deny"):
        r = await ctl.post(path, json={"by": "alice"})
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert (await ctl.get("/v1/approvals/nope")).status_code == 404


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"not json", 400, None),
    (b"[]", 400, None),
    (b"{}", 422, "by"),
    (b'{"by": ""}', 422, "by"),
    (b'{"by": 7}', 422, "by"),
    (b'{"by": "x\\r\\nforged: log line"}', 422, "by"),
    (b'{"by": "alice", "comment": 3}', 422, "comment"),
    (b'{"by": "alice", "ok": true}', 422, "ok"),
])
async def test_bad_answers_are_refused_naming_the_field(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str,
        body: bytes, status: int, field: str | None) -> None:
    m = uuid.uuid4().hex
    async with agent(agw, token) as c:
        call = asyncio.create_task(c.post(https(upstream, f"/approve/{m}"), content=b"x"))
        [h] = await held(ctl, m)
        r = await ctl.post(f"/v1/approvals/{h['id']}/approve", content=body,
                           headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert r.json()["error"] == "invalid_request" and r.json().get("field") == field
        assert [x["id"] for x in await held(ctl, m)] == [h["id"]]  # still waiting
        await ctl.post(f"/v1/approvals/{h['id']}/deny", json={"by": "cleanup"})
        assert (await asyncio.wait_for(call, 10)).status_code == 403


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic YWRtaW46eA=="])
async def test_approvals_need_the_admin_token(agw: Gateway, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    async with httpx.AsyncClient(base_url=agw.control_url, trust_env=False) as c:
        assert (await c.get("/v1/approvals", headers=headers)).status_code == 401
        r = await c.post("/v1/approvals/x/approve", json={"by": "a"}, headers=headers)
        assert r.status_code == 401


async def test_mcp_tool_call_is_held_with_its_arguments(
        agw: Gateway, ctl: httpx.AsyncClient, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex
    url = https(upstream, "/mcp")
    async with agent(agw, token) as c:
        init = await c.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                       "params": {}})
        assert init.status_code == 200  # no tool runs: nothing to approve
        call = asyncio.create_task(c.post(url, json={
            "jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "pay", "arguments": {"amount": 120, "to": m}}}))
        [h] = await held(ctl, m)
        assert h["calls"] == [{"name": "pay", "arguments": {"amount": 120, "to": m}}]
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
        assert (await asyncio.wait_for(call, 10)).status_code == 200


async def test_a_body_too_large_to_hold_is_refused(
        agw: Gateway, upstream: Upstream, token: str) -> None:
    m = uuid.uuid4().hex

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * 1000

    async with agent(agw, token) as c:
        sized = await c.post(https(upstream, f"/approve/{m}"), content=b"x" * (CAP + 1))
        streamed = await c.post(https(upstream, f"/approve/{m}"), content=chunked())
    for r in (sized, streamed):
        assert r.status_code == 413, r.text
        assert f"at most {CAP} bytes" in r.json()["reason"]
    assert seen(upstream, m) == []


async def test_an_approved_call_whose_upstream_fails_is_recorded_as_error(
        agw: Gateway, ctl: httpx.AsyncClient, token: str) -> None:
    m = uuid.uuid4().hex
    async with agent(agw, token) as c:
        call = asyncio.create_task(
            c.post(f"http://127.0.0.1:{DEAD_PORT}/approve/{m}", content=b"x"))
        [h] = await held(ctl, m)
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "alice"})
        resp = await asyncio.wait_for(call, 10)
    assert resp.status_code == 502
    _, final = final_and_held(agw, h["request_id"])
    assert final["decision"] == "error" and final["approval"]["by"] == "alice"


# -- gateways of their own: timeout, shutdown ----------------------------------------
async def test_timeout_refuses_the_call(tmp_path: Path, shared_files: dict[str, Path],
                                        upstream: Upstream, keys: Keys) -> None:
    gw = Gateway(tmp_path, approval_config(shared_files, upstream,
                                           approval_timeout_seconds=1)).start()
    try:
        m = uuid.uuid4().hex
        async with agent(gw, keys.token()) as c, control(gw) as ctl:
            t0 = time.monotonic()
            resp = await c.post(https(upstream, f"/approve/{m}"), content=b"x")
            assert 0.9 <= time.monotonic() - t0 < 8
            assert resp.status_code == 403
            assert resp.json()["reason"] == ("no approver answered within 1 seconds; "
                                             "the call was refused")
            _, final = final_and_held(gw, resp.json()["request_id"])
            assert final["decision"] == "rejected"
            assert final["approval"]["outcome"] == "timeout" and final["approval"]["by"] is None
            r = await ctl.post(f"/v1/approvals/{final['approval']['id']}/approve",
                               json={"by": "late"})
            assert r.status_code == 409 and "timeout" in r.json()["reason"]
        assert seen(upstream, m) == []
    finally:
        gw.stop()


async def test_shutdown_refuses_held_calls(tmp_path: Path, shared_files: dict[str, Path],
                                           upstream: Upstream, keys: Keys) -> None:
    gw = Gateway(tmp_path, approval_config(shared_files, upstream)).start()
    try:
        m = uuid.uuid4().hex
        async with agent(gw, keys.token()) as c, control(gw) as ctl:
            calls = [asyncio.create_task(c.post(https(upstream, f"/approve/{m}/{i}"),
                                                content=b"x")) for i in range(3)]
            await held(ctl, m, 3)
            gw.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            results = await asyncio.wait_for(asyncio.gather(*calls), 15)
        for resp in results:
            assert resp.status_code == 403
            assert resp.json()["reason"] == ("the gateway shut down while the call was "
                                             "held for approval")
        assert await asyncio.to_thread(gw.proc.wait, 20) == 0  # type: ignore[union-attr]
        finals = [gw.records_for(r.json()["request_id"])[-1] for r in results]
        assert {f["approval"]["outcome"] for f in finals} == {"shutdown"}
        assert seen(upstream, m) == []
    finally:
        gw.stop()
