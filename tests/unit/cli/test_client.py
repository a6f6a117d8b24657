"""The one control-plane client of the CLI: where it dials, which token it sends, how it
fails — against a real aiohttp server on a loopback port the kernel picked."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.cli._client import URL_ENV, ControlClient, ControlError, control_url, segment
from proxy.config import Config
from proxy.identity import ENV_VAR as TOKEN_ENV


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (URL_ENV, TOKEN_ENV, "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


class Plane:
    """A stand-in control plane: remembers the Authorization header of each call."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Authorization"))
        if request.path == "/v1/fail":
            return web.json_response({"error": "conflict", "reason": "already ended",
                                      "field": "rules[0].methods"}, status=409)
        if request.path == "/v1/plain":
            return web.Response(text="gone away", status=503)
        if request.path == "/v1/html":
            return web.Response(text="<html>", content_type="text/html")
        return web.json_response({"path": request.path, "method": request.method})


async def _serve(host: str) -> AsyncIterator[tuple[Plane, int]]:
    plane = Plane()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", plane.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield plane, port
    finally:
        await runner.cleanup()


@pytest.fixture
async def v4() -> AsyncIterator[tuple[Plane, int]]:
    async for served in _serve("127.0.0.1"):
        yield served


@pytest.fixture
async def v6() -> AsyncIterator[tuple[Plane, int]]:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback to test `::` against")
    async for served in _serve("::1"):
        yield served


@pytest.mark.parametrize(("host", "url"), [
    ("0.0.0.0", "http://127.0.0.1:8081"),
    ("", "http://127.0.0.1:8081"),
    ("::", "http://[::1]:8081"),
    ("127.0.0.1", "http://127.0.0.1:8081"),
    ("::1", "http://[::1]:8081"),
    ("fd00::5", "http://[fd00::5]:8081"),
    ("gateway.internal", "http://gateway.internal:8081"),
])
def test_control_url_dials_the_loopback_of_a_wildcard(host: str, url: str) -> None:
    assert control_url(host, 8081) == url


def _config(tmp_path: Path, host: str, port: int, token: str | None = None) -> Config:
    token_file = tmp_path / "admin-token"
    if token is not None:
        token_file.write_text(token + "\n")
    return Config(control_listen=(host, port), admin_token_file=str(token_file))


async def test_ipv4_wildcard_is_dialled_on_127_0_0_1(tmp_path: Path,
                                                     v4: tuple[Plane, int]) -> None:
    plane, port = v4
    client = ControlClient.from_config(_config(tmp_path, "0.0.0.0", port, "file-token"))
    assert client.base_url == f"http://127.0.0.1:{port}"
    assert await asyncio.to_thread(client.call, "GET", "/v1/tasks") == {
        "path": "/v1/tasks", "method": "GET"}
    assert plane.seen == ["Bearer file-token"]


async def test_ipv6_wildcard_is_dialled_on_the_ipv6_loopback(tmp_path: Path,
                                                             v6: tuple[Plane, int]) -> None:
    plane, port = v6
    client = ControlClient.from_config(_config(tmp_path, "::", port, "file-token"))
    assert client.base_url == f"http://[::1]:{port}"
    assert await asyncio.to_thread(client.call, "POST", "/v1/x", {"a": 1}) == {
        "path": "/v1/x", "method": "POST"}
    assert plane.seen == ["Bearer file-token"]


async def test_url_and_token_from_the_environment_win(tmp_path: Path, v4: tuple[Plane, int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plane, port = v4
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{port}/")
    monkeypatch.setenv(TOKEN_ENV, " env-token\n")
    # The config names a port nobody listens on and a token file with another token.
    client = ControlClient.from_config(_config(tmp_path, "127.0.0.1", 9, "file-token"))
    assert client.base_url == f"http://127.0.0.1:{port}"
    await asyncio.to_thread(client.call, "GET", "/v1/tasks")
    assert plane.seen == ["Bearer env-token"]


async def test_an_agents_proxy_variables_are_ignored(tmp_path: Path, v4: tuple[Plane, int],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    plane, port = v4
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    client = ControlClient.from_config(_config(tmp_path, "127.0.0.1", port, "t"))
    await asyncio.to_thread(client.call, "GET", "/v1/tasks")
    assert plane.seen == ["Bearer t"]


@pytest.mark.parametrize("token_file", ["missing", "directory"])
def test_no_readable_token_is_one_clear_error(tmp_path: Path, token_file: str) -> None:
    path = tmp_path / "admin-token"
    if token_file == "directory":  # any OSError reading it, not just a missing file
        path.mkdir()
    config = Config(admin_token_file=str(path))
    with pytest.raises(ControlError) as e:
        ControlClient.from_config(config)
    assert str(e.value) == (f"no admin token: set {TOKEN_ENV}, or run where {path} "
                            "is readable")
    assert not e.value.answered
    assert token_file != "missing" or not path.exists()  # never created by the client


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/", "127.0.0.1:8081"])
def test_only_http_urls_are_dialled(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(URL_ENV, url)
    monkeypatch.setenv(TOKEN_ENV, "t")
    with pytest.raises(ControlError, match=r"is not an http\(s\) URL") as e:
        ControlClient.from_config(Config())
    assert not e.value.answered


@pytest.mark.parametrize(("path", "message"), [
    ("/v1/fail", "409: already ended [rules[0].methods]"),
    ("/v1/plain", "503: gone away"),
    ("/v1/html", "answered GET /v1/html with something other than JSON"),
])
async def test_a_refusal_names_status_reason_and_field(v4: tuple[Plane, int], path: str,
                                                      message: str) -> None:
    _, port = v4
    client = ControlClient(f"http://127.0.0.1:{port}", "t")
    with pytest.raises(ControlError) as e:
        await asyncio.to_thread(client.call, "GET", path)
    assert message in str(e.value) and e.value.answered


async def test_unreachable_is_not_an_answer() -> None:
    # Bound to port 0 a moment ago, then closed: nobody listens there now.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    client = ControlClient(f"http://127.0.0.1:{dead}", "t")
    with pytest.raises(ControlError, match="cannot reach the control plane at ") as e:
        await asyncio.to_thread(client.call, "GET", "/v1/tasks")
    assert not e.value.answered


@pytest.mark.parametrize(("value", "quoted"), [
    ("abc123", "abc123"),
    ("../v1/tasks", "..%2Fv1%2Ftasks"),
    ("x?all=1#y", "x%3Fall%3D1%23y"),
    ("a b%", "a%20b%25"),
])
async def test_an_id_stays_one_path_segment(v4: tuple[Plane, int], value: str,
                                            quoted: str) -> None:
    assert segment(value) == quoted
    _, port = v4
    client = ControlClient(f"http://127.0.0.1:{port}", "t")
    answer = await asyncio.to_thread(client.call, "GET", f"/v1/tasks/{segment(value)}")
    assert answer["path"] == f"/v1/tasks/{value}"  # the server decodes it back, whole
