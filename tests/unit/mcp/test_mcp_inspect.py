"""proxy/mcp/_inspect.py: a body judged against every MCP rule matching the endpoint."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from proxy.errors import Refused
from proxy.mcp import inspect, refused_after, rpc_refusal, transport_refusal
from proxy.mcp._inspect import TOOL_REFUSED
from proxy.mcp._jsonrpc import digest
from proxy.policy import parse_rule

RULES = [
    parse_rule({"id": "plain", "host": "mcp.test", "methods": ["POST"], "paths": ["/other"]}),
    parse_rule({"id": "basic", "host": "mcp.test", "mcp": {"tools": ["add"]}}),
    parse_rule({"id": "search", "host": "mcp.test", "secret": "s",
                "mcp": {"tools": ["search", "add"], "args": {"limit": {"maximum": 50}},
                        "methods": ["resources/*"]}}),
]


def call(name: str, arguments: Any = None, id: Any = 1) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name}
    if arguments is not None:
        params["arguments"] = arguments
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}


def msg(method: str, id: Any = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": params}


NOTE = {"jsonrpc": "2.0", "method": "notifications/initialized"}

# (body, allowed rule id or None, part of the reason, answered as a JSON-RPC error)
DECISIONS: list[tuple[Any, str | None, str, bool]] = [
    (call("add", {"a": 1}), "basic", "allowed", False),
    (call("search", {"limit": 5}), "search", "allowed", False),
    (call("add"), "basic", "allowed", False),
    (call("search", {"limit": 500}), None, "above the maximum 50", True),
    (call("search"), None, "'limit' is required by the grant and missing", True),
    (call("drop"), None, "tool 'drop' is not granted", True),
    (call("add", [1, 2]), None, "arguments must be an object", True),
    (call(7), None, "needs a tool name", True),
    ({**call("add"), "params": [1]}, None, "params must be an object", True),
    (call("add", id=None), None, "id must be a string", False),
    ({k: v for k, v in call("drop").items() if k != "id"}, None, "must carry an id", False),
    ({**call("add"), "params": {"name": "add", "Arguments": {"a": 1}}}, None,
     "'Arguments' differs only by case", True),
    (msg("initialize"), "basic", "allowed", False),
    (msg("server/discover"), "basic", "allowed", False),
    (msg("ping"), "basic", "allowed", False),
    (msg("tools/list"), "basic", "allowed", False),
    (NOTE, "basic", "allowed", False),
    ({"jsonrpc": "2.0", "id": 5, "result": {"roots": []}}, "basic", "allowed", False),
    (msg("resources/read", uri="res://x"), "search", "allowed", False),
    (msg("prompts/get", name="x"), None, "'prompts/get' is not granted", False),
    (msg("Tools/List"), None, "differs only by case or folding from 'tools/list'", False),
    (msg("TOOLS/CALL", name="add"), None, "differs only by case", False),
    # The search rule's args hold for each of its tools, so add needs a limit there too.
    ([call("add", {"limit": 1}, 1), call("search", {"limit": 1}, 2), NOTE], "search", "allowed",
     False),
    ([call("add", id=1), msg("resources/read", 2, uri="x")], None, "no single rule", True),
    ([call("add", {"limit": 9}, 1), msg("resources/read", 2, uri="x")], "search", "allowed",
     False),
    ([msg("tools/list", 1), msg("prompts/get", 2)], None, "'prompts/get' is not granted",
     False),
    ([call("add", id=1), call("drop", id=2)], None, "tool 'drop' is not granted", True),
    ([NOTE, call("add", id=1), msg("resources/read", 2, uri="x")], None, "no single rule", True),
]


@pytest.mark.parametrize(("body", "rule", "why", "rpc"), DECISIONS)
def test_decisions(body: Any, rule: str | None, why: str, rpc: bool) -> None:
    try:
        d = inspect(RULES, "POST", json.dumps(body).encode(), None, 1 << 20)
    except Refused as e:
        assert rule is None and not rpc and why in e.reason
        return
    assert d.allowed is (rule is not None)
    assert (d.rule.id if d.rule else None) == rule
    assert why in d.reason
    assert d.tool_error is rpc


def test_batch_across_rules_is_refused() -> None:
    """Each call is allowed by some rule, but no single rule (and secret) covers both."""
    rules = [RULES[1], parse_rule({"id": "other", "host": "mcp.test",
                                   "mcp": {"tools": ["search"]}})]
    body = json.dumps([call("add", id=1), call("search", id=2)]).encode()
    d = inspect(rules, "POST", body, None, 1 << 20)
    assert not d.allowed and "no single rule allows every call" in d.reason
    answer = orjson.loads(rpc_refusal(d, "rid"))
    assert [a["id"] for a in answer] == [1, 2]
    assert all(a["error"]["code"] == TOOL_REFUSED for a in answer)


def test_refusal_body() -> None:
    d = inspect(RULES, "POST", json.dumps(call("drop", id="x-1")).encode(), None, 1 << 20)
    assert orjson.loads(rpc_refusal(d, "rid")) == {
        "jsonrpc": "2.0", "id": "x-1",
        "error": {"code": TOOL_REFUSED,
                  "message": "taskgate refused this call: tool 'drop' is not granted",
                  "data": {"reason": "tool 'drop' is not granted", "request_id": "rid"}}}


def test_audit_tool_field() -> None:
    d = inspect(RULES, "POST", json.dumps(call("add", {"b": 2, "a": 1})).encode(), None, 1 << 20)
    assert d.tool == {"protocol": "mcp", "method": "tools/call", "name": "add",
                      "arguments_sha256": digest({"a": 1, "b": 2})}
    assert d.calls == (("add", b'{"a":1,"b":2}'),)
    d = inspect([parse_rule({"id": "rpc", "host": "eth.test", "mcp": {"methods": ["eth_call"]}})],
                "POST", json.dumps(msg("eth_call", x=1)).encode(), None, 1 << 20)
    assert d.allowed and d.tool == {"protocol": "jsonrpc", "method": "eth_call",
                                    "name": "eth_call", "arguments_sha256": digest({"x": 1})}
    d = inspect(RULES, "POST", json.dumps([NOTE, call("add", id=3)]).encode(), None, 1 << 20)
    assert d.tool is not None and d.tool["method"] == "batch"
    assert [e["method"] for e in d.tool["batch"]] == ["notifications/initialized", "tools/call"]


def test_tools_list_is_flagged_for_filtering() -> None:
    d = inspect(RULES, "POST", json.dumps(msg("tools/list")).encode(), None, 1 << 20)
    assert d.lists_tools and d.granted_tools == {"add", "search"}
    d = inspect(RULES, "POST", json.dumps(call("add")).encode(), None, 1 << 20)
    assert not d.lists_tools


@pytest.mark.parametrize(("method", "acts"), [("GET", False), ("DELETE", True)])
def test_bodyless_stream_and_session_requests(method: str, acts: bool) -> None:
    """The event stream is inert; ending a session is not (held under approval)."""
    d = inspect(RULES, method, b"", None, 1 << 20)
    assert d.allowed and d.tool is None and d.acts is acts


def test_empty_post_refused() -> None:
    with pytest.raises(Refused, match="needs a body"):
        inspect(RULES, "POST", b"", None, 1 << 20)


def test_no_mcp_rule() -> None:
    d = inspect(RULES[:1], "POST", json.dumps(call("add")).encode(), None, 1 << 20)
    assert not d.allowed


# (allowed body, whether it asks the server to act — held under approval: required —,
#  the ids a later refusal answers)
ACTS: list[tuple[Any, bool, list[Any]]] = [
    (call("add", {"a": 1}), True, [1]),
    (msg("resources/read", id="r", uri="res://doc"), True, ["r"]),
    (msg("initialize"), False, [1]),
    (msg("tools/list", id=2), False, [2]),
    (msg("ping", id=3), False, [3]),
    (NOTE, False, []),
    ([msg("tools/list", id=1), NOTE, call("add", id=2)], True, [1, 2]),
    # A client's answer to a server request (an elicitation "accept", a sampling
    # result) can make the server act: not provably inert, so held under approval.
    ({"jsonrpc": "2.0", "id": 9, "result": {}}, True, []),
    (msg("server/discover", id=4), False, [4]),
    ({"jsonrpc": "2.0", "method": "notifications/initialized"}, False, []),
    ({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
     False, []),
    ({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}, False, []),
    ({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}, False, []),
    # Any other notification name is not one the specification defines: not inert.
    ({"jsonrpc": "2.0", "method": "notifications/delete_everything"}, True, []),
    ([msg("ping", id=1), {"jsonrpc": "2.0", "id": 9, "result": {}}], True, [1]),
]


@pytest.mark.parametrize(("body", "acts", "ids"), ACTS)
def test_what_an_allowed_body_asks_for(body: Any, acts: bool, ids: list[Any]) -> None:
    d = inspect(RULES[1:], "POST", orjson.dumps(body), None, 1 << 20)
    assert d.allowed, d.reason
    assert (d.acts, list(d.requests), d.batch) == (acts, ids, isinstance(body, list))


def test_an_allowed_call_refused_after_is_answered_per_request() -> None:
    batch = [call("add", {"a": 1}, id="x"), NOTE, call("add", {"a": 2}, id=7)]
    d = refused_after(inspect(RULES[1:], "POST", orjson.dumps(batch), None, 1 << 20),
                      "denied by bob")
    assert not d.allowed and d.tool_error and d.reason == "denied by bob"
    assert [(e["id"], e["error"]["code"], e["error"]["data"]["reason"])
            for e in orjson.loads(rpc_refusal(d, "rid"))] == [
        ("x", TOOL_REFUSED, "denied by bob"), (7, TOOL_REFUSED, "denied by bob")]
    single = refused_after(inspect(RULES[1:], "POST", orjson.dumps(call("add", id=4)), None,
                                   1 << 20), "timed out")
    assert orjson.loads(rpc_refusal(single, "rid"))["id"] == 4


# -- only what the MCP streamable-HTTP transport defines --------------------------------
SSE = "text/event-stream"
# (method, has query, Accept, Mcp-Session-Id, has body, None if allowed else part of why)
TRANSPORT: list[tuple[str, bool, str | None, str | None, bool, str | None]] = [
    ("POST", False, "application/json, text/event-stream", None, True, None),
    ("POST", True, None, "s1", True, None),  # the old HTTP+SSE transport's /messages?session=
    ("GET", False, SSE, None, False, None),
    ("GET", False, SSE, "s1", False, None),
    ("GET", False, "application/json, text/event-stream;q=0.5", None, False, None),
    ("GET", False, "TEXT/EVENT-STREAM", None, False, None),
    ("GET", False, " text/event-stream ; charset=utf-8", None, False, None),
    ("GET", True, SSE, None, False, "carries no query"),
    ("GET", True, None, None, False, "carries no query"),
    ("GET", False, None, None, False, "must accept text/event-stream"),
    ("GET", False, "*/*", None, False, "must accept text/event-stream"),
    ("GET", False, "text/*", None, False, "must accept text/event-stream"),
    ("GET", False, "application/json", None, False, "must accept text/event-stream"),
    ("GET", False, "text/event-stream;q=0", None, False, "must accept text/event-stream"),
    ("GET", False, "text/event-stream; q=0.000", None, False, "must accept text/event-stream"),
    ("GET", False, "text/event-stream;q=x", None, False, "must accept text/event-stream"),
    ("GET", False, "text/event-streams", None, False, "must accept text/event-stream"),
    ("GET", False, SSE, None, True, "carries no body"),
    ("DELETE", False, None, "s1", False, None),
    ("DELETE", False, SSE, "s1", False, None),
    ("DELETE", False, None, None, False, "needs an Mcp-Session-Id"),
    ("DELETE", False, None, " ", False, "needs an Mcp-Session-Id"),
    ("DELETE", True, None, "s1", False, "carries no query or body"),
    ("DELETE", False, None, "s1", True, "carries no query or body"),
    ("HEAD", False, SSE, None, False, "HEAD is not an MCP transport method"),
    ("PUT", False, None, None, True, "PUT is not an MCP transport method"),
    ("PATCH", False, None, None, True, "PATCH is not an MCP transport method"),
    ("OPTIONS", False, None, None, False, "OPTIONS is not an MCP transport method"),
    ("TRACE", False, None, None, False, "TRACE is not an MCP transport method"),
    ("CONNECT", False, None, None, False, "is not an MCP transport method"),
    ("PROPFIND", False, None, None, False, "is not an MCP transport method"),
]


@pytest.mark.parametrize(("method", "query", "accept", "session", "body", "why"), TRANSPORT)
def test_transport_refusal(method: str, query: bool, accept: str | None, session: str | None,
                           body: bool, why: str | None) -> None:
    got = transport_refusal(method, query, accept, session, body)
    if why is None:
        assert got is None, got
    else:
        assert got is not None and why in got, got


@pytest.mark.parametrize("query", [False, True])
@pytest.mark.parametrize("accept", [None, "text/event-stream", "text/html;q=0"])
@pytest.mark.parametrize("session", [None, "", "s-1"])
@pytest.mark.parametrize("body", [False, True])
def test_a_post_passes_the_transport_check_whatever_its_headers(
        query: bool, accept: str | None, session: str | None, body: bool) -> None:
    """addons/mcp.py reads no header for a POST on the strength of this (its body is
    judged by inspect()): a change here must change it too."""
    assert transport_refusal("POST", query, accept, session, body) is None


@pytest.mark.parametrize(("method", "body", "why"), [
    ("GET", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"danger"}}',
     "a GET to an MCP endpoint carries no body"),
    ("GET", b" ", "carries no body"),
    ("DELETE", b"x", "a DELETE to an MCP endpoint carries no body"),
    ("HEAD", b"", "HEAD is not an MCP transport method"),
    ("PUT", json.dumps(call("add")).encode(), "PUT is not an MCP transport method"),
    ("PATCH", b"", "PATCH is not an MCP transport method"),
    ("OPTIONS", b"", "OPTIONS is not an MCP transport method"),
    ("get", b"", "is not an MCP transport method"),  # the addon passes it upper-cased
])
def test_inspect_refuses_what_the_transport_does_not_define(method: str, body: bytes,
                                                            why: str) -> None:
    with pytest.raises(Refused) as e:
        inspect(RULES, method, body, None, 1 << 20)
    assert why in e.value.reason
