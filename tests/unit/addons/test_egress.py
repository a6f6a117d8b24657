"""addons/egress.py: judge at requestheaders, pin at server_connect (mitmproxy's tflow)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

import orjson
import pytest
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from addons._base import exchange
from addons.egress import Egress
from proxy.gateway import EgressGuard, OwnAddresses
from proxy.gateway._egress import Resolver
from proxy.policy import Call, parse_rule


def dns(answers: dict[str, Sequence[str]]):  # noqa: ANN201
    async def lookup(host: str, port: int) -> Sequence[str]:
        if host not in answers:
            raise OSError("no such name")
        return answers[host]
    return lookup


def settle(pending: Awaitable[None]) -> None:
    """Run a hook's result to its end (a hook that did not wait returns DONE)."""
    async def until_done() -> None:
        await pending
    asyncio.run(until_done())


def addon(answers: dict[str, Sequence[str]]) -> Egress:
    a = Egress()
    a._guard = EgressGuard(OwnAddresses(), Resolver(dns(answers)))
    return a


def flow_for(host: str, port: int = 443, **rule: object):  # noqa: ANN201
    f = tflow.tflow()
    f.request.host, f.request.port, f.request.scheme = host, port, "https"
    ex = exchange(f)
    ex.allowed_by = parse_rule({"id": "r", "host": "*.good.test", "methods": ["GET"],
                                **rule})
    ex.call = Call("GET", "https", host, port, "/")
    return f


def hook(server: connection.Server, client: connection.Client
         ) -> server_hooks.ServerConnectionHookData:
    return server_hooks.ServerConnectionHookData(server=server, client=client)


@pytest.mark.parametrize(("answers", "opt_in", "refused"), [
    (["93.184.216.34"], False, False),
    (["127.0.0.1"], False, True),
    (["10.0.0.7"], False, True),
    (["169.254.169.254"], False, True),
    (["fd00:ec2::254"], False, True),
    (["::ffff:192.168.1.1"], False, True),
    (["93.184.216.34", "100.64.0.9"], False, True),
    (["10.0.0.7"], True, False),
])
def test_a_wildcard_name_is_judged_by_every_address(answers: list[str], opt_in: bool,
                                                    refused: bool) -> None:
    a = addon({"x.good.test": answers})
    f = flow_for("x.good.test", allow_private=opt_in)
    settle(a.requestheaders(f))
    if refused:
        assert f.response is not None and f.response.status_code == 403
        body = orjson.loads(f.response.content)
        assert set(body) >= {"error", "reason", "request_id"}
        assert "allow_private: true" in body["reason"]
        return
    assert f.response is None and exchange(f).upstream_ip == answers[0]
    # mitmproxy opens the connection to the name; the hook pins it to the judged ip
    server = connection.Server(address=("x.good.test", 443), sni="x.good.test")
    a.server_connect(hook(server, f.client_conn))
    assert server.error is None
    assert server.address == (answers[0], 443) and server.sni == "x.good.test"
    server.state = connection.ConnectionState.OPEN  # as mitmproxy has it at this hook
    server.peername = (answers[0], 443)
    a.server_connected(hook(server, f.client_conn))
    assert server.address == ("x.good.test", 443)  # reusable by name
    assert server.peername == (answers[0], 443)  # the socket stays on the pinned ip


def test_a_failed_connection_gets_its_name_back() -> None:
    a = addon({"x.good.test": ["93.184.216.34"]})
    f = flow_for("x.good.test")
    settle(a.requestheaders(f))
    server = connection.Server(address=("x.good.test", 443))
    a.server_connect(hook(server, f.client_conn))
    assert server.address == ("93.184.216.34", 443)
    a.server_connect_error(hook(server, f.client_conn))
    assert server.address == ("x.good.test", 443)


def test_a_connection_nobody_judged_is_killed() -> None:
    a = addon({})
    client = tflow.tclient_conn()
    server = connection.Server(address=("x.good.test", 443))
    a.server_connect(hook(server, client))
    assert server.error and "not checked" in server.error
    server = connection.Server(address=("x.good.test", 443), via=("http", ("10.0.0.1", 3128)))
    a.server_connect(hook(server, client))
    assert server.error


def test_pins_are_per_agent_connection_and_end_with_it() -> None:
    a = addon({"x.good.test": ["93.184.216.34"]})
    f = flow_for("x.good.test")
    settle(a.requestheaders(f))
    other = tflow.tclient_conn()
    server = connection.Server(address=("x.good.test", 443))
    a.server_connect(hook(server, other))
    assert server.error  # another agent connection: no pin
    a.client_disconnected(f.client_conn)
    server = connection.Server(address=("x.good.test", 443))
    a.server_connect(hook(server, f.client_conn))
    assert server.error


def test_a_later_call_is_judged_against_the_pinned_address() -> None:
    answers = {"x.good.test": ["10.0.0.7"]}
    a = addon(answers)
    f = flow_for("x.good.test", allow_private=True)
    settle(a.requestheaders(f))
    assert f.response is None
    answers["x.good.test"] = ["93.184.216.34"]  # rebinding: now public
    a._guard.resolver._cache.clear()  # type: ignore[union-attr]
    g = flow_for("x.good.test")  # a rule without the opt-in, on the same agent connection
    g.client_conn = f.client_conn
    settle(a.requestheaders(g))
    assert g.response is not None and g.response.status_code == 403


def test_an_unauthorized_flow_is_refused() -> None:
    a = addon({"x.good.test": ["93.184.216.34"]})
    f = tflow.tflow()
    settle(a.requestheaders(f))
    assert f.response is not None and f.response.status_code == 403
