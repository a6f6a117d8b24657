"""MCP endpoints end to end: only the transport's own requests, exact numbers, strict
answers, linear-time patterns and valid Unicode — against the real gateway.

One gateway, four kinds of upstream:

- the echo upstream (``tests.support.Upstream``): it answers anything and records what
  reached it — it stands for a JSON-RPC server that would read a call from a query
  string or a GET body, so "nothing reached it" proves nothing ran;
- the official SDK's MCPServer (JSON mode), whose tools record every run;
- a hostile MCP server (:class:`Crafted`) that answers tools/list with whatever a
  test asks for (``Tools`` look-alikes, duplicate ``result`` members…);
- the control plane, for held calls and task requests.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ceiling_config
from tests.e2e.test_approve import H2First
from tests.mcp_fixtures import TOOL_REFUSED
from tests.mcp_server import McpUpstream
from tests.support import PYTHON, WORKLOAD, Gateway, Upstream, python_env
from tests.tasks_support import admin, post_task

REDOS = "([A-Za-z0-9]+ ?)*"
INSPECT_ERROR = -32052


# -- a hostile MCP server: answers tools/list with the bytes a test chose ------------------
class Crafted:
    """Answers every POST with ``answers[id]`` (the JSON-RPC id picks it), as JSON on
    ``/mcp`` and as one SSE event on ``/mcp-sse``."""

    def __init__(self) -> None:
        self.answers: dict[int, bytes] = {}
        crafted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                answer = crafted.answers.get(json.loads(body).get("id"), b"{}")
                sse = self.path.startswith("/mcp-sse")
                data = b"data: " + answer + b"\n\n" if sse else answer
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream" if sse
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Crafted:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sdk() -> Iterator[McpUpstream]:
    up = McpUpstream(json_response=True).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def crafted() -> Iterator[Crafted]:
    c = Crafted().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
       upstream: Upstream, sdk: McpUpstream, crafted: Crafted) -> Iterator[Gateway]:
    cfg = ceiling_config(shared_files, upstream, approval_timeout_seconds=30,
                         mcp={"max_body_bytes": 1 << 20})
    echo = {"host": "127.0.0.1", "port": upstream.http_port, "scheme": "http"}
    cfg["workloads"][WORKLOAD]["standing"] += [
        {"id": "echo", **echo, "paths": ["/mcp-echo"], "mcp": {"tools": ["add"]}},
        # Even a rule that lists every method lets only the transport's requests through.
        {"id": "echo-wide", **echo, "paths": ["/mcp-wide"], "mcp": {"tools": ["add"]},
         "methods": ["GET", "POST", "DELETE", "HEAD", "PUT", "PATCH", "OPTIONS"]},
        {"id": "echo-approve", **echo, "paths": ["/mcp-approve"], "approval": "required",
         "mcp": {"tools": ["add"], "methods": ["resources/*"]}},
        {"id": "tls-echo", "host": "localhost", "allow_private": True, "port": upstream.https_port,
         "paths": ["/mcp-echo"], "mcp": {"tools": ["add"]}},
        {"id": "sdk-add", "host": "127.0.0.1", "port": sdk.port, "scheme": "http",
         "paths": ["/mcp"], "mcp": {"tools": ["add"]}},
        {"id": "sdk", "host": "127.0.0.1", "port": sdk.port, "scheme": "http",
         "paths": ["/mcp"], "mcp": {"tools": ["search"], "args": {
             "query": {"pattern": REDOS}, "limit": {"maximum": 50}}}},
        {"id": "crafted", "host": "127.0.0.1", "port": crafted.port, "scheme": "http",
         "paths": ["/mcp", "/mcp-sse"], "mcp": {"tools": ["add"]}},
    ]
    g = Gateway(tmp_path_factory.mktemp("gw-mcp-transport"), cfg).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def agent(gw: Gateway, keys: Any) -> Iterator[httpx.Client]:
    c = httpx.Client(proxy=gw.proxy_url_with(keys.token(ttl=3600)), trust_env=False,
                     timeout=20)
    yield c
    c.close()


def refused(r: httpx.Response, why: str, status: int = 403) -> dict[str, Any]:
    """A JSON refusal with error, reason and request_id, naming ``why``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] and why in body["reason"], body
    assert body["request_id"] == r.headers["x-taskgate-request-id"]
    return body


