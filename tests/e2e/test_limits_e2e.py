"""What unauthenticated clients can make the real gateway spend: connections and 407 lines."""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from proxy.gateway._limits import AUTH_FAILURES_LOGGED
from tests.conftest import base_config
from tests.support import Gateway, Keys, Upstream
from tests.wire import Reply, read_reply, request_bytes


def idle(gw: Gateway, source: str) -> socket.socket:
    """A connection from ``source`` that sends half a request head and waits."""
    s = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=5,
                                 source_address=(source, 0))
    s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nX-a: ")
    return s


def held(gw: Gateway, source: str, token: str, upstream: Upstream) -> socket.socket:
    """Like :func:`idle`, over a connection the gateway has admitted: it answers a call
    first, and it runs its ``client_connected`` (where a slot is taken) before it reads a
    byte. Then nothing still on its way can change what the gateway counts."""
    target = f"127.0.0.1:{upstream.http_port}"
    s = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=5,
                                 source_address=(source, 0))
    s.sendall(request_bytes("GET", f"http://{target}/allowed/x", target, token))
    assert read_reply(s).status == 200
    s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nX-a: ")
    return s


def closed_by_gateway(s: socket.socket) -> bool:
    """True when the gateway hung up without a byte; False when it keeps waiting."""
    s.settimeout(1.5)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def call_from(gw: Gateway, source: str, token: str | None, upstream: Upstream) -> Reply:
    """One plain proxied call over a connection from ``source``."""
    target = f"127.0.0.1:{upstream.http_port}"
    with socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10,
                                  source_address=(source, 0)) as s:
        s.sendall(request_bytes("GET", f"http://{target}/allowed/x", target, token))
        return read_reply(s)


def eventually_ok(gw: Gateway, source: str, token: str, upstream: Upstream) -> bool:
    """A call from ``source`` succeeds once the gateway has seen the freed connections
    close (bounded: a loaded machine may take a moment to notice)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            if call_from(gw, source, token, upstream).status == 200:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def test_connections_are_capped_per_client_and_in_all(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream, keys: Keys) -> None:
    cfg = base_config(shared_files, upstream)
    cfg["proxy"].update(max_connections=5, max_connections_per_client=3)
    gw = Gateway(tmp_path, cfg).start()
    token = keys.token()
    try:
        with ExitStack() as stack:
            # Each held connection is counted before the next opens, and none closes
            # meanwhile: a call over a connection of its own would give its slot back
            # only after the client has seen it close, maybe after the next one opened.
            mine = [stack.enter_context(held(gw, "127.0.0.1", token, upstream))
                    for _ in range(3)]
            extra = stack.enter_context(idle(gw, "127.0.0.1"))
            assert closed_by_gateway(extra)  # a fourth from one address: closed at once
            assert not closed_by_gateway(mine[0])  # the first three stay
            others = [stack.enter_context(held(gw, "127.0.0.2", token, upstream))
                      for _ in range(2)]  # others get in (each answers a call)
            third = stack.enter_context(idle(gw, "127.0.0.3"))
            assert closed_by_gateway(third)  # five open in all: nobody else
            assert not closed_by_gateway(others[0])
            mine[0].close()
            assert eventually_ok(gw, "127.0.0.1", token, upstream)  # a slot is free
        assert eventually_ok(gw, "127.0.0.3", token, upstream)
        assert "connections refused" in gw.output()
    finally:
        gw.stop()


def test_407_flood_is_summarized_not_written_line_by_line(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream) -> None:
    gw = Gateway(tmp_path, base_config(shared_files, upstream)).start()
    flood = AUTH_FAILURES_LOGGED + 25
    url = f"http://127.0.0.1:{upstream.http_port}/allowed/x"
    try:
        ids = []
        with gw.client(None) as c:
            for _ in range(flood):
                r = c.get(url)
                assert r.status_code == 407
                assert r.json()["error"]["code"] == "proxy_authentication_required"
                assert r.json()["request_id"] == r.headers["x-taskgate-request-id"]
                ids.append(r.headers["x-taskgate-request-id"])
        other = call_from(gw, "127.0.0.2", None, upstream)
        assert other.status == 407
        metrics = httpx.get(f"{gw.control_url}/metrics", timeout=10).text
    finally:
        assert gw.stop() == 0
    records = gw.audit()
    written = {r["request_id"] for r in records}
    assert set(ids[:AUTH_FAILURES_LOGGED]) <= written  # the first ones, one by one
    assert not set(ids[AUTH_FAILURES_LOGGED:]) & written  # the rest ...
    summaries = [r for r in records if r["request_id"] not in set(ids)
                 and r["client"] == "127.0.0.1"]
    assert len(summaries) == 1  # ... counted in one record, written at the latest on stop
    (summary,) = summaries
    # no credential shown by any of them: challenges, kept out of the denials
    assert summary["status"] == 407 and summary["decision"] == "challenge"
    assert summary["reason"].startswith("25 more calls refused for a missing or invalid proxy")
    assert other.request_id in written  # another client: its own line
    challenged = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith('taskgate_calls_total{decision="challenge"'))
    assert challenged >= flood + 1  # every refusal is still counted
    assert 'taskgate_calls_total{decision="deny"' not in metrics
    from proxy.audit import verify

    assert verify(str(gw.audit_path)).ok
