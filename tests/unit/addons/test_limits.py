"""addons/limits.py: connection caps, the request-head clock, refusals written to the wire."""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from mitmproxy import connection
from mitmproxy.net.http import http1
from mitmproxy.options import Options
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.test import taddons, tflow

from addons._errors import h1_refusal
from addons.limits import DEFAULT_MAX_HEADER_BYTES, Limits
from proxy.gateway import REQUEST_ID_HEADER, Services
from tests.core import services
from tests.unit.addons.conftest import request


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[Services]:
    async with services(tmp_path, max_connections=3, max_connections_per_client=2,
                        max_header_bytes=4096, header_timeout_seconds=7) as built:
        yield built


def client(ip: str) -> connection.Client:
    c = tflow.tclient_conn()
    c.peername = (ip, 40000)
    return c


async def test_one_address_gets_its_share_of_connections(capped: Services) -> None:
    limits = Limits(capped)
    with taddons.context(limits):
        first, second, third = client("10.0.0.1"), client("10.0.0.1"), client("10.0.0.1")
        for c in (first, second, third):
            limits.client_connected(c)
        assert first.error is None and second.error is None
        assert third.error is not None and "max_connections_per_client" in third.error
        limits.client_disconnected(first)  # its slot comes back
        fourth = client("10.0.0.1")
        limits.client_connected(fourth)
        assert fourth.error is None


async def test_the_gateway_caps_connections_from_everyone(capped: Services) -> None:
    limits = Limits(capped)
    with taddons.context(limits):
        clients = [client(f"10.0.0.{i}") for i in range(1, 5)]
        for c in clients:
            limits.client_connected(c)
    assert [c.error is None for c in clients] == [True, True, True, False]
    assert "proxy.max_connections" in (clients[3].error or "")


async def test_settings_come_from_the_config(capped: Services) -> None:
    limits = Limits(capped)
    assert (limits.max_header_bytes, limits.header_timeout) == (4096, 7.0)
    waiting = Limits()  # under mitmdump -s, before the gateway is built: defaults
    assert waiting.max_header_bytes == DEFAULT_MAX_HEADER_BYTES
    c = client("10.0.0.1")
    waiting.client_connected(c)
    assert c.error is None


async def test_the_head_clock_runs_until_the_head_is_in(capped: Services) -> None:
    limits = Limits(capped)
    with taddons.context(limits):
        c = client("10.0.0.1")
        limits.client_connected(c)
        timer = limits._timers[c.id]
        assert 6 < timer.when() - asyncio.get_running_loop().time() <= 7  # the config's
        f = request()
        f.client_conn = c
        limits.requestheaders(f)
        assert c.id not in limits._timers and timer.cancelled()
        limits.http_connect(f)  # the tunnel's first head gets a clock of its own
        assert c.id in limits._timers
        limits.client_disconnected(c)
        assert c.id not in limits._timers


async def test_an_expired_clock_without_a_connection_is_dropped(capped: Services) -> None:
    limits = Limits(capped)
    with taddons.context(limits):
        c = client("10.0.0.1")
        limits.client_connected(c)
        limits._expire(c.id, "its request head took too long")  # no proxyserver: nothing open
    assert c.id not in limits._timers


@pytest.mark.parametrize(("status", "error"), [(408, "request_timeout"),
                                               (431, "request_header_fields_too_large")])
def test_a_refusal_on_the_wire_is_taskgates_json(status: int, error: str) -> None:
    raw = h1_refusal(status, error, "why it was refused")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    resp = http1.read_response_head(head.split(b"\r\n"))
    doc = orjson.loads(body)
    rid = resp.headers[REQUEST_ID_HEADER]
    assert doc == {"error": {"type": "taskgate_refusal", "code": error,
                             "message": f"taskgate: why it was refused (request id {rid})",
                             "request_id": rid},
                   "reason": "why it was refused", "request_id": rid}
    assert resp.headers["Connection"] == "close"
    assert resp.headers["Content-Type"] == "application/json"
    assert int(resp.headers["Content-Length"]) == len(body)


class _Waits(layer.Layer):
    """A layer that opens a connection at start (a blocking command: it pauses) and
    notes every event it handles."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.handled: list[events.Event] = []

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        self.handled.append(event)
        if isinstance(event, events.Start):
            yield commands.OpenConnection(self.context.server)


def test_a_paused_layer_replays_what_came_meanwhile_in_order() -> None:
    """The event queue every layer gets (nothing allocated while empty, not a 760-byte
    deque) keeps mitmproxy's order: events that came while the layer waited run after
    the reply, first come first, and the queue is empty again after."""
    Limits()  # installs the patches
    ctx = Context(tflow.tclient_conn(), Options())
    ctx.server = tflow.tserver_conn()
    waits = _Waits(ctx)
    queue = waits._paused_event_queue
    assert not queue and len(queue) == 0 and list(queue) == []
    assert sys.getsizeof(queue) < sys.getsizeof(collections.deque()) / 10
    [open_] = list(waits.handle_event(events.Start()))
    assert isinstance(open_, commands.OpenConnection)
    later = [events.DataReceived(ctx.client, b"one"), events.DataReceived(ctx.client, b"two")]
    for event in later:
        assert list(waits.handle_event(event)) == []  # paused: queued
    assert queue and len(queue) == 2 and list(queue) == later
    list(waits.handle_event(events.OpenConnectionCompleted(open_, None)))
    assert waits.handled[-2:] == later
    assert not queue and list(queue) == [] and queue._events is None  # the deque let go


def test_the_event_queue_is_a_deque_once_used() -> None:
    """An agent can send on while its call is held: thousands of events queue up, and
    taking each must not move all the others (a list's pop(0) would): first in, first
    out, through a deque."""
    Limits()
    queue = _Waits(Context(tflow.tclient_conn(), Options()))._paused_event_queue
    with pytest.raises(IndexError):
        queue.popleft()
    for i in range(50_000):
        queue.append(i)  # type: ignore[arg-type]
    assert isinstance(queue._events, collections.deque)
    assert [queue.popleft() for _ in range(50_000)] == list(range(50_000))
    assert not queue
