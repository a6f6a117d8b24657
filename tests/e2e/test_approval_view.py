"""Approvers see exactly what they approve, and exactly that is forwarded (issue 10.5).

Real gateway, real agents (HTTP/1.1 and HTTP/2), a real upstream that keeps the
raw bytes it receives. The approver is shown the full URL with its query values,
the headers that will be forwarded, the body (up to 64 KiB, with the size and
SHA-256 of all of it), the MCP tool and arguments — on the API and the CLI — and
never the proxy credential or the gateway's secret. The audit record keeps the
digest with the approval; the upstream receives byte-identical requests. The
hook tests at the end change a held flow after its approval and see it refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from mitmproxy import http
from mitmproxy.test import tflow

from addons._base import exchange
from addons.approve import Approve, ApprovedAsShown
from proxy.approvals import Approvals
from proxy.approvals._held import VIEW_BODY_BYTES, body_view, request_digest
from proxy.gateway import Services
from proxy.identity import Caller
from proxy.policy import parse_rule
from tests.conftest import base_config
from tests.core import services
from tests.e2e.test_approve import H2First, admin_token, control
from tests.e2e.test_cli_approvals import clean_env, taskgate
from tests.support import Gateway, Upstream

SECRET = "sk-view-" + uuid.uuid4().hex  # the gateway's secret: never shown to an approver
QUERY_SECRET = "qk-view-" + uuid.uuid4().hex


class RawUpstream(Upstream):
    """The test upstream, keeping each request's raw target, headers and body."""

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.raw_path,
                          "headers": list(request.raw_headers), "body": body})
        return web.json_response({"ok": True, "body_len": len(body)})


@pytest.fixture(scope="module")
def raw_up(test_ca: Any) -> Iterator[RawUpstream]:
    cert = test_ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    up = RawUpstream(ctx).start()
    yield up
    up.stop()


def view_config(shared_files: dict[str, Path], up: Upstream) -> dict[str, Any]:
    cfg = base_config(shared_files, up, approval_timeout_seconds=60)
    plain = {"host": "127.0.0.1", "port": up.http_port, "scheme": "http",
             "methods": ["GET", "POST", "PUT", "DELETE"], "approval": "required"}
    cfg["workloads"][next(iter(cfg["workloads"]))]["standing"] = [
        {**plain, "id": "view", "paths": ["/view/**"]},
        {**plain, "id": "view-secret", "paths": ["/vsecret/**"], "secret": "api-key"},
        {**plain, "id": "view-query", "paths": ["/vquery/**"], "secret": "query-key"},
        {"id": "view-tls", "host": "localhost", "allow_private": True, "port": up.https_port,
         "methods": ["POST"], "paths": ["/view/**"], "approval": "required"},
        {"id": "pay", "host": "127.0.0.1", "port": up.http_port, "scheme": "http",
         "paths": ["/mcp"], "mcp": {"tools": ["pay"]}, "approval": "required"},
    ]
    cfg["secrets"] = {
        "api-key": {"provider": "env", "var": "VIEW_API_KEY",
                    "inject": {"header": "Authorization", "value": "Bearer {token}"}},
        "query-key": {"provider": "env", "var": "VIEW_QUERY_KEY",
                      "inject": {"query": "api_key"}},
    }
    return cfg


@pytest.fixture(scope="module")
def vgw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
        raw_up: RawUpstream) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("approval-view"), view_config(shared_files, raw_up),
                 env={"VIEW_API_KEY": SECRET, "VIEW_QUERY_KEY": QUERY_SECRET}).start()
    yield gw
    gw.stop()


