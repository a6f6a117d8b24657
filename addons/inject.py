"""Inject the secret an authorized call's rule names; mask it in what comes back.

Requests: only once the call is authorized (and approved, where the rule asks
for a person), only when every name for the destination agrees with the rule
(:func:`proxy.secrets.check_destination`), in ``requestheaders`` — a streamed
body would go out before a later hook. What the agent sent in that place, and
any credential of its own (Authorization, Cookie, an ``access_token`` query
parameter), is removed first. A provider failure is a 502 naming the secret.

Responses: every value the broker handed out lately is masked in the reason
phrase, header names and values, trailers and body — buffered bodies in
``response``, streamed ones by a filter installed in ``responseheaders`` (the
audit addon, later in the chain, wraps it to count). A coded body (any
``Content-Encoding``, a ``Transfer-Encoding`` other than chunked) is scanned
decoded, never past a size cap (:mod:`proxy.secrets.codings`); a buffered one off
the event loop. On a call that carried a secret, an answer that cannot be
decoded, or decodes too large, is withheld (502) or, streamed, cut.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from mitmproxy import http

from addons._base import (
    AGENT_CREDENTIALS,
    GatewayAddon,
    exchange,
    guarded,
    refuse,
    refuse_for,
    streams_response,
)
from proxy.errors import Refused, TaskgateError
from proxy.gateway import Exchange
from proxy.policy import Rule
from proxy.secrets import (
    Redactor,
    SecretBroker,
    check_destination,
    replaced_params,
    set_query_param,
    strip_query_params,
)
from proxy.secrets.codings import StreamDecoder, TooLarge, Undecodable, codings, decode

INLINE_SCAN_BYTES = 256 * 1024  # a larger or coded buffered body is scanned off the loop
AUTHORIZED = ("allow", "approved")

StreamFilter = Callable[[bytes], bytes | Iterable[bytes]]


def _after(inner: StreamFilter, outer: Callable[[bytes], list[bytes]]
           ) -> Callable[[bytes], list[bytes]]:
    """Redact what another addon's stream filter produced."""

    def step(chunk: bytes) -> list[bytes]:
        out = inner(chunk)
        data = out if isinstance(out, bytes) else b"".join(out)
        if chunk:  # b"" means the end to ``outer``: never pass it mid-stream
            return outer(data) if data else []
        return [*outer(data), *outer(b"")] if data else outer(b"")

    return step


class _MaskSecrets(logging.Filter):
    """Mask live secret values in every log line (mitmproxy's quote upstream bytes)."""

    def __init__(self, broker: SecretBroker) -> None:
        super().__init__()
        self.broker = broker

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.broker.redactor()
        if redactor is not None:
            msg = record.getMessage()
            masked = redactor.redact_text(msg)
            if masked != msg:
                record.msg, record.args = masked, None
        return True


