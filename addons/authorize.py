"""Authorize each call against the caller's rules; default deny."""

from __future__ import annotations

import re
from collections.abc import Awaitable

from mitmproxy import connection, ctx, http
from mitmproxy.net.http import url

from addons._base import (
    GatewayAddon,
    PerConnection,
    exchange,
    guarded,
    header,
    refuse,
    refuse_for,
)
from addons.egress import Egress
from proxy.errors import Refused, TaskgateError
from proxy.gateway import (
    Exchange,
    Seen,
    Services,
    SocketTotals,
    Tunnel,
    upgrade_decision,
    websocket_upgrade,
)
from proxy.policy import Call, Decision, canonical_host

__all__ = ["Authorize", "Egress", "tunnel_of"]


# Control characters a header value must not carry (HTAB is whitespace, allowed).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _scan(req: http.Request) -> tuple[str | None, bool]:
    """Why the request cannot be forwarded as judged (or ``None``), and whether it asks
    to leave HTTP: one pass over the header fields for both.

    The method is judged upper-cased (mitmproxy's ``request.method``) but would be
    sent as written; methods are case-sensitive (RFC 9110 9.1), so ``get`` is
    refused rather than silently turned into ``GET``. A header value with a control
    character (NUL, CR, LF, …) is read differently by different servers. An upgrade
    (WebSocket, h2c, anything: an ``Upgrade`` field, or ``upgrade`` among the
    ``Connection`` options) would leave the connection carrying frames no rule,
    budget or audit record ever sees."""
    raw = req.data.method
    if raw != raw.upper():
        shown = raw.decode("ascii", "replace")[:16]
        return (f"method {shown!r} is not upper-case; methods are case-sensitive: send "
                f"{shown.upper()!r}"), False
    upgrade = False
    for name, value in req.headers.fields:
        if _CTL.search(value) or _CTL.search(name):
            shown = name.decode("ascii", "replace")[:64]
            return (f"header {shown!r} carries a control character; only visible "
                    "characters, spaces and tabs are forwarded"), False
        lname = name.lower()
        if lname == b"upgrade" or (lname == b"connection" and any(
                token.strip().lower() == b"upgrade" for token in value.split(b","))):
            upgrade = True
    return None, upgrade


def _forward_canonical(req: http.Request, host: str, current: str | None) -> None:
    """Send the host as judged: the connection target, Host and :authority all name
    the canonical host (``API.GOOD.TEST.`` goes out as ``api.good.test``). Written
    only where it differs: mitmproxy's setters re-encode the header fields.
    ``current`` is the request's ``host_header`` as it was judged."""
    if req.data.host != host:
        req.data.host = host
    if current is not None:
        wanted = url.hostport(req.scheme, host, req.port)
        if current != wanted:
            req.host_header = wanted