@pytest.fixture
async def ctl(vgw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with control(vgw) as c:
        yield c


def agent(gw: Gateway, token: str, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(proxy=gw.proxy_url_with(token), verify=gw.ssl_context(),
                             timeout=30, trust_env=False, **kw)


def plain(up: Upstream, path: str) -> str:
    return f"http://127.0.0.1:{up.http_port}{path}"


async def waiting_for(ctl: httpx.AsyncClient, marker: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            r = await ctl.get("/v1/approvals")
            assert r.status_code == 200, r.text
            found = [h for h in r.json()["approvals"] if marker in h["url"]]
            if found:
                assert len(found) == 1
                return found[0]
            await asyncio.sleep(0.05)


def received(up: RawUpstream, marker: str) -> dict[str, Any]:
    [got] = [s for s in up.seen if marker in s["path"]]
    return got


def final_record(gw: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        recs = gw.records_for(request_id)
        if len(recs) == 2:
            return recs[1]
        time.sleep(0.05)
    raise AssertionError(gw.records_for(request_id))


def digest_of_view(req: dict[str, Any], body: bytes) -> str:
    """The digest recomputed by a reader from what the approver was shown."""
    return request_digest(req["method"].encode(), req["url"].encode(),
                          tuple((n.encode(), v.encode()) for n, v in req["headers"]), body)


def header(req: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in req["headers"] if n.lower() == name.lower()]


# -- what is shown, and what is forwarded, for bodies of every kind --------------------
BODIES = {
    "json": orjson.dumps({"amount": 990000, "to": "ATTACKER-IBAN", "memo": "rent"}),
    "binary": bytes(range(256)) * 3,
    "large-text": b'{"rows": "' + b"x" * (200 * 1024) + b'"}',
    "large-binary": bytes(range(256)) * 1024,  # 256 KiB, NUL and 0xff in it
    "cut-in-a-character": b"ab" + "€".encode() * 40000,  # the 64 KiB bound splits a '€'
    "empty": b"",
}


@pytest.mark.parametrize("kind", list(BODIES))
async def test_the_approver_sees_the_request_and_the_upstream_gets_exactly_it(
        vgw: Gateway, ctl: httpx.AsyncClient, raw_up: RawUpstream, token: str,
        kind: str) -> None:
    body = BODIES[kind]
    m = uuid.uuid4().hex
    target = f"/view/{m}?amount=990000&to=ATTACKER-IBAN&memo=a%20b"
    async with agent(vgw, token) as c:
        call = asyncio.create_task(c.put(plain(raw_up, target), content=body,
                                         headers={"X-Trace": f"t-{m}",
                                                  "Content-Type": "application/octet-stream"}))
        h = await waiting_for(ctl, m)
        # The full URL, query values included — in the listing and in the request view.
        assert h["url"] == plain(raw_up, target)
        req = h["request"]
        assert req["method"] == "PUT" and req["url"] == plain(raw_up, target)
        assert header(req, "x-trace") == [f"t-{m}"]
        assert header(req, "proxy-authorization") == [] and token not in str(h)
        view = req["body"]
        assert view["size"] == len(body)
        assert view["sha256"] == hashlib.sha256(body).hexdigest()
        assert view["truncated"] == (len(body) > VIEW_BODY_BYTES)
        shown = (base64.b64decode(view["shown"]) if view["encoding"] == "base64"
                 else view["shown"].encode())
        assert shown == body[:view["shown_bytes"]] and len(shown) <= VIEW_BODY_BYTES
        assert view["encoding"] == ("base64" if kind in ("binary", "large-binary")
                                    else "utf-8")
        if kind == "cut-in-a-character":
            assert VIEW_BODY_BYTES - 3 < view["shown_bytes"] < VIEW_BODY_BYTES
        # One approval, shown alike on GET /v1/approvals/{id}.
        one = (await ctl.get(f"/v1/approvals/{h['id']}")).json()
        assert one["request"] == req
        r = await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
        assert r.status_code == 200, r.text
        assert r.json()["request"]["digest"] == req["digest"]
        resp = await asyncio.wait_for(call, 20)
    assert resp.status_code == 200, resp.text
    got = received(raw_up, m)
    assert (got["method"], got["path"], got["body"]) == ("PUT", target, body)
    forwarded = [(n.lower(), v) for n, v in got["headers"]]
    assert (b"x-trace", f"t-{m}".encode()) in forwarded
    assert not any(n == b"proxy-authorization" for n, _ in forwarded)
    # The record keeps what was approved: the digest of the whole request, the body's.
    rec = final_record(vgw, resp.headers["x-taskgate-request-id"])
    assert rec["decision"] == "approved"
    assert rec["approval"]["digest"] == req["digest"] == digest_of_view(req, got["body"])
    assert rec["approval"]["body_sha256"] == hashlib.sha256(got["body"]).hexdigest()
    assert rec["approval"]["body_bytes"] == len(got["body"])
    assert "990000" not in rec["path"] and "REDACTED" in rec["path"]  # the log still redacts


async def test_an_http2_call_is_shown_and_forwarded_byte_for_byte(
        vgw: Gateway, ctl: httpx.AsyncClient, raw_up: RawUpstream, token: str) -> None:
    """HTTP/2 in, HTTP/1.1 out: the framing changes, nothing the approver saw does."""
    body = orjson.dumps({"to": "ATTACKER-IBAN", "n": list(range(2000))})
    m = uuid.uuid4().hex
    verify = H2First(ssl.PROTOCOL_TLS_CLIENT)
    verify.load_verify_locations(cafile=str(vgw.ca))
    url = f"https://localhost:{raw_up.https_port}/view/{m}?to=ATTACKER-IBAN"
    async with httpx.AsyncClient(proxy=vgw.proxy_url_with(token), verify=verify, http2=True,
                                 timeout=30, trust_env=False) as c:
        call = asyncio.create_task(c.post(url, content=body, headers={"x-h2": m}))
        h = await waiting_for(ctl, m)
        assert h["url"] == url and header(h["request"], "x-h2") == [m]
        assert h["request"]["body"]["shown"].encode() == body
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
        resp = await asyncio.wait_for(call, 20)
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    got = received(raw_up, m)
    assert got["body"] == body and got["path"] == url.split(str(raw_up.https_port), 1)[1]
    rec = final_record(vgw, resp.headers["x-taskgate-request-id"])
    assert rec["approval"]["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_the_secret_and_the_agents_own_credentials_are_never_shown(
        vgw: Gateway, ctl: httpx.AsyncClient, raw_up: RawUpstream, token: str) -> None:
    m = uuid.uuid4().hex
    body = b'{"release": "v1"}'
    async with agent(vgw, token) as c:
        call = asyncio.create_task(c.post(
            plain(raw_up, f"/vsecret/{m}?access_token=agent-own&x=1"), content=body,
            headers={"Authorization": "Bearer agent-own", "Cookie": "s=agent-own",
                     "X-Keep": "yes"}))
        h = await waiting_for(ctl, m)
        req = h["request"]
        assert req["secret"] == "api-key"
        # What goes out as the agent sent it is shown; what the gateway replaces is not.
        assert req["url"] == plain(raw_up, f"/vsecret/{m}?x=1")
        assert header(req, "x-keep") == ["yes"]
        assert header(req, "authorization") == header(req, "cookie") == []
        assert "agent-own" not in orjson.dumps(h).decode()
        r = await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
        assert SECRET not in r.text
        resp = await asyncio.wait_for(call, 20)
        after = (await ctl.get(f"/v1/approvals/{h['id']}")).text
    assert resp.status_code == 200, resp.text
    assert SECRET not in after and SECRET not in vgw.audit_path.read_text()
    got = received(raw_up, m)
    forwarded = {n.lower(): v for n, v in got["headers"]}
    assert forwarded[b"authorization"] == f"Bearer {SECRET}".encode()  # added after approval
    assert b"cookie" not in forwarded and forwarded[b"x-keep"] == b"yes"
    assert got["body"] == body and got["path"] == f"/vsecret/{m}?x=1"
    rec = final_record(vgw, resp.headers["x-taskgate-request-id"])
    assert rec["approval"]["digest"] == req["digest"]


async def test_a_query_secret_is_added_after_the_approval_not_shown(
        vgw: Gateway, ctl: httpx.AsyncClient, raw_up: RawUpstream, token: str) -> None:
    m = uuid.uuid4().hex
    async with agent(vgw, token) as c:
        call = asyncio.create_task(c.get(plain(raw_up, f"/vquery/{m}?api_key=mine&page=2")))
        h = await waiting_for(ctl, m)
        assert h["url"] == plain(raw_up, f"/vquery/{m}?page=2")
        assert h["request"]["secret"] == "query-key" and "mine" not in str(h)
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
        resp = await asyncio.wait_for(call, 20)
    assert resp.status_code == 200, resp.text
    assert received(raw_up, m)["path"] == f"/vquery/{m}?page=2&api_key={QUERY_SECRET}"
    assert QUERY_SECRET not in (await ctl.get(f"/v1/approvals/{h['id']}")).text


async def test_mcp_tool_and_arguments_are_shown_with_the_body(
        vgw: Gateway, ctl: httpx.AsyncClient, raw_up: RawUpstream, token: str) -> None:
    m = uuid.uuid4().hex
    body = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                         "params": {"name": "pay",
                                    "arguments": {"amount": 990000, "to": f"IBAN-{m}"}}})
    async with agent(vgw, token) as c:
        call = asyncio.create_task(c.post(plain(raw_up, "/mcp"), content=body, headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}))
        async with asyncio.timeout(10):
            while True:
                waiting = (await ctl.get("/v1/approvals")).json()["approvals"]
                found = [h for h in waiting if m in str(h["calls"])]
                if found:
                    break
                await asyncio.sleep(0.05)
        [h] = found
        assert h["calls"] == [{"name": "pay", "arguments": {"amount": 990000, "to": f"IBAN-{m}"}}]
        assert h["request"]["body"]["shown"].encode() == body
        await ctl.post(f"/v1/approvals/{h['id']}/approve", json={"by": "carol"})
        resp = await asyncio.wait_for(call, 20)
    assert resp.status_code == 200, resp.text
    [got] = [s for s in raw_up.seen if m.encode() in s["body"]]
    assert got["body"] == body
    rec = final_record(vgw, resp.headers["x-taskgate-request-id"])
    assert rec["approval"]["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_the_cli_shows_query_values_headers_body_and_tool_arguments(
        vgw: Gateway, ctl: httpx.AsyncClient, raw_up: RawUpstream, token: str,
        tmp_path: Path) -> None:
    env = clean_env(TASKGATE_CONTROL_URL=vgw.control_url, TASKGATE_ADMIN_TOKEN=admin_token(vgw))
    m = uuid.uuid4().hex
    lines = b"\n".join(b"line %d of the body" % i for i in range(60))
    async with agent(vgw, token) as c:
        call = asyncio.create_task(c.post(plain(raw_up, f"/view/{m}?amount=990000&to=EVIL"),
                                          content=lines, headers={"X-Trace": m}))
        h = await waiting_for(ctl, m)
        rc, out, err = await taskgate("approvals", "list", cwd=tmp_path, env=env)
        assert rc == 0, err
        assert f"POST {plain(raw_up, f'/view/{m}?amount=990000&to=EVIL')}" in out
        assert f"header:   X-Trace: {m}" in out or f"header:   x-trace: {m}" in out
        assert f"{len(lines)} bytes, utf-8" in out and hashlib.sha256(lines).hexdigest() in out
        assert "| line 0 of the body" in out and "| line 59 of the body" not in out  # a start
        assert h["request"]["digest"] in out
        rc, out, err = await taskgate("approvals", "show", h["id"], cwd=tmp_path, env=env)
        assert rc == 0, err
        assert "| line 59 of the body" in out and "amount=990000" in out  # all of it
        rc, out, err = await taskgate("approvals", "show", h["id"], "--json", cwd=tmp_path,
                                      env=env)
        assert rc == 0 and orjson.loads(out)["request"] == h["request"]
        rc, out, err = await taskgate("approvals", "approve", h["id"], "--by", "erin",
                                      cwd=tmp_path, env=env)
        assert rc == 0, err
        assert "amount=990000&to=EVIL" in out and h["request"]["digest"] in out
        assert (await asyncio.wait_for(call, 20)).status_code == 200
    assert received(raw_up, m)["body"] == lines


# -- the digest and the body view, as tables -------------------------------------------
@pytest.mark.parametrize(("body", "limit", "encoding", "shown", "truncated"), [
    (b"", 10, "utf-8", "", False),
    (b"hello", 10, "utf-8", "hello", False),
    (b"hello world", 5, "utf-8", "hello", True),
    ("é".encode() * 3, 3, "utf-8", "é", True),  # cut inside the second 'é': one kept
    (b"\xff\xfe", 10, "base64", "//4=", False),
    (b"\x00\x01\x02" * 4, 4, "base64", "AAECAA==", True),
    (b"ok\xffok", 10, "base64", base64.b64encode(b"ok\xffok").decode(), False),
])
def test_body_view(body: bytes, limit: int, encoding: str, shown: str,
                   truncated: bool) -> None:
    v = body_view(body, limit)
    assert (v["encoding"], v["shown"], v["truncated"], v["size"]) == (
        encoding, shown, truncated, len(body))
    assert v["sha256"] == hashlib.sha256(body).hexdigest()


BASE = (b"POST", b"https://api.example/pay?to=A", ((b"x-a", b"1"), (b"x-b", b"2")), b"{}")


@pytest.mark.parametrize("changed", [
    (b"PUT", *BASE[1:]),
    (BASE[0], b"https://api.example/pay?to=B", *BASE[2:]),
    (BASE[0], b"https://api.example:444/pay?to=A", *BASE[2:]),
    (*BASE[:2], ((b"x-a", b"1"), (b"x-b", b"3")), BASE[3]),
    (*BASE[:2], ((b"x-b", b"2"), (b"x-a", b"1")), BASE[3]),  # order
    (*BASE[:2], ((b"x-a", b"1"),), BASE[3]),
    (*BASE[:2], ((b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"")), BASE[3]),
    (*BASE[:3], b"{ }"),
    (*BASE[:2], ((b"x-a", b"1x-b"), (b"", b"2")), BASE[3]),  # no ambiguity in the framing
])
def test_every_change_changes_the_digest(changed: tuple[Any, ...]) -> None:
    assert request_digest(*changed) != request_digest(*BASE)


def test_framing_headers_are_not_part_of_the_digest() -> None:
    framed = (*BASE[:2], ((b"x-a", b"1"), (b"content-length", b"2"), (b"x-b", b"2")), BASE[3])
    chunked = (*BASE[:2], ((b"Transfer-Encoding", b"chunked"), *BASE[2]), BASE[3])
    assert request_digest(*framed) == request_digest(*chunked) == request_digest(*BASE)


# -- a change after the approval is refused (the hook, on mitmproxy test flows) --------
@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Services]:
    async with services(tmp_path, approval_timeout_seconds=30, leeway_seconds=0) as built:
        yield built


