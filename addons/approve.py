"""Hold calls whose rule says ``approval: required`` until a person answers.

The ``request`` hook awaits the approval. mitmproxy runs every hook in a task
of its own and pauses only the HTTP stream that raised it (``Layer.handle_event``
marks the command ``blocking = self`` so outer layers go on), so a held call
never holds up another call — not even another stream of the same HTTP/2
connection. Its body is buffered (never streamed), so nothing reaches the
upstream before the answer.

The approver is shown the request as it will go out (:func:`held_request`), with
a digest over it; :class:`ApprovedAsShown`, after the inject addon in the chain,
computes the digest again right before the call leaves and refuses it if
anything but the secret's placement changed.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson
from mitmproxy import connection, http

from addons._base import (
    HOP_HEADERS,
    SECRET_REPLACES,
    GatewayAddon,
    exchange,
    guarded,
    refuse,
    refuse_for,
    tool_error,
)
from proxy.approvals import Approvals, HeldRequest, target_url
from proxy.errors import PayloadTooLarge, Refused, TaskgateError
from proxy.gateway import ApprovedAs, Exchange
from proxy.identity import Caller
from proxy.mcp import McpDecision, refused_after
from proxy.policy import Rule
from proxy.secrets import SecretBroker, replaced_params, strip_query_params


def _lower(names: tuple[str, ...]) -> frozenset[bytes]:
    return frozenset(name.lower().encode("latin-1") for name in names)


# Never shown, never forwarded: the proxy credential (the identify addon takes it off).
HOP = _lower(HOP_HEADERS)
# On a rule with a secret the inject addon drops the agent's own credentials and sets
# Accept-Encoding: not what the agent's call carries upstream.
SECRET_HEADERS = _lower(SECRET_REPLACES)
CHANGED = ("the call changed after it was approved (it is no longer byte for byte what "
           "the approver was shown); it was not forwarded")


def replaced_by_secret(broker: SecretBroker, rule: Rule
                       ) -> tuple[frozenset[bytes], tuple[str, ...]]:
    """Header names (lower case) and query parameters the gateway replaces when it
    adds ``rule``'s secret after the approval; none without a secret."""
    headers = set(HOP)
    params: list[str] = []
    if rule.secret is not None:
        headers.update(SECRET_HEADERS)
        spec = broker.specs.get(rule.secret)
        if spec is not None:
            params.extend(replaced_params(spec.inject))
            if spec.inject.kind != "query":
                headers.add(spec.inject.name.lower().encode("latin-1"))
    return frozenset(headers), tuple(params)


def held_request(flow: http.HTTPFlow, hidden: frozenset[bytes], params: tuple[str, ...],
                 secret: str | None = None) -> HeldRequest:
    """``flow``'s request as it goes upstream, less what the gateway replaces."""
    req = flow.request
    target = req.data.path
    if params:  # as the inject addon strips them (a control byte in a name: refused)
        target = strip_query_params(target, params)
    url = target_url(req.scheme, req.host, req.port, "").encode("utf-8") + target
    headers = tuple((n, v) for n, v in req.headers.fields if n.lower() not in hidden)
    return HeldRequest.of(req.data.method, url, headers, req.raw_content or b"", secret)