def seen_since(upstream: Upstream, before: int, marker: str) -> list[dict[str, Any]]:
    return [s for s in upstream.seen[before:] if marker in s["path"]]


# -- 1. only what the MCP transport defines ------------------------------------------------
SSE = {"Accept": "text/event-stream"}
CALL = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"danger"}}'

# (method, path and query, headers, body, part of the reason)
NOT_TRANSPORT: list[tuple[str, str, dict[str, str], bytes | None, str]] = [
    ("GET", "/mcp-echo?method=tools/call&name=danger", SSE, None, "carries no query"),
    ("GET", "/mcp-echo?" + httpx.QueryParams({"rpc": CALL}).__str__(), SSE, None,
     "carries no query"),
    ("GET", "/mcp-echo?", SSE, None, "carries no query"),
    ("GET", "/mcp-echo?x", {}, None, "carries no query"),
    ("GET", "/mcp-echo", {}, None, "must accept text/event-stream"),
    ("GET", "/mcp-echo", {"Accept": "application/json"}, None,
     "must accept text/event-stream"),
    ("GET", "/mcp-echo", {"Accept": "*/*"}, None, "must accept text/event-stream"),
    ("GET", "/mcp-echo", {"Accept": "text/event-stream;q=0"}, None,
     "must accept text/event-stream"),
    ("GET", "/mcp-echo", SSE, CALL.encode(), "carries no body"),
    ("DELETE", "/mcp-echo", {}, None, "needs an Mcp-Session-Id"),
    ("DELETE", "/mcp-echo?name=danger", {"Mcp-Session-Id": "s1"}, None,
     "carries no query or body"),
    ("DELETE", "/mcp-echo", {"Mcp-Session-Id": "s1"}, CALL.encode(),
     "carries no query or body"),
    ("HEAD", "/mcp-wide", SSE, None, "HEAD is not an MCP transport method"),
    ("PUT", "/mcp-wide", {}, CALL.encode(), "PUT is not an MCP transport method"),
    ("PATCH", "/mcp-wide", {}, CALL.encode(), "PATCH is not an MCP transport method"),
    ("OPTIONS", "/mcp-wide", {}, None, "OPTIONS is not an MCP transport method"),
    ("GET", "/mcp-wide?method=tools/call", SSE, None, "carries no query"),
]


@pytest.mark.parametrize(("method", "target", "headers", "body", "why"), NOT_TRANSPORT,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(NOT_TRANSPORT)])
def test_not_a_transport_request_is_refused(gw: Gateway, keys: Any,
                                            upstream: Upstream, method: str, target: str,
                                            headers: dict[str, str], body: bytes | None,
                                            why: str) -> None:
    before = len(upstream.seen)
    # A connection of its own: a refused HEAD is answered with a body on HTTP/1.1
    # (addons/_base.refuse, for every refusal), which would garble the next answer.
    with httpx.Client(proxy=gw.proxy_url_with(keys.token()), trust_env=False,
                      timeout=20) as agent:
        r = agent.request(method, f"http://127.0.0.1:{upstream.http_port}{target}",
                          headers=headers, content=body)
    if method == "HEAD":
        assert r.status_code == 403 and r.content == b""
    else:
        refused(r, why)
    assert seen_since(upstream, before, "/mcp-") == [], "it reached the upstream"
    rec = gw.records_for(r.headers["x-taskgate-request-id"])
    assert len(rec) == 1 and rec[0]["decision"] == "deny" and rec[0]["rule"] is None, rec


