"""Transparent mode: connections redirected to ``listen.transparent`` (no proxy credential).

``next_layer``: what arrives must be HTTP, or TLS (intercepted with the gateway's CA)
carrying HTTP; anything else, and TLS from an address no workload claims, is refused
(the connection closed) and audited — never relayed raw. mitmproxy's own NextLayer addon
runs first and picks a layer; this one keeps it, waits for more data, or replaces it.

``requestheaders`` (before identify): the caller is the source address's workload, or
its task bound there (:mod:`proxy.gateway._transparent`); the destination is the
original address, named by the TLS server name or Host, which must resolve to it. The
request then goes down the chain by that name (authorize judges it, egress pins the
original address). A refusal here answers JSON with the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from mitmproxy import connection, http
from mitmproxy.proxy import commands, events, layer, layers, mode_specs
from mitmproxy.proxy.layers import tls

from addons._base import GatewayAddon, exchange, guarded, refuse
from proxy.errors import TaskgateError
from proxy.gateway import (
    Exchange,
    Resolver,
    Services,
    SourceIdentity,
    TaskBinds,
    destination_name,
    looks_like_http,
    new_request_id,
    original_destination_reason,
)
from proxy.policy import split_hostport

__all__ = ["Transparent", "transparent"]

log = logging.getLogger("taskgate")

NOT_HTTP = ("only HTTP and HTTPS are accepted on the transparent listener; other traffic is "
            "refused, never relayed")


def transparent(client: connection.Client) -> bool:
    """Did ``client`` arrive on the transparent listener?"""
    return isinstance(client.proxy_mode, mode_specs.TransparentMode)


class _Closed(layer.Layer):
    """A refused connection: closed as soon as it starts, nothing read or relayed."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


def _hello_sni(data: bytes) -> str | None:
    """The server name in a TLS ClientHello not yet handshaken (for the record only)."""
    try:
        hello = tls.parse_client_hello(data)
    except ValueError:
        return None
    return hello.sni if hello is not None else None


class Transparent(GatewayAddon):
    """Identify a redirected connection by its source; hold its calls to where it was sent."""

    def __init__(self, services: Services | None = None) -> None:
        super().__init__(services)
        self._identity: SourceIdentity | None = None
        self._resolver = Resolver()

    @property
    def identity(self) -> SourceIdentity:
        """Built from the config in force, again when a reload swapped in another."""
        config = self.gateway.config
        if self._identity is None or self._identity.config is not config:
            self._identity = SourceIdentity(config, TaskBinds(self.services.tasks))
        return self._identity

    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        ctx = nextlayer.context
        if not transparent(ctx.client) or not self.started:
            return
        try:
            why = self._refusal(nextlayer)
        except Exception:  # noqa: BLE001 - mitmproxy would go on with its own choice
            log.exception("taskgate: judging a transparent connection failed; closing it")
            why = "the gateway failed while judging the connection; it was refused"
        if why is None:
            return
        nextlayer.layer = _Closed(ctx)
        await self._audit_closed(ctx.client, why, _hello_sni(nextlayer.data_client()))

    def _refusal(self, nextlayer: layer.NextLayer) -> str | None:
        """Why the connection is refused now; None to go on with mitmproxy's choice (or,
        with ``nextlayer.layer`` cleared, to wait for more data)."""
        ctx = nextlayer.context
        chosen = nextlayer.layer
        if isinstance(chosen, (tls.ServerTLSLayer, tls.ClientTLSLayer)) \
                and not ctx.client.tls_established:
            # TLS from an address no workload claims is refused before the handshake;
            # from a claimed one, the decrypted data decides next time round.
            peer = ctx.client.peername[0] if ctx.client.peername else None
            if self.identity.sources.workload_of(peer or "") is not None:
                return None
            return self._who_reason(peer)
        if isinstance(chosen, layers.HttpLayer) or chosen is None:
            verdict = looks_like_http(nextlayer.data_client())
            if verdict is None:
                nextlayer.layer = None  # wait for the request line
                return None
            return None if verdict else NOT_HTTP
        return NOT_HTTP  # raw TCP/UDP, DNS, QUIC, TLS inside TLS: nothing but HTTP passes

    def _who_reason(self, peer: str | None) -> str:
        try:
            self.identity.caller(peer)
        except TaskgateError as e:
            return e.reason
        return NOT_HTTP

    async def _audit_closed(self, client: connection.Client, reason: str,
                            sni: str | None) -> None:
        """One record for a connection refused before any HTTP request could answer."""
        peer = client.peername[0] if client.peername else None
        ex = Exchange(request_id=new_request_id(), client=peer)
        try:
            ex.caller = self.identity.caller(peer)
        except TaskgateError:
            pass  # unclaimed: recorded without a workload
        if client.sockname:  # the original destination (SO_ORIGINAL_DST)
            name = client.sni or sni or str(client.sockname[0])
            ex.host, ex.port = name[:255], int(client.sockname[1])
        ex.scheme = "https" if client.tls_established else None
        ex.deny(reason)
        log.warning("taskgate: transparent connection from %s refused: %s", peer, reason)
        try:
            await self.gateway.audit_exchange(ex)
        except TaskgateError:
            log.exception("taskgate: the refused transparent connection was not recorded")

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or not flow.live or not transparent(flow.client_conn):
            return None  # a proxy-mode call: no coroutine (addons/_pipeline.py)
        return self._destination(flow)

    async def _destination(self, flow: http.HTTPFlow) -> None:
        ex = exchange(flow)
        self.gateway.begin(ex)
        try:
            ex.caller = self.identity.caller(ex.client)
            self.gateway.policy.check(ex.caller)
        except TaskgateError as e:
            refuse(flow, 403, "forbidden", e.reason)
            return
        req = flow.request
        # mitmproxy puts SO_ORIGINAL_DST there for a transparent connection.
        ip, port = str(flow.client_conn.sockname[0]), int(flow.client_conn.sockname[1])
        sni = flow.client_conn.sni if req.scheme == "https" else None
        try:
            name = destination_name(sni, req.host_header, ip)
        except TaskgateError as e:
            refuse(flow, 403, "forbidden", e.reason)
            return
        if req.authority and not (req.is_http2 or req.is_http3):
            # An absolute-form URL would be passed on as the request's host: it must be
            # the name judged, and goes upstream in origin form.
            if destination_name(None, req.authority, ip) != name or \
                    (split_hostport(req.authority)[1] or port) != port:
                refuse(flow, 403, "forbidden", "the request's URL names another host than "
                                               "the connection's destination")
                return
            req.authority = ""
        why = await original_destination_reason(self._resolver, name, port, ip)
        if why is not None:
            refuse(flow, 403, "forbidden", why)
            return
        ex.original_dst = ip
        req.data.host = name  # judged by name from here on (authorize, egress)


addons = [Transparent()]
