"""Authorize each call against the caller's rules; default deny."""

from __future__ import annotations

import re

from mitmproxy import http
from mitmproxy.net.http import url

from addons._base import GatewayAddon, exchange, guarded, refuse, refuse_for
from addons.egress import CALL, RULE, Egress
from proxy.errors import Refused, TaskgateError
from proxy.gateway import Tunnel
from proxy.policy import canonical_host

__all__ = ["CALL", "RULE", "Authorize", "Egress"]  # CALL: the Call judged, for body judges


# Control characters a header value must not carry (HTAB is whitespace, allowed).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _malformed(req: http.Request) -> str | None:
    """Why the request cannot be forwarded as judged, or ``None``.

    The method is judged upper-cased (mitmproxy's ``request.method``) but would be
    sent as written; methods are case-sensitive (RFC 9110 9.1), so ``get`` is
    refused rather than silently turned into ``GET``. A header value with a control
    character (NUL, CR, LF, …) is read differently by different servers."""
    raw = req.data.method
    if raw != raw.upper():
        shown = raw.decode("ascii", "replace")[:16]
        return (f"method {shown!r} is not upper-case; methods are case-sensitive: send "
                f"{shown.upper()!r}")
    for name, value in req.headers.fields:
        if _CTL.search(value) or _CTL.search(name):
            shown = name.decode("ascii", "replace")[:64]
            return (f"header {shown!r} carries a control character; only visible "
                    "characters, spaces and tabs are forwarded")
    return None


def _forward_canonical(req: http.Request, host: str) -> None:
    """Send the host as judged: the connection target, Host and :authority all name
    the canonical host (``API.GOOD.TEST.`` goes out as ``api.good.test``)."""
    req.data.host = host
    if req.host_header is not None:
        req.host_header = url.hostport(req.scheme, host, req.port)


def _upgrade(req: http.Request) -> bool:
    """Does the request ask to leave HTTP (WebSocket, h2c, anything)? After an upgrade
    the connection carries frames no rule, budget or audit record ever sees."""
    return "Upgrade" in req.headers or any(
        token.strip().lower() == "upgrade"
        for value in req.headers.get_all("Connection") for token in value.split(","))


class Authorize(GatewayAddon):
    """CONNECT: refuse tunnels to endpoints no rule names. Requests: match the rules."""

    @guarded
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        ex = exchange(flow)
        ex.host, ex.port = flow.request.host, flow.request.port
        if ex.caller is None:
            raise Refused("caller not identified")
        decision = self.gateway.authorize_connect(ex.caller, flow.request.host, flow.request.port)
        if not decision.allowed:
            refuse(flow, 403, "forbidden", decision.reason)
            return
        self.gateway.tunnels[flow.client_conn.id] = Tunnel(
            ex.caller, canonical_host(flow.request.host), flow.request.port)

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        """Trailers of a buffered request are forwarded too: same rule as headers."""
        if flow.response or not flow.live or flow.request.trailers is None:
            return
        for name, value in flow.request.trailers.fields:
            if _CTL.search(value) or _CTL.search(name):
                refuse(flow, 400, "bad_request", "a request trailer carries a control "
                                                 "character")
                return

    @guarded
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        ex = exchange(flow)
        if ex.caller is None:
            raise Refused("caller not identified")
        gw = self.gateway
        req = flow.request
        why = _malformed(req)
        if why is not None:
            refuse(flow, 400, "bad_request", why)
            return
        tunnel = gw.tunnels.get(flow.client_conn.id)
        try:
            call = gw.describe(ex, req.method, req.scheme, req.host, req.port, req.data.path)
            gw.check_host_header(call, req.host_header, tunnel)
            if tunnel is not None and req.scheme == "https":
                gw.check_sni(flow.client_conn.sni, tunnel)
            if tunnel is not None and req.authority:
                # mitmproxy keeps an absolute-form URL inside a tunnel as it came.
                gw.check_authority(call, req.authority, tunnel)
                if not (req.is_http2 or req.is_http3):  # HTTP/2's :authority stays
                    req.authority = ""  # origin-form upstream
            if _upgrade(req):
                raise Refused("protocol upgrades (WebSocket, h2c) are not supported: "
                              "every call must stay a plain HTTP request to be judged")
        except Refused as e:
            refuse_for(flow, e)
            return
        decision = gw.authorize(ex.caller, call)
        ex.rule = decision.rule_id
        try:
            decision = await gw.admit(ex, decision)  # budgets (task grants)
        except TaskgateError as e:
            refuse_for(flow, e)
            return
        if not decision.allowed:
            refuse(flow, 403, "forbidden", decision.reason)
            return
        ex.decision, ex.reason = "allow", decision.reason
        _forward_canonical(req, call.host)
        flow.metadata[RULE] = decision.rule
        flow.metadata[CALL] = call


# Standalone (mitmdump -s addons/authorize.py): never authorize without the SSRF guard.
addons = [Authorize(), Egress()]