class Authorize(GatewayAddon):
    """CONNECT: refuse tunnels to endpoints no rule names, remember the ones allowed.
    Requests: match the rules."""

    name = "authorize"  # how the other addons find it in mitmproxy's addon manager

    def __init__(self, services: Services | None = None) -> None:
        super().__init__(services)
        # The tunnel each agent connection opened, kept with the connection (as
        # mitmproxy's proxyauth keeps its logins): gone with it.
        self._tunnels: PerConnection[Tunnel] = PerConnection()
        # Each agent connection's last call as read and judged (a keep-alive agent
        # repeats its request line): gone with the connection.
        self._seen: PerConnection[Seen] = PerConnection()

    def tunnel(self, client: connection.Client) -> Tunnel | None:
        """The CONNECT tunnel ``client`` opened and this addon allowed, if any."""
        return self._tunnels.get(client)

    @guarded
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        ex = exchange(flow)
        ex.host, ex.port = flow.request.host, flow.request.port
        if ex.caller is None:
            raise Refused("caller not identified")
        decision = self.gateway.authorize_connect(ex.caller, flow.request.host, flow.request.port)
        if not decision.allowed and not self.gateway.reporting(ex.caller):
            refuse(flow, 403, "forbidden", decision.reason)
            return  # report mode: the tunnel opens; each call in it is judged (would_deny)
        self._tunnels[flow.client_conn] = Tunnel(
            ex.caller, canonical_host(flow.request.host), flow.request.port, ex.request_id)

    def response(self, flow: http.HTTPFlow) -> None:
        """A switch of protocols goes through only if the WebSocket addon took the socket
        on (it judges the frames, writes the record): loaded without it, fail closed."""
        resp = flow.response
        if resp is None or resp.status_code != 101 or not flow.live:
            return
        ex = exchange(flow)
        if ex.websocket is None or not ex.websocket.watched:
            ex.deny("the upstream switched protocols, and no WebSocket addon is loaded to "
                    "judge and record what follows; the connection was closed", "error")
            flow.kill()

    def client_disconnected(self, client: connection.Client) -> None:
        # At once, not when the connection object is collected: a flow still running
        # (held for approval) finds no tunnel for a connection that is gone.
        self._tunnels.pop(client)

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        """Trailers of a buffered request are forwarded too: same rule as headers."""
        if flow.response or not flow.live or flow.request.trailers is None:
            return
        for name, value in flow.request.trailers.fields:
            if _CTL.search(value) or _CTL.search(name):
                refuse(flow, 400, "bad_request", "a request trailer carries a control "
                                                 "character")
                return

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or not flow.live:
            return None
        ex = exchange(flow)
        if ex.caller is None:
            raise Refused("caller not identified")
        gw = self.gateway
        req = flow.request
        why, upgrade = _scan(req)
        if why is not None:
            refuse(flow, 400, "bad_request", why)
            return None
        client = flow.client_conn
        tunnel = ex.tunnel = self._tunnels.get(client)
        seen = self._seen.get(client)
        method, scheme, host, port, target = (req.method, req.scheme, req.host, req.port,
                                              req.data.path)
        try:
            call = gw.describe(ex, method, scheme, host, port, target, seen)
            # mitmproxy's host_header, its branches kept: the Host header (read in one
            # pass over the fields) but on HTTP/2 and /3, where the :authority comes first.
            host_header = (req.host_header if req.is_http2 or req.is_http3
                           else header(req.headers, b"host"))
            gw.check_host_header(call, host_header, tunnel)
            if tunnel is not None and req.scheme == "https":
                gw.check_sni(flow.client_conn.sni, tunnel)
            if tunnel is not None and req.authority:
                # mitmproxy keeps an absolute-form URL inside a tunnel as it came.
                gw.check_authority(call, req.authority, tunnel)
                if not (req.is_http2 or req.is_http3):  # HTTP/2's :authority stays
                    req.authority = ""  # origin-form upstream
            if upgrade and not websocket_upgrade(req.method, req.http_version,
                                                 req.headers.get_all("Upgrade")):
                raise Refused("protocol upgrades other than WebSocket (h2c, …) are not "
                              "supported: every call must stay a plain HTTP request to be "
                              "judged")
        except Refused as e:
            refuse_for(flow, e)
            return None
        decision = gw.judge(ex, call, seen)
        rules = ex.rules
        assert rules is not None  # judge() kept the rules it judged by
        if seen is None or seen.call is not call or seen.rules is not rules:
            self._seen[client] = Seen((method, scheme, host, port, target), call, ex.path,
                                      rules, decision)
        if upgrade:  # a WebSocket: only on a rule that says websocket: true
            decision = upgrade_decision(decision, rules.matching(call))
        ex.rule = decision.rule_id
        if gw.counts(ex, decision):  # budgets (task grants): may wait for the store
            return self._admitted(flow, ex, call, decision, upgrade, host_header)
        self._decided(flow, ex, call, decision, upgrade, host_header)
        return None

    async def _admitted(self, flow: http.HTTPFlow, ex: Exchange, call: Call,
                        decision: Decision, upgrade: bool, host_header: str | None) -> None:
        try:
            decision = await self.gateway.admit(ex, decision)
        except TaskgateError as e:
            refuse_for(flow, e)
            return
        self._decided(flow, ex, call, decision, upgrade, host_header)

    def _decided(self, flow: http.HTTPFlow, ex: Exchange, call: Call, decision: Decision,
                 upgrade: bool, host_header: str | None) -> None:
        """Let the call on or refuse it, as its (admitted) decision says."""
        gw, req = self.gateway, flow.request
        if not decision.allowed and gw.reporting(ex.caller):
            gw.report(ex, decision.reason)
            _forward_canonical(req, call.host, host_header)
            ex.call = call
            return
        if not decision.allowed:
            refuse(flow, 403, "forbidden", decision.reason)
            return
        ex.decision, ex.reason = "allow", decision.reason
        if upgrade:
            ex.websocket = SocketTotals()
        _forward_canonical(req, call.host, host_header)
        ex.allowed_by, ex.call = decision.rule, call


def tunnel_of(client: connection.Client) -> Tunnel | None:
    """The tunnel ``client`` opened, as the loaded :class:`Authorize` allowed it; None
    outside a tunnel, or with no Authorize loaded (then every call needs its own
    credential: fail closed).

    Found by name, not by class: under ``mitmdump -s addons/authorize.py`` the loaded
    addon's class comes from the script, a module of its own."""
    owner: Authorize | None = ctx.master.addons.get(Authorize.name)
    return owner.tunnel(client) if owner is not None else None


# Standalone (mitmdump -s addons/authorize.py): never authorize without the SSRF guard.
addons = [Authorize(), Egress()]