def flow_to_hold() -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.method = "POST"
    f.request.url = "https://api.example/pay?amount=10&to=alice"
    f.request.headers["X-Trace"] = "t1"
    f.request.content = b'{"amount": 10, "to": "alice"}'
    ex = exchange(f)
    ex.caller = Caller(workload="spiffe://acme.test/agent", issuer="https://issuer.test",
                       expires_at=time.time() + 600, task=None, owner="ops@acme.test")
    ex.decision, ex.rule = "allow", "pay"
    ex.allowed_by = parse_rule({"id": "pay", "host": "api.example", "methods": ["POST"],
                                "approval": "required"})
    return f


async def approved(core: Services, f: http.HTTPFlow) -> None:
    registry: Approvals = core.approvals
    task = asyncio.create_task(Approve(core).request(f))
    async with asyncio.timeout(5):
        while True:
            if registry.waiting():
                break
            await asyncio.sleep(0.005)
    registry.approve(registry.waiting()[0].id, "alice")
    await asyncio.wait_for(task, 5)
    assert f.response is None and exchange(f).decision == "approved"
    assert exchange(f).approved_as is not None


def _body(f: http.HTTPFlow) -> None:
    f.request.content = b'{"amount": 990000, "to": "mallory"}'


def _query(f: http.HTTPFlow) -> None:
    f.request.url = "https://api.example/pay?amount=990000&to=alice"