def test_get_with_chunked_body_refused(gw: Gateway, agent: httpx.Client,
                                       upstream: Upstream) -> None:
    before = len(upstream.seen)
    r = agent.request("GET", f"http://127.0.0.1:{upstream.http_port}/mcp-echo", headers=SSE,
                      content=iter([CALL.encode()[:10], CALL.encode()[10:]]))
    refused(r, "carries no body")
    assert seen_since(upstream, before, "/mcp-") == []


@pytest.mark.parametrize(("method", "headers"), [
    ("GET", {"Accept": "text/event-stream"}),
    ("DELETE", {"Mcp-Session-Id": "s1"}),
])
def test_h2_body_without_length_on_get_or_delete_refused(gw: Gateway, upstream: Upstream,
                                                         keys: Any, method: str,
                                                         headers: dict[str, str]) -> None:
    """HTTP/2 carries a body with no Content-Length: refused once it is held."""
    ctx = H2First(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(gw.ca))
    before = len(upstream.seen)
    with httpx.Client(proxy=gw.proxy_url_with(keys.token()), verify=ctx, http2=True,
                      trust_env=False, timeout=20) as c:
        r = c.request(method, f"https://localhost:{upstream.https_port}/mcp-echo",
                      headers=headers, content=iter([CALL.encode()]))
        assert r.http_version == "HTTP/2"
        refused(r, "carries no body")
        # The same request without a body is the transport's own: it goes through.
        ok = c.request(method, f"https://localhost:{upstream.https_port}/mcp-echo",
                       headers=headers)
    assert ok.status_code == 200, ok.text
    assert [s["method"] for s in seen_since(upstream, before, "/mcp-echo")] == [method]


@pytest.mark.parametrize(("method", "headers"), [
    ("GET", {"Accept": "text/event-stream"}),
    ("GET", {"Accept": "application/json, text/event-stream", "Mcp-Session-Id": "s1"}),
    ("DELETE", {"Mcp-Session-Id": "s1"}),
    ("DELETE", {"Mcp-Session-Id": "s1", "Content-Length": "0"}),
])
def test_transport_requests_pass(agent: httpx.Client, upstream: Upstream, method: str,
                                 headers: dict[str, str]) -> None:
    before = len(upstream.seen)
    r = agent.request(method, f"http://127.0.0.1:{upstream.http_port}/mcp-echo",
                      headers=headers)
    assert r.status_code == 200, r.text
    assert [s["method"] for s in seen_since(upstream, before, "/mcp-echo")] == [method]


# -- 1b. approval: required holds everything that is not provably inert --------------------
def pending(gw: Gateway) -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.control_url}/v1/approvals", headers=admin(gw), timeout=10)
    assert r.status_code == 200, r.text
    return [h for h in r.json()["approvals"] if "/mcp-approve" in h["url"]]


def wait_pending(gw: Gateway, n: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = pending(gw)
        if len(found) >= n:
            return found
        time.sleep(0.05)
    raise AssertionError("nothing was held within 10 s")


def note(method: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method}).encode()


def req(method: str, id: Any = 1, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).encode()


INERT: list[tuple[str, dict[str, str], bytes | None]] = [
    ("GET", {"Accept": "text/event-stream"}, None),
    ("POST", {}, req("initialize", protocolVersion="2025-11-25", capabilities={},
                     clientInfo={"name": "t", "version": "1"})),
    ("POST", {}, note("notifications/initialized")),
    ("POST", {}, json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                             "params": {"requestId": 1}}).encode()),
    ("POST", {}, req("tools/list")),
    ("POST", {}, req("ping")),
    ("POST", {}, b"[" + req("ping", 1) + b"," + req("tools/list", 2) + b","
     + note("notifications/initialized") + b"]"),
]


