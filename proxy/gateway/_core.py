"""The gateway core: everything the data plane asks, as plain calls.

The mitmproxy addons are thin adapters around this object: they turn a flow
into an :class:`Exchange` and core calls, and a core answer back into a
response. Nothing here knows about mitmproxy, so every decision can be tested
(and benchmarked) without a proxy in the way.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import orjson

from proxy.audit import AuditLog, redact_target
from proxy.config import Config
from proxy.errors import Refused
from proxy.gateway._exchange import Exchange, Seen, Tunnel
from proxy.gateway._limits import AuthFailures
from proxy.identity import Caller, Identity
from proxy.policy import (
    Call,
    Decision,
    ambiguity,
    canonical_host,
    decode,
    default_port,
    split_hostport,
    split_target,
)
from proxy.tasks import Policy

__all__ = [
    "GRPC_STATUS",
    "REQUEST_ID_HEADER",
    "Gateway",
    "grpc_refusal",
    "is_grpc",
    "new_request_id",
    "refusal_body",
    "refusal_message",
]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Taskgate-Request-Id"


def new_request_id() -> str:
    """A random (version 4) UUID in hex, as ``uuid.uuid4().hex`` writes it: the same
    bits set from the same 16 random bytes, without a ``UUID`` object per call."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


REFUSAL_TYPE = "taskgate_refusal"


def refusal_message(reason: str, request_id: str) -> str:
    """The one sentence a client shows for a refusal: the reason and the request id,
    so an agent (or its LLM) can adapt and a person can find the audit record."""
    return f"taskgate: {reason} (request id {request_id})"


def refusal_body(error: str, reason: str, request_id: str, **extra: Any) -> bytes:
    """The JSON body of every data-plane refusal: machine-readable, and readable by an LLM.

    ``error`` is an object in the shape the LLM SDKs read (OpenAI's and Anthropic's
    ``{"error": {"type", "code", "message"}}``): the openai SDK puts only
    ``error.message`` into its exception's text, so the message carries the reason and
    the request id. ``reason`` and ``request_id`` stay at the top level too.
    """
    return orjson.dumps({
        "error": {"type": REFUSAL_TYPE, "code": error,
                  "message": refusal_message(reason, request_id), "request_id": request_id},
        "reason": reason, "request_id": request_id, **extra})


# A refusal's HTTP status as a gRPC status code (grpc/doc/statuscodes.md): what a
# gRPC client raises when its call is refused.
GRPC_STATUS = {400: 3, 403: 7, 407: 16, 408: 4, 411: 3, 413: 8, 429: 8, 431: 8,
               502: 14, 503: 14}
_GRPC_INTERNAL = 13


def is_grpc(content_type: str | None) -> bool:
    """A gRPC call (``application/grpc``, ``+proto``, ``-web``…): it is refused the
    gRPC way, since its client reads the status from ``grpc-status``, not HTTP's."""
    return (content_type or "").strip().lower().startswith("application/grpc")


def grpc_refusal(status: int, reason: str, request_id: str) -> dict[str, str]:
    """The headers of a refused gRPC call, answered "Trailers-Only" (HTTP 200, no
    body): ``grpc-status`` for ``status`` and ``grpc-message`` with the reason and
    the request id, percent-encoded as the gRPC spec asks (bytes outside printable
    ASCII, and ``%``)."""
    message = refusal_message(reason, request_id).encode()
    encoded = "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
                      for b in message)
    return {"grpc-status": str(GRPC_STATUS.get(status, _GRPC_INTERNAL)),
            "grpc-message": encoded}


