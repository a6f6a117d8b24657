"""Authorize each call against the caller's rules; default deny."""

from __future__ import annotations

from mitmproxy import http

from addons._base import GatewayAddon, exchange, guarded, refuse, refuse_for
from proxy.errors import Refused, TaskgateError
from proxy.gateway import Tunnel
from proxy.hosts import canonical_host

RULE = "taskgate.rule"
CALL = "taskgate.call"  # the Call judged, for addons that judge the body


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
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        ex = exchange(flow)
        if ex.caller is None:
            raise Refused("caller not identified")
        gw = self.gateway
        req = flow.request
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
        flow.metadata[RULE] = decision.rule
        flow.metadata[CALL] = call


addons = [Authorize()]