@pytest.mark.parametrize(("method", "headers", "body"), INERT)
def test_inert_requests_are_not_held(gw: Gateway, agent: httpx.Client, upstream: Upstream,
                                     method: str, headers: dict[str, str],
                                     body: bytes | None) -> None:
    before = len(upstream.seen)
    r = agent.request(method, f"http://127.0.0.1:{upstream.http_port}/mcp-approve",
                      headers=headers, content=body)
    assert r.status_code == 200, r.text
    assert len(seen_since(upstream, before, "/mcp-approve")) == 1
    recs = gw.records_for(r.headers["x-taskgate-request-id"])
    assert [x["decision"] for x in recs] == ["allow"], recs


ACTS: list[tuple[str, str, dict[str, str], bytes | None]] = [
    ("tool-call", "POST", {}, req("tools/call", name="add", arguments={"a": 1, "b": 2})),
    ("granted-method", "POST", {}, req("resources/read", uri="res://doc")),
    ("client-answer", "POST", {}, json.dumps({"jsonrpc": "2.0", "id": 7, "result": {
        "action": "accept", "content": {"confirm": True}}}).encode()),
    ("client-error-answer", "POST", {}, json.dumps(
        {"jsonrpc": "2.0", "id": 7, "error": {"code": -1, "message": "no"}}).encode()),
    ("custom-notification", "POST", {}, note("notifications/delete_everything")),
    ("batch-inert-and-call", "POST", {}, b"[" + req("ping", 1) + b","
     + req("tools/call", 2, name="add", arguments={}) + b"]"),
    ("session-delete", "DELETE", {"Mcp-Session-Id": "s1"}, None),
]


@pytest.mark.parametrize(("method", "headers", "body"), [c[1:] for c in ACTS],
                         ids=[c[0] for c in ACTS])
def test_not_provably_inert_is_held(gw: Gateway, keys: Any, upstream: Upstream,
                                    method: str, headers: dict[str, str],
                                    body: bytes | None) -> None:
    before = len(upstream.seen)
    url = f"http://127.0.0.1:{upstream.http_port}/mcp-approve"
    with httpx.Client(proxy=gw.proxy_url_with(keys.token()), trust_env=False,
                      timeout=20) as c:
        result: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: result.update(
            r=c.request(method, url, headers=headers, content=body)))
        t.start()
        try:
            [h] = wait_pending(gw)
            assert h["method"] == method
            assert seen_since(upstream, before, "/mcp-approve") == []  # held, not sent
            r = httpx.post(f"{gw.control_url}/v1/approvals/{h['id']}/deny",
                           headers=admin(gw), json={"by": "bob"}, timeout=10)
            assert r.status_code == 200, r.text
        finally:
            t.join(20)
    r = result["r"]
    assert seen_since(upstream, before, "/mcp-approve") == []
    if r.headers.get("content-type", "").startswith("application/json") and \
            r.status_code == 200:
        errors = r.json() if isinstance(r.json(), list) else [r.json()]
        assert all(e["error"]["code"] == TOOL_REFUSED for e in errors)
    else:
        refused(r, "denied by bob")


# -- 2. numbers compared exactly as written ------------------------------------------------
@pytest.fixture(scope="module")
def session(gw: Gateway, sdk: McpUpstream, agent: httpx.Client) -> dict[str, str]:
    """A live session with the SDK's server, through the gateway."""
    headers = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    r = agent.post(sdk.url, headers=headers, content=req(
        "initialize", protocolVersion="2025-11-25", capabilities={},
        clientInfo={"name": "raw", "version": "1"}))
    assert r.status_code == 200, r.text
    headers |= {"mcp-session-id": r.headers["mcp-session-id"],
                "mcp-protocol-version": "2025-11-25"}
    r = agent.post(sdk.url, headers=headers, content=note("notifications/initialized"))
    assert r.status_code == 202, r.text
    return headers


def search(limit: str, query: str = '"docs"', id: int = 1) -> bytes:
    return ('{"jsonrpc":"2.0","id":' + str(id) + ',"method":"tools/call","params":{"name":'
            '"search","arguments":{"query":' + query + ',"limit":' + limit + "}}}").encode()


