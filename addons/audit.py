"""Write one audit record per call, before the response completes; stream and count."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from mitmproxy import connection, http, tls
from mitmproxy.proxy import server_hooks

from addons._base import GatewayAddon, exchange, header, refuse, set_header, streams_response
from addons._pipeline import DONE
from addons.authorize import tunnel_of
from proxy.errors import Unavailable
from proxy.gateway import REQUEST_ID_HEADER, Exchange, Services
from proxy.secrets import SecretBroker
from proxy.secrets.redact import scrub_upstream_text

log = logging.getLogger("taskgate")


StreamFilter = Callable[[bytes], bytes | Iterable[bytes]]


def _counter(ex: Exchange, inner: StreamFilter | None = None) -> StreamFilter:
    """Count what reaches the agent, after any filter another addon installed."""
    if inner is None:
        def count(chunk: bytes) -> bytes:
            ex.bytes_out += len(chunk)
            return chunk

        return count

    def count_filtered(chunk: bytes) -> list[bytes]:
        out = inner(chunk)
        # Never pass an empty chunk on: over HTTP/1 chunked it would end the body.
        chunks = [c for c in ([out] if isinstance(out, bytes) else out) if c]
        ex.bytes_out += sum(len(c) for c in chunks)
        return chunks

    return count_filtered


class _Withheld:
    """The stream filter of a refusal that replaced an answer about to stream: the
    upstream's bytes never pass; the refusal's body goes out once in their place
    (at the first chunk, so an endless event stream does not hold it back)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.sent:
            return []
        self.sent = True
        return [self.body]


def _request_counter(ex: Exchange) -> StreamFilter:
    def count(chunk: bytes) -> bytes:
        ex.bytes_in += len(chunk)
        return chunk

    return count


def _scrubbed(broker: SecretBroker, msg: str) -> str:
    """mitmproxy's error text quotes what the upstream sent: drop the quotes, mask secrets."""
    return scrub_upstream_text(msg, broker.redactor())


AUDIT_DOWN = "the audit log cannot be written; the call was refused before it was sent"
UNTRUSTED = ("the agent's TLS handshake with the gateway failed; does it trust taskgate's "
             "CA (`taskgate ca`)?")


