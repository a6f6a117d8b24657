"""Issue 17.1 against the real gateway: odd values never stop the audit log, and a log
that cannot be written refuses calls at once, then recovers.

Agents send strings that are not valid Unicode (JSON ``\\ud800`` escapes in
JSON-RPC bodies, bytes that are not UTF-8 in paths, hosts and headers); an
approver answers with them. Every call is answered promptly, has its record,
the gateway keeps serving everyone, and ``taskgate audit verify`` passes. Then
the disk refuses writes (RLIMIT_FSIZE on the process; an ENOSPC tmpfs in a
mount namespace): calls get a 503 at once, ``/readyz`` says not ready, and
both recover when the disk takes writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import base_config
from tests.e2e import assert_refusal
from tests.support import PYTHON, Gateway, Keys, Upstream, python_env
from tests.wire import Reply, request_bytes, send

BAD_BODIES = {  # JSON-RPC bodies whose strings hold lone surrogates (as JSON escapes)
    "method": b'{"jsonrpc":"2.0","id":1,"method":"x\\ud800"}',
    "tool-name": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\\udc80"}}',
    "argument": b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
                b'"params":{"name":"add","arguments":{"a":"\\ud800"}}}',
    "argument-key": b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
                    b'"params":{"name":"add","arguments":{"\\udfff":1}}}',
    "id": b'{"jsonrpc":"2.0","id":"\\ud800","method":"tools/call","params":{"name":"nope"}}',
    "batch": b'[{"jsonrpc":"2.0","id":1,"method":"\\udfff"},'
             b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add"}}]',
    "params-key": b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
                  b'"params":{"name":"add","\\ud800":1}}',
    "notification": b'{"jsonrpc":"2.0","method":"notifications/\\ud83d"}',
    "pair-halves-apart": b'{"jsonrpc":"2.0","id":1,"method":"\\udc00\\ud800"}',
}


def config(shared_files: dict[str, Path], upstream: Upstream, **extra: Any) -> dict[str, Any]:
    cfg = base_config(shared_files, upstream, **extra)
    wl = next(iter(cfg["workloads"].values()))
    wl["standing"] = [*wl["standing"],
        {"id": "echo-mcp", "host": "127.0.0.1", "port": upstream.http_port, "scheme": "http",
         "paths": ["/mcp"], "mcp": {"tools": ["add"]}},
        {"id": "held", "host": "127.0.0.1", "port": upstream.http_port, "scheme": "http",
         "methods": ["POST"], "paths": ["/approve/**"], "approval": "required"}]
    return cfg


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
       upstream: Upstream) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("failsafe"), config(shared_files, upstream)).start()
    yield g
    g.stop()


def timed_send(gw: Gateway, data: bytes) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = send(gw.proxy_port, data, timeout=10)
    return reply, time.monotonic() - started


def still_serving(gw: Gateway, upstream: Upstream, keys: Keys) -> None:
    """Another agent's ordinary call goes through, promptly."""
    with gw.client(keys.token()) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/still", timeout=5)
    assert r.status_code == 200, r.text


