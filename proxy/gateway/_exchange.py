"""One call as the gateway handles it (:class:`Exchange`) and the tunnel it came through.

The addons hand a call along as one :class:`Exchange` (the only thing they keep on a
mitmproxy flow): what the audit record says about it, and the typed state one hook
leaves for a later one (the rule that allowed it, what the MCP addon read, what the
approver was shown…). Nothing here knows about mitmproxy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.approvals import HeldRequest
from proxy.audit import rfc3339
from proxy.identity import Caller
from proxy.mcp import McpDecision
from proxy.policy import Call, Decision, Rule, RuleSet
from proxy.secrets import Redactor

__all__ = ["ApprovedAs", "Exchange", "Seen", "SocketTotals", "Tunnel"]


@dataclass(slots=True)
class Tunnel:
    """A CONNECT tunnel: who opened it, and where it may lead."""

    caller: Caller
    host: str
    port: int
    connect_id: str | None = None
    """The CONNECT's request id (on its ``200 Connection established``): every call
    through the tunnel names it in its record, so what ``curl -v`` shows is found."""


@dataclass(frozen=True, slots=True)
class Seen:
    """An agent connection's last call as read and judged (authorize keeps one per
    connection): a keep-alive agent repeats its request line, and reading the host
    and path and matching the rules are pure functions of it and of the rules.

    ``target`` is (method, scheme, host, port, raw request target) as the request
    carried them; ``rules`` the very rule set judged by (a reload or another task
    makes another object, never a changed one)."""

    target: tuple[str, str, str, int, bytes]
    call: Call
    path: str | None
    rules: RuleSet
    decision: Decision


@dataclass(slots=True)
class SocketTotals:
    """What went through one WebSocket (the ``websocket`` field of its audit record).

    ``in`` is from the agent, ``out`` to it; bytes are message payloads as read
    (decompressed). ``refused`` frames were not forwarded (MCP). ``closed_by`` is
    ``agent``, ``upstream`` or ``gateway`` (the task ended: addons/websocket.py)."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    refused: int = 0
    close_code: int | None = None
    closed_by: str | None = None
    socket: str | None = None
    """On the record of a refused frame: the request id of its socket's record."""
    watched: bool = False
    """The WebSocket addon took the socket on (its 101 passed): it writes the record
    when the socket ends, and judges its frames. Not recorded."""

    def count(self, from_agent: bool, size: int) -> None:
        if from_agent:
            self.frames_in += 1
            self.bytes_in += size
        else:
            self.frames_out += 1
            self.bytes_out += size

    def record(self) -> dict[str, Any]:
        return {"frames_in": self.frames_in, "frames_out": self.frames_out,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "refused": self.refused, "close_code": self.close_code,
                "closed_by": self.closed_by,
                **({"socket": self.socket} if self.socket else {})}


@dataclass(frozen=True, slots=True)
class ApprovedAs:
    """What an approver was shown, and what the gateway may still change after the
    approval (the secret's placement): the call goes upstream only if it still is that."""

    shown: HeldRequest
    hidden: frozenset[bytes]  # header names (lower case) the gateway sets or drops
    params: tuple[str, ...]  # query parameters the gateway replaces


@dataclass(slots=True)
class Exchange:
    """One call as the gateway handles it; becomes exactly one final audit record
    (a call held for approval also gets a ``held`` record when the hold starts).

    The fields from ``request_id`` to ``bytes_out`` are the record; the rest is
    state the addons pass along the chain, never written to the log.
    """

    request_id: str
    client: str | None
    started: float = field(default_factory=time.monotonic)
    ts: float = field(default_factory=time.time)
    caller: Caller | None = None
    method: str | None = None
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    upstream_ip: str | None = None  # the address checked and connected to (_egress.py)
    path: str | None = None
    tool: dict[str, Any] | None = None
    decision: str | None = None
    rule: str | None = None
    reason: str | None = None
    secret: str | None = None
    approval: dict[str, Any] | None = None
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    websocket: SocketTotals | None = None
    """A WebSocket upgrade the gateway allowed (authorize), and what went through it."""
    audited: bool = False
    counted: bool = False

    # -- passed along the addon chain (not recorded) ----------------------------------
    tunnel: Tunnel | None = None
    """The CONNECT tunnel the call came through (authorize), checked against its target."""
    original_dst: str | None = None
    """The address a transparent call was sent to (transparent): egress pins it."""
    call: Call | None = None
    """The call as judged: canonical host, decoded path (authorize)."""
    rules: RuleSet | None = None
    """The caller's rules the call was judged on (authorize): a config reload while it
    is in flight leaves them as they were for this call (mcp)."""
    allowed_by: Rule | None = None
    """The rule that allowed the call (authorize); for MCP, the rule that allowed its
    tool (mcp). It answers for what follows: approval, secret. ``rule`` is its id in
    the record, cleared when a later addon refuses the call."""
    buffer_body: bool = False
    """A later hook reads or changes the request body (mcp, approve, inject): it is
    held whole, never streamed upstream before that hook ran (audit)."""
    held_cap: tuple[int, str] | None = None
    """(bytes, why): the most a body held whole may be (mcp, approve). A body without a
    length is held as it arrives; past this it is refused (413) at once (limits)."""
    mcp_rules: tuple[Rule, ...] = ()
    """The allowing rules with an ``mcp`` grant: the body is judged against them (mcp)."""
    mcp_decision: McpDecision | None = None
    """What the MCP addon read in the body and decided (mcp); the approver is shown it."""
    approved_as: ApprovedAs | None = None
    """An approved call as its approver saw it (approve), checked once more right
    before it leaves (approve's ApprovedAsShown)."""
    secret_deferred: bool = False
    """The secret goes on in ``request``, once the rule deciding the call (MCP) or a
    person's yes is known (inject)."""
    secret_injected: bool = False
    """The call carries a secret: an answer that cannot be scanned for it is withheld."""
    redactor: Redactor | None = None
    """Masks the secrets handed out lately in this call's answer (inject)."""
    stream_undecodable: bool = False
    """The streamed answer could not be decoded to scan it; the call is cut (inject)."""

    def deny(self, reason: str, decision: str = "deny") -> None:
        self.decision, self.reason = decision, reason

    def record(self) -> dict[str, Any]:
        """The call's record, every field of :data:`~proxy.audit.FIELDS` in order.

        Built as it stands, once per call: its values are made encodable
        (:func:`~proxy.audit.clean`) by the log's writer, in place, before the record
        is chained and before any observer sees it."""
        caller = self.caller
        tunnel = self.tunnel
        return {
            "ts": rfc3339(self.ts), "seq": None, "replica": None,
            "request_id": self.request_id,
            "connect_id": tunnel.connect_id if tunnel is not None else None,
            "workload": caller.workload if caller is not None else None,
            "task": caller.task if caller is not None else None,
            "owner": caller.owner if caller is not None else None,
            "client": self.client, "method": self.method, "scheme": self.scheme,
            "host": self.host, "port": self.port, "upstream_ip": self.upstream_ip,
            "path": self.path, "tool": self.tool, "decision": self.decision or "error",
            "rule": self.rule, "reason": self.reason, "secret": self.secret,
            "approval": self.approval, "status": self.status, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "websocket": self.websocket.record() if self.websocket is not None else None,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "prev": None, "hash": None,
        }
