"""Every body-hardening case, as a raw HTTP body through the real gateway.

Each case is its own test against the SDK's MCPServer (JSON mode) with a live
session, so an allowed call really runs and a refused one provably does not
(``danger`` is never granted; every tool records when it runs). The last test
checks the gateway is still healthy after all of them.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import httpx
import pytest

from tests.framing_servers import H2Client
from tests.mcp_fixtures import TOOL_REFUSED, mcp_gateway, mcp_servers, records
from tests.mcp_server import McpUpstream
from tests.support import Gateway, Upstream

__all__ = ["mcp_gateway", "mcp_servers"]  # fixtures used by name

CAP = 65536  # mcp.max_body_bytes in the test gateway


def msg(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
    m: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        m["params"] = params
    return m


def call(name: str, arguments: dict[str, Any] | None = None, id: Any = 1) -> dict[str, Any]:
    return msg("tools/call", {"name": name, "arguments": arguments or {}}, id)


def enc(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()


DANGER = enc(call("danger", {"target": "prod"}))
ADD = enc(call("add", {"a": 1, "b": 2}))
ADD_JSON = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":%s}'


def nested(depth: int) -> bytes:
    return (ADD_JSON % ('{"name":"add","arguments":{"a":' + "[" * depth + "]" * depth
                        + ',"b":1}}')).encode()


# (id, body, extra headers, expected): expected is ("403"|"413"|"411", reason part)
# or ("rpc", reason part) for a JSON-RPC error answering a tools/call.
CASES: list[tuple[str, bytes, dict[str, str], tuple[str, str]]] = [
    ("utf8-bom", b"\xef\xbb\xbf" + DANGER, {}, ("403", "byte order mark")),
    ("utf16", DANGER.decode().encode("utf-16"), {}, ("403", "not valid UTF-8")),
    ("utf16-be-no-bom", DANGER.decode().encode("utf-16-be"), {}, ("403", "not valid JSON")),
    ("invalid-utf8", ADD_JSON.encode() % b'{"name":"add","arguments":{"a":"\xff","b":1}}', {},
     ("403", "not valid UTF-8")),
    ("dup-key-top", (ADD_JSON % '{"name":"add","arguments":{"a":1,"b":2}}')[:-1].encode()
     + b',"params":{"name":"danger","arguments":{"target":"x"}}}', {},
     ("403", "duplicate key 'params'")),
    ("dup-key-name", (ADD_JSON % '{"name":"add","name":"danger"}').encode(), {},
     ("403", "duplicate key 'name'")),
    ("dup-key-escaped", (ADD_JSON % '{"name":"add","n\\u0061me":"danger"}').encode(), {},
     ("403", "duplicate key 'name'")),
    ("dup-key-deep", (ADD_JSON % '{"name":"add","arguments":{"a":{"x":1,"x":2},"b":1}}'
                      ).encode(), {}, ("403", "duplicate key 'x'")),
    ("case-key-beside", (ADD_JSON % '{"name":"add","Name":"danger"}').encode(), {},
     ("403", "differ only by case or Unicode folding")),
    ("fold-long-s", '{"jsonrpc":"2.0","id":1,"method":"tools/call","paramſ":{"name":"danger"}}'
     .encode(), {}, ("403", "'paramſ' differs only by case or Unicode folding from 'params'")),
    ("fold-fullwidth", (ADD_JSON % '{"name":"add","ｎａｍｅ":"danger"}').encode(), {},
     ("403", "differ only by case or Unicode folding")),
    ("fold-envelope-case", b'{"jsonrpc":"2.0","id":1,"Method":"tools/call",'
     b'"params":{"name":"danger"}}', {}, ("403", "'Method' differs only by case")),
    ("fold-param-alone", (ADD_JSON % '{"Name":"danger"}').encode(), {},
     ("rpc", "'Name' differs only by case or Unicode folding from 'name'")),
    ("fold-arg-constrained", enc(call("search", {"query": "ok", "limit": 1, "LIMIT": 500})),
     {}, ("403", "differ only by case or Unicode folding")),
    ("method-case", enc(msg("Tools/Call", {"name": "danger"})), {},
     ("403", "differs only by case or folding from 'tools/call'")),
    ("lone-surrogate-key", (ADD_JSON % '{"name":"add","arguments":{"\\ud800":1}}').encode(), {},
     ("403", "unpaired surrogate")),
    ("content-type-text-plain", DANGER, {"Content-Type": "text/plain"},
     ("rpc", "'danger' is not granted")),
    ("content-type-octet-stream", DANGER, {"Content-Type": "application/octet-stream"},
     ("rpc", "'danger' is not granted")),
    ("gzip-inspected", gzip.compress(DANGER), {"Content-Encoding": "gzip"},
     ("rpc", "'danger' is not granted")),
    ("deflate-inspected", zlib.compress(DANGER), {"Content-Encoding": "deflate"},
     ("rpc", "'danger' is not granted")),
    ("br-inspected", brotli.compress(DANGER), {"Content-Encoding": "br"},
     ("rpc", "'danger' is not granted")),
    ("gzip-twice-inspected", gzip.compress(gzip.compress(DANGER)),
     {"Content-Encoding": "gzip, gzip"}, ("rpc", "'danger' is not granted")),
    ("gzip-bomb", gzip.compress(b" " * (20 << 20)), {"Content-Encoding": "gzip"},
     ("413", "gzip-decoded body is larger")),
    ("br-bomb", brotli.compress(b" " * (20 << 20)), {"Content-Encoding": "br"},
     ("413", "br-decoded body is larger")),
    ("gzip-truncated", gzip.compress(DANGER)[:-12], {"Content-Encoding": "gzip"},
     ("403", "gzip")),
    ("gzip-trailing-member", gzip.compress(ADD) + gzip.compress(DANGER),
     {"Content-Encoding": "gzip"}, ("403", "bytes follow the end of the gzip data")),
    ("gzip-mislabelled", DANGER, {"Content-Encoding": "gzip"},
     ("403", "not valid gzip data")),
    ("raw-deflate-refused", zlib.compress(DANGER)[2:-4], {"Content-Encoding": "deflate"},
     ("403", "not valid deflate data")),
    ("unknown-encoding", DANGER, {"Content-Encoding": "compress"},
     ("403", "unsupported Content-Encoding 'compress'")),
    ("unknown-encoding-stacked", gzip.compress(DANGER), {"Content-Encoding": "x-taskgate, gzip"},
     ("403", "unsupported Content-Encoding 'x-taskgate'")),
    ("over-cap", ADD_JSON.encode() % b'{"name":"add","arguments":{"a":1,"b":1,"pad":"'
     + b"x" * CAP + b'"}}', {}, ("413", f"at most {CAP} bytes")),
    ("jsonrpc-1.0", enc({**call("danger"), "jsonrpc": "1.0"}), {},
     ("403", '"jsonrpc" must be "2.0"')),
    ("jsonrpc-missing", enc({k: v for k, v in call("danger").items() if k != "jsonrpc"}), {},
     ("403", '"jsonrpc" must be "2.0"')),
    ("jsonrpc-number", enc({**call("danger"), "jsonrpc": 2.0}), {},
     ("403", '"jsonrpc" must be "2.0"')),
    ("method-and-result", enc({**call("danger"), "result": {}}), {},
     ("403", "both a method and a result")),
    ("result-and-error", enc({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}}), {},
     ("403", "exactly one of result and error")),
    ("unknown-member", enc({**call("danger"), "tool": "add"}), {},
     ("403", "unknown JSON-RPC member 'tool'")),
    ("batch-one-refused", enc([call("add", {"a": 1, "b": 2}, id=1), call("danger", id=2)]), {},
     ("rpc", "'danger' is not granted")),
    ("batch-empty", b"[]", {}, ("403", "an empty batch")),
    ("batch-nested", enc([[call("danger")]]), {}, ("403", "must be an object")),
    ("tool-name-newline", enc(call("add\n")), {}, ("rpc", "tool name is not 1-128")),
    ("tool-name-too-long", enc(call("a" * 129)), {}, ("rpc", "tool name is not 1-128")),
    ("tool-name-unicode", enc(call("аdd")), {}, ("rpc", "tool name is not 1-128")),
    ("tool-not-granted", enc(call("danger", id="req-7")), {}, ("rpc", "'danger' is not granted")),
    ("tool-call-without-id", enc({k: v for k, v in call("danger").items() if k != "id"}), {},
     ("403", "tools/call must carry an id")),
    ("arg-missing", enc(call("search", {"query": "docs"})), {},
     ("rpc", "argument 'limit' is required by the grant and missing")),
    ("arg-wrong-type", enc(call("search", {"query": "docs", "limit": "10"})), {},
     ("rpc", "argument 'limit' must be a number")),
    ("arg-bool-not-number", enc(call("search", {"query": "docs", "limit": True})), {},
     ("rpc", "argument 'limit' must be a number")),
    ("arg-above-maximum", enc(call("search", {"query": "docs", "limit": 51})), {},
     ("rpc", "argument 'limit' is above the maximum 50")),
    ("arg-pattern-partial", enc(call("search", {"query": "docs\n", "limit": 1})), {},
     ("rpc", "argument 'query' does not match the allowed pattern")),
    ("arg-max-length", enc(call("search", {"query": "a" * 41, "limit": 1})), {},
     ("rpc", "argument 'query' is longer than 40 characters")),
    ("arg-nan", (ADD_JSON % '{"name":"search","arguments":{"query":"a","limit":NaN}}').encode(),
     {}, ("403", "NaN is not JSON")),
    ("arg-overflow", (ADD_JSON % '{"name":"search","arguments":{"query":"a","limit":1e999}}'
                      ).encode(), {}, ("403", "overflows to infinity")),
    ("deep-nesting", nested(20000), {}, ("403", "nests too deeply")),
    ("trailing-data", DANGER + b" {}", {}, ("403", "not valid JSON (Extra data)")),
    ("empty-post", b"", {}, ("403", "needs a body")),
    ("not-json", b"tools/call danger", {}, ("403", "not valid JSON")),
    ("method-not-listed", enc(msg("prompts/get", {"name": "greet"})), {},
     ("403", "'prompts/get' is not granted")),
]


@pytest.fixture(scope="module")
def session(mcp_gateway: Gateway, mcp_servers: dict[str, McpUpstream], keys: Any
            ) -> Iterator[tuple[httpx.Client, McpUpstream, dict[str, str]]]:
    """A live MCP session with the JSON-mode server, through the gateway."""
    up = mcp_servers["json"]
    client = httpx.Client(proxy=mcp_gateway.proxy_url_with(keys.token(ttl=3600)),
                          trust_env=False, timeout=20)
    headers = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    r = client.post(up.url, headers=headers, content=enc(msg("initialize", {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}})))
    assert r.status_code == 200, r.text
    headers |= {"mcp-session-id": r.headers["mcp-session-id"],
                "mcp-protocol-version": "2025-11-25"}
    r = client.post(up.url, headers=headers,
                    content=enc({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    assert r.status_code == 202, r.text
    yield client, up, headers
    client.close()


@pytest.mark.parametrize(("body", "extra", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hardening(session: tuple[httpx.Client, McpUpstream, dict[str, str]],
                   mcp_gateway: Gateway, body: bytes, extra: dict[str, str],
                   expected: tuple[str, str]) -> None:
    client, up, headers = session
    up.ran.clear()
    h = {**headers, **extra}
    r = client.post(up.url, headers=h, content=body)
    kind, why = expected
    rid = r.headers["x-taskgate-request-id"]
    if kind == "rpc":
        assert r.status_code == 200, r.text
        answer = r.json()
        errors = answer if isinstance(answer, list) else [answer]
        assert all(e["error"]["code"] == TOOL_REFUSED for e in errors), answer
        assert why in errors[-1]["error"]["message"], answer
        assert errors[0]["error"]["data"]["request_id"] == rid
    else:
        assert r.status_code == int(kind), r.text
        assert why in r.json()["reason"], r.json()
        assert r.json()["request_id"] == rid
    assert up.ran == [], "a refused call reached the tool"
    recs = mcp_gateway.records_for(rid)
    assert len(recs) == 1 and recs[0]["decision"] == "deny", recs


def test_refusal_echoes_string_id(session: tuple[httpx.Client, McpUpstream, dict[str, str]]
                                  ) -> None:
    client, up, headers = session
    r = client.post(up.url, headers=headers, content=enc(call("danger", id="req-7")))
    assert r.json()["id"] == "req-7"
    assert r.json()["jsonrpc"] == "2.0"


def test_batch_refusal_answers_every_request(
        session: tuple[httpx.Client, McpUpstream, dict[str, str]]) -> None:
    client, up, headers = session
    up.ran.clear()
    r = client.post(up.url, headers=headers, content=enc(
        [call("add", {"a": 1, "b": 2}, id=1), {"jsonrpc": "2.0", "method": "notifications/x"},
         call("danger", id=2)]))
    answer = r.json()
    assert [e["id"] for e in answer] == [1, 2]
    assert "another call in this batch was refused" in answer[0]["error"]["message"]
    assert up.ran == []


def test_deny_record_carries_tool(session: tuple[httpx.Client, McpUpstream, dict[str, str]],
                                  mcp_gateway: Gateway) -> None:
    client, up, headers = session
    r = client.post(up.url, headers=headers, content=DANGER)
    rec = mcp_gateway.records_for(r.headers["x-taskgate-request-id"])[0]
    digest = __import__("hashlib").sha256(b'{"target":"prod"}').hexdigest()
    assert rec["tool"] == {"protocol": "mcp", "method": "tools/call", "name": "danger",
                           "arguments_sha256": digest}
    assert rec["decision"] == "deny" and rec["rule"] is None and rec["status"] == 200


def test_allowed_raw_call_runs(session: tuple[httpx.Client, McpUpstream, dict[str, str]],
                               mcp_gateway: Gateway) -> None:
    client, up, headers = session
    up.ran.clear()
    r = client.post(up.url, headers=headers,
                    content=enc(call("search", {"query": "docs", "limit": 50})))
    assert r.status_code == 200 and "error" not in r.json(), r.text
    assert up.ran == [("search", {"query": "docs", "limit": 50})]
    rec = mcp_gateway.records_for(r.headers["x-taskgate-request-id"])[0]
    assert rec["decision"] == "allow" and rec["rule"] == f"mcp-search-{up.port}"


@pytest.mark.parametrize(("coding", "encode"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress)])
def test_encoded_allowed_body_reaches_upstream(mcp_gateway: Gateway, upstream: Upstream,
                                               token: str, coding: str, encode: Any) -> None:
    """An allowed encoded body is forwarded encoded; the upstream (aiohttp decodes
    request bodies) reads exactly the bytes the gateway judged."""
    body = encode(ADD)
    with mcp_gateway.client(token) as c:
        r = c.post(f"http://127.0.0.1:{upstream.http_port}/mcp-echo", content=body,
                   headers={"Content-Encoding": coding, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["body_len"] == len(ADD)
    assert r.json()["headers"]["Content-Encoding"] == coding


def _unsized(gw: Gateway, upstream: Upstream, mcp_servers: dict[str, McpUpstream],
             token: str, how: str, body: list[bytes]) -> tuple[int, Any, str | None, bool]:
    """POST ``body`` with no length: chunked over HTTP/1.1 (the echo upstream), or over
    HTTP/2 with no Content-Length (the TLS MCP server). The status, JSON answer, request
    id, and whether all of ``body`` was sent before the answer came (HTTP/2)."""
    if how == "http1-chunked":
        with gw.client(token) as c:
            r = c.post(f"http://127.0.0.1:{upstream.http_port}/mcp-echo", content=iter(body))
        return r.status_code, r.json(), r.headers.get("x-taskgate-request-id"), True
    up = mcp_servers["tls"]
    with H2Client(gw.proxy_port, f"{up.host}:{up.port}", token, gw.ca,
                  server_name=up.host) as c:
        sid = c.start("POST", "/mcp", [("accept", "application/json, text/event-stream"),
                                       ("content-type", "application/json")])
        sent_all = False
        for chunk in body:
            c.data(sid, chunk)
            c.pump(0.1)
            if c.replies[sid].ended or c.replies[sid].reset:
                break  # refused before the body ended
        else:
            sent_all = True
            c.end(sid)
        reply = c.wait(sid)
    return reply.status, reply.json(), reply.request_id, sent_all


INIT = enc(msg("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                              "clientInfo": {"name": "raw", "version": "1"}}))


@pytest.mark.parametrize("how", ["http1-chunked", "http2"])
def test_a_body_without_a_length_is_held_and_judged(
        mcp_gateway: Gateway, upstream: Upstream, mcp_servers: dict[str, McpUpstream],
        token: str, how: str) -> None:
    """No length (chunked, HTTP/2): the body is held as it arrives, within the cap, then
    judged like any other; what is allowed reaches the upstream whole."""
    body = ADD if how == "http1-chunked" else INIT
    status, answer, rid, _ = _unsized(mcp_gateway, upstream, mcp_servers, token, how,
                                      [body[:10], body[10:]])
    assert status == 200, answer
    if how == "http1-chunked":
        assert answer["body_len"] == len(ADD)
    else:
        assert answer["result"]["serverInfo"]
    assert rid is not None
    rec = mcp_gateway.records_for(rid)[0]
    assert rec["decision"] == "allow" and rec["bytes_in"] == len(body)


@pytest.mark.parametrize("how", ["http1-chunked", "http2"])
def test_a_body_without_a_length_past_the_cap_is_refused_as_it_arrives(
        mcp_gateway: Gateway, upstream: Upstream, mcp_servers: dict[str, McpUpstream],
        token: str, how: str) -> None:
    """Past mcp.max_body_bytes the call is refused (413) before the body ends: the rest
    is never read, nothing is forwarded."""
    chunks = [b"x" * 16384] * (CAP // 16384 + 8)
    before = len(upstream.seen)
    status, answer, _, sent_all = _unsized(mcp_gateway, upstream, mcp_servers, token, how,
                                           chunks)
    assert status == 413, answer
    assert f"at most {CAP} bytes" in answer["reason"]
    assert len(upstream.seen) == before
    if how == "http2":
        assert not sent_all  # answered while the body was still coming
    rec = mcp_gateway.records_for(answer["request_id"])[0]
    assert rec["decision"] == "deny" and rec["status"] == 413


def test_gateway_healthy_after_all(session: tuple[httpx.Client, McpUpstream, dict[str, str]],
                                   mcp_gateway: Gateway) -> None:
    client, up, headers = session
    assert mcp_gateway.proc is not None and mcp_gateway.proc.poll() is None
    assert httpx.get(f"{mcp_gateway.control_url}/healthz").status_code == 200
    assert httpx.get(f"{mcp_gateway.control_url}/readyz").status_code == 200
    up.ran.clear()
    r = client.post(up.url, headers=headers, content=ADD)
    assert r.status_code == 200 and r.json()["result"]["structuredContent"] == {"result": 3}
    assert up.ran == [("add", {"a": 1, "b": 2})]
    assert "Traceback" not in mcp_gateway.output()
    assert not records(mcp_gateway, decision="error")