@pytest.mark.parametrize("limit", [
    "50.0000000000000001", "50.00000000000000000000000000001", "5.00000000000000001e1",
    "50000000000000000001e-18", "100000000000000000000000", "9007199254740993",
])
def test_number_above_maximum_as_written_refused(agent: httpx.Client, sdk: McpUpstream,
                                                 session: dict[str, str], limit: str) -> None:
    sdk.ran.clear()
    r = agent.post(sdk.url, headers=session, content=search(limit))
    assert r.status_code == 200, r.text
    assert r.json()["error"]["code"] == TOOL_REFUSED
    assert "'limit' is above the maximum 50" in r.json()["error"]["message"]
    assert sdk.ran == []


@pytest.mark.parametrize(("limit", "value"), [("50", 50), ("5e1", 50), ("49.0", 49),
                                              ("1E1", 10), ("-0", 0)])
def test_number_within_maximum_runs(agent: httpx.Client, sdk: McpUpstream,
                                    session: dict[str, str], limit: str, value: int) -> None:
    sdk.ran.clear()
    r = agent.post(sdk.url, headers=session, content=search(limit))
    assert r.status_code == 200 and "error" not in r.json(), r.text
    assert sdk.ran == [("search", {"query": "docs", "limit": value})]


# -- 3. tools/list answers read strictly ----------------------------------------------------
TOOLS = b'[{"name":"add","inputSchema":{"type":"object"}},{"name":"danger"}]'
ANSWERS: list[tuple[str, bytes]] = [
    ("Tools", b'{"jsonrpc":"2.0","id":%d,"result":{"Tools":' + TOOLS + b"}}"),
    ("TOOLS-beside", b'{"jsonrpc":"2.0","id":%d,"result":{"tools":[],"TOOLS":' + TOOLS + b"}}"),
    ("dup-result", b'{"jsonrpc":"2.0","id":%d,"result":{"tools":[]},"result":{"tools":'
     + TOOLS + b"}}"),
    ("dup-tools", b'{"jsonrpc":"2.0","id":%d,"result":{"tools":[],"tools":' + TOOLS + b"}}"),
    ("Result", b'{"jsonrpc":"2.0","id":%d,"Result":{"tools":' + TOOLS + b"}}"),
    ("dup-name", b'{"jsonrpc":"2.0","id":%d,"result":{"tools":[{"name":"add",'
     b'"name":"danger"}]}}'),
    ("lone-surrogate", b'{"jsonrpc":"2.0","id":%d,"result":{"tools":[{"name":"add",'
     b'"description":"\\ud800"},{"name":"danger"}]}}'),
]


@pytest.mark.parametrize("path", ["/mcp", "/mcp-sse"])
@pytest.mark.parametrize("answer", [a for _, a in ANSWERS], ids=[n for n, _ in ANSWERS])
def test_unreadable_tools_list_answer_replaced(agent: httpx.Client, crafted: Crafted,
                                               path: str, answer: bytes) -> None:
    rid = len(crafted.answers) + 100
    crafted.answers[rid] = answer.replace(b"%d", str(rid).encode())
    r = agent.post(f"http://127.0.0.1:{crafted.port}{path}", content=req("tools/list", rid),
                   headers={"Accept": "application/json, text/event-stream"})
    assert r.status_code == 200
    assert b"danger" not in r.content
    data = r.text.removeprefix("data: ").strip() if path == "/mcp-sse" else r.text
    assert json.loads(data)["error"]["code"] == INSPECT_ERROR, r.text


def test_readable_tools_list_answer_filtered(agent: httpx.Client, crafted: Crafted) -> None:
    crafted.answers[99] = b'{"jsonrpc":"2.0","id":99,"result":{"tools":' + TOOLS + b"}}"
    r = agent.post(f"http://127.0.0.1:{crafted.port}/mcp", content=req("tools/list", 99))
    assert r.status_code == 200
    assert [t["name"] for t in r.json()["result"]["tools"]] == ["add"]


