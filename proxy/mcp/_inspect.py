"""Judge an MCP / JSON-RPC request body against the caller's rules for the endpoint.

Every rule that matches the endpoint and carries ``mcp`` is considered, not
just the first: a body is allowed when one rule allows every message in it
(a batch is all or nothing, and never split across rules, so the rule that
allowed it — its secret, its approval — answers for all of it).

A refused ``tools/call`` is answered as a JSON-RPC error carrying the
request's ``id`` (code :data:`TOOL_REFUSED`), so the agent's MCP client
reports a tool error instead of a broken transport; any other refusal is an
HTTP 403.

Only what the MCP transports define reaches an MCP endpoint
(:func:`transport_refusal`): ``POST`` with a JSON-RPC body; ``GET`` only as the
server's event stream (``Accept: text/event-stream``, no query, no body);
``DELETE`` only to end a session (``Mcp-Session-Id``, no query, no body).
Anything else — another method, a GET with a query (a server may read calls
from it), a body on GET or DELETE — is refused, never passed uninspected.

:attr:`McpDecision.acts` is "not provably inert": only ``initialize`` (and
``server/discover``), ``ping``, ``tools/list``, the client notifications the
specification defines, and the plain event-stream GET are inert; everything
else — a tool call, a granted method, the client's answer to a server request,
a session DELETE — is held on an ``approval: required`` rule.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.errors import Refused
from proxy.mcp._jsonrpc import Arguments, Message, canonical, decode_content, digest, parse_body
from proxy.policy import ALWAYS_ALLOWED, TOOL_NAME, McpGrant, Rule, fold, mcp_method

__all__ = ["INERT_METHODS", "TOOL_REFUSED", "McpDecision", "inspect", "refused_after",
           "rpc_refusal", "transport_refusal"]

# JSON-RPC reserves -32000..-32099 for implementation-defined server errors. MCP
# itself uses -32000 (connection closed), -32001 (request timeout), -32002
# (resource not found), -32020..-32022 and -32042, so taskgate takes -32051:
# "the gateway's policy refused this call". The message says why.
TOOL_REFUSED = -32051

_TOOL_PARAMS = ("name", "arguments", "_meta")
_FOLDED_TOOL_PARAMS = {fold(k): k for k in _TOOL_PARAMS}
_FOLDED_METHODS = {fold(m): m for m in (*ALWAYS_ALLOWED, "tools/call", "initialize")}

# Messages that provably make the server do nothing on the caller's behalf: the
# lifecycle, and the notifications a client sends under the MCP specification.
INERT_METHODS = ALWAYS_ALLOWED | {
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed"}
SESSION_HEADER = "mcp-session-id"


def transport_refusal(method: str, has_query: bool, accept: str | None,
                      session_id: str | None, has_body: bool) -> str | None:
    """Why a request is not one the MCP streamable-HTTP transport defines, or ``None``.

    ``has_body`` is what is known of the body (a non-zero length, chunked framing, or
    bytes read); :func:`inspect` checks the bytes again once they are held.
    """
    if method == "POST":
        return None  # the body is read and judged by inspect()
    if method == "GET":
        if has_query:
            return ("a GET to an MCP endpoint opens the server's event stream and carries "
                    "no query; send calls as a POST with a JSON-RPC body")
        if not _accepts_sse(accept):
            return ("a GET to an MCP endpoint must accept text/event-stream (it opens the "
                    "server's event stream); send calls as a POST with a JSON-RPC body")
        if has_body:
            return "a GET to an MCP endpoint carries no body"
        return None
    if method == "DELETE":
        if not session_id or not session_id.strip():
            return "a DELETE to an MCP endpoint ends a session and needs an Mcp-Session-Id"
        if has_query or has_body:
            return "a DELETE to an MCP endpoint ends a session and carries no query or body"
        return None
    return (f"{method[:16]} is not an MCP transport method; an MCP endpoint takes POST "
            "(JSON-RPC), GET (the event stream) and DELETE (end a session)")


def _accepts_sse(accept: str | None) -> bool:
    """Whether an ``Accept`` header lists ``text/event-stream`` (and not with ``q=0``)."""
    for part in (accept or "").split(","):
        kind, *params = part.split(";")
        if kind.strip().lower() != "text/event-stream":
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    return float(value.strip()) > 0
                except ValueError:
                    return False
        return True
    return False


@dataclass(frozen=True, slots=True)
class McpDecision:
    """The verdict on one MCP body. The zero value denies."""

    allowed: bool = False
    reason: str = "no MCP grant allows this call"
    rule: Rule | None = None
    tool: dict[str, Any] | None = None  # the audit record's ``tool`` field
    # For a refused tools/call: (id, reason) for each request to answer, and batch or not.
    replies: tuple[tuple[str | int | None, str], ...] = ()
    batch: bool = False
    lists_tools: bool = False  # the body asks tools/list: filter the response
    granted_tools: frozenset[str] = frozenset()
    # (tool, canonical JSON of its arguments) per tools/call, for approvals: bytes,
    # so the parsed document does not outlive the decision.
    calls: tuple[tuple[str, bytes], ...] = field(default=())
    # For an allowed body: the ids of its requests (answered with JSON-RPC errors if
    # the call is refused later, e.g. by an approver), and whether it asks the server
    # to act — a tool call, or a method granted through mcp.methods — rather than
    # only the lifecycle (initialize, ping, tools/list, notifications, responses).
    requests: tuple[str | int | None, ...] = ()
    acts: bool = False

    @property
    def tool_error(self) -> bool:
        """Whether the refusal is answered as a JSON-RPC error rather than a 403."""
        return not self.allowed and bool(self.replies)


class _Call:
    """One message, with its structural problems found once (not per rule)."""

    __slots__ = ("msg", "name", "arguments", "problem", "entry", "canonical")

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self.name: str | None = None
        self.arguments: Mapping[str, Any] = {}
        self.problem: str | None = None
        self.canonical: bytes | None = None
        m = msg.method
        if m is None:
            self.entry = _entry("mcp", None, None, None)
            return
        if m == "tools/call":
            self._tool_call(msg)
            raw = msg.params.get("arguments", {}) if isinstance(msg.params, dict) else None
            self.canonical = canonical(raw) if raw is not None else None
            self.entry = _entry("mcp", m, self.name, _sha256(self.canonical))
            return
        known = _FOLDED_METHODS.get(fold(m))
        if known is not None and known != m:
            self.problem = f"method {m[:64]!r} differs only by case or folding from {known!r}"
        self.entry = _entry("mcp" if mcp_method(m) else "jsonrpc", m[:128], m[:128],
                            digest(msg.params))

    def _tool_call(self, msg: Message) -> None:
        params = msg.params
        if not isinstance(params, dict):
            self.problem = "tools/call params must be an object"
            return
        for key in params:
            known = _FOLDED_TOOL_PARAMS.get(fold(key))
            if known is not None and known != key:
                self.problem = (f"tools/call parameter {key[:64]!r} differs only by case or "
                                f"Unicode folding from {known!r}")
                return
        name = params.get("name")
        if not isinstance(name, str):
            self.problem = "tools/call needs a tool name (a string)"
            return
        self.name = name[:128]
        if TOOL_NAME.fullmatch(name) is None:
            self.problem = "the tool name is not 1-128 of A-Z a-z 0-9 _ . -"
            return
        arguments = params.get("arguments", {})
        if not isinstance(arguments, (dict, Arguments)):
            self.problem = "tools/call arguments must be an object"
            return
        self.arguments = arguments
        if not msg.has_id:
            self.problem = "tools/call must carry an id"

    def why_not(self, grant: McpGrant) -> str | None:
        if self.problem is not None:
            return self.problem
        m = self.msg.method
        if m is None:
            return None  # the client answering a request of the server
        if m == "tools/call":
            assert self.name is not None
            return grant.why_not_tool(self.name, self.arguments)
        if grant.allows_method(m):
            return None
        return f"method {m[:64]!r} is not granted (list it in mcp.methods)"

    @property
    def answers_as_tool_error(self) -> bool:
        return self.msg.method == "tools/call" and self.msg.has_id


def _sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def _entry(protocol: str, method: str | None, name: str | None,
           arguments_sha256: str | None) -> dict[str, Any]:
    return {"protocol": protocol, "method": method, "name": name,
            "arguments_sha256": arguments_sha256}


def _tool_field(calls: Sequence[_Call], batch: bool) -> dict[str, Any]:
    if not batch:
        return calls[0].entry
    protocol = "mcp" if any(c.entry["protocol"] == "mcp" for c in calls) else "jsonrpc"
    return {**_entry(protocol, "batch", None, None), "batch": [c.entry for c in calls]}


def inspect(rules: Sequence[Rule], http_method: str, body: bytes,
            content_encoding: str | None, cap: int) -> McpDecision:
    """Judge one request body on an MCP endpoint. Raises :class:`Refused` (403) or
    :class:`~proxy.errors.PayloadTooLarge` (413) for a body that cannot be read safely.

    The garbage collector is paused meanwhile. The parsed document has no cycles
    and is freed (by reference counting) before this returns, but a collection
    while it is alive would promote its thousands of objects, and enough of those
    trigger full collections of the whole gateway heap: measured under load, that
    was most of the cost of a 100 KB body. The pause is bounded by the size cap.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _inspect(rules, http_method, body, content_encoding, cap)
    finally:
        if collecting:
            gc.enable()


