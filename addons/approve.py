"""Hold calls whose rule says ``approval: required`` until a person answers.

The ``request`` hook awaits the approval. mitmproxy runs every hook in a task
of its own and pauses only the HTTP stream that raised it (``Layer.handle_event``
marks the command ``blocking = self`` so outer layers go on), so a held call
never holds up another call — not even another stream of the same HTTP/2
connection. Its body is buffered (never streamed), so nothing reaches the
upstream before the answer.
"""

from __future__ import annotations

from typing import Any

import orjson
from mitmproxy import connection, http

from addons._base import GatewayAddon, exchange, guarded, refuse, refuse_for
from addons.authorize import RULE
from addons.mcp import MCP_DECISION, tool_error
from proxy.approvals import Approvals, target_url
from proxy.errors import PayloadTooLarge, Refused, TaskgateError
from proxy.identity import Caller
from proxy.mcp_inspect import McpDecision, refused_after

INSPECT_BODY = "taskgate.inspect_body"


class Approve(GatewayAddon):
    """requestheaders: keep a call that may be held from streaming upstream.
    request: hold it; on approval let it go, on anything else refuse it."""

    @property
    def approvals(self) -> Approvals:
        return self.gateway.components["approvals"]

    @guarded
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        rule = flow.metadata.get(RULE)
        if rule is None or not rule.approval:
            return
        flow.metadata[INSPECT_BODY] = True
        length = flow.request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._cap:
            refuse_for(flow, self._too_large())

    @guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        rule = flow.metadata.get(RULE)
        if rule is None or not rule.approval:
            return
        ex = exchange(flow)
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
            decision = flow.metadata.get(MCP_DECISION)
            if not isinstance(decision, McpDecision):
                raise Refused("the MCP body was not inspected; it cannot be held for approval")
            if not (decision.acts or decision.calls):
                return  # initialize, tools/list, notifications: nothing runs, nothing to approve
            calls = [{"name": name, "arguments": orjson.loads(args)}
                     for name, args in decision.calls]
        gw = self.gateway
        ex.bytes_in = len(body)
        held = self.approvals.new(
            request_id=ex.request_id, workload=caller.workload, task=caller.task,
            owner=caller.owner, purpose=self._purpose(caller.task), method=ex.method,
            url=target_url(ex.scheme, ex.host, ex.port, ex.path), tool=ex.tool, calls=calls,
            client_id=flow.client_conn.id, expires_at=self._ends_at(caller))
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
        if self._gateway is not None and "approvals" in self._gateway.components:
            self.approvals.client_gone(client.id)

    def _ends_at(self, caller: Caller) -> float:
        """When the caller's grant ends: a task's at its expiry (task tokens get no
        leeway), a workload token's at its expiry plus the configured leeway."""
        if caller.task is not None:
            return caller.expires_at
        return caller.expires_at + self.gateway.identity.leeway

    def _purpose(self, task_id: str | None) -> str | None:
        """The task's purpose, so the approver knows what the agent was asked to do."""
        tasks = self.gateway.components.get("tasks")
        task = tasks.get(task_id) if tasks is not None and task_id is not None else None
        return task.purpose if task is not None else None

    @property
    def _cap(self) -> int:
        return self.gateway.config.max_inspect_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"a call held for approval is buffered at the gateway; "
                               f"its body may be at most {self._cap} bytes")


addons = [Approve()]
