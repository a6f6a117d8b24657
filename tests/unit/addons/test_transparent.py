"""addons/transparent.py: a redirected connection is known by its source address, held
to its original destination, and must be HTTP (taddons, tflow, a NextLayer by hand).
The same in network namespaces, with the deploy rules: tests/e2e/test_transparent.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import connection, http
from mitmproxy.options import Options
from mitmproxy.proxy import context, events, layer, layers, mode_specs
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.test import taddons

from addons._base import exchange
from addons.authorize import Authorize
from addons.identify import Identify
from addons.transparent import NOT_HTTP, Transparent
from proxy.config._model import parse_config
from proxy.gateway import Resolver, Services
from tests.core import services
from tests.support import WORKLOAD, Keys
from tests.unit.addons.conftest import config_doc, credential, refusal, request

AGENT, STRANGER, ORIGINAL = "10.77.0.2", "10.77.0.9", "10.77.0.1"
TRANSPARENT = mode_specs.ProxyMode.parse("transparent")


async def _dns(host: str, port: int) -> Sequence[str]:
    answers = {"api.example": [ORIGINAL], "front.example": ["10.99.0.1"]}
    if host not in answers:
        raise OSError("no such name")
    return answers[host]


@pytest.fixture
async def tsvc(tmp_path: Path, shared_files: dict[str, Path]) -> AsyncIterator[Services]:
    doc = config_doc(shared_files["jwks"])
    doc["workloads"][WORKLOAD]["sources"] = [f"{AGENT}/32"]
    cfg = parse_config(doc)
    async with services(tmp_path, issuers=cfg.issuers, workloads=cfg.workloads,
                        secrets=cfg.secrets) as built:
        yield built


def transparent_addon(svc: Services) -> Transparent:
    addon = Transparent(svc)
    addon._resolver = Resolver(_dns)  # noqa: SLF001 - the test's names, not the machine's
    return addon


def redirected(source: str = AGENT, url: str = f"http://{ORIGINAL}/allowed/x",
               **headers: str) -> http.HTTPFlow:
    """A request as mitmproxy's transparent mode hands it on: the host is the original
    destination's address, which is also the client connection's sockname."""
    f = request(url=url, **headers)
    f.client_conn.proxy_mode = TRANSPARENT
    f.client_conn.peername = (source, 40000)
    f.client_conn.sockname = (ORIGINAL, f.request.port)
    return f


async def test_claimed_source_is_the_workload_and_the_call_goes_by_name(tsvc: Services) -> None:
    f = redirected(Host="api.example")
    with taddons.context(Identify(tsvc), Authorize(tsvc)):
        await transparent_addon(tsvc).requestheaders(f)
        await Identify(tsvc).requestheaders(f)
    ex = exchange(f)
    assert f.response is None
    assert ex.caller is not None and ex.caller.workload == WORKLOAD and ex.caller.task is None
    assert (f.request.host, f.request.port, ex.original_dst) == ("api.example", 80, ORIGINAL)


async def test_a_credential_on_a_transparent_call_names_no_one(tsvc: Services,
                                                               keys: Keys) -> None:
    f = redirected(Host="api.example",
                   Proxy_Authorization=credential(keys.token("spiffe://acme.test/x")))
    with taddons.context(Identify(tsvc), Authorize(tsvc)):
        await transparent_addon(tsvc).requestheaders(f)
        await Identify(tsvc).requestheaders(f)
    ex = exchange(f)
    assert ex.caller is not None and ex.caller.workload == WORKLOAD
    assert "Proxy-Authorization" not in f.request.headers


async def test_unclaimed_source_is_refused(tsvc: Services) -> None:
    f = redirected(STRANGER, Host="api.example")
    with taddons.context(Identify(tsvc), Authorize(tsvc)):
        await transparent_addon(tsvc).requestheaders(f)
    doc = refusal(f, 403, "forbidden")
    assert doc["reason"].startswith(f"no workload claims the source address {STRANGER}")
    assert exchange(f).caller is None and f.request.host == ORIGINAL


async def test_identify_refuses_a_transparent_call_nobody_identified(tsvc: Services) -> None:
    f = redirected(Host="api.example")  # the transparent addon did not run
    with taddons.context(Identify(tsvc), Authorize(tsvc)):
        await Identify(tsvc).requestheaders(f)
    assert "identified by its source address" in refusal(f, 403)["reason"]


@pytest.mark.parametrize(("headers", "url", "reason"), [
    ({"Host": "front.example"}, f"http://{ORIGINAL}/allowed/x",
     f"'front.example' resolves to 10.99.0.1, not to {ORIGINAL}"),
    ({"Host": "nowhere.example"}, f"http://{ORIGINAL}/allowed/x", "could not be resolved"),
    ({"Host": "10.77.0.7"}, f"http://{ORIGINAL}/allowed/x", f"not to {ORIGINAL}"),
    ({"Host": "bad host!"}, f"http://{ORIGINAL}/allowed/x", "not a valid host name"),
])
async def test_a_name_that_does_not_lead_to_the_original_destination_is_refused(
        tsvc: Services, headers: dict[str, str], url: str, reason: str) -> None:
    f = redirected(url=url, **headers)
    with taddons.context(Identify(tsvc), Authorize(tsvc)):
        await transparent_addon(tsvc).requestheaders(f)
    assert reason in refusal(f, 403, "forbidden")["reason"]


async def test_an_absolute_url_naming_another_host_is_refused(tsvc: Services) -> None:
    f = redirected(Host="api.example")
    f.request.authority = "front.example"
    with taddons.context(Identify(tsvc), Authorize(tsvc)):
        await transparent_addon(tsvc).requestheaders(f)
    assert "URL names another host" in refusal(f, 403)["reason"]
    g = redirected(Host="api.example")
    g.request.authority = "api.example:80"
    with taddons.context(Identify(tsvc), Authorize(tsvc)):
        await transparent_addon(tsvc).requestheaders(g)
    assert g.response is None and g.request.authority == ""  # origin form upstream


async def test_a_regular_proxy_call_is_not_touched(tsvc: Services) -> None:
    f = request(Host="api.example")
    with taddons.context(Identify(tsvc), Authorize(tsvc)):
        await transparent_addon(tsvc).requestheaders(f)
    assert f.response is None and exchange(f).caller is None


# -- next_layer ------------------------------------------------------------------------------
def next_layer(data: bytes, chosen: type[layer.Layer] | None = layers.HttpLayer,
               source: str = AGENT) -> layer.NextLayer:
    client = connection.Client(peername=(source, 40000), sockname=(ORIGINAL, 25),
                               timestamp_start=0, proxy_mode=TRANSPARENT)
    ctx = context.Context(client, Options())
    nl = layer.NextLayer(ctx)
    nl.events = [events.DataReceived(client, data)] if data else []
    if chosen is layers.HttpLayer:
        nl.layer = layers.HttpLayer(ctx, HTTPMode.transparent)
    elif chosen is not None:
        nl.layer = chosen(ctx)
    return nl


@pytest.mark.parametrize(("data", "chosen"), [
    (b"HELO mail.example\r\n", layers.HttpLayer),
    (b"\x00\x1c\x12\x34\x01\x00\r\n", layers.HttpLayer),
    (b"anything", layers.TCPLayer),
    (b"anything", layers.DNSLayer),
])
async def test_what_is_not_http_is_closed_and_audited(tsvc: Services, data: bytes,
                                                      chosen: type[layer.Layer]) -> None:
    written: list[dict[str, Any]] = []
    tsvc.gateway.on_record.append(written.append)
    nl = next_layer(data, chosen)
    with taddons.context(transparent_addon(tsvc)):
        await transparent_addon(tsvc).next_layer(nl)
    assert type(nl.layer).__name__ == "_Closed"
    [record] = written
    assert NOT_HTTP in record["reason"] and record["workload"] == WORKLOAD
    assert (record["client"], record["host"], record["port"]) == (AGENT, ORIGINAL, 25)


@pytest.mark.parametrize(("data", "kept"), [
    (b"GET / HTTP/1.1\r\n", True),
    (b"GET /partial", False),  # waits for the request line: no layer yet
])
async def test_http_goes_on(tsvc: Services, data: bytes, kept: bool) -> None:
    nl = next_layer(data)
    with taddons.context(transparent_addon(tsvc)):
        await transparent_addon(tsvc).next_layer(nl)
    assert isinstance(nl.layer, layers.HttpLayer) if kept else nl.layer is None


async def test_tls_from_an_unclaimed_address_is_closed(tsvc: Services) -> None:
    nl = next_layer(b"\x16\x03\x01", layers.ServerTLSLayer, source=STRANGER)
    with taddons.context(transparent_addon(tsvc)):
        await transparent_addon(tsvc).next_layer(nl)
    assert type(nl.layer).__name__ == "_Closed"
    nl = next_layer(b"\x16\x03\x01", layers.ServerTLSLayer)
    with taddons.context(transparent_addon(tsvc)):
        await transparent_addon(tsvc).next_layer(nl)
    assert isinstance(nl.layer, layers.ServerTLSLayer)


async def test_tls_inside_tls_is_closed(tsvc: Services) -> None:
    nl = next_layer(b"\x16\x03\x01\x00\x05", layers.ServerTLSLayer)
    nl.context.client.tls_version = "TLSv1.3"
    nl.context.client.timestamp_tls_setup = 1.0  # the outer handshake is done
    assert nl.context.client.tls_established
    with taddons.context(transparent_addon(tsvc)):
        await transparent_addon(tsvc).next_layer(nl)
    assert type(nl.layer).__name__ == "_Closed"


async def test_sources_follow_the_config_in_force(tsvc: Services) -> None:
    addon = transparent_addon(tsvc)
    assert addon.identity.sources.workload_of(STRANGER) is None
    doc = {"workloads": {WORKLOAD: {"sources": [f"{STRANGER}/32"]}}}
    tsvc.gateway.config = parse_config(doc)  # as a reload swaps it in
    assert addon.identity.sources.workload_of(STRANGER) == WORKLOAD
    assert addon.identity.sources.workload_of(AGENT) is None