def _inspect(rules: Sequence[Rule], http_method: str, body: bytes,
             content_encoding: str | None, cap: int) -> McpDecision:
    grants = [(r, r.mcp) for r in rules if isinstance(r.mcp, McpGrant)]
    if not grants:
        return McpDecision(reason="no MCP rule matches this endpoint")
    tools = frozenset().union(*(g.tools for _, g in grants))
    if http_method != "POST":
        if http_method not in ("GET", "DELETE"):
            raise Refused(transport_refusal(http_method, False, None, None, False)
                          or "not an MCP transport method")
        if body:
            raise Refused(f"a {http_method} to an MCP endpoint carries no body")
        # The event stream is inert; ending a session is not (held under approval).
        what = "event stream" if http_method == "GET" else "session end"
        return McpDecision(True, f"MCP endpoint granted ({what})", grants[0][0],
                           granted_tools=tools, acts=http_method != "GET")
    if not body:
        raise Refused("JSON-RPC body refused: a POST to an MCP endpoint needs a body")
    messages, batch = parse_body(decode_content(body, content_encoding, cap))
    calls = [_Call(m) for m in messages]
    tool = _tool_field(calls, batch)
    lists = any(m.method == "tools/list" for m in messages)
    invoked = tuple((c.name, c.canonical) for c in calls
                    if c.msg.method == "tools/call" and c.name is not None
                    and c.canonical is not None)
    verdicts = [[c.why_not(g) for _, g in grants] for c in calls]
    for i, (rule, _) in enumerate(grants):
        if all(v[i] is None for v in verdicts):
            return McpDecision(
                True, _allowed_reason(calls), rule, tool, batch=batch, lists_tools=lists,
                granted_tools=tools, calls=invoked,
                requests=tuple(c.msg.id for c in calls
                               if c.msg.has_id and c.msg.method is not None),
                acts=not all(c.msg.method in INERT_METHODS for c in calls))
    # Refused: say why for the first message no rule allows.
    first = next((k for k, v in enumerate(verdicts) if all(w is not None for w in v)), None)
    if first is None:
        reason = "no single rule allows every call in this batch; send them separately"
        culprit = next((c for c in calls if c.answers_as_tool_error), calls[0])
    else:
        culprit = calls[first]
        reason = _best_reason(verdicts[first])
    if not culprit.answers_as_tool_error:
        return McpDecision(False, reason, None, tool, calls=invoked)
    replies = []
    for c in calls:
        if c.msg.has_id and c.msg.method is not None:
            why = reason if c is culprit else (
                f"not run: another call in this batch was refused ({reason})")
            replies.append((c.msg.id, why))
    return McpDecision(False, reason, None, tool, tuple(replies), batch, calls=invoked)


