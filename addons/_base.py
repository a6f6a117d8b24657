"""What every taskgate addon shares: the flow's exchange, refusals, fail-closed hooks,
and the header lists more than one addon acts on.

A call's state travels along the chain as its :class:`~proxy.gateway.Exchange`, the
one thing kept on the flow (:func:`exchange`); an addon reads what an earlier one
left there as typed fields, never another addon's constants.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import connection, ctx, http

from addons._pipeline import DONE
from addons._standalone import shared_services
from proxy.audit import redact_target
from proxy.errors import TaskgateError, Unavailable, status_for
from proxy.gateway import (
    REQUEST_ID_HEADER,
    Exchange,
    Gateway,
    Services,
    grpc_refusal,
    is_grpc,
    new_request_id,
    refusal_body,
)
from proxy.mcp import McpDecision, rpc_refusal
from proxy.policy import canonical_host, split_target

log = logging.getLogger("taskgate")

EXCHANGE = "taskgate.exchange"  # the one flow.metadata key of taskgate
CONFIG_OPTION = "taskgate_config"

# The proxy credential and its companion: taken off every call (identify), never
# forwarded, never shown to an approver (approve).
HOP_HEADERS = ("Proxy-Authorization", "Proxy-Connection")
# What an agent could authenticate with on its own: on a rule with a secret, only the
# gateway's credential goes out (inject drops these; the ``access_token`` query
# parameter, the bearer token's query form (RFC 6750 2.3), goes with the secret's).
AGENT_CREDENTIALS = ("Authorization", "Proxy-Authorization", "Cookie")
# Every header a rule's secret replaces besides its own place (inject): the agent's
# credentials, and Accept-Encoding (set to identity, so an answer can be scanned for
# echoes of the value). An approver is not shown them (approve).
SECRET_REPLACES = (*AGENT_CREDENTIALS, "Accept-Encoding")

# A policy hook: plain, async, or plain returning an awaitable when it has to wait.
Hook = Callable[[Any, http.HTTPFlow], Awaitable[None] | None]


def header(headers: http.Headers, lname: bytes) -> str | None:
    """``headers.get(name)`` for a lower-case ``lname``, in one pass over the fields
    (mitmproxy's lookup converts the name and lower-cases every field through three
    calls; on the hooks every call runs, that added up). Folded as ``Headers.get``."""
    return _folded([v for k, v in headers.fields if k.lower() == lname])


def _folded(values: list[bytes]) -> str | None:
    """A field's values as ``Headers.get`` gives them: joined, or None if there are none."""
    if not values:
        return None
    return ", ".join(v.decode("utf-8", "surrogateescape") for v in values)


def set_header(headers: http.Headers, name: str, value: str) -> None:
    """``headers[name] = value``; appended without rebuilding the fields when the
    header is not there yet (the usual case: our own headers)."""
    lname = name.lower().encode()
    if any(k.lower() == lname for k, _ in headers.fields):
        headers[name] = value
    else:
        headers.fields = (*headers.fields, (name.encode(), value.encode("utf-8",
                                                                        "surrogateescape")))


class PerConnection[V]:
    """What an addon keeps per agent connection (its tunnel, its last call), gone with it.

    Keyed by the connection's id, as a ``WeakKeyDictionary`` of connections finds
    them (mitmproxy's connections are equal when their ids are), but without its
    cost on every call: a weak reference made per lookup, and the connection's
    ``__hash__`` and ``__eq__`` run in Python (~0.5 µs a lookup, several per call).
    As there, an entry goes when its connection object is collected (a finalizer
    set with the connection's first entry); :meth:`pop` drops it at once."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, V] = {}

    def get(self, client: connection.Client) -> V | None:
        return self._values.get(client.id)

    def __setitem__(self, client: connection.Client, value: V) -> None:
        key = client.id
        if key not in self._values:
            weakref.finalize(client, self._values.pop, key, None)
        self._values[key] = value

    def pop(self, client: connection.Client) -> V | None:
        return self._values.pop(client.id, None)

    def __len__(self) -> int:
        return len(self._values)


def exchange(flow: http.HTTPFlow) -> Exchange:
    """The flow's :class:`Exchange`, made on first use (request id, client address)."""
    ex = flow.metadata.get(EXCHANGE)
    if ex is None:
        peer = flow.client_conn.peername
        req = flow.request
        ex = Exchange(request_id=new_request_id(), client=peer[0] if peer else None,
                      method=req.method, scheme=req.scheme or None, host=req.host[:255],
                      port=req.port)
        if req.method != "CONNECT":
            raw_path, raw_query = split_target(req.data.path)
            ex.path = redact_target(raw_path.decode("latin-1")[:2048],
                                    raw_query.decode("latin-1")[:2048])
        flow.metadata[EXCHANGE] = ex
    return ex


def refuse(flow: http.HTTPFlow, status: int, error: str, reason: str,
           headers: dict[str, str] | None = None, decision: str = "deny") -> None:
    """Answer the agent with a JSON refusal and mark the exchange denied."""
    ex = exchange(flow)
    if status != 407 or ex.decision is None:
        ex.deny(reason, "error" if status >= 500 else decision)
    ex.status = status
    if ex.host:
        # Refused before the host was judged (407, CONNECT): log its canonical
        # spelling where it has one, so a search by host finds '127.1' too.
        with contextlib.suppress(ValueError):
            ex.host = canonical_host(ex.host)
    flow.request.stream = False
    content_type = flow.request.headers.get("content-type")
    if is_grpc(content_type):  # a gRPC client reads grpc-status, not HTTP's status
        flow.response = http.Response.make(200, b"", {
            "Content-Type": content_type or "application/grpc",
            REQUEST_ID_HEADER: ex.request_id, **grpc_refusal(status, reason, ex.request_id),
            **(headers or {})})
        return
    flow.response = http.Response.make(
        status,
        refusal_body(error, reason, ex.request_id),
        {"Content-Type": "application/json", REQUEST_ID_HEADER: ex.request_id,
         **(headers or {})},
    )


