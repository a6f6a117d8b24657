"""The addons on their own, under plain ``mitmdump -s``: they load and they enforce."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import base_config
from tests.e2e import assert_refusal
from tests.support import REPO, Upstream, python_env
from tests.wire import request_bytes, send

# Beside this Python first (the venv's own mitmdump, which README's test command never
# puts on PATH), then PATH: as bench/run.py finds it.
MITMDUMP = (shutil.which("mitmdump", path=str(Path(sys.executable).parent))
            or shutil.which("mitmdump"))
LISTENING = re.compile(r"proxy listening at 127\.0\.0\.1:(\d+)")


@dataclass
class Mitmdump:
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    audit_path: Path
    probes: list[int]

    @property
    def ca(self) -> Path:
        return self.dir / "confdir" / "mitmproxy-ca-cert.pem"

    def client(self, token: str | None) -> httpx.Client:
        auth = f"agent:{token}@" if token else ""
        return httpx.Client(proxy=f"http://{auth}127.0.0.1:{self.port}",
                            verify=ssl.create_default_context(cafile=str(self.ca)),
                            trust_env=False, timeout=10)

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def output(self) -> str:
        return (self.dir / "out.txt").read_text(errors="replace")


@pytest.fixture(scope="module")
def mitmdump(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
             upstream: Upstream) -> Iterator[Mitmdump]:
    if MITMDUMP is None:
        pytest.skip("mitmdump is not installed")
    d = tmp_path_factory.mktemp("mitmdump")
    cfg = base_config(shared_files, upstream)
    cfg["audit"] = {"path": str(d / "audit.jsonl")}
    (d / "taskgate.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", "0",
           "--set", f"confdir={d / 'confdir'}",
           "--set", f"ssl_verify_upstream_trusted_ca={shared_files['upstream_ca']}"]
    for name in ("identify", "authorize", "audit"):
        cmd += ["-s", str(REPO / "addons" / f"{name}.py")]
    cmd += ["--set", f"taskgate_config={d / 'taskgate.yaml'}"]
    with open(d / "out.txt", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=d, env=python_env(PYTHONUNBUFFERED="1"),
                                stdout=out, stderr=subprocess.STDOUT)
    md = Mitmdump(proc, 0, d, d / "audit.jsonl", [])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # it binds port 0 and says which port it got
        assert proc.poll() is None, md.output()
        if bound := LISTENING.search(md.output()):
            md.port = port = int(bound[1])
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"mitmdump never listened:\n{md.output()}")
    # The proxy listens before the addons' `running` builds the gateway: calls in
    # that window must be refused cleanly. Ask until the gateway itself answers.
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reply = send(port, request_bytes("GET", "http://127.0.0.1:1/", "127.0.0.1:1", None))
            md.probes.append(reply.status)
            if reply.status == 407:
                break
        time.sleep(0.02)
    yield md
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_addons_load_without_errors(mitmdump: Mitmdump) -> None:
    out = mitmdump.output()
    assert "Addon error" not in out and "Traceback" not in out, out
    assert mitmdump.proc.poll() is None


def test_calls_during_start_up_refused(mitmdump: Mitmdump) -> None:
    """Before the gateway exists: 503 (fail closed), and mitmdump does not exit over it."""
    assert mitmdump.probes[-1] == 407
    assert set(mitmdump.probes) <= {503, 407}, mitmdump.probes
    assert mitmdump.proc.poll() is None


def test_allowed_http(mitmdump: Mitmdump, upstream: Upstream, token: str) -> None:
    with mitmdump.client(token) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
    assert r.status_code == 200, r.text
    assert "proxy-authorization" not in {k.lower() for k in r.json()["headers"]}
    recs = [x for x in mitmdump.audit() if x["request_id"] == r.headers["x-taskgate-request-id"]]
    assert len(recs) == 1 and recs[0]["decision"] == "allow"


def test_allowed_https(mitmdump: Mitmdump, upstream: Upstream, token: str) -> None:
    with mitmdump.client(token) as c:
        r = c.get(f"https://localhost:{upstream.https_port}/allowed/x")
    assert r.status_code == 200, r.text


def test_refused(mitmdump: Mitmdump, upstream: Upstream, token: str) -> None:
    before = len(upstream.seen)
    with mitmdump.client(token) as c:
        r = c.get(f"https://localhost:{upstream.https_port}/secret")
        m = c.delete(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
    assert_refusal(r.status_code, r.headers, r.content, 403, "allows this path")
    assert_refusal(m.status_code, m.headers, m.content, 403, "allows this method")
    assert len(upstream.seen) == before


def test_no_token(mitmdump: Mitmdump, upstream: Upstream) -> None:
    with mitmdump.client(None) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
    assert_refusal(r.status_code, r.headers, r.content, 407, "no proxy credential")


def test_connect_to_unnamed_host(mitmdump: Mitmdump, token: str) -> None:
    with mitmdump.client(token) as c, pytest.raises(httpx.ProxyError, match="403"):
        c.get("https://nowhere.example/")


def test_ambiguous_path(mitmdump: Mitmdump, upstream: Upstream, token: str) -> None:
    authority = f"127.0.0.1:{upstream.http_port}"
    reply = send(mitmdump.port, request_bytes(
        "GET", f"http://{authority}/allowed/%2e%2e/secret", authority, token))
    assert_refusal(reply.status, reply.headers, reply.body, 403, "ambiguous path")


def test_one_record_per_call_one_chain(mitmdump: Mitmdump, upstream: Upstream,
                                       token: str) -> None:
    """Three scripts, one gateway: one audit log with one chain."""
    before = len(mitmdump.audit())
    with mitmdump.client(token) as c:
        for _ in range(3):
            c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
    recs = mitmdump.audit()
    assert len(recs) == before + 3
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert all(b["prev"] == a["hash"] for a, b in zip(recs, recs[1:], strict=False))
    assert token not in mitmdump.audit_path.read_text() + mitmdump.output()