def refused_after(decision: McpDecision, reason: str) -> McpDecision:
    """An allowed ``decision`` refused after all (an approver said no, the hold timed
    out): every request of the body is answered with a JSON-RPC error saying why."""
    return McpDecision(False, reason, None, decision.tool,
                       tuple((rid, reason) for rid in decision.requests), decision.batch,
                       calls=decision.calls)


def _best_reason(reasons: Sequence[str | None]) -> str:
    """Prefer a rule that grants the tool but not these arguments: it says more."""
    texts = [r for r in reasons if r is not None]
    for r in texts:
        if not r.endswith("is not granted"):
            return r
    return texts[0]


def _allowed_reason(calls: Sequence[_Call]) -> str:
    names = [c.name for c in calls if c.name is not None]
    if names:
        return f"tool call allowed by rule: {', '.join(names[:8])}"
    return "MCP message allowed by rule"


def rpc_refusal(decision: McpDecision, request_id: str) -> bytes:
    """The JSON-RPC error body answering a refused tools/call (an array for a batch)."""
    errors = [
        {"jsonrpc": "2.0", "id": rid,
         "error": {"code": TOOL_REFUSED, "message": f"taskgate refused this call: {why}",
                   "data": {"reason": why, "request_id": request_id}}}
        for rid, why in decision.replies
    ]
    return orjson.dumps(errors if decision.batch else errors[0])
