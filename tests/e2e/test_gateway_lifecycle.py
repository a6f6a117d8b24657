"""The gateway as a process: streaming, expiry inside a tunnel, SIGTERM, start-up.

Most tests here need a gateway of their own (a different config, or one they
stop); the shared module gateway serves the streaming tests.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from aiohttp import web

from tests.conftest import base_config
from tests.e2e import CLEAN_ENV, assert_refusal, curl
from tests.support import PYTHON, Gateway, Keys, Upstream, python_env
from tests.wire import Tunnel, request_bytes, send


# -- streaming ------------------------------------------------------------------
def _sse_url(upstream: Upstream, scheme: str, n: int, gap: float) -> str:
    if scheme == "https":
        return f"https://localhost:{upstream.https_port}/sse?n={n}&gap={gap}"
    return f"http://127.0.0.1:{upstream.http_port}/sse?n={n}&gap={gap}"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_sse_arrives_incrementally(gateway: Gateway, upstream: Upstream, token: str,
                                   scheme: str) -> None:
    n, gap = 5, 0.3
    arrivals: list[float] = []
    body = b""
    with gateway.client(token) as c:
        start = time.monotonic()
        with c.stream("GET", _sse_url(upstream, scheme, n, gap)) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            rid = r.headers["x-taskgate-request-id"]
            for chunk in r.iter_raw():
                body += chunk
                arrivals.extend(time.monotonic() - start
                                for _ in range(chunk.count(b"\n\n")))
        end = time.monotonic() - start
    assert len(arrivals) == n, body
    # The upstream takes (n-1)*gap to finish; the first event must not wait for that.
    assert end >= (n - 1) * gap
    assert arrivals[0] < (n - 1) * gap / 2, arrivals
    assert arrivals[-1] - arrivals[0] > (n - 1) * gap / 2, arrivals
    # The record is written once the stream ends, with what was streamed.
    deadline = time.monotonic() + 5
    while not gateway.records_for(rid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (rec,) = gateway.records_for(rid)
    assert rec["status"] == 200 and rec["decision"] == "allow"
    assert rec["bytes_out"] == len(body)
    assert rec["duration_ms"] >= (n - 1) * gap * 1000


def test_sse_arrives_incrementally_curl(gateway: Gateway, upstream: Upstream,
                                        token: str) -> None:
    n, gap = 4, 0.4
    cmd = ["curl", "-sS", "-N", "--max-time", "10", "-x", gateway.proxy_url,
           "--proxy-user", f"agent:{token}", "--cacert", str(gateway.ca),
           _sse_url(upstream, "https", n, gap)]
    start = time.monotonic()
    arrivals = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, env=CLEAN_ENV) as p:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic() - start)
    assert p.returncode == 0 and len(arrivals) == n
    assert arrivals[0] < (n - 1) * gap / 2, arrivals
    assert arrivals[-1] - arrivals[0] > (n - 1) * gap / 2, arrivals


# -- expiry inside a tunnel ---------------------------------------------------------
@pytest.fixture(scope="module")
def strict_gateway(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
                   upstream: Upstream) -> Any:
    """No leeway: a token stops working the second it expires."""
    cfg = base_config(shared_files, upstream)
    cfg["identity"]["leeway_seconds"] = 0
    gw = Gateway(tmp_path_factory.mktemp("gw-strict"), cfg).start()
    yield gw
    gw.stop()


def test_expired_token_refused_inside_open_tunnel(strict_gateway: Gateway, upstream: Upstream,
                                                  keys: Keys) -> None:
    token = keys.token(ttl=2)
    expires = int(time.time() + 2)
    host = f"localhost:{upstream.https_port}"
    with Tunnel(strict_gateway.proxy_port, host, token) as t:
        assert t.connect.status == 200
        t.start_tls(strict_gateway.ca, "localhost")
        first = t.request(request_bytes("GET", "/allowed/x", host, None))
        assert first.status == 200, first.body
        time.sleep(max(0.0, expires - time.time()) + 0.3)
        late = t.request(request_bytes("GET", "/allowed/x", host, None))
    data = assert_refusal(late.status, late.headers, late.body, 407, "token has expired")
    (rec,) = strict_gateway.records_for(data["request_id"])
    assert rec["status"] == 407 and rec["host"] == "localhost"
    # a new tunnel or a plain call with the same token: refused as well
    with Tunnel(strict_gateway.proxy_port, host, token) as t:
        assert_refusal(t.connect.status, t.connect.headers, t.connect.body, 407, "expired")
    authority = f"127.0.0.1:{upstream.http_port}"
    plain = send(strict_gateway.proxy_port, request_bytes(
        "GET", f"http://{authority}/allowed/x", authority, token))
    assert_refusal(plain.status, plain.headers, plain.body, 407, "expired")


# -- SIGTERM -------------------------------------------------------------------------
def test_sigterm_lets_calls_in_flight_finish(tmp_path: Path, shared_files: dict[str, Path],
                                             upstream: Upstream, token: str) -> None:
    gw = Gateway(tmp_path, base_config(shared_files, upstream)).start()
    results: dict[str, Any] = {}

    def call(name: str, url: str) -> None:
        try:
            with gw.client(token) as c:
                r = c.get(url)
                results[name] = (r.status_code, r.headers["x-taskgate-request-id"], r.json())
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            results[name] = e

    seen_before = sum(1 for s in upstream.seen if s["path"].startswith("/slow"))
    threads = [threading.Thread(target=call, args=(name, url)) for name, url in (
        ("http", f"http://127.0.0.1:{upstream.http_port}/slow?s=1.5"),
        ("https", f"https://localhost:{upstream.https_port}/slow?s=1.5"))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while (sum(1 for s in upstream.seen if s["path"].startswith("/slow")) - seen_before < 2
               and time.monotonic() < deadline):
            time.sleep(0.02)  # both calls are at the upstream now
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=1).close()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{gw.control_url}/healthz", timeout=1)
        for t in threads:
            t.join(15)
        assert gw.proc.wait(15) == 0
    finally:
        gw.stop()
    assert results["http"][0] == 200 and results["https"][0] == 200, results
    for name in ("http", "https"):
        (rec,) = gw.records_for(results[name][1])
        assert rec["status"] == 200 and rec["decision"] == "allow"
    assert gw.audit_path.read_bytes().endswith(b"\n")
    assert "shutting down" in gw.output()


# -- start-up ------------------------------------------------------------------------
def _run(args: list[str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = python_env()
    env.pop("TASKGATE_ADMIN_TOKEN", None)
    return subprocess.run([*PYTHON, "-m", "proxy", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("which", ["proxy", "control"])
def test_failed_bind_exits_nonzero(tmp_path: Path, which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = 0  # the listener that binds: anywhere
        listen = ({"proxy": f"127.0.0.1:{port}", "control": f"127.0.0.1:{other}"}
                  if which == "proxy" else
                  {"proxy": f"127.0.0.1:{other}", "control": f"127.0.0.1:{port}"})
        (tmp_path / "taskgate.yaml").write_text(
            f"listen: {{proxy: '{listen['proxy']}', control: '{listen['control']}'}}\n")
        r = _run(["run", "-c", "taskgate.yaml"], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    what = "the proxy could not listen on" if which == "proxy" else \
        "control plane cannot listen on"
    assert f"{what} 127.0.0.1:{port}" in out, out
    assert "running" not in r.stdout
    assert "Traceback" not in out


def _ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def test_embedded_defaults_deny_everything(tmp_path: Path, upstream: Upstream,
                                           keys: Keys) -> None:
    """`taskgate run` with no config, in an empty folder: the fixed default ports."""
    if not _ports_free(8080, 8081):
        pytest.skip("127.0.0.1:8080/8081 are in use on this machine")
    env = python_env(PYTHONUNBUFFERED="1")
    env.pop("TASKGATE_ADMIN_TOKEN", None)
    log = tmp_path / "out.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*PYTHON, "-m", "proxy", "run"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get("http://127.0.0.1:8081/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        home = tmp_path / ".taskgate"
        assert f"admin token:   {home / 'admin-token'}" in text, text
        assert f"CA cert:       {home / 'ca' / 'mitmproxy-ca-cert.pem'}" in text
        assert "config:        <embedded defaults>" in text
        assert (home / "admin-token").stat().st_mode & 0o777 == 0o600
        assert (home / "ca" / "mitmproxy-ca.pem").stat().st_mode & 0o777 == 0o600
        # deny everything: no issuer is trusted, no workload has a rule
        authority = f"127.0.0.1:{upstream.http_port}"
        before = len(upstream.seen)
        for token in (None, keys.token()):
            reply = send(8080, request_bytes("GET", f"http://{authority}/allowed/x",
                                             authority, token))
            assert_refusal(reply.status, reply.headers, reply.body, 407)
            with Tunnel(8080, f"localhost:{upstream.https_port}", token) as t:
                assert t.connect.status == 407
        assert len(upstream.seen) == before
        assert httpx.get("http://127.0.0.1:8081/v1/anything", timeout=2).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_taskgate_ca(tmp_path: Path) -> None:
    (tmp_path / "taskgate.yaml").write_text("home: state\n")
    r = _run(["ca"], tmp_path)
    assert r.returncode == 0, r.stderr
    cert = tmp_path / "state" / "ca" / "mitmproxy-ca-cert.pem"
    assert r.stdout.startswith(f"CA certificate:  {cert}\n")
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert f"export {var}={cert}  # " in r.stdout
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" not in cert.read_bytes()
    for key in ("mitmproxy-ca.pem", "mitmproxy-ca.p12"):
        assert stat.S_IMODE((cert.parent / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
    first = cert.read_bytes()
    again = _run(["ca", "-c", "taskgate.yaml"], tmp_path)
    assert again.returncode == 0 and cert.read_bytes() == first  # made once, then kept


def test_ca_key_mode_of_a_running_gateway(gateway: Gateway) -> None:
    ca_dir = gateway.home / "ca"
    assert b"PRIVATE KEY" in (ca_dir / "mitmproxy-ca.pem").read_bytes()
    for key in ("mitmproxy-ca.pem", "mitmproxy-ca.p12"):
        assert stat.S_IMODE((ca_dir / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700


def test_ca_key_mode_repaired_on_start(tmp_path: Path, shared_files: dict[str, Path],
                                       upstream: Upstream) -> None:
    """A key made readable by mistake is locked down again when the gateway starts."""
    assert _run(["ca"], tmp_path).returncode == 0
    key = tmp_path / ".taskgate" / "ca" / "mitmproxy-ca.pem"
    os.chmod(key, 0o644)
    gw = Gateway(tmp_path, base_config(shared_files, upstream)).start()
    try:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    finally:
        gw.stop()


def test_curl_through_a_fresh_gateway(gateway: Gateway, upstream: Upstream,
                                      token: str) -> None:
    """The CA a fresh gateway made is all curl needs for HTTPS through it."""
    r = curl(gateway, f"https://localhost:{upstream.https_port}/allowed/x", token)
    assert r.status == 200, r.stderr


def test_failed_audit_write_fails_the_call_closed(tmp_path: Path, shared_files: dict[str, Path],
                                                  upstream: Upstream, token: str) -> None:
    """The log lives on a full disk: no call completes unrecorded, and /readyz says so.
    Once a write failed, no call leaves for the upstream, whatever its shape."""
    cfg = base_config(shared_files, upstream)
    cfg["audit"] = {"path": "/dev/full"}  # every write fails with ENOSPC
    gw = Gateway(tmp_path, cfg).start()
    tls = f"https://localhost:{upstream.https_port}"
    try:
        with gw.client(token) as c:
            first = c.get(f"{tls}/secret")  # refused; its record is the first write
            before = len(upstream.seen)
            calls = [
                c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x"),
                c.get(f"{tls}/allowed/x"),
                c.get(f"{tls}/sse?n=3&gap=0.1"),
                c.post(f"{tls}/allowed/upload", content=b"x" * 2_000_000),  # streamed
                c.post(f"{tls}/allowed/upload", content=iter([b"y" * 1000] * 3)),  # chunked
            ]
        assert len(upstream.seen) == before, upstream.seen[before:]
        for r in (first, *calls):
            assert_refusal(r.status_code, r.headers, r.content, 503, "the audit log c")
        for r in calls:
            assert "refused before it was sent" in r.json()["reason"]
        ready = httpx.get(f"{gw.control_url}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["checks"]["audit"] is False
        assert gw.proc is not None and gw.proc.poll() is None  # still serving
    finally:
        gw.stop()


class GatedUpstream(Upstream):
    """``/allowed/gated`` answers with an event stream only once ``gate`` is set."""

    def __init__(self, tls_ctx: Any) -> None:
        super().__init__(tls_ctx)
        self.gate = threading.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/allowed/gated", self.gated)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def gated(self, request: web.Request) -> web.StreamResponse:
        self.seen.append({"method": request.method, "path": request.raw_path,
                          "headers": dict(request.headers)})
        for _ in range(500):
            if self.gate.is_set():
                break
            await asyncio.sleep(0.02)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: event {i}\n\n".encode())
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp


def _audit_write_errors(gw: Gateway) -> float:
    metrics = httpx.get(f"{gw.control_url}/metrics", timeout=5).text
    (line,) = [x for x in metrics.splitlines()
               if x.startswith("taskgate_audit_write_errors_total ")]
    return float(line.split()[1])


def test_audit_failing_mid_call_withholds_the_stream(tmp_path: Path, test_ca: trustme.CA,
                                                     shared_files: dict[str, Path],
                                                     token: str) -> None:
    """The log fails while a call is at the upstream: the answer, which would stream to
    the agent before its record is written, is withheld (503). When the disk takes
    writes again, the next refusal's record makes the log healthy and calls go through."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("localhost").configure_cert(ctx)
    up = GatedUpstream(ctx).start()
    gw = Gateway(tmp_path, base_config(shared_files, up)).start()
    url = f"https://localhost:{up.https_port}/allowed/gated"
    result: dict[str, Any] = {}

    def agent() -> None:
        with gw.client(token) as c:
            r = c.get(url)
            result.update(status=r.status_code, headers=r.headers, body=r.content)

    thread = threading.Thread(target=agent)
    assert gw.proc is not None
    try:
        thread.start()
        deadline = time.monotonic() + 10
        while not up.seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert up.seen, "the call never reached the upstream"
        # The gateway may write no byte more to its files: the audit log fails (EFBIG).
        _, hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE,
                         (gw.audit_path.stat().st_size, hard))
        probe = send(gw.proxy_port, request_bytes(  # no token: refused, record fails
            "GET", f"https://localhost:{up.https_port}/allowed/x", "localhost", None))
        assert probe.status == 503
        assert httpx.get(f"{gw.control_url}/readyz", timeout=5).json()["checks"]["audit"] \
            is False
        up.gate.set()
        thread.join(15)
        assert_refusal(result["status"], result["headers"], result["body"], 503,
                       "the audit log cannot be written")
        assert b"event" not in result["body"]
        # Its record is tried when the upstream's stream ends: the second failed write.
        while _audit_write_errors(gw) < 2 and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        assert _audit_write_errors(gw) == 2
        # The disk takes writes again: one refusal (whose record is the probe), then calls.
        resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
        with gw.client(token) as c:
            again = c.get(f"https://localhost:{up.https_port}/allowed/x")
            assert_refusal(again.status_code, again.headers, again.content, 503,
                           "refused before it was sent")
            assert c.get(f"https://localhost:{up.https_port}/allowed/x").status_code == 200
        assert len(up.seen) == 2
    finally:
        up.gate.set()
        thread.join(15)
        gw.stop()
        up.stop()