def _method(f: http.HTTPFlow) -> None:
    f.request.method = "PUT"


def _host(f: http.HTTPFlow) -> None:
    f.request.host = "evil.example"


def _header(f: http.HTTPFlow) -> None:
    f.request.headers["X-Trace"] = "t2"


def _new_header(f: http.HTTPFlow) -> None:
    f.request.headers["X-Override"] = "1"


def _dropped_header(f: http.HTTPFlow) -> None:
    del f.request.headers["X-Trace"]


def _one_byte(f: http.HTTPFlow) -> None:
    f.request.content = (f.request.raw_content or b"") + b" "


@pytest.mark.parametrize("change", [_body, _query, _method, _host, _header, _new_header,
                                    _dropped_header, _one_byte])
async def test_a_change_after_the_approval_is_refused(core: Services, change: Any) -> None:
    f = flow_to_hold()
    await approved(core, f)
    change(f)  # an addon later in the chain, or a bug, touches the approved call
    await ApprovedAsShown(core).request(f)
    assert f.response is not None and f.response.status_code == 500
    doc = orjson.loads(f.response.content or b"")
    assert doc["error"]["code"] == "changed_after_approval" and doc["request_id"]
    assert exchange(f).decision == "error"


async def test_the_unchanged_approved_call_goes_on(core: Services) -> None:
    f = flow_to_hold()
    await approved(core, f)
    f.request.headers["Content-Length"] = str(len(f.request.raw_content or b""))  # framing
    await ApprovedAsShown(core).request(f)
    assert f.response is None and exchange(f).decision == "approved"
    approved_as = exchange(f).approved_as
    assert approved_as is not None
    assert exchange(f).approval["digest"] == approved_as.shown.digest  # type: ignore[index]


async def test_only_the_secrets_placement_may_change_after_approval(
        core: Services) -> None:
    """On a rule with a secret the inject addon replaces the credential headers and
    Accept-Encoding; nothing else."""
    f = flow_to_hold()
    exchange(f).allowed_by = parse_rule({"id": "pay", "host": "api.example",
                                         "methods": ["POST"], "approval": "required",
                                         "secret": "pay-key"})
    f.request.headers["Authorization"] = "Bearer agent-own"
    await approved(core, f)
    f.request.headers["Authorization"] = "Bearer the-secret"
    f.request.headers["Accept-Encoding"] = "identity"
    await ApprovedAsShown(core).request(f)
    assert f.response is None
    f.request.headers["X-Trace"] = "t2"
    await ApprovedAsShown(core).request(f)
    assert f.response is not None and f.response.status_code == 500
