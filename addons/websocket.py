"""WebSocket: frames of an allowed upgrade flow, counted, judged on MCP rules, closed when
the task ends; the socket's one audit record is written when it ends.

The upgrade request itself is judged by the chain like any call (authorize allows it
only on a rule with ``websocket: true``; proxy/gateway/_websocket.py). Here:

- ``responseheaders``: a 101 answer to a call that was not an allowed WebSocket
  upgrade (an upstream switching protocols unasked) kills the call;
- ``websocket_start``: the socket joins its task's open sockets, so the task's end
  (revoked, expired: ``TaskRegistry.on_end``) closes it with 1008 and the reason;
- ``websocket_message``: counts each message; on a rule with ``mcp`` judges each one
  from the agent as a JSON-RPC body (a refused one is dropped, answered with a
  JSON-RPC error frame, and recorded; a tool call is a call of its own: the task's
  budget, its own record) and filters tools/list answers; masks echoes of secrets in
  what the upstream sends;
- ``websocket_end``: the record, with the totals and the close code.

mitmproxy has no way to close a WebSocket from outside its layer, nor a cap on a
message's length: addons/_ws_layer.py teaches the layer both.
"""

from __future__ import annotations

import contextlib
import logging
import time

from mitmproxy import http, websocket

from addons import _ws_layer as layer
from addons._base import GatewayAddon, exchange
from proxy.errors import TaskgateError, Unavailable
from proxy.gateway import (
    POLICY_VIOLATION,
    Exchange,
    FrameVerdict,
    OpenSockets,
    Services,
    answer_frame,
    frame_exchange,
    granted_tools,
    judge_frame,
    turned_down,
)
from proxy.policy import Decision

__all__ = ["WebSocket"]

log = logging.getLogger("taskgate")

GOING_AWAY = 1001  # RFC 6455 7.4.1: the gateway is shutting down
INTERNAL_ERROR = 1011  # … the gateway could not go on (a bug, the audit log)
AUTHORIZED = ("allow", "approved")


