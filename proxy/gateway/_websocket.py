"""WebSocket connections the gateway lets through: which upgrades, their totals, the
sockets of each task, and the judging of MCP frames. Nothing here knows mitmproxy.

A WebSocket is one call. Its upgrade request is judged like any other, and allowed
only by a rule that says ``websocket: true`` (:func:`upgrade_decision`); any other
upgrade (h2c, a WebSocket on a rule without the flag) stays refused. Frames then flow
until one side closes, or the gateway does: when the task ends (revoked, expired)
its sockets are closed with :data:`POLICY_VIOLATION` and the reason
(:class:`OpenSockets`). The call's one audit record is written when the socket ends,
with its :class:`SocketTotals`.

On a rule with ``mcp`` every text frame from the agent is one JSON-RPC body, judged
as strictly as an HTTP body (:func:`judge_frame`); a refused frame is not forwarded,
the agent gets a JSON-RPC error frame instead. Binary frames cannot be judged there.
A message that acts (a tool call) is a call of its own, as an MCP POST is: it takes
one from the task's budget and gets its own record (:func:`frame_exchange`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from proxy.errors import TaskgateError
from proxy.gateway._core import new_request_id
from proxy.gateway._exchange import Exchange, SocketTotals
from proxy.mcp import McpDecision, filter_message, inspect, refused_after, rpc_refusal
from proxy.policy import Decision, Rule

__all__ = [
    "FRAME_REFUSED",
    "POLICY_VIOLATION",
    "FrameVerdict",
    "OpenSockets",
    "answer_frame",
    "close_reason",
    "frame_exchange",
    "granted_tools",
    "judge_frame",
    "turned_down",
    "upgrade_decision",
    "websocket_upgrade",
]

POLICY_VIOLATION = 1008  # RFC 6455 7.4.1: the close code of a socket the gateway ends
FRAME_REFUSED = -32051  # the JSON-RPC error code of a refused frame (as a refused tools/call)
MAX_CLOSE_REASON = 123  # bytes a close frame's reason may hold (RFC 6455 5.5.1)


def websocket_upgrade(method: str, http_version: str, upgrade: Sequence[str]) -> bool:
    """Whether an upgrade request asks for a WebSocket (RFC 6455 4.1): a GET over
    HTTP/1.1 whose one ``Upgrade`` value is ``websocket``. Anything else that asks
    to leave HTTP (h2c, two protocols at once) is not one."""
    return (method == "GET" and http_version == "HTTP/1.1" and len(upgrade) == 1
            and upgrade[0].strip().lower() == "websocket")


def upgrade_decision(decision: Decision, matching: Sequence[Rule]) -> Decision:
    """The decision on a WebSocket upgrade: allowed only by a rule that says
    ``websocket: true`` (the first of ``matching``, every rule that allows the call)."""
    if not decision.allowed:
        return decision
    for rule in matching:
        if rule.websocket:
            return Decision(True, "WebSocket upgrade allowed by rule", rule)
    return Decision(False, f"rule {decision.rule_id!r} allows this call but not a WebSocket "
                           "upgrade; a rule needs websocket: true for that")


Close = Callable[[int, str], None]


class OpenSockets:
    """The open WebSockets of each task, so that the task's end closes them.

    Keyed by whatever the data plane identifies a socket with; ``close(code, reason)``
    is how it closes one."""

    def __init__(self) -> None:
        self._by_task: dict[str, dict[Hashable, Close]] = {}

    def add(self, task: str, key: Hashable, close: Close) -> None:
        self._by_task.setdefault(task, {})[key] = close

    def remove(self, task: str, key: Hashable) -> None:
        sockets = self._by_task.get(task)
        if sockets is not None:
            sockets.pop(key, None)
            if not sockets:
                del self._by_task[task]

    def count(self, task: str) -> int:
        return len(self._by_task.get(task, ()))

    def task_ended(self, task: str, how: str | None) -> int:
        """Close every socket of ``task`` (``how``: revoked, expired); how many."""
        sockets = self._by_task.pop(task, {})
        reason = f"task {how}" if how else "task ended"
        for close in sockets.values():
            close(POLICY_VIOLATION, reason)
        return len(sockets)


@dataclass(frozen=True, slots=True)
class FrameVerdict:
    """The verdict on one message from the agent on an MCP rule. The zero value refuses.

    Every verdict has its own ``request_id``: a refused message's record (and the one
    its JSON-RPC error names), or an acting one's (:attr:`acts`)."""

    allowed: bool = False
    reason: str = "the frame was not judged"
    tool: dict[str, Any] | None = None
    reply: bytes | None = None  # the JSON-RPC error sent back in its place
    request_id: str = ""
    rule: Rule | None = None  # the rule that allowed it
    acts: bool = False  # asks the server to act (a tool call): a call of its own
    decision: McpDecision | None = field(default=None, repr=False)


