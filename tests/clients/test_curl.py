"""curl through the gateway, set up from the environment (lower-case ``https_proxy``
and ``http_proxy``: curl ignores upper-case ``HTTP_PROXY``), as ``curl -v`` users see
it: the request id on ``200 Connection established`` is in the audit log."""

from __future__ import annotations

import re
import subprocess
import time

from tests.clients.conftest import EVENTS, GAP, REFUSED_REASON, World, incremental


def curl(world: World, *args: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          text=True, env=env or world.env(), timeout=30)


def ids_shown(stderr: str) -> list[str]:
    """The request ids ``curl -v`` printed, in order (the CONNECT's first)."""
    return re.findall(r"^< x-taskgate-request-id: (\w+)", stderr, re.I | re.M)


def test_curl_v_shows_the_connect_id_and_the_log_has_it(world: World) -> None:
    out = curl(world, "-v", f"{world.origin}/allowed/curl")
    assert out.returncode == 0 and '"path": "/allowed/curl"' in out.stdout, out.stderr
    connect_id, call_id = ids_shown(out.stderr)
    assert "200 Connection established" in out.stderr
    rec = world.record(call_id)
    assert rec["connect_id"] == connect_id and rec["decision"] == "allow"
    assert [r["request_id"] for r in world.gw.audit() if r["connect_id"] == connect_id] == [
        call_id]


def test_a_tunnel_whose_tls_the_agent_refused_is_recorded_under_its_connect_id(
        world: World) -> None:
    """curl without taskgate's CA: no call is made, so the CONNECT's id (what curl -v
    shows) gets a record that says the agent does not trust the gateway."""
    env = world.env(CURL_CA_BUNDLE=str(world.upstream_ca))  # the upstream's CA, not ours
    out = curl(world, "-v", f"{world.origin}/allowed/untrusted", env=env)
    assert out.returncode != 0 and "200 Connection established" in out.stderr
    (connect_id,) = ids_shown(out.stderr)
    rec = world.record(connect_id)
    assert (rec["decision"], rec["method"], rec["host"]) == ("error", "CONNECT", "localhost")
    assert "does it trust taskgate's CA" in rec["reason"], rec


def test_curl_plain_http_uses_lower_case_http_proxy(world: World) -> None:
    """Only ``http_proxy`` set: curl still goes through the gateway (the record)."""
    env = {k: v for k, v in world.env().items() if k != "HTTP_PROXY"}
    out = curl(world, "-i", f"http://127.0.0.1:{world.upstream.http_port}/allowed/p", env=env)
    (rid,) = re.findall(r"^x-taskgate-request-id: (\w+)", out.stdout, re.I | re.M)
    rec = world.record(rid)
    assert (rec["decision"], rec["rule"], rec["connect_id"]) == ("allow", "plain", None)


def test_curl_streams_events_as_they_come(world: World) -> None:
    proc = subprocess.Popen(["curl", "-sSN", f"{world.origin}/sse?n={EVENTS}&gap={GAP}"],
                            stdout=subprocess.PIPE, env=world.env(), text=True)
    assert proc.stdout is not None
    stamps = [time.monotonic() for line in proc.stdout if line.startswith("data:")]
    proc.wait(10)
    assert len(stamps) == EVENTS and incremental(stamps), stamps


def test_curl_refusal_shows_the_reason(world: World) -> None:
    out = curl(world, f"{world.origin}/elsewhere")
    assert REFUSED_REASON in out.stdout and "request id" in out.stdout, out.stdout