class Gateway:
    """Identity, policy and audit behind one object the addons share."""

    def __init__(self, config: Config, identity: Identity, policy: Policy,
                 audit: AuditLog, *, floods: AuthFailures | None = None) -> None:
        self.config = config
        self.identity = identity
        self.policy = policy
        self.audit = audit
        self.floods = floods  # 407 floods: counted and summarized (proxy/gateway/_limits.py)
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # Every written record, in order (metrics, the task registry's refunds).
        self.on_record: list[Callable[[dict[str, Any]], None]] = []
        # Called once when the gateway stops taking calls: calls that would otherwise
        # last the whole grace period (open WebSockets) end now and write their record.
        self.on_stop: list[Callable[[], None]] = []

    def stopping(self) -> None:
        """The gateway takes no more calls: end the long-lived ones (:attr:`on_stop`)."""
        for hook in self.on_stop:
            try:
                hook()
            except Exception:  # noqa: BLE001 - one hook failing never stops the others
                log.exception("stop hook failed")

    def begin(self, ex: Exchange) -> None:
        """Count ``ex`` as in flight until its record is written (graceful shutdown waits)."""
        if not ex.counted:
            ex.counted = True
            self.in_flight += 1
            self.idle.clear()

    async def drained(self, grace: float) -> bool:
        """Wait until no call is in flight (or ``grace`` seconds); True if drained."""
        try:
            await asyncio.wait_for(self.idle.wait(), grace)
        except TimeoutError:
            return False
        return True

    # -- identity -------------------------------------------------------------
    def recheck(self, caller: Caller, *, admitted: bool = False) -> None:
        """Re-validate a tunnel's caller for one more call (expiry, revocation), or
        (``admitted``) for a call already counted that waited, e.g. for approval."""
        self.identity.check_fresh(caller)
        if admitted:
            self.policy.check_live(caller)
        else:
            self.policy.check(caller)

    def check_client(self, caller: Caller, client: str | None) -> None:
        """A task token bound to other client addresses is refused (407) from ``client``."""
        self.policy.check_client(caller, client)

    def reporting(self, caller: Caller | None) -> bool:
        """Is the caller in report mode (its workload's or its task's)? A call the rules
        refuse then goes through, recorded ``would_deny`` (:meth:`report`)."""
        return caller is not None and self.policy.reporting(caller)

    @staticmethod
    def report(ex: Exchange, reason: str) -> None:
        """Let a refused call of a report-mode caller through: recorded ``would_deny``
        with the reason it would have been refused; no rule answers for it, so it gets
        no secret, no approval, no MCP grant."""
        ex.deny(reason, "would_deny")
        ex.allowed_by = None
        ex.mcp_rules = ()
        ex.secret_deferred = False

    # -- requests -------------------------------------------------------------
    def describe(self, ex: Exchange, method: str, scheme: str, host: str, port: int,
                 raw_target: bytes, seen: Seen | None = None) -> Call:
        """Fill ``ex`` from the request line and return the :class:`Call` to judge;
        ``seen``'s when it read the same request line (its connection's last call).

        Raises :class:`Refused` for a host or path with more than one reading.
        """
        ex.method, ex.scheme, ex.port = method, scheme, port
        if seen is not None and seen.target == (method, scheme, host, port, raw_target):
            ex.host, ex.path = seen.call.host, seen.path
            return seen.call
        raw_path, raw_query = split_target(raw_target)
        ex.path = redact_target(raw_path.decode("latin-1"), raw_query.decode("latin-1"))
        try:
            ex.host = canonical_host(host)
        except ValueError:
            ex.host = host[:255]
            raise Refused("the request's host is not a valid host name") from None
        why = ambiguity(raw_path)
        if why is not None:
            raise Refused(f"ambiguous path refused: {why}")
        return Call(method, scheme, ex.host, port, decode(raw_path))

    def check_host_header(self, call: Call, host_header: str | None,
                          tunnel: Tunnel | None) -> None:
        """The Host header must name the host the call goes to (no domain fronting)."""
        if tunnel is not None and (call.host, call.port) != (tunnel.host, tunnel.port):
            raise Refused("the request's target differs from the CONNECT target")
        if host_header is not None and not _names_target(host_header, call):
            raise Refused("the Host header does not match the "
                          + ("CONNECT target" if tunnel else "request's target"))

    def check_authority(self, call: Call, authority: str, tunnel: Tunnel) -> None:
        """An absolute-form URL inside a tunnel must name the CONNECT target: passed
        on, the upstream would take its host as the request's (domain fronting)."""
        if (call.host, call.port) != (tunnel.host, tunnel.port) or not _names_target(
                authority, call):
            raise Refused("the request's URL names another host than the CONNECT target")

    def check_sni(self, sni: str | None, tunnel: Tunnel) -> None:
        """TLS SNI inside a tunnel must name the CONNECT target."""
        if sni is None:
            return
        try:
            same = canonical_host(sni) == tunnel.host
        except ValueError:
            same = False
        if not same:
            raise Refused("the TLS server name does not match the CONNECT target")

    def authorize(self, caller: Caller, call: Call) -> Decision:
        return self.policy.rules_for(caller).decide(call)

    def judge(self, ex: Exchange, call: Call, seen: Seen | None = None) -> Decision:
        """Decide ``call`` on the caller's rules as they are now, and keep those rules
        with the call: a reload while it is in flight does not change what the later
        hooks (MCP) judge it by. ``seen``'s decision when it judged this very call on
        these very rules."""
        assert ex.caller is not None
        rules = ex.rules = self.policy.rules_for(ex.caller)
        if seen is not None and seen.call is call and seen.rules is rules:
            return seen.decision
        return rules.decide(call)

    def private_ok(self, ex: Exchange) -> bool:
        """For a call no rule allows (report mode): may it reach a private address?
        Only if one of the caller's rules naming its host and port opts in."""
        call = ex.call
        if call is None or ex.rules is None:
            return False
        return any(r.private_ok and r.admits_endpoint(call.host, call.port)
                   for r in ex.rules.candidates(call.host))

    def counts(self, ex: Exchange, decision: Decision) -> bool:
        """Does :meth:`admit` count ``decision`` against a grant (and so may wait for the
        store)? When not, admitting it would return it unchanged: callers skip it."""
        return ex.caller is not None and decision.allowed and self.policy.budgeted(ex.caller)

    async def admit(self, ex: Exchange, decision: Decision) -> Decision:
        """Count an allowed call against its grant; may turn it into a refusal."""
        if ex.caller is None or not decision.allowed:
            return decision
        return await self.policy.admit(ex.caller, decision, ex.request_id)

    def authorize_connect(self, caller: Caller, host: str, port: int) -> Decision:
        """At CONNECT: does any rule of the caller name this endpoint at all?"""
        try:
            chost = canonical_host(host)
        except ValueError:
            return Decision(False, "the CONNECT target is not a valid host name")
        if self.policy.rules_for(caller).names_endpoint(chost, port):
            return Decision(True, "a rule names this endpoint")
        return Decision(False, "no rule allows this host and port")

    # -- audit ----------------------------------------------------------------
    async def audit_exchange(self, ex: Exchange) -> None:
        """Write ``ex``'s record once; raises :class:`~proxy.errors.Unavailable` on failure."""
        if ex.audited:
            return
        ex.audited = True
        if ex.counted:
            ex.counted = False
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()
        record = ex.record()
        if self.floods is not None and self.floods.absorb(record):
            self._observe(record)  # counted (metrics) and summarized, not a line of its own
            return
        await self._write(record)

    async def audit_interim(self, ex: Exchange, decision: str, reason: str,
                            approval: dict[str, Any] | None = None) -> None:
        """Write a record for ``ex`` that is not its last (``held``: waiting for approval).

        ``ex`` stays open and in flight: its one final record is still written
        by :meth:`audit_exchange`. Raises :class:`~proxy.errors.Unavailable` on failure.
        """
        record = ex.record()
        record.update(decision=decision, reason=reason, approval=approval, status=None)
        await self._write(record)

    async def _write(self, record: dict[str, Any]) -> None:
        await self.audit.write(record)
        self._observe(record)

    def _observe(self, record: dict[str, Any]) -> None:
        for hook in self.on_record:
            try:
                hook(record)
            except Exception:  # noqa: BLE001 - observers never affect the call
                log.exception("audit observer failed")


def _names_target(hostport: str, call: Call) -> bool:
    """Does ``hostport`` (a Host header, a URL's authority) name ``call``'s host and port?"""
    name, port = split_hostport(hostport)
    if port is None:
        # No port means the scheme's default (RFC 9110 7.2), not "any port":
        # 'Host: api' on a call to api:8443 names another authority.
        port = default_port(call.scheme)
    try:
        return canonical_host(name) == call.host and port == call.port
    except ValueError:
        return False
