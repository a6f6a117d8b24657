"""Inject the secret an authorized call's rule names; mask it in what comes back.

Requests: only once the call is authorized (and approved, where the rule asks
for a person), only when every name for the destination agrees with the rule
(:func:`proxy.secrets.check_destination`), in ``requestheaders`` — a streamed
body would go out before a later hook. What the agent sent in that place, and
any credential of its own (Authorization, Cookie, an ``access_token`` query
parameter), is removed first. A provider failure is a 502 naming the secret.

Responses: every value the broker handed out lately is masked in headers and
body — buffered bodies in ``response``, streamed ones by a filter installed in
``responseheaders`` (the audit addon, later in the chain, wraps it to count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mitmproxy import http

from addons._base import GatewayAddon, exchange, guarded, refuse, refuse_for, streams_response
from addons.authorize import RULE
from addons.mcp import MCP_RULES
from proxy.errors import Refused, TaskgateError
from proxy.gateway import Exchange
from proxy.rules import Rule
from proxy.secrets import COMPONENT, Redactor, SecretBroker, check_destination, set_query_param

# What an agent could authenticate with on its own: on a rule with a secret, only the
# gateway's credential goes out (Proxy-Authorization is taken off for every call;
# access_token is the bearer token's query form, RFC 6750 2.3).
AGENT_CREDENTIALS = ("Authorization", "Proxy-Authorization", "Cookie")
AGENT_CREDENTIAL_PARAMS = ("access_token",)
INJECTED = "taskgate.secret_injected"
DEFERRED = "taskgate.secret_after_approval"
REDACTOR = "taskgate.redactor"
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


class Inject(GatewayAddon):
    """Add the rule's secret to authorized calls; redact secrets from responses."""

    @property
    def broker(self) -> SecretBroker | None:
        return self.gateway.components.get(COMPONENT)

    @guarded
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        rule: Rule | None = flow.metadata.get(RULE)
        mcp_rules = flow.metadata.get(MCP_RULES)
        if rule is None or (rule.secret is None and not mcp_rules):
            return
        ex = exchange(flow)
        if ex.decision not in AUTHORIZED:
            return
        if mcp_rules or (rule.approval and ex.decision != "approved"):
            # The rule that decides an MCP call (its tool) and a person's yes are
            # both known only in `request` hooks that run before ours: keep the
            # body whole so the headers can still change then.
            flow.metadata[DEFERRED] = True
            flow.metadata["taskgate.inspect_body"] = True
            return
        await self._inject(flow, ex, rule)

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.pop(DEFERRED, False) or flow.response or not flow.live:
            return
        ex = exchange(flow)
        rule: Rule = flow.metadata[RULE]  # for MCP: the rule that allowed this tool call
        if rule.secret is None:
            return
        if ex.decision not in AUTHORIZED or flow.request.stream:
            refuse_for(flow, Refused("the call was not authorized; its secret was not added",
                                     rule.id))
            return
        await self._inject(flow, ex, rule)

    async def _inject(self, flow: http.HTTPFlow, ex: Exchange, rule: Rule) -> None:
        broker, req = self.broker, flow.request
        assert rule.secret is not None and ex.caller is not None
        ex.secret = rule.secret
        try:
            if broker is None:
                raise Refused("secrets are not configured in this gateway", rule.id)
            check_destination(rule, scheme=req.scheme, host=req.host, port=req.port,
                              host_header=req.host_header, authority=req.authority,
                              tunnel=self.gateway.tunnels.get(flow.client_conn.id),
                              sni=flow.client_conn.sni)
            minted = await broker.token(rule.secret, ex.caller, rule)
        except TaskgateError as e:
            refuse_for(flow, e)
            return
        if flow.response or not flow.live:  # the agent went away while we waited
            return
        place = broker.specs[rule.secret].inject.render(minted.value)
        for name in AGENT_CREDENTIALS:
            req.headers.pop(name, None)
        for name in AGENT_CREDENTIAL_PARAMS:
            if b"?" in req.data.path:
                req.data.path = set_query_param(req.data.path, name, None)
        if place.query:
            req.data.path = set_query_param(req.data.path, place.name, place.value.reveal())
        else:
            req.headers.pop(place.name, None)
            req.headers[place.name] = place.value.reveal()
        # Only identity bodies can be scanned for echoes of the value.
        req.headers["Accept-Encoding"] = "identity"
        ex.secret = broker.label(minted)
        flow.metadata[INJECTED] = True

    # -- responses --------------------------------------------------------------
    @guarded
    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        broker = self.broker
        redactor = broker.redactor() if broker is not None and resp is not None else None
        if resp is None or redactor is None:
            return
        flow.metadata[REDACTOR] = redactor
        _redact_headers(resp.headers, redactor)
        if resp.stream:
            if callable(resp.stream):
                resp.stream = _after(resp.stream, redactor.stream())
            return
        if not streams_response(flow, self.gateway.config.stream_threshold_bytes):
            return
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if flow.metadata.get(INJECTED) and encoding not in ("", "identity"):
            ex = exchange(flow)
            ex.deny("the upstream sent an encoded stream that cannot be scanned for "
                    "secret echoes; the call was cut", "error")
            flow.kill()
            return
        resp.stream = redactor.stream()

    @guarded
    async def response(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        redactor: Redactor | None = flow.metadata.get(REDACTOR)
        if resp is None or redactor is None or resp.stream:
            return
        if resp.trailers:
            _redact_headers(resp.trailers, redactor)
        try:
            content = resp.get_content(strict=True)
        except ValueError:
            if flow.metadata.get(INJECTED):
                refuse(flow, 502, "secret_unredactable",
                       "the upstream's answer could not be decoded to scan it for secret "
                       "echoes; it was withheld")
            return
        if content and redactor.found_in(content):
            resp.content = redactor.redact(content)


def _redact_headers(headers: http.Headers, redactor: Redactor) -> None:
    fields = headers.fields
    redacted = tuple((name, redactor.redact(value)) for name, value in fields)
    if redacted != fields:
        headers.fields = redacted


addons = [Inject()]