def _error_frame(reason: str, request_id: str, rpc_id: Any = None) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rpc_id,
                         "error": {"code": FRAME_REFUSED,
                                   "message": f"taskgate refused this message: {reason}",
                                   "data": {"reason": reason, "request_id": request_id}}})


def judge_frame(rules: Sequence[Rule], payload: bytes | None, cap: int) -> FrameVerdict:
    """Judge one message from the agent against the MCP rules of its socket.

    ``payload`` is a text message's bytes, None for a binary one (no JSON-RPC to
    read: refused). A text message is read as one JSON-RPC body, exactly as a POST
    body is (:func:`proxy.mcp.inspect`)."""
    request_id = new_request_id()
    if payload is None:
        reason = "binary frames cannot be inspected on an MCP rule; send JSON-RPC as text"
        return FrameVerdict(False, reason, None, _error_frame(reason, request_id), request_id)
    try:
        decision = inspect(rules, "POST", payload, None, cap)
    except TaskgateError as e:
        return FrameVerdict(False, e.reason, None, _error_frame(e.reason, request_id),
                            request_id)
    if decision.allowed:
        return FrameVerdict(True, decision.reason, decision.tool, None, request_id,
                            decision.rule, decision.acts, decision)
    return FrameVerdict(False, decision.reason, decision.tool,
                        _refusal(decision, request_id), request_id, decision=decision)


def turned_down(verdict: FrameVerdict, reason: str) -> FrameVerdict:
    """An allowed message refused after all (the task's budget is spent): each of its
    requests answered with a JSON-RPC error saying why."""
    decision = verdict.decision
    refused = refused_after(decision, reason) if decision is not None else None
    reply = (rpc_refusal(refused, verdict.request_id) if refused is not None
             and refused.tool_error else _error_frame(reason, verdict.request_id))
    return FrameVerdict(False, reason, verdict.tool, reply, verdict.request_id,
                        decision=refused)


def _refusal(decision: McpDecision, request_id: str) -> bytes:
    if decision.tool_error:
        return rpc_refusal(decision, request_id)
    return _error_frame(decision.reason, request_id)


def frame_exchange(ex: Exchange, verdict: FrameVerdict, size: int) -> Exchange:
    """The record of one judged message: the socket's call, with the message's own
    request id, decision, rule, reason and tool (``websocket.socket``: the socket's)."""
    return replace(ex, request_id=verdict.request_id, started=time.monotonic(),
                   ts=time.time(), decision="allow" if verdict.allowed else "deny",
                   rule=verdict.rule.id if verdict.allowed and verdict.rule else None,
                   reason=verdict.reason, tool=verdict.tool, status=None, bytes_in=size,
                   bytes_out=0, audited=False, counted=False,
                   websocket=SocketTotals(frames_in=1, bytes_in=size,
                                          refused=0 if verdict.allowed else 1,
                                          socket=ex.request_id))


def close_reason(reason: str) -> str:
    """``reason`` cut to what a close frame carries (123 bytes of UTF-8)."""
    return reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore")


def granted_tools(rules: Sequence[Rule]) -> frozenset[str]:
    """Every tool the MCP rules of a socket grant (what a tools/list answer may show)."""
    return frozenset().union(*(r.mcp.tools for r in rules if r.mcp is not None))


def answer_frame(payload: bytes, granted: frozenset[str]) -> bytes:
    """A text message from the server on an MCP rule, as the agent may see it: tools
    no rule grants taken out of a tools/list answer; a message that cannot be read
    strictly replaced by a JSON-RPC error (a lenient client might read it otherwise)."""
    filtered = filter_message(payload, granted, strict=True)
    return payload if filtered is None else filtered
