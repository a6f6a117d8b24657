"""Identify the calling workload from its proxy credential (CONNECT or request)."""

from __future__ import annotations

from collections.abc import Awaitable

from mitmproxy import http

from addons._base import HOP_HEADERS, GatewayAddon, exchange, guarded, refuse_for
from addons.authorize import tunnel_of
from addons.transparent import transparent
from proxy.errors import InvalidCredential, Refused, TaskgateError
from proxy.gateway import Exchange
from proxy.identity import Caller


def _credential(flow: http.HTTPFlow) -> str | None:
    """Take the proxy credential off the request: it never travels upstream."""
    values = flow.request.headers.get_all("Proxy-Authorization")
    for name in HOP_HEADERS:
        flow.request.headers.pop(name, None)
    if len(values) > 1:
        raise InvalidCredential("more than one Proxy-Authorization header")
    return values[0] if values else None


class Identify(GatewayAddon):
    """CONNECT: verify the token (authorize remembers the caller with the tunnel).
    Requests: the tunnel's caller (re-checked), or the request's own token."""

    @guarded
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        ex = exchange(flow)
        ex.method = "CONNECT"
        shown = "Proxy-Authorization" in flow.request.headers  # else a 407 is a challenge
        try:
            # Identify, then check the grant: a refused caller is still named in the record.
            ex.caller = await self.gateway.identity.identify(_credential(flow))
            self.gateway.check_client(ex.caller, ex.client)
            self.gateway.policy.check(ex.caller)
        except TaskgateError as e:
            refuse_for(flow, e, challenge=not shown and ex.caller is None)

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or not flow.live:
            return None
        ex = exchange(flow)
        self.gateway.begin(ex)
        tunnel = ex.tunnel = tunnel_of(flow.client_conn)  # its record names the CONNECT
        shown = "Proxy-Authorization" in flow.request.headers  # else a 407 is a challenge
        try:
            credential = _credential(flow)
            if transparent(flow.client_conn):
                # Known by its source address (the transparent addon, before this one);
                # a credential on the request names no one and is dropped.
                if ex.caller is None:
                    raise Refused("a transparent call is identified by its source address; "
                                  "this one was not")
            elif tunnel is not None:
                ex.caller = tunnel.caller
                self.gateway.recheck(tunnel.caller)
            else:
                caller = self.gateway.identity.known(credential)
                if caller is None:  # a token not seen lately: verified, which may wait
                    return self._verified(flow, ex, credential, shown)
                self._admit(ex, caller)
        except TaskgateError as e:
            refuse_for(flow, e, challenge=not shown and ex.caller is None)
        return None

    async def _verified(self, flow: http.HTTPFlow, ex: Exchange, credential: str | None,
                        shown: bool) -> None:
        try:
            self._admit(ex, await self.gateway.identity.identify(credential))
        except TaskgateError as e:
            refuse_for(flow, e, challenge=not shown and ex.caller is None)

    def _admit(self, ex: Exchange, caller: Caller) -> None:
        """Name the caller on the record, then check its binding and grant."""
        ex.caller = caller
        self.gateway.check_client(caller, ex.client)
        self.gateway.policy.check(caller)

addons = [Identify()]