class WebSocket(GatewayAddon):
    """The frames of allowed WebSocket upgrades (see the module docstring)."""

    def __init__(self, services: Services | None = None) -> None:
        super().__init__(services)
        self._open = OpenSockets()  # task id → its open sockets (keyed by flow id)
        self._flows: dict[str, http.HTTPFlow] = {}
        self._watching = False  # on the task registry's end hooks
        layer.install()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or resp.status_code != 101 or not self.started:
            return
        ex = exchange(flow)
        if ex.websocket is None or ex.decision not in AUTHORIZED:
            # The agent sent no allowed upgrade, yet the upstream switched protocols:
            # what follows would be frames no rule or record sees.
            ex.deny("the upstream switched protocols on a call that was not an allowed "
                    "WebSocket upgrade; the connection was closed", "error")
            flow.kill()
            return
        ex.websocket.watched = True

    async def websocket_start(self, flow: http.HTTPFlow) -> None:
        ex = exchange(flow)
        totals, caller = ex.websocket, ex.caller
        if totals is None or caller is None or ex.call is None or not self.started:
            layer.close(flow, INTERNAL_ERROR, "the WebSocket was not authorized")
            return
        self._watch()
        layer.set_max_message(self.gateway.config.websocket_max_message_bytes)
        self._flows[flow.id] = flow
        if caller.task is not None:
            self._open.add(caller.task, flow.id, lambda code, why: self.close(flow, code, why))
        matching = self.gateway.policy.rules_for(caller).matching(ex.call)
        ex.mcp_rules = tuple(r for r in matching if r.mcp is not None)
        try:  # the task may have ended while the upgrade was answered
            self.gateway.recheck(caller, admitted=True)
        except TaskgateError as e:
            self.close(flow, POLICY_VIOLATION, e.reason)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        # mitmproxy keeps every message on the flow: a long-lived socket would grow
        # without bound. The layer holds this one until it is sent.
        flow.websocket.messages.clear()
        ex = exchange(flow)
        totals = ex.websocket
        if totals is None or not self.started or totals.closed_by == "gateway":
            message.drop()  # unjudged, or arrived after the gateway's close was sent for
            return
        if len(message.content) > layer.max_message() and not message.injected:
            # Read whole in one go (a longer one still arriving is cut by the layer).
            message.drop()
            self.close(flow, layer.TOO_BIG, layer.too_big())
            return
        try:
            await self._message(flow, message)
        except Exception:  # noqa: BLE001 - fail closed: a frame not judged never passes
            log.exception("taskgate: judging a WebSocket message failed; closing the socket")
            message.drop()
            self.close(flow, INTERNAL_ERROR, "the gateway could not judge a message")

    async def _message(self, flow: http.HTTPFlow, message: websocket.WebSocketMessage
                       ) -> None:
        ex = exchange(flow)
        totals = ex.websocket
        assert totals is not None
        if message.injected:  # the gateway's own answer to a refused frame
            totals.count(False, len(message.content))
            return
        if not self.gateway.audit.healthy:
            message.drop()
            self.close(flow, INTERNAL_ERROR, "the audit log cannot be written")
            return
        rules = ex.mcp_rules
        if message.from_client:
            try:  # the task's end closes its sockets; a token's expiry shows here
                assert ex.caller is not None
                self.gateway.recheck(ex.caller, admitted=True)
            except TaskgateError as e:
                message.drop()
                self.close(flow, POLICY_VIOLATION, e.reason)
                return
            size = len(message.content)
            totals.count(True, size)
            if rules:
                verdict = judge_frame(rules, message.content if message.is_text else None,
                                      self.gateway.config.max_inspect_bytes)
                if verdict.allowed and verdict.acts:  # a tool call: a call of its own
                    verdict = await self._admit(ex, verdict, size)
                if not verdict.allowed:
                    message.drop()
                    totals.refused += 1
                    assert verdict.reply is not None
                    layer.send(flow, verdict.reply)
                if (verdict.acts or not verdict.allowed) and not await self._record(
                        flow, frame_exchange(ex, verdict, size)):
                    message.drop()
            return
        content = message.content
        if rules and message.is_text:
            content = answer_frame(content, granted_tools(rules))
        redactor = self.services.secrets.redactor()
        if redactor is not None:
            content = redactor.redact(content)
        if content != message.content:
            message.content = content
        totals.count(False, len(content))

    async def _admit(self, ex: Exchange, verdict: FrameVerdict, size: int) -> FrameVerdict:
        """Take an acting message from the task's budget, or turn it down."""
        try:
            decision = await self.gateway.admit(frame_exchange(ex, verdict, size),
                                                Decision(True, verdict.reason, verdict.rule))
        except TaskgateError as e:
            return turned_down(verdict, e.reason)
        return verdict if decision.allowed else turned_down(verdict, decision.reason)

    async def _record(self, flow: http.HTTPFlow, frame: Exchange) -> bool:
        """Write a message's own record; if it cannot be, close the socket."""
        try:
            await self.gateway.audit_exchange(frame)
        except Unavailable:
            self.close(flow, INTERNAL_ERROR, "the audit log cannot be written")
            return False
        return True

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._flows.pop(flow.id, None)
        ex = exchange(flow)
        totals = ex.websocket
        if totals is None or flow.websocket is None or not self.started:
            return
        if ex.caller is not None and ex.caller.task is not None:
            self._open.remove(ex.caller.task, flow.id)
        totals.close_code = flow.websocket.close_code
        if totals.closed_by is None:
            totals.closed_by = "agent" if flow.websocket.closed_by_client else "upstream"
        ex.bytes_in, ex.bytes_out = totals.bytes_in, totals.bytes_out
        try:
            await self.gateway.audit_exchange(ex)
        except Unavailable:
            log.error("audit write failed for the WebSocket %s", ex.request_id)

    def close(self, flow: http.HTTPFlow, code: int, reason: str) -> None:
        """Close ``flow``'s socket on both sides with ``code`` and ``reason`` (the record
        says the gateway closed it, and why)."""
        layer.closed_by_gateway(flow, code, reason)
        layer.close(flow, code, reason)

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            self.services.tasks.on_end.append(self._task_ended)
            self.gateway.on_stop.append(self._going_away)
            self.services.metrics.track("open_websockets", lambda: float(len(self._flows)))

    def _going_away(self) -> None:
        for flow in list(self._flows.values()):
            self.close(flow, GOING_AWAY, "the gateway is shutting down")

    async def _task_ended(self, task_id: str) -> None:
        if not self._open.count(task_id):
            return
        task = self.services.tasks.get(task_id)
        how = task.state(time.time()) if task is not None else None
        self._open.task_ended(task_id, how if how in ("revoked", "expired") else None)

    def done(self) -> None:
        if self._watching and self._services is not None:
            self._watching = False
            with contextlib.suppress(ValueError):
                self.services.tasks.on_end.remove(self._task_ended)
            with contextlib.suppress(ValueError):
                self.gateway.on_stop.remove(self._going_away)


addons = [WebSocket()]
