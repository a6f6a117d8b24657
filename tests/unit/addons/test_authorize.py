"""addons/authorize.py: tunnels to endpoints a rule names; calls matched against the rules."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import http
from mitmproxy.test import taddons

from addons._base import exchange
from addons.authorize import Authorize, tunnel_of
from addons.identify import Identify
from proxy.config._model import parse_config
from proxy.gateway import Services, Tunnel
from proxy.policy import Call
from tests.support import WORKLOAD, Keys
from tests.unit.addons.conftest import (
    OTHER_WORKLOAD,
    RULES,
    config_doc,
    connect,
    refusal,
    request,
)


async def judged(svc: Services, f: http.HTTPFlow, authorize: Authorize | None = None
                 ) -> Authorize:
    """Run ``f`` through identify and authorize, as the chain does."""
    authorize = authorize or Authorize(svc)
    with taddons.context(Identify(svc), authorize):
        await Identify(svc).requestheaders(f)
        await authorize.requestheaders(f)
    return authorize


async def test_an_allowed_call_carries_its_rule_and_call(svc: Services,
                                                        agent_token: str) -> None:
    f = request(url="http://API.Example./allowed/x?q=1", token=agent_token)
    await judged(svc, f)
    ex = exchange(f)
    assert f.response is None
    assert ex.decision == "allow" and ex.rule == "read"
    assert ex.allowed_by is not None and ex.allowed_by.id == "read"
    assert ex.call == Call("GET", "http", "api.example", 80, "/allowed/x")
    assert ex.tunnel is None
    # forwarded as judged: the canonical host
    assert f.request.host == "api.example" and f.request.headers["Host"] == "api.example"
    assert ex.record()["rule"] == "read"


async def test_a_path_no_rule_allows_is_refused(svc: Services, agent_token: str) -> None:
    f = request(url="http://api.example/private", token=agent_token)
    await judged(svc, f)
    assert "path" in refusal(f, 403, "forbidden")["reason"]
    assert exchange(f).allowed_by is None and exchange(f).call is None


async def test_a_method_no_rule_allows_is_refused(svc: Services, agent_token: str) -> None:
    f = request("DELETE", "http://api.example/allowed/x", token=agent_token)
    await judged(svc, f)
    assert "method" in refusal(f, 403, "forbidden")["reason"]


async def test_a_lower_case_method_is_refused(svc: Services, agent_token: str) -> None:
    f = request(token=agent_token)
    f.request.data.method = b"get"
    await judged(svc, f)
    assert "case-sensitive" in refusal(f, 400, "bad_request")["reason"]


async def test_a_header_with_a_control_character_is_refused(svc: Services,
                                                           agent_token: str) -> None:
    f = request(token=agent_token)
    f.request.headers.fields = (*f.request.headers.fields, (b"X-Bad", b"a\x00b"))
    await judged(svc, f)
    assert "control character" in refusal(f, 400, "bad_request")["reason"]


async def test_a_protocol_upgrade_is_refused(svc: Services, agent_token: str) -> None:
    f = request(token=agent_token, Connection="Upgrade", Upgrade="websocket")
    await judged(svc, f)
    assert "upgrade" in refusal(f, 403)["reason"]


async def test_a_host_header_naming_another_host_is_refused(svc: Services,
                                                           agent_token: str) -> None:
    f = request(token=agent_token)
    f.request.headers["Host"] = "evil.example"
    await judged(svc, f)
    assert "Host header" in refusal(f, 403)["reason"]


async def test_a_call_nobody_identified_is_refused(svc: Services) -> None:
    f = request()
    with taddons.context(Authorize(svc)):
        await Authorize(svc).requestheaders(f)
    assert refusal(f, 403)["reason"] == "caller not identified"


async def test_a_request_trailer_with_a_control_character_is_refused(svc: Services) -> None:
    f = request("POST", "http://api.example/approve/x", content=b"{}")
    f.request.trailers = http.Headers([(b"X-Sum", b"a\nb")])
    await Authorize(svc).request(f)
    assert "trailer" in refusal(f, 400, "bad_request")["reason"]
    clean = request("POST", "http://api.example/approve/x", content=b"{}")
    clean.request.trailers = http.Headers([(b"X-Sum", b"ab")])
    await Authorize(svc).request(clean)
    assert clean.response is None


async def test_connect_to_an_endpoint_no_rule_names_is_refused(svc: Services,
                                                              agent_token: str) -> None:
    authorize = Authorize(svc)
    f = connect("elsewhere.example", token=agent_token)
    with taddons.context(Identify(svc), authorize):
        await Identify(svc).http_connect(f)
        await authorize.http_connect(f)
        assert tunnel_of(f.client_conn) is None
    assert "no rule allows" in refusal(f, 403, "forbidden")["reason"]
    assert exchange(f).host == "elsewhere.example" and exchange(f).port == 443


async def test_an_allowed_connect_opens_a_tunnel_calls_stay_in(svc: Services,
                                                              agent_token: str) -> None:
    authorize = Authorize(svc)
    tunnel = connect("API.example", token=agent_token)
    with taddons.context(Identify(svc), authorize):
        await Identify(svc).http_connect(tunnel)
        await authorize.http_connect(tunnel)
        opened = tunnel_of(tunnel.client_conn)
    caller = exchange(tunnel).caller
    assert tunnel.response is None and caller is not None and caller.workload == WORKLOAD
    assert opened == Tunnel(caller, "api.example", 443, exchange(tunnel).request_id) \
        == authorize.tunnel(tunnel.client_conn)

    inside = request(url="https://api.example/allowed/x")
    inside.client_conn = tunnel.client_conn
    inside.client_conn.sni = "api.example"
    await judged(svc, inside, authorize)
    assert inside.response is None and exchange(inside).tunnel == opened

    elsewhere = request(url="https://other.example/allowed/x")
    elsewhere.client_conn = tunnel.client_conn
    await judged(svc, elsewhere, authorize)
    assert "CONNECT target" in refusal(elsewhere, 403)["reason"]

    wrong_sni = request(url="https://api.example/allowed/x")
    wrong_sni.client_conn = tunnel.client_conn
    tunnel.client_conn.sni = "evil.example"
    await judged(svc, wrong_sni, authorize)
    assert "TLS server name" in refusal(wrong_sni, 403)["reason"]


async def test_a_caller_without_rules_is_refused_at_connect(svc: Services, keys: Keys
                                                           ) -> None:
    authorize = Authorize(svc)
    f = connect("api.example", token=keys.token(sub=OTHER_WORKLOAD))
    with taddons.context(Identify(svc), authorize):
        await Identify(svc).http_connect(f)
        await authorize.http_connect(f)
    refusal(f, 403, "forbidden")
    assert authorize.tunnel(f.client_conn) is None


async def test_a_connections_last_call_is_judged_again_on_new_rules(
        svc: Services, agent_token: str, shared_files: dict[str, Path]) -> None:
    """authorize keeps each connection's last call as read and judged; the same
    request line again is that call, but judged afresh once the rules are others
    (a reload), and another request line is read anew."""
    authorize = Authorize(svc)
    first = request(url="http://api.example/allowed/x?k=1", token=agent_token)

    async def again(url: str = "http://api.example/allowed/x?k=1") -> http.HTTPFlow:
        f = request(url=url, token=agent_token)
        f.client_conn = first.client_conn
        await judged(svc, f, authorize)
        return f

    await judged(svc, first, authorize)
    same = await again()
    assert exchange(same).decision == "allow" and exchange(same).call is exchange(first).call
    assert exchange(same).path == "/allowed/x?k=REDACTED" == exchange(first).path
    assert exchange(same).host == "api.example"

    doc = config_doc(shared_files["jwks"])
    doc["workloads"][WORKLOAD]["standing"] = [r for r in RULES if r["id"] != "read"]
    svc.gateway.policy.reconfigure(parse_config(doc))  # type: ignore[attr-defined]
    assert "path" in refusal(await again(), 403, "forbidden")["reason"]
    svc.gateway.policy.reconfigure(parse_config(config_doc(shared_files["jwks"])))  # type: ignore[attr-defined]
    assert exchange(await again()).decision == "allow"
    assert "path" in refusal(await again("http://api.example/private"), 403)["reason"]
    assert exchange(await again("http://api.example/allowed/y")).call == Call(
        "GET", "http", "api.example", 80, "/allowed/y")
    assert exchange(await again()).decision == "allow"