def tool_error(flow: http.HTTPFlow, decision: McpDecision, verdict: str = "deny") -> None:
    """Answer a refused tools/call the MCP way: JSON-RPC errors with the requests' ids,
    so the agent's client reports a tool error, not a broken transport (mcp, and
    approve for a held tool call that does not go ahead)."""
    ex = exchange(flow)
    ex.deny(decision.reason, verdict)
    ex.status = 200
    flow.request.stream = False
    flow.response = http.Response.make(
        200, rpc_refusal(decision, ex.request_id),
        {"Content-Type": "application/json", REQUEST_ID_HEADER: ex.request_id})


def refuse_for(flow: http.HTTPFlow, exc: BaseException, *, challenge: bool = False) -> None:
    """Refuse with the status the core's exception tree maps ``exc`` to. A 407 to a
    call that showed no credential at all (``challenge``) is recorded as
    ``challenge``, not ``deny``: git and libcurl clients probe without one first."""
    status, error, reason = status_for(exc)
    headers = {"Proxy-Authenticate": 'Basic realm="taskgate"'} if status == 407 else None
    refuse(flow, status, error, reason, headers,
           decision="challenge" if challenge and status == 407 else "deny")


def guarded(hook: Hook) -> Hook:
    """Fail closed: mitmproxy logs an addon's exception and lets the flow go on,
    so any exception in a policy hook ends here, in a refusal.

    Works for ``async def`` hooks and for plain ones; a plain hook may return an
    awaitable when it has to wait this time (its exceptions are caught the same),
    so the usual call costs no coroutine: it returns :data:`DONE`, which the pipeline
    skips and a test can still await (addons/_pipeline.py)."""

    def fail(self: Any, flow: http.HTTPFlow, e: Exception) -> None:
        if isinstance(e, TaskgateError):  # a refusal with a reason, not a bug
            log.warning("taskgate: %s refused the call: %s", hook.__qualname__, e.reason)
        else:
            log.exception("taskgate: %s failed; refusing the call", hook.__qualname__)
        if flow.live and not flow.response:
            refuse_for(flow, e)
        elif flow.live:
            flow.kill()

    async def waited(self: Any, flow: http.HTTPFlow, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception as e:  # noqa: BLE001 - the whole point: deny on anything
            fail(self, flow, e)

    @functools.wraps(hook)
    def wrapper(self: Any, flow: http.HTTPFlow) -> Awaitable[None]:
        try:
            pending = hook(self, flow)
        except Exception as e:  # noqa: BLE001 - the whole point: deny on anything
            fail(self, flow, e)
            return DONE
        return DONE if pending is None else waited(self, flow, pending)

    return wrapper


def streams_response(flow: http.HTTPFlow, threshold: int) -> bool:
    """Whether the response goes to the agent as it arrives rather than buffered:
    no length (SSE, chunked), an event stream, or longer than ``threshold``. One rule,
    so the addons that filter a stream (inject) and count it (audit) agree."""
    resp = flow.response
    assert resp is not None
    lengths, types = [], []  # both fields in one pass (asked on every response)
    for name, value in resp.headers.fields:
        lname = name.lower()
        if lname == b"content-length":
            lengths.append(value)
        elif lname == b"content-type":
            types.append(value)
    length = _folded(lengths)
    return bool(
        (length is None and flow.request.data.method != b"HEAD"
         and resp.status_code not in (204, 304))
        or (_folded(types) or "").startswith("text/event-stream")
        or (length and length.isdigit() and int(length) > threshold))


class GatewayAddon:
    """Base of the taskgate addons: holds the gateway's :class:`Services`.

    Inside ``taskgate run`` they are handed in; under plain ``mitmdump -s`` they
    are built from the ``taskgate_config`` option when the proxy starts.
    """

    def __init__(self, services: Services | None = None) -> None:
        self._services = services

    @property
    def services(self) -> Services:
        if self._services is None:
            # Standalone (mitmdump -s): the proxy listens before `running` built the
            # gateway; a call in that window is refused (503), not crashed on.
            raise Unavailable("the gateway is still starting; the call was refused")
        return self._services

    @property
    def gateway(self) -> Gateway:
        return self.services.gateway

    @property
    def started(self) -> bool:
        return self._services is not None

    def __dir__(self) -> list[str]:
        # mitmproxy's command collection getattr()s every name dir() lists when a
        # script loads, before `running` built the gateway; a property reading the
        # gateway would raise there. Commands are methods, never properties.
        cls = type(self)
        return [name for name in super().__dir__()
                if not isinstance(getattr(cls, name, None), property)]

    def load(self, loader: Any) -> None:
        if CONFIG_OPTION not in ctx.options:
            loader.add_option(CONFIG_OPTION, str, "",
                              "taskgate config file (standalone use with mitmdump -s)")

    async def running(self) -> None:
        if self._services is None:
            self._services = await shared_services(getattr(ctx.options, CONFIG_OPTION) or None)