class Approve(GatewayAddon):
    """requestheaders: keep a call that may be held from streaming upstream.
    request: hold it; on approval let it go, on anything else refuse it."""

    @property
    def approvals(self) -> Approvals:
        return self.services.approvals

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        ex = exchange(flow)
        rule = ex.allowed_by
        if rule is None or not rule.approval:
            return
        ex.buffer_body = True
        cap = self._cap
        if ex.held_cap is None or ex.held_cap[0] > cap:
            ex.held_cap = (cap, self._too_large().reason)
        length = flow.request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._cap:
            refuse_for(flow, self._too_large())

    @guarded
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or not flow.live:
            return None
        ex = exchange(flow)
        rule = ex.allowed_by
        if rule is None or not rule.approval:
            return None  # the usual call: no coroutine (addons/_pipeline.py)
        return self._hold(flow, ex, rule)

    async def _hold(self, flow: http.HTTPFlow, ex: Exchange, rule: Rule) -> None:
        caller = ex.caller
        body = flow.request.raw_content
        if caller is None:
            raise Refused("caller not identified")
        if flow.request.stream or body is None:
            raise Refused("a streamed call cannot be held for approval")
        if len(body) > self._cap:
            refuse_for(flow, self._too_large())
            return
        calls: list[dict[str, Any]] = []
        decision: McpDecision | None = None
        if rule.mcp is not None:
            # What the approver sees is what the MCP addon judged (strictly parsed,
            # Content-Encoding decoded) — never a second, more lenient reading.
            decision = ex.mcp_decision
            if decision is None:
                raise Refused("the MCP body was not inspected; it cannot be held for approval")
            if not (decision.acts or decision.calls):
                return  # initialize, tools/list, notifications: nothing runs, nothing to approve
            calls = [{"name": name, "arguments": orjson.loads(args)}
                     for name, args in decision.calls]
        gw = self.gateway
        ex.bytes_in = len(body)
        hidden, params = replaced_by_secret(self.services.secrets, rule)
        shown = held_request(flow, hidden, params, rule.secret)
        held = self.approvals.new(
            request_id=ex.request_id, workload=caller.workload, task=caller.task,
            owner=caller.owner, purpose=self._purpose(caller.task), method=ex.method,
            url=shown.view()["url"], tool=ex.tool, calls=calls,
            client_id=flow.client_conn.id, expires_at=self._ends_at(caller), request=shown,
            log_url=target_url(ex.scheme, ex.host, ex.port, ex.path))
        await gw.audit_interim(ex, "held", "waiting for approval", held.audit_value())
        self.approvals.start(held)
        answer = await self.approvals.wait(held)
        ex.approval = held.audit_value()
        if answer.outcome == "client_disconnected" and flow.killable:
            ex.deny(answer.reason, "rejected")
            flow.kill()  # nobody to answer; the error hook writes the record
            return
        if not answer.approved:
            self._reject(flow, decision, answer.reason)
            return
        try:
            # The task may have ended, the token expired, while it waited; the budget
            # is not looked at again: this call was counted when it was admitted.
            gw.recheck(caller, admitted=True)
        except TaskgateError as e:
            self._reject(flow, decision, f"{answer.reason}, but {e.reason}")
            return
        if held_request(flow, hidden, params, rule.secret).digest != shown.digest:
            refuse(flow, 500, "changed_after_approval", CHANGED, decision="error")
            return
        ex.approved_as = ApprovedAs(shown, hidden, params)
        ex.decision, ex.reason = "approved", answer.reason

    @staticmethod
    def _reject(flow: http.HTTPFlow, decision: McpDecision | None, reason: str) -> None:
        """A held call that does not go ahead: 403, or for MCP requests JSON-RPC errors
        with their ids (the MCP addon's refusal), so the agent sees a tool error."""
        if decision is not None and decision.requests:
            tool_error(flow, refused_after(decision, reason), verdict="rejected")
        else:
            refuse(flow, 403, "forbidden", reason, decision="rejected")

    def client_disconnected(self, client: connection.Client) -> None:
        if self._services is not None:
            self.approvals.client_gone(client.id)

    def _ends_at(self, caller: Caller) -> float:
        """When the caller's grant ends: a task's at its expiry (task tokens get no
        leeway), a workload token's at its expiry plus the configured leeway."""
        if caller.task is not None:
            return caller.expires_at
        return caller.expires_at + self.gateway.identity.leeway

    def _purpose(self, task_id: str | None) -> str | None:
        """The task's purpose, so the approver knows what the agent was asked to do."""
        task = self.services.tasks.get(task_id) if task_id is not None else None
        return task.purpose if task is not None else None

    @property
    def _cap(self) -> int:
        return self.gateway.config.max_inspect_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"a call held for approval is buffered at the gateway; "
                               f"its body may be at most {self._cap} bytes")


class ApprovedAsShown(GatewayAddon):
    """request (last in the chain but the record): an approved call goes upstream only
    if it is still byte for byte what the approver was shown, the secret aside."""

    @guarded
    def request(self, flow: http.HTTPFlow) -> None:
        approved = exchange(flow).approved_as
        if approved is None or flow.response or not flow.live:
            return
        shown = approved.shown
        if flow.request.stream or held_request(flow, approved.hidden, approved.params,
                                               shown.secret).digest != shown.digest:
            refuse(flow, 500, "changed_after_approval", CHANGED, decision="error")


# Under plain `mitmdump -s`, load this file after inject.py for the last check to come
# after the secret's placement (Approve itself checks again right after the approval).
addons = [Approve(), ApprovedAsShown()]
