"""Issue 10 item 12: the control plane has a budget of its own.

Connections to the control plane are capped (``control.max_connections``), a request
head must arrive within ``control.header_timeout_seconds`` and an idle keep-alive
connection closes after ``control.idle_timeout_seconds``; none of it touches what agents
get through the proxy. The gateway runs with few open files, as a small container does.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.conftest import base_config
from tests.support import Gateway, Keys, Upstream

CAP = 40
HEAD_TIMEOUT = 2
IDLE_TIMEOUT = 3
NOFILE = 256  # the gateway's open-file limit in these tests


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
       upstream: Upstream) -> Iterator[Gateway]:
    cfg = base_config(shared_files, upstream)
    cfg["proxy"].update(max_connections=60, max_connections_per_client=60)
    cfg["control"] = {"max_connections": CAP, "header_timeout_seconds": HEAD_TIMEOUT,
                      "idle_timeout_seconds": IDLE_TIMEOUT}
    g = Gateway(tmp_path_factory.mktemp("ctl"), cfg).start()
    assert g.proc is not None
    resource.prlimit(g.proc.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    yield g
    g.stop()


def trickler(gw: Gateway, data: bytes) -> socket.socket | None:
    try:
        s = socket.create_connection(("127.0.0.1", gw.control_port), timeout=5)
        s.sendall(data)
        return s
    except OSError:
        return None


def agent_call(gw: Gateway, keys: Keys, upstream: Upstream) -> int:
    with gw.client(keys.token()) as c:
        return c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x").status_code


def healthz(gw: Gateway) -> int:
    return httpx.get(f"{gw.control_url}/healthz", timeout=5).status_code


def eventually_healthy(gw: Gateway, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if healthz(gw) == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("data", [
    b"",  # connects and says nothing
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # a head that never ends
    b"GET /v1/tasks HTTP/1.1\r\nAuthorization: Bearer ",  # half a header line
    b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{",  # a body
])
def test_many_trickling_control_connections_leave_agents_alone(
        gw: Gateway, keys: Keys, upstream: Upstream, data: bytes) -> None:
    with ExitStack() as stack:
        opened = 0
        for _ in range(4 * NOFILE):  # far more than the gateway's open files
            s = trickler(gw, data)
            if s is not None:
                stack.enter_context(s)
                opened += 1
        assert opened >= NOFILE
        time.sleep(0.5)
        for _ in range(3):
            assert agent_call(gw, keys, upstream) == 200  # the proxy's budget is its own
        assert eventually_healthy(gw, HEAD_TIMEOUT + IDLE_TIMEOUT + 5)


def test_connections_past_the_cap_get_a_json_503(gw: Gateway) -> None:
    with ExitStack() as stack:
        held = [stack.enter_context(s) for _ in range(CAP)
                if (s := trickler(gw, b"GET /healthz HTTP/1.1\r\n")) is not None]
        assert len(held) == CAP
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", gw.control_port), timeout=5) as s:
            # Answered as it opens, before it sends (nothing is read from it).
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 503 ")
        body = data.split(b"\r\n\r\n", 1)[1]
        assert b'"error": "unavailable"' in body and b"control.max_connections" in body
        assert b"request_id" in body
    assert eventually_healthy(gw, 5)


@pytest.mark.parametrize("data", [b"", b"GET /healthz HTTP/1.1\r\n", b"GET /hea"])
def test_slow_head_is_closed_with_408(gw: Gateway, data: bytes) -> None:
    start = time.monotonic()
    s = trickler(gw, data)
    assert s is not None
    with s:
        s.settimeout(HEAD_TIMEOUT + 5)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    elapsed = time.monotonic() - start
    assert HEAD_TIMEOUT - 0.5 <= elapsed < HEAD_TIMEOUT + 3
    assert got.startswith(b"HTTP/1.1 408 ") and b"control.header_timeout_seconds" in got


def test_trickled_head_is_closed(gw: Gateway) -> None:
    """A byte at a time keeps a connection busy, not alive: the head clock is not reset."""
    s = trickler(gw, b"G")
    assert s is not None
    closed = False
    with s:
        for b in b"ET /healthz HTTP/1.1\r\nX-Slow: " + b"s" * 100:
            time.sleep(0.2)
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed = True
                break
    assert closed


def test_idle_keep_alive_connection_is_closed(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.control_port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 ")
        start = time.monotonic()
        s.settimeout(IDLE_TIMEOUT + 5)
        assert s.recv(4096) == b""
        assert time.monotonic() - start < IDLE_TIMEOUT + 3


def test_a_busy_keep_alive_connection_is_served(gw: Gateway) -> None:
    """Requests that keep coming, each in time, are all answered."""
    with httpx.Client(timeout=5) as c:
        for _ in range(5):
            assert c.get(f"{gw.control_url}/healthz").status_code == 200
            time.sleep(HEAD_TIMEOUT / 2)


def test_a_refused_request_with_a_body_left_unsent_is_closed_within_the_head_timeout(
        gw: Gateway) -> None:
    """aiohttp drains the unread rest of a refused body before it closes (10 s by default):
    the gateway bounds that by the head timeout, so a client that sends a head, lets
    the 401 come back and trickles nothing more holds its slot no longer than that."""
    s = trickler(gw, b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
    assert s is not None
    with s:
        s.settimeout(HEAD_TIMEOUT + 5)
        start, data = time.monotonic(), b""
        while chunk := s.recv(4096):
            data += chunk
        elapsed = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 401 ")
    assert elapsed < HEAD_TIMEOUT + 1.5, elapsed
