"""Identify the calling workload from its proxy credential (CONNECT or request)."""

from __future__ import annotations

from collections.abc import Awaitable

from mitmproxy import connection, http

from addons._base import HOP_HEADERS, GatewayAddon, PerConnection, exchange, guarded, refuse_for
from addons.authorize import tunnel_of
from addons.transparent import transparent
from proxy.errors import InvalidCredential, Refused, TaskgateError
from proxy.gateway import Exchange, Services
from proxy.identity import Caller

_HOP = frozenset(name.lower().encode() for name in HOP_HEADERS)
_PROXY_AUTHORIZATION = b"proxy-authorization"
_P = (b"P", b"p")
assert all(name[:1] in _P for name in _HOP)


def _credential(flow: http.HTTPFlow) -> list[str]:
    """Take the proxy credentials off the request (they never travel upstream) and
    return them, in one pass over the header fields (mitmproxy's lookup and its two
    deletes each walked every field); the fields are rebuilt only when there was one."""
    headers = flow.request.headers
    fields = headers.fields
    values: list[str] = []
    hop = False
    for name, value in fields:
        if name[:1] in _P and (lname := name.lower()) in _HOP:  # both are "Proxy-…"
            hop = True
            if lname == _PROXY_AUTHORIZATION:
                values.append(value.decode("utf-8", "surrogateescape"))  # as Headers does
    if hop:
        headers.fields = tuple(f for f in fields if f[0].lower() not in _HOP)
    return values


def _one(credentials: list[str]) -> str | None:
    if len(credentials) > 1:
        raise InvalidCredential("more than one Proxy-Authorization header")
    return credentials[0] if credentials else None


class Identify(GatewayAddon):
    """CONNECT: verify the token (authorize remembers the caller with the tunnel).
    Requests: the tunnel's caller (re-checked), or the request's own token."""

    def __init__(self, services: Services | None = None) -> None:
        super().__init__(services)
        # Per agent connection, its last credential and that token's cache key: a
        # keep-alive client sends the same one on every call, so it is decoded and
        # hashed once per connection. Dropped with the connection.
        self._keys: PerConnection[tuple[str, bytes]] = PerConnection()

    @guarded
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        ex = exchange(flow)
        ex.method = "CONNECT"
        credentials = _credential(flow)
        shown = bool(credentials)  # else a 407 is a challenge
        try:
            # Identify, then check the grant: a refused caller is still named in the record.
            ex.caller = await self.gateway.identity.identify(_one(credentials))
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
        credentials = _credential(flow)
        shown = bool(credentials)  # else a 407 is a challenge
        try:
            credential = _one(credentials)
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
                caller = self._known(flow.client_conn, credential)
                if caller is None:  # a token not seen lately: verified, which may wait
                    return self._verified(flow, ex, credential, shown)
                self._admit(ex, caller)
        except TaskgateError as e:
            refuse_for(flow, e, challenge=not shown and ex.caller is None)
        return None

    def _known(self, client: connection.Client, credential: str | None) -> Caller | None:
        """The caller of a token verified lately, or ``None`` when it has to be verified
        (which may wait); the token's cache key is kept for the connection's next call."""
        identity = self.gateway.identity
        memo = self._keys.get(client)
        if memo is None or memo[0] != credential:
            memo = (credential or "", identity.key_of(credential))  # raises if malformed
            self._keys[client] = memo
        return identity.known_key(memo[1])

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