# -- 4. patterns run in linear time -------------------------------------------------------
def test_redos_argument_does_not_freeze_the_gateway(agent: httpx.Client, sdk: McpUpstream,
                                                    session: dict[str, str]) -> None:
    """Python's re needs ~6 s for this 28-character argument (2^27 ways to split it)."""
    sdk.ran.clear()
    evil = json.dumps("A1 " * 9 + "!")
    start = time.monotonic()
    r = agent.post(sdk.url, headers=session, content=search("1", evil))
    took = time.monotonic() - start
    assert r.json()["error"]["code"] == TOOL_REFUSED
    assert "does not match the allowed pattern" in r.json()["error"]["message"]
    assert took < 2, took
    for n in (1000, 60000):  # longer still: linear, not exponential
        r = agent.post(sdk.url, headers=session, content=search("1", json.dumps("a" * n + "!")))
        assert "does not match the allowed pattern" in r.json()["error"]["message"]
    assert time.monotonic() - start < 5
    ok = agent.post(sdk.url, headers=session, content=search("1", '"taskgate docs"'))
    assert "error" not in ok.json(), ok.text
    assert sdk.ran == [("search", {"query": "taskgate docs", "limit": 1})]


def test_other_calls_not_held_up_by_a_redos_argument(agent: httpx.Client, sdk: McpUpstream,
                                                     session: dict[str, str], gw: Gateway,
                                                     keys: Any) -> None:
    evil = search("1", json.dumps("A1 " * 12 + "!"), id=5)
    results: list[float] = []

    def attack() -> None:
        with httpx.Client(proxy=gw.proxy_url_with(keys.token()), trust_env=False,
                          timeout=30) as c:
            for _ in range(5):
                c.post(sdk.url, headers=session, content=evil)

    t = threading.Thread(target=attack)
    t.start()
    try:
        for _ in range(5):
            start = time.monotonic()
            r = agent.post(sdk.url, headers=session, content=search("2", '"plain words"', 6))
            results.append(time.monotonic() - start)
            assert "error" not in r.json(), r.text
    finally:
        t.join(30)
    assert max(results) < 2, results


def test_argument_over_the_match_cap_refused(agent: httpx.Client, sdk: McpUpstream,
                                             session: dict[str, str]) -> None:
    sdk.ran.clear()
    r = agent.post(sdk.url, headers=session,
                   content=search("1", json.dumps("a" * (64 * 1024 + 1))))
    assert "longer than the 65536 characters" in r.json()["error"]["message"]
    assert sdk.ran == []


