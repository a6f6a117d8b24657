"""addons/inject.py: the rule's secret on authorized calls only, masked in what comes back."""

from __future__ import annotations

import gzip

from mitmproxy import http
from mitmproxy.test import taddons

from addons._base import exchange
from addons.authorize import Authorize
from addons.identify import Identify
from addons.inject import Inject
from proxy.gateway import Services
from tests.unit.addons.conftest import SECRET, connect, refusal, request, respond


async def in_tunnel(svc: Services, token: str, method: str, url: str, *,
                    content: bytes | None = None, **headers: str
                    ) -> tuple[http.HTTPFlow, Inject]:
    """A call inside a CONNECT tunnel to api.example:443, through identify, authorize
    and inject's requestheaders."""
    identify, authorize, inject = Identify(svc), Authorize(svc), Inject(svc)
    tunnel = connect("api.example", token=token)
    f = request(method, url, content=content, **headers)
    f.client_conn = tunnel.client_conn
    f.client_conn.sni = "api.example"
    with taddons.context(identify, authorize, inject):
        await identify.http_connect(tunnel)
        await authorize.http_connect(tunnel)
        await identify.requestheaders(f)
        await authorize.requestheaders(f)
        await inject.requestheaders(f)
    return f, inject


async def test_the_secret_replaces_the_agents_credentials(svc: Services,
                                                         agent_token: str) -> None:
    f, _ = await in_tunnel(svc, agent_token, "GET", "https://api.example/secret/x?api_key=own",
                           Authorization="Bearer agent-own", Cookie="session=agent")
    ex = exchange(f)
    assert f.response is None
    assert f.request.headers["Authorization"] == f"Bearer {SECRET}"
    assert "Cookie" not in f.request.headers
    assert f.request.headers["Accept-Encoding"] == "identity"
    assert ex.secret == "key" and ex.secret_injected and not ex.secret_deferred
    assert ex.record()["secret"] == "key"


async def test_no_secret_outside_a_tunnel(svc: Services, agent_token: str) -> None:
    f = request(url="https://api.example/secret/x", token=agent_token)
    f.client_conn.sni = "api.example"
    inject = Inject(svc)
    with taddons.context(Identify(svc), Authorize(svc), inject):
        await Identify(svc).requestheaders(f)
        await Authorize(svc).requestheaders(f)
        await inject.requestheaders(f)
    assert "CONNECT tunnel" in refusal(f, 403)["reason"]
    assert f.request.headers.get("Authorization") is None
    assert not exchange(f).secret_injected


async def test_a_rule_without_a_secret_adds_none(svc: Services, agent_token: str) -> None:
    f, _ = await in_tunnel(svc, agent_token, "GET", "https://api.example/allowed/x",
                           Authorization="Bearer agent-own")
    assert f.response is None and f.request.headers["Authorization"] == "Bearer agent-own"
    assert exchange(f).secret is None and not exchange(f).secret_injected


async def test_a_refused_call_gets_no_secret(svc: Services, agent_token: str) -> None:
    f, _ = await in_tunnel(svc, agent_token, "DELETE", "https://api.example/secret/x")
    refusal(f, 403)  # refused by authorize; inject leaves it be
    assert "Authorization" not in f.request.headers and exchange(f).secret is None


async def test_a_call_held_for_approval_gets_its_secret_after_the_yes(
        svc: Services, agent_token: str) -> None:
    f, inject = await in_tunnel(svc, agent_token, "POST", "https://api.example/pay/x",
                                content=b"{}")
    ex = exchange(f)
    assert ex.secret_deferred and ex.buffer_body
    assert "Authorization" not in f.request.headers
    ex.decision = "approved"  # what the approve addon does once a person said yes
    await inject.request(f)
    assert f.response is None and f.request.headers["Authorization"] == f"Bearer {SECRET}"
    assert ex.secret_injected and not ex.secret_deferred


async def test_a_deferred_secret_for_a_call_not_approved_is_refused(
        svc: Services, agent_token: str) -> None:
    f, inject = await in_tunnel(svc, agent_token, "POST", "https://api.example/pay/x",
                                content=b"{}")
    exchange(f).decision = "held"
    await inject.request(f)
    assert "not authorized" in refusal(f, 403)["reason"]
    assert "Authorization" not in f.request.headers


async def test_echoes_of_the_secret_are_masked(svc: Services, agent_token: str) -> None:
    f, inject = await in_tunnel(svc, agent_token, "GET", "https://api.example/secret/x")
    resp = respond(f, 200, b'{"token": "' + SECRET.encode() + b'"}', X_Echo=SECRET)
    await inject.responseheaders(f)
    assert exchange(f).redactor is not None
    assert SECRET not in resp.headers["X-Echo"]
    await inject.response(f)
    assert SECRET.encode() not in (resp.content or b"") and resp.status_code == 200
    assert resp.headers["content-length"] == str(len(resp.raw_content or b""))


async def test_a_coded_answer_is_scanned_decoded(svc: Services, agent_token: str) -> None:
    f, inject = await in_tunnel(svc, agent_token, "GET", "https://api.example/secret/x")
    resp = respond(f, 200, gzip.compress(SECRET.encode()), Content_Encoding="gzip")
    await inject.responseheaders(f)
    await inject.response(f)
    assert "content-encoding" not in resp.headers
    assert SECRET.encode() not in (resp.raw_content or b"")


async def test_an_answer_that_cannot_be_scanned_is_withheld(svc: Services,
                                                           agent_token: str) -> None:
    f, inject = await in_tunnel(svc, agent_token, "GET", "https://api.example/secret/x")
    respond(f, 200, b"not gzip at all", Content_Encoding="gzip")
    await inject.responseheaders(f)
    await inject.response(f)
    assert "withheld" in refusal(f, 502, "secret_unredactable")["reason"]


async def test_a_stream_that_cannot_be_decoded_is_cut(svc: Services, agent_token: str) -> None:
    f, inject = await in_tunnel(svc, agent_token, "GET", "https://api.example/secret/x")
    resp = respond(f, 200, b"", Content_Encoding="gzip")
    del resp.headers["content-length"]  # no length: streamed
    await inject.responseheaders(f)
    assert callable(resp.stream)
    assert list(resp.stream(b"definitely not gzip")) == []
    assert exchange(f).stream_undecodable
    await inject.response(f)
    assert not f.live and exchange(f).decision == "error"