def log_is_whole(gw: Gateway) -> list[dict[str, Any]]:
    """Every line valid UTF-8 JSON, and `taskgate audit verify -c` passes."""
    raw = gw.audit_path.read_bytes()
    raw.decode("utf-8")  # strict
    recs = [json.loads(x) for x in raw.splitlines() if x.strip()]
    run = subprocess.run([*PYTHON, "-m", "proxy", "audit", "verify", "-c", str(gw.config_path)],
                         cwd=gw.dir, env=python_env(), capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return recs


# -- odd values reach the record ---------------------------------------------------
@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_lone_surrogates_in_a_json_rpc_body(gw: Gateway, upstream: Upstream, keys: Keys,
                                            body: bytes) -> None:
    host = f"127.0.0.1:{upstream.http_port}"
    reply, took = timed_send(gw, request_bytes(
        "POST", f"http://{host}/mcp", host, keys.token(),
        extra=b"Content-Type: application/json\r\n", body=body))
    assert took < 5, took
    rid = reply.request_id
    assert rid is not None and reply.status in (200, 400, 403, 500), reply
    reply.body.decode("utf-8")  # whatever the answer, it is valid UTF-8
    still_serving(gw, upstream, keys)
    recs = [r for r in log_is_whole(gw) if r["request_id"] == rid]
    assert len(recs) == 1, recs
    # Refused as malformed before any value was kept, or kept as escaped text: either
    # way nothing in the record is a lone surrogate (this would raise).
    json.dumps(recs[0], ensure_ascii=False).encode("utf-8")
    if body is BAD_BODIES["method"] and recs[0]["tool"] is not None:
        assert recs[0]["tool"]["method"] == "x\\ud800"


RAW = {  # agent-controlled request lines and headers with bytes that are not UTF-8
    "path": lambda h: (b"GET http://" + h + b"/allowed/\xed\xa0\x80 HTTP/1.1\r\nHost: " + h),
    "path-latin1": lambda h: (b"GET http://" + h + b"/allowed/\xff\xfe HTTP/1.1\r\nHost: " + h),
    "host": lambda h: b"GET http://\xed\xa0\x80.example/allowed HTTP/1.1\r\nHost: " + h,
    "host-header": lambda h: (b"GET http://" + h + b"/allowed/x HTTP/1.1\r\nHost: \xed\xa0\x80"),
    "other-header": lambda h: (b"GET http://" + h + b"/allowed/x HTTP/1.1\r\nHost: " + h
                               + b"\r\nX-Note: \xed\xa0\x80\xff"),
    "connect": lambda h: b"CONNECT \xed\xa0\x80:443 HTTP/1.1\r\nHost: \xed\xa0\x80:443",
    "method": lambda h: b"G\xffT http://" + h + b"/allowed/x HTTP/1.1\r\nHost: " + h,
}


@pytest.mark.parametrize("make", list(RAW.values()), ids=list(RAW))
def test_bytes_that_are_not_utf8_in_the_request(gw: Gateway, upstream: Upstream, keys: Keys,
                                                make: Any) -> None:
    from tests.wire import basic

    host = f"127.0.0.1:{upstream.http_port}".encode()
    data = make(host) + b"\r\nProxy-Authorization: " + basic(keys.token()).encode() + b"\r\n\r\n"
    reply, took = timed_send(gw, data)
    assert took < 5, took
    assert reply.request_id is not None
    body = reply.body.decode("utf-8")
    if reply.status >= 400:
        assert json.loads(body)["request_id"]
    still_serving(gw, upstream, keys)
    log_is_whole(gw)


def admin(gw: Gateway) -> httpx.Client:
    token = (gw.home / "admin-token").read_text().strip()
    return httpx.Client(base_url=gw.control_url, timeout=10, trust_env=False,
                        headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize(("answer", "by", "comment"), [
    ("approve", b"\\ud800alice", b"ok \\udc80"),
    ("deny", b"bob\\udfff", b"\\ud83d no"),
    ("approve", b"carol", b"\\udc00\\ud800 halves in the wrong order"),
])
def test_lone_surrogates_from_the_approver(gw: Gateway, upstream: Upstream, keys: Keys,
                                           answer: str, by: bytes, comment: bytes) -> None:
    m = uuid.uuid4().hex
    result: dict[str, Any] = {}

    async def agent() -> None:
        async with httpx.AsyncClient(proxy=gw.proxy_url_with(keys.token()), timeout=20,
                                     trust_env=False) as c:
            r = await c.post(f"http://127.0.0.1:{upstream.http_port}/approve/{m}",
                             content=b"x")
            result.update(status=r.status_code, body=r.content, headers=r.headers)

    async def scenario() -> None:
        call = asyncio.create_task(agent())
        with admin(gw) as ctl:
            async with asyncio.timeout(10):
                while True:
                    waiting = (await asyncio.to_thread(ctl.get, "/v1/approvals")).json()
                    found = [h for h in waiting["approvals"] if m in h["url"]]
                    if found:
                        break
                    await asyncio.sleep(0.05)
            url = f"/v1/approvals/{found[0]['id']}/{answer}"
            r = await asyncio.to_thread(
                ctl.post, url, content=b'{"by":"' + by + b'","comment":"' + comment + b'"}',
                headers={"Content-Type": "application/json"})
            r.content.decode("utf-8")
            if r.status_code != 200:  # refused as malformed: the call still waits, and
                assert r.status_code in (400, 422), r.text  # a proper answer releases it
                assert not call.done()
                r = await asyncio.to_thread(ctl.post, url, json={"by": "dave"})
                assert r.status_code == 200, r.text
        await asyncio.wait_for(call, 15)

    asyncio.run(scenario())
    rid = result["headers"]["x-taskgate-request-id"]
    result["body"].decode("utf-8")
    still_serving(gw, upstream, keys)
    recs = [r for r in log_is_whole(gw) if r["request_id"] == rid]
    assert [r["decision"] for r in recs][0] == "held" and len(recs) == 2, recs
    approval = recs[1]["approval"]
    assert approval["by"] == "dave" or "\\ud" in json.dumps(approval), recs[1]  # refused,
    # or kept as escaped text


def test_ready_checks_every_background_worker(gw: Gateway) -> None:
    r = httpx.get(f"{gw.control_url}/readyz", timeout=5)
    assert r.status_code == 200
    assert r.json()["checks"] == {"proxy": True, "audit": True, "store": True, "sweeper": True}
    metrics = httpx.get(f"{gw.control_url}/metrics", timeout=5).text
    for worker in ("audit", "audit-head", "store", "sweeper"):
        assert f'taskgate_background_failures_total{{worker="{worker}"}}' in metrics


# -- the log cannot be written at all ------------------------------------------------
def metric(gw: Gateway, name: str) -> float:
    text = httpx.get(f"{gw.control_url}/metrics", timeout=5).text
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def calls_fail_at_once_then_recover(gw: Gateway, upstream: Upstream, keys: Keys,
                                    fail: Any, heal: Any) -> None:
    url = f"http://127.0.0.1:{upstream.http_port}/allowed/x"
    tls = f"https://localhost:{upstream.https_port}/allowed/x"
    with gw.client(keys.token()) as c:
        assert c.get(url).status_code == 200
        fail()
        started = time.monotonic()
        first = c.get(url)  # its record is the first write that fails
        assert_refusal(first.status_code, first.headers, first.content, 503, "the audit log")
        before = len(upstream.seen)
        for _ in range(3):
            for r in (c.get(url), c.get(tls), c.post(tls, content=b"y" * 100)):
                assert_refusal(r.status_code, r.headers, r.content, 503,
                               "the audit log cannot be written")
        assert time.monotonic() - started < 5  # ten calls, none waited on the disk
        assert len(upstream.seen) == before  # none left for the upstream
        ready = httpx.get(f"{gw.control_url}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["checks"]["audit"] is False
        assert ready.json()["status"] == "not ready"
        assert metric(gw, "taskgate_audit_healthy") == 0
        assert metric(gw, "taskgate_audit_write_errors_total") >= 1
        heal()
        again = c.get(url)  # refused before it was sent; its record goes in
        assert_refusal(again.status_code, again.headers, again.content, 503,
                       "refused before it was sent")
        assert c.get(url).status_code == 200
    assert httpx.get(f"{gw.control_url}/readyz", timeout=5).status_code == 200
    assert metric(gw, "taskgate_audit_healthy") == 1


def test_file_size_limit_fails_calls_at_once_then_recovers(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream, keys: Keys) -> None:
    gw = Gateway(tmp_path, config(shared_files, upstream)).start()
    assert gw.proc is not None
    _, hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE)
    try:
        calls_fail_at_once_then_recover(
            gw, upstream, keys,
            lambda: resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE,
                                     (gw.audit_path.stat().st_size, hard)),
            lambda: resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (hard, hard)))
    finally:
        gw.stop()
    log_is_whole(gw)


