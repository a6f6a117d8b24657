"""Per-tool-call authorization on MCP (streamable HTTP) and JSON-RPC endpoints.

Runs after ``authorize``: when a rule that matched the call carries ``mcp``,
the request body is held (within ``mcp.max_body_bytes``), read strictly and
judged against every matching rule (``proxy.mcp._inspect``). A refused
``tools/call`` is answered with a JSON-RPC error (HTTP 200, the request's id);
other refusals with 403/413. tools/list answers are filtered to the
granted tools as they stream back (``proxy.mcp._filter``). Only what the MCP
transport defines reaches the endpoint (``proxy.mcp._inspect.transport_refusal``):
POST with a body, the event-stream GET, the session DELETE.

Tool pinning (``proxy.mcp._pins``, kept by ``proxy.gateway._pins``): the filter
shows a tool only while its definition is the pinned one, and a call to a tool
whose definition changed is refused with a JSON-RPC error naming the change.
"""

from __future__ import annotations

from mitmproxy import http

from addons._base import GatewayAddon, exchange, guarded, refuse_for, tool_error
from proxy.errors import PayloadTooLarge, Refused, TaskgateError
from proxy.gateway import Exchange
from proxy.mcp import (
    SESSION_HEADER,
    JsonFilter,
    McpDecision,
    ReplaceFilter,
    Review,
    SseFilter,
    error_message,
    inspect,
    refused_after,
    transport_refusal,
)
from proxy.policy import McpGrant

# A tools/list answer may be larger than a request; bound what one event may hold.
MIN_RESPONSE_CAP = 4 << 20