class Inject(GatewayAddon):
    """Add the rule's secret to authorized calls; redact secrets from responses."""

    @property
    def broker(self) -> SecretBroker:
        return self.services.secrets

    async def running(self) -> None:
        await super().running()
        broker = self.broker
        for logger in (logging.getLogger(), logging.getLogger("mitmproxy")):
            for handler in logger.handlers:
                if not any(isinstance(f, _MaskSecrets) for f in handler.filters):
                    handler.addFilter(_MaskSecrets(broker))

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or not flow.live:
            return None
        ex = exchange(flow)
        rule = ex.allowed_by
        if rule is None or (rule.secret is None and not ex.mcp_rules):
            return None
        if ex.decision not in AUTHORIZED:
            return None
        if ex.mcp_rules or (rule.approval and ex.decision != "approved"):
            # The rule that decides an MCP call (its tool) and a person's yes are
            # both known only in `request` hooks that run before ours: keep the
            # body whole so the headers can still change then.
            ex.secret_deferred = ex.buffer_body = True
            return None
        return self._inject(flow, ex, rule)  # awaited only on a rule with a secret

    @guarded
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        ex = exchange(flow)
        deferred, ex.secret_deferred = ex.secret_deferred, False
        if not deferred or flow.response or not flow.live or ex.decision == "would_deny":
            return None  # would_deny (report mode): no rule allows it, so no secret
        rule = ex.allowed_by  # for MCP: the rule that allowed this tool call
        if rule is None:  # deferred only on a rule: fail closed, never guess
            raise Refused("the call was not authorized; its secret was not added")
        if rule.secret is None:
            return None
        if ex.decision not in AUTHORIZED or flow.request.stream:
            refuse_for(flow, Refused("the call was not authorized; its secret was not added",
                                     rule.id))
            return None
        return self._inject(flow, ex, rule)

    async def _inject(self, flow: http.HTTPFlow, ex: Exchange, rule: Rule) -> None:
        broker, req = self.broker, flow.request
        assert rule.secret is not None and ex.caller is not None
        ex.secret = rule.secret
        try:
            check_destination(rule, scheme=req.scheme, host=req.host, port=req.port,
                              host_header=req.host_header, authority=req.authority,
                              tunnel=ex.tunnel, sni=flow.client_conn.sni)
            minted = await broker.token(rule.secret, ex.caller, rule)
        except TaskgateError as e:
            refuse_for(flow, e)
            return
        if flow.response or not flow.live:  # the agent went away while we waited
            return
        spec = broker.specs[rule.secret].inject
        place = spec.render(minted.value)
        for name in AGENT_CREDENTIALS:
            req.headers.pop(name, None)
        # The agent's own credential parameters, however spelled (API_KEY, api%5Fkey,
        # Api-Key); a name with a control byte (api_key%00) is refused, not guessed at.
        try:
            req.data.path = strip_query_params(req.data.path, replaced_params(spec))
        except ValueError as e:
            refuse_for(flow, Refused(f"{e}; the call was refused", rule.id))
            return
        if place.query:
            req.data.path = set_query_param(req.data.path, place.name, place.value.reveal())
        else:
            req.headers.pop(place.name, None)
            req.headers[place.name] = place.value.reveal()
        # Only identity bodies can be scanned for echoes of the value.
        req.headers["Accept-Encoding"] = "identity"
        ex.secret = broker.label(minted)
        ex.secret_injected = True

    # -- responses --------------------------------------------------------------
    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        redactor = self.broker.redactor() if resp is not None else None
        if resp is None or redactor is None:
            return
        ex = exchange(flow)
        ex.redactor = redactor
        _redact_headers(resp.headers, redactor)
        resp.reason = redactor.redact(resp.data.reason).decode("latin-1")
        if resp.stream:
            if callable(resp.stream):
                _unframed(flow)
                resp.stream = _after(resp.stream, redactor.stream())
            return
        if not streams_response(flow, self.gateway.config.stream_threshold_bytes):
            return
        try:
            steps = codings(resp.headers.get("content-encoding"),
                            resp.headers.get("transfer-encoding"))
        except Undecodable:
            if ex.secret_injected:
                ex.deny("the upstream sent a stream in a coding that cannot be "
                                    "scanned for secret echoes; the call was cut", "error")
                flow.kill()
            return  # not carrying a secret: passed on as it came
        _unframed(flow)
        if not steps:
            resp.stream = redactor.stream()
            return
        # Decoded as it streams, so the agent gets it decoded: no codings either.
        resp.headers.pop("content-encoding", None)
        resp.stream = _decoding(StreamDecoder(steps), redactor.stream(), ex)

    @guarded
    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        ex = exchange(flow)
        if flow.response is None or ex.redactor is None:
            return None  # no secret went out: nothing to scan, no coroutine
        return self._scanned(flow, ex)

    async def _scanned(self, flow: http.HTTPFlow, ex: Exchange) -> None:
        resp, redactor = flow.response, ex.redactor
        assert resp is not None and redactor is not None  # response() looked
        if resp.trailers:  # streamed or not, they go out after this hook
            _redact_headers(resp.trailers, redactor)
        if resp.stream:
            if ex.stream_undecodable:
                ex.stream_undecodable = False
                ex.deny("the upstream's stream could not be decoded to scan it "
                                    "for secret echoes; the call was cut", "error")
                flow.kill()
            return
        raw = resp.raw_content or b""
        if not raw:
            return
        try:
            steps = codings(resp.headers.get("content-encoding"),
                            resp.headers.get("transfer-encoding"))
            if steps or len(raw) > INLINE_SCAN_BYTES:
                out = await asyncio.to_thread(_scan, raw, steps, redactor)
            else:
                out = _scan(raw, steps, redactor)
        except Undecodable as e:
            if ex.secret_injected:
                why = ("is too large decoded to scan it" if isinstance(e, TooLarge)
                       else "could not be decoded to scan it")
                refuse(flow, 502, "secret_unredactable",
                       f"the upstream's answer {why} for secret echoes; it was withheld")
            return
        if out is None:
            return
        resp.raw_content = out
        resp.headers.pop("content-encoding", None)
        te = resp.headers.get("transfer-encoding", "")
        if "chunked" in te.lower():
            resp.headers["transfer-encoding"] = "chunked"
        else:
            resp.headers.pop("transfer-encoding", None)
            resp.headers["content-length"] = str(len(out))


def _unframed(flow: http.HTTPFlow) -> None:
    """A scanned stream has no length: a masked echo is shorter or longer than the
    value (the fixed marker), so the body goes out chunked (HTTP/1) or framed by
    HTTP/2's own frames."""
    resp = flow.response
    assert resp is not None
    if flow.request.method == "HEAD" or resp.status_code < 200 or resp.status_code in (204,
                                                                                       304):
        return  # no body (a 101 hands the connection over): framing stays as it came
    resp.headers.pop("content-length", None)
    if resp.http_version.startswith("HTTP/1"):
        resp.headers["transfer-encoding"] = "chunked"
    else:
        resp.headers.pop("transfer-encoding", None)


def _scan(raw: bytes, steps: list[str], redactor: Redactor) -> bytes | None:
    """The decoded body, redacted, if it held an echo; else None (sent as it came)."""
    content = decode(raw, steps)
    return redactor.redact(content) if redactor.found_in(content) else None


def _decoding(decoder: StreamDecoder, redact: Callable[[bytes], list[bytes]],
              ex: Exchange) -> Callable[[bytes], list[bytes]]:
    """A stream filter that decodes, then redacts. Past a decoding error nothing more
    goes out (not even the redactor's held tail: it may be most of a value) and the
    ``response`` hook cuts the call."""
    failed = False

    def step(chunk: bytes) -> list[bytes]:
        nonlocal failed
        if failed:
            return []
        try:
            if not chunk:
                decoder.end()
                return redact(b"")
            data = decoder.feed(chunk)
        except Undecodable:
            failed = True
            ex.stream_undecodable = True
            return []
        return redact(data) if data else []

    return step


def _redact_headers(headers: http.Headers, redactor: Redactor) -> None:
    """Mask echoes in names and values; a masked name is lower-cased (HTTP/2 allows
    no upper case in a name, HTTP/1 does not care; the marker is upper case)."""
    fields = headers.fields
    redacted = tuple((_masked_name(redactor, name), redactor.redact(value))
                     for name, value in fields)
    if redacted != fields:
        headers.fields = redacted


def _masked_name(redactor: Redactor, name: bytes) -> bytes:
    masked = redactor.redact(name)
    return name if masked == name else masked.lower()


addons = [Inject()]