@pytest.mark.parametrize(("pattern", "why"), [
    ("(a)\\1", "invalid escape sequence"),
    ("(?=a)a", "invalid perl operator"),
    ("(?<!a)b", "invalid perl operator"),
    ("a++", "bad repetition operator"),
    ("(?P<x>a)(?P=x)", "invalid perl operator"),
])
def test_task_with_a_pattern_re2_cannot_compile_is_422(gw: Gateway, upstream: Upstream,
                                                        pattern: str, why: str) -> None:
    rule = {"id": "mcp-task", "host": "localhost", "allow_private": True,
            "port": upstream.https_port,
            "paths": ["/mcp"], "mcp": {"tools": ["read_file"], "args": {
                "limit": {"maximum": 10}, "path": {"pattern": pattern}}}}
    r = post_task(gw, [rule], up=upstream)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "rules[0].mcp.args.path.pattern", body
    assert why in body["reason"] and "RE2" in body["reason"], body
    ok = post_task(gw, [{**rule, "mcp": {**rule["mcp"], "args": {
        "limit": {"maximum": 10}, "path": {"pattern": "/docs/[a-z]+"}}}}], up=upstream)
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize("pattern", ["(a)\\1", "(?=a)a", "x{1001}"])
def test_check_config_refuses_a_pattern_re2_cannot_compile(tmp_path: Path,
                                                           pattern: str) -> None:
    cfg = {"workloads": {"w": {"owner": "o", "standing": [
        {"id": "r", "host": "mcp.test", "mcp": {"tools": ["t"],
                                                "args": {"q": {"pattern": pattern}}}}]}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([*PYTHON, "-m", "proxy", "check-config", "t.yaml"], cwd=tmp_path,
                         env=python_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert 'workloads["w"].standing[0].mcp.args.q.pattern' in out.stderr, out.stderr
    assert "RE2" in out.stderr and "Traceback" not in out.stderr


# -- 5. strings that are not valid Unicode never get in -------------------------------------
def tool_call(args: str = '{"a":1,"b":2}', name: str = '"add"', id: str = "1",
              method: str = '"tools/call"', meta: str = "") -> bytes:
    return ('{"jsonrpc":"2.0","id":' + id + ',"method":' + method + ',"params":{"name":'
            + name + ',"arguments":' + args + meta + "}}").encode()


SURROGATES: list[tuple[str, bytes, str]] = [
    ("arg-value", tool_call('{"a":1,"b":2,"c":"\\ud800"}'), "unpaired surrogate"),
    ("arg-value-upper", tool_call('{"a":1,"b":2,"c":"x\\uDFFFx"}'), "unpaired surrogate"),
    ("arg-key", tool_call('{"a":1,"b":2,"\\udc00":1}'), "unpaired surrogate"),
    ("arg-nested", tool_call('{"a":1,"b":2,"c":[{"d":["\\ud83d"]}]}'), "unpaired surrogate"),
    ("reversed-pair", tool_call('{"a":1,"b":2,"c":"\\ude00\\ud83d"}'), "unpaired surrogate"),
    ("tool-name", tool_call(name='"add\\ud800"'), "unpaired surrogate"),
    ("method", tool_call(method='"tools/call\\ud800"'), "unpaired surrogate"),
    ("id", tool_call(id='"\\ud800"'), "unpaired surrogate"),
    ("meta", tool_call(meta=',"_meta":{"progressToken":"\\udbff"}'), "unpaired surrogate"),
    ("batch", b"[" + tool_call(id="1") + b"," + tool_call('{"a":"\\ud800"}', id="2") + b"]",
     "unpaired surrogate"),
    ("notification", b'{"jsonrpc":"2.0","method":"notifications/\\ud800"}',
     "unpaired surrogate"),
    ("cesu8-raw", tool_call('{"a":1,"b":2,"c":"X"}').replace(b"X", b"\xed\xa0\x80"),
     "not valid UTF-8"),
    ("cesu8-raw-key", tool_call('{"a":1,"b":2,"X":1}').replace(b"X", b"\xed\xb0\x80"),
     "not valid UTF-8"),
]


@pytest.mark.parametrize(("body", "why"), [c[1:] for c in SURROGATES],
                         ids=[c[0] for c in SURROGATES])
def test_lone_surrogates_refused_and_the_audit_goes_on(gw: Gateway, agent: httpx.Client,
                                                        sdk: McpUpstream,
                                                        session: dict[str, str],
                                                        body: bytes, why: str) -> None:
    sdk.ran.clear()
    r = agent.post(sdk.url, headers=session, content=body)
    refused(r, why)
    assert sdk.ran == []
    rid = r.headers["x-taskgate-request-id"]
    recs = gw.records_for(rid)
    assert len(recs) == 1 and recs[0]["decision"] == "deny", recs
    # The audit writer is alive: the next call is answered and recorded.
    ok = agent.post(sdk.url, headers=session, content=tool_call())
    assert ok.json()["result"]["structuredContent"] == {"result": 3}, ok.text
    assert len(gw.records_for(ok.headers["x-taskgate-request-id"])) == 1


def test_gateway_healthy_after_all(gw: Gateway) -> None:
    assert gw.proc is not None and gw.proc.poll() is None
    assert httpx.get(f"{gw.control_url}/readyz").status_code == 200
    assert "Traceback" not in gw.output()
