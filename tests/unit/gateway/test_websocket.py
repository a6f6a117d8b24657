"""proxy/gateway/_websocket.py: which upgrades are WebSockets, which rule allows one,
the sockets of a task, and MCP frames judged like bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.gateway import (
    Exchange,
    OpenSockets,
    answer_frame,
    close_reason,
    frame_exchange,
    granted_tools,
    judge_frame,
    turned_down,
    upgrade_decision,
    websocket_upgrade,
)
from proxy.policy import Decision, parse_rule

CAP = 1 << 20


def rule(**kw: Any) -> Any:
    kw.setdefault("id", "r")
    kw.setdefault("host", "rt.example")
    if "mcp" not in kw:
        kw.setdefault("methods", ["GET"])
    return parse_rule(kw)


@pytest.mark.parametrize(("method", "version", "upgrade", "ok"), [
    ("GET", "HTTP/1.1", ["websocket"], True),
    ("GET", "HTTP/1.1", ["WebSocket "], True),
    ("POST", "HTTP/1.1", ["websocket"], False),
    ("GET", "HTTP/1.0", ["websocket"], False),
    ("GET", "HTTP/2.0", ["websocket"], False),
    ("GET", "HTTP/1.1", ["h2c"], False),
    ("GET", "HTTP/1.1", ["websocket, h2c"], False),
    ("GET", "HTTP/1.1", ["websocket", "websocket"], False),
    ("GET", "HTTP/1.1", [], False),  # Connection: upgrade alone
])
def test_websocket_upgrade(method: str, version: str, upgrade: list[str], ok: bool) -> None:
    assert websocket_upgrade(method, version, upgrade) is ok


def test_an_upgrade_needs_a_rule_that_opts_in() -> None:
    plain, socket = rule(id="plain"), rule(id="socket", websocket=True)
    allowed = Decision(True, "allowed by rule", plain)
    refused = upgrade_decision(allowed, [plain])
    assert not refused.allowed and "websocket: true" in refused.reason
    assert "'plain'" in refused.reason
    # another matching rule that opts in allows it, and answers for it
    ok = upgrade_decision(allowed, [plain, socket])
    assert ok.allowed and ok.rule is socket
    denied = Decision()
    assert upgrade_decision(denied, [socket]) is denied  # a refused call stays refused


def test_a_task_end_closes_its_sockets_only() -> None:
    sockets, closed = OpenSockets(), []
    for task, key in (("t1", "a"), ("t1", "b"), ("t2", "c")):
        sockets.add(task, key, lambda code, why, key=key: closed.append((key, code, why)))
    sockets.remove("t1", "b")
    assert sockets.task_ended("t1", "revoked") == 1
    assert closed == [("a", 1008, "task revoked")]
    assert sockets.task_ended("t1", "expired") == 0  # once
    assert sockets.count("t2") == 1
    sockets.task_ended("t2", None)
    assert closed[-1] == ("c", 1008, "task ended")


MCP = [rule(id="m", paths=["/mcp"], mcp={"tools": ["search"]})]


def call(tool: str, rpc_id: int = 1) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
                         "params": {"name": tool, "arguments": {}}})


def test_a_frame_calling_a_granted_tool_is_allowed_and_acts() -> None:
    verdict = judge_frame(MCP, call("search"), CAP)
    assert verdict.allowed and verdict.reply is None and verdict.tool is not None
    assert verdict.tool["name"] == "search" and verdict.acts and verdict.rule is MCP[0]


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
    {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
])
def test_lifecycle_frames_are_allowed_and_do_not_act(message: dict[str, Any]) -> None:
    verdict = judge_frame(MCP, orjson.dumps(message), CAP)
    assert verdict.allowed and not verdict.acts


def test_an_allowed_frame_turned_down_answers_each_request() -> None:
    verdict = turned_down(judge_frame(MCP, call("search", 4), CAP), "task budget spent")
    assert not verdict.allowed and verdict.reply is not None
    reply = orjson.loads(verdict.reply)
    assert reply["id"] == 4 and reply["error"]["data"]["reason"] == "task budget spent"
    assert reply["error"]["data"]["request_id"] == verdict.request_id


def test_a_frame_calling_another_tool_gets_a_tool_error_with_its_id() -> None:
    verdict = judge_frame(MCP, call("delete", 9), CAP)
    assert not verdict.allowed and verdict.reply is not None and verdict.request_id
    reply = orjson.loads(verdict.reply)
    assert reply["id"] == 9 and reply["error"]["code"] == -32051
    assert reply["error"]["data"]["request_id"] == verdict.request_id


@pytest.mark.parametrize(("payload", "why"), [
    (None, "binary frames"),
    (b"not json", ""),
    (b'{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "ping"}', ""),
    (b"\xff\xfe", ""),
    (b"[]", ""),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "resources/read"}', ""),
    (b"x" * (CAP + 1), ""),
])
def test_a_frame_that_cannot_be_judged_is_refused(payload: bytes | None, why: str) -> None:
    verdict = judge_frame(MCP, payload, CAP)
    assert not verdict.allowed and verdict.reply is not None
    reply = orjson.loads(verdict.reply)
    assert reply["error"]["code"] == -32051 and why in reply["error"]["data"]["reason"]
    assert reply["error"]["data"]["request_id"] == verdict.request_id


def test_tools_list_answers_keep_only_granted_tools() -> None:
    answer = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "search"}, {"name": "delete"}]}})
    kept = orjson.loads(answer_frame(answer, granted_tools(MCP)))
    assert [t["name"] for t in kept["result"]["tools"]] == ["search"]
    other = b'{"jsonrpc": "2.0", "id": 2, "result": {}}'
    assert answer_frame(other, granted_tools(MCP)) == other
    unreadable = orjson.loads(answer_frame(b'{"a": 1, "a": 2}', granted_tools(MCP)))
    assert unreadable["error"]["code"] == -32052


def test_a_judged_frame_gets_its_own_record() -> None:
    ex = Exchange(request_id="socket-id", client="127.0.0.1", method="GET", host="rt.example")
    ex.decision, ex.status, ex.bytes_in, ex.rule = "allow", 101, 500, "socket"
    verdict = judge_frame(MCP, call("delete"), CAP)
    rec = frame_exchange(ex, verdict, 42).record()
    assert rec["request_id"] == verdict.request_id != "socket-id"
    assert (rec["decision"], rec["rule"], rec["status"], rec["bytes_in"]) == \
        ("deny", None, None, 42)
    assert rec["tool"]["name"] == "delete" and rec["host"] == "rt.example"
    assert rec["websocket"]["socket"] == "socket-id" and rec["websocket"]["refused"] == 1
    assert ex.decision == "allow" and ex.request_id == "socket-id"  # the socket's untouched
    allowed = frame_exchange(ex, judge_frame(MCP, call("search"), CAP), 40).record()
    assert (allowed["decision"], allowed["rule"]) == ("allow", "m")
    assert allowed["websocket"]["refused"] == 0


def test_a_close_reason_fits_a_close_frame() -> None:
    assert close_reason("task revoked") == "task revoked"
    long = close_reason("é" * 100)
    assert len(long.encode()) <= 123 and long == "é" * 61
