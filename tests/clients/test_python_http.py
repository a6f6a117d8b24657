"""The Python HTTP clients agents use, set up from the environment only (the proxy
variables and each one's CA variable, docs/clients.md): requests, httpx, aiohttp
(``trust_env=True``) and urllib. Each call passes and is recorded, an event stream
arrives event by event, and a refusal's body carries the reason and request id (these
clients' own exceptions name only the status)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import aiohttp
import httpx
import pytest
import requests

from tests.clients.conftest import EVENTS, GAP, REFUSED_REASON, World, incremental

ID = "x-taskgate-request-id"
Answer = tuple[int, str | None, bytes]  # status, request id, body


def get_requests(url: str) -> Answer:
    r = requests.get(url, timeout=10)
    return r.status_code, r.headers.get(ID), r.content


def get_httpx(url: str) -> Answer:
    with httpx.Client(timeout=10) as c:  # trust_env: proxy and SSL_CERT_FILE
        r = c.get(url)
    return r.status_code, r.headers.get(ID), r.content


def session() -> aiohttp.ClientSession:
    """aiohttp reads the proxy variables with ``trust_env``; its default SSL context is
    made when aiohttp is imported, from SSL_CERT_FILE as set then. An agent's environment
    is set before it starts; this test sets it later, so the context is made now."""
    return aiohttp.ClientSession(trust_env=True, connector=aiohttp.TCPConnector(
        ssl=ssl.create_default_context()))


def get_aiohttp(url: str) -> Answer:
    async def go() -> Answer:
        async with session() as s, s.get(url) as r:
            return r.status, r.headers.get(ID), await r.read()

    return asyncio.run(go())


def get_urllib(url: str) -> Answer:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - a test URL
            return r.status, r.headers.get(ID), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get(ID), e.read()


def lines_requests(url: str) -> Iterator[bytes]:
    with requests.get(url, stream=True, timeout=10) as r:
        yield from r.iter_lines()


def lines_httpx(url: str) -> Iterator[bytes]:
    with httpx.Client(timeout=10) as c, c.stream("GET", url) as r:
        for line in r.iter_lines():
            yield line.encode()


def lines_urllib(url: str) -> Iterator[bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - a test URL
        yield from r


GETS: dict[str, Callable[[str], Answer]] = {
    "requests": get_requests, "httpx": get_httpx, "aiohttp": get_aiohttp,
    "urllib": get_urllib}
STREAMS = {"requests": lines_requests, "httpx": lines_httpx, "urllib": lines_urllib}


@pytest.fixture
def agent_env(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    for name, value in world.env().items():
        monkeypatch.setenv(name, value)
    return world


@pytest.mark.parametrize("client", GETS)
def test_call_passes_and_is_recorded(agent_env: World, client: str) -> None:
    status, rid, body = GETS[client](f"{agent_env.origin}/allowed/{client}")
    assert status == 200 and json.loads(body)["path"] == f"/allowed/{client}"
    rec = agent_env.record(str(rid))
    assert (rec["decision"], rec["rule"], rec["status"]) == ("allow", "api", 200)
    assert rec["connect_id"] and rec["bytes_out"] == len(body)


@pytest.mark.parametrize("client", GETS)
def test_refusal_body_names_reason_and_request_id(agent_env: World, client: str) -> None:
    status, rid, body = GETS[client](f"{agent_env.origin}/elsewhere")
    doc = json.loads(body)
    assert status == 403 and REFUSED_REASON in doc["error"]["message"]
    assert rid and rid in doc["error"]["message"]
    assert agent_env.record(rid)["decision"] == "deny"


@pytest.mark.parametrize("client", STREAMS)
def test_stream_arrives_event_by_event(agent_env: World, client: str) -> None:
    url = f"{agent_env.origin}/sse?n={EVENTS}&gap={GAP}"
    stamps = [time.monotonic() for line in STREAMS[client](url) if line.startswith(b"data:")]
    assert len(stamps) == EVENTS and incremental(stamps), stamps


def test_aiohttp_stream_arrives_event_by_event(agent_env: World) -> None:
    async def go() -> list[float]:
        url = f"{agent_env.origin}/sse?n={EVENTS}&gap={GAP}"
        async with session() as s, s.get(url) as r:
            return [time.monotonic() async for line in r.content if line.startswith(b"data:")]

    stamps = asyncio.run(go())
    assert len(stamps) == EVENTS and incremental(stamps), stamps