class Mcp(GatewayAddon):
    """Hold, read and judge MCP request bodies; filter tools/list answers."""

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        ex = exchange(flow)
        call = ex.call
        if ex.allowed_by is None or call is None or ex.caller is None:
            return
        if ex.websocket is not None:
            return  # an allowed WebSocket upgrade: its frames are judged (addons/websocket.py)
        judged_on = ex.rules or self.gateway.policy.rules_for(ex.caller)
        if not judged_on.has_mcp:
            return
        rules = tuple(r for r in judged_on.matching(call) if r.mcp is not None)
        if not rules:
            return
        ex.mcp_rules, ex.buffer_body = rules, True
        try:
            self._check_transport(flow)
            self._check_length(flow)
        except TaskgateError as e:
            ex.rule = None
            refuse_for(flow, e)

    @staticmethod
    def _check_transport(flow: http.HTTPFlow) -> None:
        """Refuse what the MCP transport does not define (a GET with a query, HEAD, PUT…)."""
        req = flow.request
        method = req.method.upper()
        if method == "POST":
            return  # what transport_refusal says of every POST: inspect() judges the body
        length = req.headers.get_all("content-length")
        has_body = "transfer-encoding" in req.headers or any(v.strip() != "0" for v in length)
        why = transport_refusal(method, "?" in req.path,
                                ",".join(req.headers.get_all("accept")) or None,
                                req.headers.get(SESSION_HEADER), has_body)
        if why is not None:
            raise Refused(why)

    def _check_length(self, flow: http.HTTPFlow) -> None:
        """Refuse early a body too large to hold; one whose length is unknown (chunked,
        HTTP/2) is held as it arrives, within the same cap (``held_cap``: limits)."""
        req = flow.request
        if req.stream:
            raise Refused("an MCP request body cannot be streamed past inspection")
        cap = self.gateway.config.max_inspect_bytes
        why = f"an MCP request body may be at most {cap} bytes"
        exchange(flow).held_cap = (cap, why)
        length = req.headers.get_all("content-length")
        if length:
            if len(set(length)) != 1 or not length[0].isdigit():
                raise Refused("the request's Content-Length is not one number")
            if int(length[0]) > cap:
                raise PayloadTooLarge(why)

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange(flow)
        rules = ex.mcp_rules
        if not rules or flow.response or not flow.live:
            return
        req = flow.request
        try:
            if req.raw_content is None:
                raise Refused("the MCP request body was not held for inspection")
            decision = inspect(rules, req.method.upper(), req.raw_content,
                               ",".join(req.headers.get_all("content-encoding")) or None,
                               self.gateway.config.max_inspect_bytes)
        except TaskgateError as e:
            ex.rule = None
            refuse_for(flow, e)
            return
        ex.tool, ex.mcp_decision = decision.tool, decision
        if not decision.allowed and self.gateway.reporting(ex.caller):
            ex.rule = None
            self.gateway.report(ex, decision.reason)  # the tool and its arguments' digest
            return                                   # are in the record (ex.tool)
        if not decision.allowed:
            ex.rule = None
            if decision.tool_error:
                tool_error(flow, decision)
            else:
                refuse_for(flow, Refused(decision.reason))
            return
        assert decision.rule is not None
        changed = self._changed_tool(ex, decision)
        if changed is not None:
            ex.rule = None
            ex.mcp_decision = refused = refused_after(decision, changed)
            tool_error(flow, refused)
            return
        ex.allowed_by = decision.rule  # the rule that allowed the tool answers for it
        ex.rule, ex.decision, ex.reason = decision.rule.id, "allow", decision.reason
        if decision.lists_tools or req.method == "GET":
            req.headers["accept-encoding"] = "identity"  # filter what we can read

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Filter tools/list answers (fail closed: an error here kills the flow)."""
        decision = exchange(flow).mcp_decision
        resp = flow.response
        if resp is None or decision is None or not decision.allowed:
            return
        if not 200 <= resp.status_code < 300 or flow.request.method == "HEAD":
            return
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        sse = ctype == "text/event-stream"
        if not decision.lists_tools and not (sse and flow.request.method == "GET"):
            return
        cap = max(4 * self.gateway.config.max_inspect_bytes, MIN_RESPONSE_CAP)
        granted = decision.granted_tools
        review = self._pin_review(exchange(flow))
        if resp.headers.get("content-encoding", "").strip().lower() not in ("", "identity"):
            resp.headers.pop("content-encoding")
            resp.headers["content-type"] = "application/json"
            resp.stream = ReplaceFilter(error_message(
                "the server's answer is compressed and could not be inspected"))
        elif sse:
            resp.stream = SseFilter(granted, cap, every=decision.lists_tools, review=review)
        else:
            resp.stream = JsonFilter(granted, cap, review=review)
        resp.headers.pop("content-length", None)
        if flow.request.http_version.startswith("HTTP/1") and \
                flow.request.http_version != "HTTP/1.0":
            resp.headers["transfer-encoding"] = "chunked"

    # -- tool pinning ------------------------------------------------------------------
    @staticmethod
    def _server(ex: Exchange) -> str | None:
        call = ex.call
        if call is None:
            return None
        return f"{call.scheme}://{call.host}:{call.port}{call.path.split('?', 1)[0]}"

    def _changed_tool(self, ex: Exchange, decision: McpDecision) -> str | None:
        """Why a tool this body calls may not run (its definition changed), or None."""
        server, caller = self._server(ex), ex.caller
        if not decision.calls or server is None or caller is None:
            return None
        pins = self.services.pins
        for name, _ in decision.calls:
            why = pins.refusal(caller.workload, caller.task, server, name)
            if why is not None:
                return why
        return None

    def _pin_review(self, ex: Exchange) -> Review | None:
        server, caller = self._server(ex), ex.caller
        if server is None or caller is None:
            return None
        rule_pins: dict[str, str] = {}
        for matching in ex.mcp_rules or ():
            if isinstance(matching.mcp, McpGrant):
                rule_pins.update(matching.mcp.pins)
        rule = ex.mcp_decision.rule if ex.mcp_decision is not None else None
        who = {"workload": caller.workload, "task": caller.task, "owner": caller.owner}
        return self.services.pins.review(who, server, rule_pins, rule.id if rule else None,
                                         ex.request_id)


addons = [Mcp()]
