"""``proxy.workers: 2`` (proxy/supervisor.py): two worker processes share the proxy port,
one control plane, a supervisor that restarts a killed worker and drains all on SIGTERM.

The gateway runs against a private Redis (``state.backend: redis``, as workers need);
the calls use a workload's standing rules, which need no task state.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import base_config
from tests.redis_support import RedisServer, redis_available
from tests.support import Gateway, Upstream

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def workers_config(shared_files: dict[str, Path], upstream: Upstream, redis: RedisServer,
                   **extra: Any) -> dict[str, Any]:
    cfg = base_config(shared_files, upstream, **extra)
    cfg["proxy"] = {**cfg["proxy"], "workers": 2}
    cfg["state"] = {"backend": "redis", "redis_url": redis.url}
    cfg["replica_id"] = "gw-a"
    return cfg


@pytest.fixture(scope="module")
def wgw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
        upstream: Upstream, redis: RedisServer) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("wgw"),
                 workers_config(shared_files, upstream, redis)).start()
    yield gw
    gw.stop()


def worker_logs(gw: Gateway) -> list[dict[str, Any]]:
    recs = []
    for path in sorted(gw.audit_path.parent.glob("audit-gw-a-w*.jsonl")):
        recs.extend(orjson.loads(line) for line in path.read_bytes().splitlines() if line)
    return recs


def worker_pids(gw: Gateway) -> list[int]:
    assert gw.proc is not None
    children = Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()
    return sorted(int(p) for p in children)


def dead(pid: int) -> bool:
    """Reaped by the supervisor: every thread of it has exited, its sockets are closed.
    (A zombie leader is not enough: its other threads may still hold the listener.)"""
    return not Path(f"/proc/{pid}").exists()


def calls(gw: Gateway, token: str, upstream: Upstream, n: int) -> list[str]:
    """``n`` allowed calls, each on a new connection (so the kernel spreads them)."""
    ids = []
    for _ in range(n):
        with gw.client(token) as c:
            r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-taskgate-request-id"])
    return ids


def wait_for(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_both_workers_serve_one_port(wgw: Gateway, token: str, upstream: Upstream) -> None:
    assert len(worker_pids(wgw)) == 2
    ids = set(calls(wgw, token, upstream, 40))
    recs = wait_for(lambda: [r for r in worker_logs(wgw) if r["request_id"] in ids]
                    if len([r for r in worker_logs(wgw) if r["request_id"] in ids]) == 40
                    else None)
    assert {r["replica"] for r in recs} == {"gw-a/w1", "gw-a/w2"}
    assert all(r["decision"] == "allow" for r in recs)
    assert httpx.get(f"{wgw.control_url}/readyz").json()["checks"]["proxy"] is True


def test_metrics_count_calls_from_both_workers(wgw: Gateway, token: str,
                                               upstream: Upstream) -> None:
    def allowed() -> float:
        text = httpx.get(f"{wgw.control_url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('taskgate_calls_total{decision="allow"'))

    before = allowed()
    calls(wgw, token, upstream, 20)
    wait_for(lambda: allowed() == before + 20)
    text = httpx.get(f"{wgw.control_url}/metrics").text
    assert "taskgate_workers_ready 2.0" in text


def test_the_control_plane_answers_from_every_workers_log(wgw: Gateway, token: str,
                                                          upstream: Upstream) -> None:
    calls(wgw, token, upstream, 10)
    admin = (wgw.home / "admin-token").read_text().strip()
    r = httpx.get(f"{wgw.control_url}/v1/audit?limit=1000",
                  headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    assert {"gw-a/w1", "gw-a/w2"} <= set(r.json()["replicas"])
    # The live tail (the review page's): from the cursor given, exactly the new calls.
    tail = r.json()["tail"]
    assert "audit-gw-a-w1.jsonl:" in tail and "audit-gw-a-w2.jsonl:" in tail
    ids = set(calls(wgw, token, upstream, 6))

    def new() -> list[dict[str, Any]]:
        got = httpx.get(f"{wgw.control_url}/v1/audit", params={"after": tail},
                        headers={"Authorization": f"Bearer {admin}"})
        assert got.status_code == 200, got.text
        return list(got.json()["records"])

    recs = wait_for(lambda: (found := new()) and len(found) == 6 and found)
    assert {r["request_id"] for r in recs} == ids
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)


def reload_counts(gw: Gateway) -> Counter[str]:
    """Applied config reloads recorded, by replica (the supervisor and each worker)."""
    recs = []
    for path in gw.audit_path.parent.glob("audit*.jsonl"):
        recs.extend(orjson.loads(line) for line in path.read_bytes().splitlines() if line)
    return Counter(r["replica"] for r in recs
                   if r["decision"] == "allow" and "config reload" in (r.get("reason") or ""))


def reloads(gw: Gateway) -> set[str]:
    return set(reload_counts(gw))


def test_sighup_reloads_the_supervisor_then_every_worker_which_keep_serving(
        wgw: Gateway, token: str, upstream: Upstream) -> None:
    assert wgw.proc is not None
    before = worker_pids(wgw)
    wgw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "the config was reloaded; reloading 2 workers" in wgw.output())
    # Each process applied the file itself (one audit record each), none restarted.
    wait_for(lambda: {"gw-a", "gw-a/w1", "gw-a/w2"} <= reloads(wgw))
    assert wgw.proc.poll() is None
    assert worker_pids(wgw) == before
    calls(wgw, token, upstream, 10)


def test_post_reload_on_the_control_plane_reloads_every_worker(
        wgw: Gateway, token: str, upstream: Upstream) -> None:
    before = reload_counts(wgw)
    admin = (wgw.home / "admin-token").read_text().strip()
    r = httpx.post(f"{wgw.control_url}/v1/reload", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    assert r.json()["applied"] is True
    after = wait_for(lambda: (c := reload_counts(wgw))
                     and all(c[k] == before[k] + 1 for k in ("gw-a", "gw-a/w1", "gw-a/w2"))
                     and c)
    assert after
    calls(wgw, token, upstream, 4)


def test_a_killed_worker_is_started_again(wgw: Gateway, token: str,
                                          upstream: Upstream) -> None:
    victim = worker_pids(wgw)[0]
    os.kill(victim, signal.SIGKILL)
    # Once it is dead (its listener closed with it: what the kernel had queued for it
    # was reset, as any kill -9 does), calls keep succeeding: the other worker holds the
    # port while the supervisor starts a new one.
    wait_for(lambda: dead(victim))
    calls(wgw, token, upstream, 10)
    wait_for(lambda: len(worker_pids(wgw)) == 2 and victim not in worker_pids(wgw))
    wait_for(lambda: httpx.get(f"{wgw.control_url}/readyz").status_code == 200)
    assert "worker 1 (pid" in wgw.output() or "worker 2 (pid" in wgw.output()
    assert "exited with signal SIGKILL; starting it again" in wgw.output()
    ids = set(calls(wgw, token, upstream, 20))
    wait_for(lambda: len([r for r in worker_logs(wgw) if r["request_id"] in ids]) == 20)


def test_sigterm_drains_every_worker_and_exits_0(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream,
        redis: RedisServer, token: str) -> None:
    gw = Gateway(tmp_path, workers_config(shared_files, upstream, redis)).start()
    pids = worker_pids(gw)
    with gw.client(token) as c:
        # A slow call in flight when the stop comes: it still gets its answer.
        result: dict[str, int] = {}

        def slow() -> None:
            result["status"] = c.get(f"http://127.0.0.1:{upstream.http_port}/slow").status_code

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)
        assert gw.stop(signal.SIGTERM) == 0
        t.join(10)
    assert result.get("status") == 200
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert "stopping 2 workers" in gw.output()


def test_a_proxy_port_taken_by_another_program_fails_the_start(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream,
        redis: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = workers_config(shared_files, upstream, redis)
        cfg["listen"] = {"proxy": f"127.0.0.1:{port}", "control": "127.0.0.1:0"}
        gw = Gateway(tmp_path, cfg).start(wait=False)
        assert gw.proc is not None
        assert gw.proc.wait(30) == 2
        gw.stop()
    assert f"the proxy cannot listen on 127.0.0.1:{port}" in gw.output()


def test_a_home_too_long_for_the_workers_sockets_fails_the_start(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream,
        redis: RedisServer) -> None:
    cfg = workers_config(shared_files, upstream, redis, home="h" * 120)
    gw = Gateway(tmp_path, cfg).start(wait=False)
    assert gw.proc is not None
    assert gw.proc.wait(30) == 2
    gw.stop()
    assert "more than a Unix socket takes; use a shorter home" in gw.output()