class NamespacedGateway(Gateway):
    """The gateway in a mount namespace of its own, its audit log on a 256 KiB tmpfs."""

    def __init__(self, workdir: Path, config: dict[str, Any], disk: Path) -> None:
        self.disk = disk
        super().__init__(workdir, config)

    def command(self) -> list[str]:
        mount = f"mount -t tmpfs -o size=256k,mode=0700 taskgate-test {self.disk} &&"
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                " ".join([mount, "exec", *super().command()])]

    def inside(self, path: Path) -> Path:
        """``path`` as the gateway's mount namespace sees it."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root") / path.relative_to("/")


def can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o size=64k t {where}"], capture_output=True,
                           timeout=10, check=False)
    return probe.returncode == 0


def test_full_disk_fails_calls_at_once_then_recovers(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream, keys: Keys) -> None:
    """ENOSPC for real: the audit log's own small file system fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not can_mount_tmpfs(disk):
        pytest.skip("no mount namespaces here (unshare -m and tmpfs)")
    cfg = config(shared_files, upstream, audit={"path": str(disk / "audit.jsonl")})
    (tmp_path / "gw").mkdir()
    gw = NamespacedGateway(tmp_path / "gw", cfg, disk)
    gw.start()
    filler = gw.inside(disk / "filler")

    def fill() -> None:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for chunk in (1 << 16, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * chunk)
        finally:
            os.close(fd)
        # tmpfs counts pages: the log's last page still has room; fill it with blank
        # lines (which readers skip), so the next record needs a page there is not.
        log = gw.inside(disk / "audit.jsonl")
        with open(log, "ab") as f:
            f.write(b"\n" * (-log.stat().st_size % 4096))
        probe = os.open(gw.inside(disk / "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as e:
                os.write(probe, b"\0")
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(probe)
            os.remove(gw.inside(disk / "probe"))

    try:
        calls_fail_at_once_then_recover(gw, upstream, keys, fill, lambda: os.remove(filler))
        log = gw.inside(disk / "audit.jsonl").read_bytes()
    finally:
        gw.stop()
    recs = [json.loads(x) for x in log.splitlines() if x.strip()]
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert recs[-1]["status"] == 200
