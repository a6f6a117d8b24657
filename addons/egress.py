"""Resolve an allowed call's host once, judge every address, pin the connection to it.

``requestheaders`` (after authorize): the core (:mod:`proxy.gateway._egress`) resolves the
host and judges every address against the rule that allowed the call; a call is
refused (403) if any address is private and the rule did not opt in. The address
judged is pinned for the agent connection and that host:port.

``server_connect``: mitmproxy is about to open the upstream connection to
``(host, port)``; its address becomes the pinned IP, so mitmproxy never
resolves the name itself. The TLS server name (``server.sni``, set from the host
when mitmproxy made the connection) and the Host header keep the name.
``server_connected`` gives the connection its name back, so later calls on the
same agent connection to the same host:port reuse it (each is judged against
that same pinned address). A connection with no pin is refused: fail closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import server_hooks

from addons._base import GatewayAddon, exchange, guarded, refuse
from proxy.errors import Refused
from proxy.gateway import (
    EgressGuard,
    Exchange,
    OwnAddresses,
    Services,
    Verdict,
    local_addresses,
)
from proxy.policy import canonical_host

Endpoint = tuple[str, int]


class Egress(GatewayAddon):
    """SSRF guard: every address a name resolves to is judged; the judged one is used."""

    def __init__(self, services: Services | None = None) -> None:
        super().__init__(services)
        self._guard: EgressGuard | None = None
        # agent connection id → {(canonical host, port): pinned ip}
        self._pins: dict[str, dict[Endpoint, str]] = {}
        # upstream connection id → the (host, port) it was asked for, until connected
        self._names: dict[str, Endpoint] = {}

    @property
    def guard(self) -> EgressGuard:
        if self._guard is None:
            config = self.gateway.config
            listens = [config.proxy_listen, config.control_listen]
            if config.transparent_listen is not None:
                listens.append(config.transparent_listen)
            own = OwnAddresses.of(listens, local_addresses())
            self._guard = EgressGuard(own)
        return self._guard

    def configure(self, updated: set[str]) -> None:
        # A pin exists once a request was judged; mitmproxy's default (eager) opens the
        # upstream at CONNECT, before any request. `taskgate run` sets lazy itself; under
        # plain `mitmdump -s` this addon does (eager would fail closed on every tunnel).
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or not flow.live:
            return None
        ex = exchange(flow)
        rule, call = ex.allowed_by, ex.call
        if call is None or (rule is None and ex.decision != "would_deny"):
            raise Refused("the call was not authorized")  # never reached past authorize
        # Report mode does not reach the SSRF guard: a would_deny call is judged as one
        # a rule of the caller naming its endpoint would be, private addresses refused.
        opt_in = rule.private_ok if rule is not None else self.gateway.private_ok(ex)
        pins = self._pins.setdefault(flow.client_conn.id, {})
        key = (call.host, call.port)
        # A transparent call goes where it was sent (its name was checked to lead there).
        pinned = pins.get(key) or ex.original_dst
        verdict = self.guard.check_known(call.host, call.port, opt_in=opt_in, pinned=pinned)
        if verdict is None:  # a name to resolve: the one case that waits
            return self._resolved(flow, ex, pins, key, opt_in, pinned)
        self._pin(flow, ex, pins, key, verdict)
        return None

    async def _resolved(self, flow: http.HTTPFlow, ex: Exchange, pins: dict[Endpoint, str],
                        key: Endpoint, opt_in: bool, pinned: str | None) -> None:
        verdict = await self.guard.check(key[0], key[1], opt_in=opt_in, pinned=pinned)
        self._pin(flow, ex, pins, key, verdict)

    @staticmethod
    def _pin(flow: http.HTTPFlow, ex: Exchange, pins: dict[Endpoint, str], key: Endpoint,
             verdict: Verdict) -> None:
        """Refuse the call, or pin its connection to the address judged (the agent
        connection's pins, ``pins``, outlive no disconnect: see client_disconnected)."""
        if not verdict.allowed or verdict.ip is None:
            refuse(flow, 403, "forbidden", verdict.reason)
            return
        pins.setdefault(key, verdict.ip)
        ex.upstream_ip = verdict.ip

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.address is None or server.via is not None:
            # An upstream proxy (not taskgate's mode) would resolve the name itself.
            server.error = "taskgate: upstream connections go direct to a checked address"
            return
        host, port = server.address
        try:
            key = (canonical_host(host), port)
        except ValueError:
            key = (host, port)
        ip = self._pins.get(data.client.id, {}).get(key)
        if ip is None:
            server.error = "taskgate: the upstream's address was not checked; not connecting"
            return
        self._names[server.id] = server.address
        server.address = (ip, port)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore(data.server)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._restore(data.server)

    def _restore(self, server: connection.Server) -> None:
        name = self._names.pop(server.id, None)
        if name is None:
            return
        # The socket is connected to the pinned ip (``peername``); the address goes
        # back to the name, as on any connection mitmproxy resolves itself, so its
        # reuse check (by name) and the other addons see what they expect. mitmproxy
        # refuses to *redirect* an open connection by assigning ``address``; this
        # redirects nothing, hence the plain attribute write.
        object.__setattr__(server, "address", name)

    def client_disconnected(self, client: connection.Client) -> None:
        with contextlib.suppress(KeyError):
            del self._pins[client.id]


addons = [Egress()]
