"""addons/identify.py: who is calling, at CONNECT and on every request (taddons, tflow)."""

from __future__ import annotations

from mitmproxy.test import taddons

from addons._base import exchange
from addons.authorize import Authorize
from addons.identify import Identify
from proxy.gateway import Services
from tests.support import WORKLOAD, Keys
from tests.unit.addons.conftest import OTHER_WORKLOAD, connect, credential, refusal, request


async def test_a_request_with_a_valid_token_names_its_caller(svc: Services,
                                                            agent_token: str) -> None:
    f = request(token=agent_token, Proxy_Connection="keep-alive")
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).requestheaders(f)
    ex = exchange(f)
    assert f.response is None
    assert ex.caller is not None and ex.caller.workload == WORKLOAD
    assert ex.counted and svc.gateway.in_flight == 1  # in flight until its record
    # the proxy credential never travels upstream
    assert "Proxy-Authorization" not in f.request.headers
    assert "Proxy-Connection" not in f.request.headers


async def test_a_request_without_a_credential_is_refused_with_407(svc: Services) -> None:
    f = request()
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).requestheaders(f)
    doc = refusal(f, 407, "proxy_authentication_required")
    assert "no proxy credential" in doc["reason"]
    assert f.response is not None
    assert f.response.headers["Proxy-Authenticate"] == 'Basic realm="taskgate"'
    assert exchange(f).caller is None
    assert exchange(f).decision == "challenge"  # no credential shown: not a denial


async def test_an_empty_credential_is_a_denial_not_a_challenge(svc: Services) -> None:
    f = request(Proxy_Authorization=credential(""))
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).requestheaders(f)
    assert "empty proxy credential" in refusal(f, 407)["reason"]
    assert exchange(f).decision == "deny"


async def test_a_forged_token_is_refused(svc: Services, keys: Keys) -> None:
    f = request(token=keys.token(key=keys.other))  # signed by a key the JWKS lacks
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).requestheaders(f)
    refusal(f, 407)
    assert exchange(f).caller is None


async def test_two_credentials_are_refused(svc: Services, agent_token: str) -> None:
    f = request(token=agent_token)
    f.request.headers.add("Proxy-Authorization", credential(agent_token))
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).requestheaders(f)
    assert "more than one" in refusal(f, 407)["reason"]
    assert "Proxy-Authorization" not in f.request.headers


async def test_an_expired_token_is_refused(svc: Services, keys: Keys) -> None:
    f = connect("api.example", token=keys.token(ttl=-600))
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).http_connect(f)
    assert "expired" in refusal(f, 407)["reason"]
    assert exchange(f).method == "CONNECT" and exchange(f).caller is None


async def test_connect_names_the_caller(svc: Services, keys: Keys) -> None:
    f = connect("api.example", token=keys.token(sub=OTHER_WORKLOAD))
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).http_connect(f)
    ex = exchange(f)
    assert f.response is None and ex.method == "CONNECT"
    assert ex.caller is not None and ex.caller.workload == OTHER_WORKLOAD
    assert "Proxy-Authorization" not in f.request.headers


async def test_connect_without_a_credential_is_refused(svc: Services) -> None:
    f = connect("api.example")
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).http_connect(f)
    refusal(f, 407)


async def test_a_call_inside_a_tunnel_is_its_openers(svc: Services, agent_token: str) -> None:
    identify, authorize = Identify(svc), Authorize(svc)
    tunnel = connect("api.example", token=agent_token)
    with taddons.context(identify, authorize):
        await identify.http_connect(tunnel)
        await authorize.http_connect(tunnel)
        inner = request(url="https://api.example/allowed/x")  # no credential of its own
        inner.client_conn = tunnel.client_conn
        await identify.requestheaders(inner)
        assert inner.response is None
        assert exchange(inner).caller == exchange(tunnel).caller
        # Another agent connection has no tunnel: its call needs a credential.
        stranger = request(url="https://api.example/allowed/x")
        await identify.requestheaders(stranger)
        refusal(stranger, 407)


async def test_the_tunnel_ends_with_its_connection(svc: Services, agent_token: str) -> None:
    identify, authorize = Identify(svc), Authorize(svc)
    tunnel = connect("api.example", token=agent_token)
    with taddons.context(identify, authorize):
        await identify.http_connect(tunnel)
        await authorize.http_connect(tunnel)
        authorize.client_disconnected(tunnel.client_conn)
        inner = request(url="https://api.example/allowed/x")
        inner.client_conn = tunnel.client_conn
        await identify.requestheaders(inner)
    refusal(inner, 407)


async def test_without_authorize_loaded_every_call_shows_a_credential(
        svc: Services, agent_token: str) -> None:
    identify = Identify(svc)
    tunnel = connect("api.example", token=agent_token)
    with taddons.context(identify):
        await identify.http_connect(tunnel)
        inner = request(url="https://api.example/allowed/x")
        inner.client_conn = tunnel.client_conn
        await identify.requestheaders(inner)
    refusal(inner, 407)


async def test_a_grpc_call_without_a_credential_is_refused_unauthenticated(
        svc: Services) -> None:
    """A gRPC client reads grpc-status: 407 becomes UNAUTHENTICATED (16), in an HTTP 200."""
    f = request("POST", "https://api.example/pkg.Svc/Call", content=b"\0\0\0\0\0",
                Content_Type="application/grpc")
    with taddons.context(Identify(svc), Authorize(svc)):
        await Identify(svc).requestheaders(f)
    assert f.response is not None and f.response.status_code == 200
    assert f.response.headers["grpc-status"] == "16"
    assert "no proxy credential" in f.response.headers["grpc-message"]
    assert exchange(f).request_id in f.response.headers["grpc-message"]
    assert f.response.content == b"" and exchange(f).decision == "challenge"


async def test_each_call_on_a_connection_is_its_own_credentials(svc: Services, keys: Keys
                                                                  ) -> None:
    """The token's cache key is remembered per connection: a later call on the same
    connection with another credential, a forged one or none is judged by its own."""
    identify = Identify(svc)
    calls = [request(token=keys.token()), request(token=keys.token()),
             request(token=keys.token(sub=OTHER_WORKLOAD)),
             request(token=keys.token(key=keys.other)), request(), request(token="")]
    for f in calls[1:]:
        f.client_conn = calls[0].client_conn
    with taddons.context(identify, Authorize(svc)):
        for f in calls:
            await identify.requestheaders(f)
    workloads = [(ex.caller.workload if ex.caller else None, ex.decision)
                 for ex in map(exchange, calls)]
    assert workloads == [(WORKLOAD, None), (WORKLOAD, None), (OTHER_WORKLOAD, None),
                         (None, "deny"), (None, "challenge"), (None, "deny")]
    assert all("Proxy-Authorization" not in f.request.headers for f in calls)