class Audit(GatewayAddon):
    """Tag every response with the request id; record every call, refusal and error.

    The record is written when the answer is complete, after the upstream acted;
    so once a write failed (``audit.healthy`` is False) no call leaves and no
    answer starts streaming. The refusal's own record tries the disk again: the
    first write that succeeds makes the log healthy, and calls go through again.
    """

    def _down(self, flow: http.HTTPFlow) -> bool:
        """Refuse the call (503) if the audit log failed its last write."""
        if self.gateway.audit.healthy:
            return False
        refuse(flow, 503, "unavailable", AUDIT_DOWN, decision="error")
        return True

    def __init__(self, services: Services | None = None) -> None:
        super().__init__(services)
        # Upstreams a client's calls could not reach (connect or TLS failed), until the
        # error hook of the call records it: mitmproxy answers those with a 502.
        self._unreachable: dict[str, set[tuple[str, int]]] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live or not self.started or self._down(flow):
            return
        req = flow.request
        length = header(req.headers, b"content-length")
        # No length: a chunked HTTP/1 body, or an HTTP/2 or /3 body (framed by its
        # frames; gRPC streams are endless). Streamed, never held whole in memory.
        unknown = length is None and (
            "chunked" in (header(req.headers, b"transfer-encoding") or "").lower()
            or not req.http_version.startswith("HTTP/1"))
        large = unknown or (length is not None and length.isdigit()
                            and int(length) > self.gateway.config.stream_threshold_bytes)
        ex = exchange(flow)
        if large and not ex.buffer_body:
            req.stream = _request_counter(ex)

    def request(self, flow: http.HTTPFlow) -> None:
        """The last look before the call leaves (after any hold for approval); a streamed
        body has gone already, judged in ``requestheaders``."""
        if flow.response or not flow.live or not self.started or flow.request.stream:
            return
        self._down(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or not self.started:  # not started: refused, id already on it
            return
        ex = exchange(flow)
        set_header(resp.headers, REQUEST_ID_HEADER, ex.request_id)
        if not (resp.stream
                or streams_response(flow, self.gateway.config.stream_threshold_bytes)):
            return  # buffered: `response` writes the record before anything is sent
        if not self.gateway.audit.healthy:  # streamed, it would reach the agent unrecorded
            refuse(flow, 503, "unavailable", AUDIT_DOWN, decision="error")
            refusal = flow.response
            assert refusal is not None  # refuse() set it
            body = refusal.raw_content or b""
            refusal.stream = _Withheld(body)
            ex.bytes_out = len(body)
            return
        resp.stream = _counter(ex, resp.stream if callable(resp.stream) else None)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None]:
        """Settle the totals and write the record; what to await is the write itself
        (no coroutine of this hook's own around it, on every call)."""
        resp = flow.response
        assert resp is not None
        ex = exchange(flow)
        if isinstance(resp.stream, _Withheld) and not resp.stream.sent:
            # The upstream's answer had no body to stream in place of: mitmproxy read
            # it whole into the refusal; send the refusal's own body instead.
            resp.content, resp.stream = resp.stream.body, False
        ex.status = resp.status_code
        if not resp.stream:
            ex.bytes_out = len(resp.raw_content or b"")
        if not flow.request.stream:
            ex.bytes_in = len(flow.request.raw_content or b"")
        if ex.decision is None:
            ex.deny("no decision was made; refused", "error")
        if flow.websocket is not None and ex.websocket is not None and ex.websocket.watched:
            return DONE  # a WebSocket's one record is written when it ends (addons/websocket.py)
        return self._write(flow, ex)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            flow.response.headers[REQUEST_ID_HEADER] = exchange(flow).request_id

    async def http_connect_error(self, flow: http.HTTPFlow) -> None:
        ex = exchange(flow)
        ex.status = flow.response.status_code if flow.response else None
        ex.bytes_out = len(flow.response.raw_content or b"") if flow.response else 0
        await self._write(flow, ex)

    async def error(self, flow: http.HTTPFlow) -> None:
        ex = exchange(flow)
        if ex.audited or not self.started:
            return
        msg = flow.error.msg if flow.error else "the call failed"
        streamed = flow.response is not None and bool(flow.response.stream)
        if streamed and ex.decision in ("allow", "approved") and msg.startswith("Client disc"):
            # The agent hung up on a stream it had been answered on (an MCP client
            # does after the last event): the call was allowed and answered.
            ex.reason = "the agent closed the connection before the stream ended"
        elif ex.decision in (None, "allow", "approved"):  # an approved call can still fail
            ex.reason = _scrubbed(self.services.secrets, msg)
            ex.decision = "error"
        if flow.response is not None and ex.status is None:
            ex.status = flow.response.status_code
        failed = self._unreachable.get(flow.client_conn.id)
        if failed and (flow.request.host, flow.request.port) in failed:
            failed.discard((flow.request.host, flow.request.port))
            if flow.response is None and ex.status is None:
                ex.status = 502  # what mitmproxy answered (proxy/server.py makes it JSON)
        try:
            await self.gateway.audit_exchange(ex)
        except Unavailable:
            log.error("audit write failed for errored call %s", ex.request_id)

    async def tls_failed_client(self, data: tls.TlsData) -> None:
        """The agent's TLS handshake inside an allowed tunnel failed (most often: it does
        not trust taskgate's CA). No call will name the CONNECT, so its request id, the
        one on ``200 Connection established``, gets a record saying why."""
        client = data.context.client
        tunnel = tunnel_of(client) if self.started else None
        if tunnel is None or tunnel.connect_id is None:
            return
        ex = Exchange(request_id=tunnel.connect_id,
                      client=client.peername[0] if client.peername else None,
                      caller=tunnel.caller, method="CONNECT", host=tunnel.host,
                      port=tunnel.port)
        why = _scrubbed(self.services.secrets, data.conn.error or "")
        ex.deny(f"{UNTRUSTED} ({why})" if why else UNTRUSTED, "error")
        try:
            await self.gateway.audit_exchange(ex)
        except Unavailable:
            log.error("audit write failed for the failed tunnel %s", ex.request_id)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._upstream_failed(data.client, data.server)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        if isinstance(data.conn, connection.Server):  # the upstream side's handshake
            self._upstream_failed(data.context.client, data.conn)

    def _upstream_failed(self, client: connection.Client, server: connection.Server
                         ) -> None:
        if server.address is not None:
            host, port = server.address[0], server.address[1]
            self._unreachable.setdefault(client.id, set()).add((host, port))

    def client_disconnected(self, client: connection.Client) -> None:
        self._unreachable.pop(client.id, None)

    async def _write(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        if not self.started:
            # mitmdump -s start-up window: the call was refused (503) and there is
            # no log yet to write to. A warning: an error would make mitmdump exit.
            log.warning("taskgate: call %s refused during start-up, not recorded",
                        ex.request_id)
            return
        try:
            await self.gateway.audit_exchange(ex)
        except Exception as e:  # noqa: BLE001 - an unrecorded call must not complete
            log.error("audit write failed for %s: %s", ex.request_id, e)
            if flow.response is not None and not flow.response.stream and flow.live:
                if ex.reason != AUDIT_DOWN:  # else refused before it was sent, and says so
                    refuse(flow, 503, "unavailable",
                           "the audit log could not be written; the call was refused",
                           decision="error")
                    flow.response.headers[REQUEST_ID_HEADER] = ex.request_id
            else:
                flow.kill()


addons = [Audit()]
