"""Hot reload on the real gateway: SIGHUP, POST /v1/reload and ``taskgate reload``.

A bad file changes nothing (the error names file, line and key; 422; an audit record);
a good one applies to the next call, inside an open tunnel too; tasks beyond a lowered
ceiling are revoked; changed secrets are fetched anew; changed listeners are reported.
Then 10 reloads under a bench-style load: no call fails, and the time from SIGHUP to
the new rules applying is measured."""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import re
import signal
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.load import Client, ClientError, Target
from tests.conftest import ceiling_config
from tests.support import PYTHON, WORKLOAD, Gateway, Keys, Upstream
from tests.tasks_support import Tunnel, admin, client, create_task, http_rule, show

SECRET = "reload-secret-value-5678"


@pytest.fixture(scope="module")
def base(shared_files: dict[str, Path], upstream: Upstream) -> dict[str, Any]:
    cfg = ceiling_config(shared_files, upstream)
    cfg["workloads"][WORKLOAD]["standing"].append(
        {"id": "secret-read", "host": "127.0.0.1", "port": upstream.http_port,
         "scheme": "http", "methods": ["GET"], "paths": ["/secret/**"], "secret": "demo-key"})
    return cfg


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, base: dict[str, Any]) -> Iterator[Gateway]:
    gateway = Gateway(tmp_path_factory.mktemp("gw-reload"), copy.deepcopy(base),
                      env={"TASKGATE_TEST_SECRET": SECRET}).start()
    yield gateway
    gateway.stop()


@pytest.fixture
def cfg(gw: Gateway, base: dict[str, Any]) -> dict[str, Any]:
    """The base config, in force again (each test edits its own copy)."""
    fresh = copy.deepcopy(base)
    fresh["listen"] = gw.config["listen"]  # the bound ports, as the gateway wrote them
    answer = reload_with(gw, fresh)
    assert answer.status_code == 200, answer.text
    return fresh


def write(gw: Gateway, cfg: dict[str, Any] | str) -> None:
    """Replace the config file in one step (a reload never reads half a file)."""
    tmp = gw.config_path.with_suffix(".tmp")
    tmp.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, gw.config_path)


def reload_with(gw: Gateway, cfg: dict[str, Any] | str) -> httpx.Response:
    write(gw, cfg)
    return httpx.post(f"{gw.control_url}/v1/reload", headers=admin(gw), timeout=30)


def reload_records(gw: Gateway) -> list[dict[str, Any]]:
    return [r for r in gw.audit() if r["method"] == "RELOAD"]


def standing(cfg: dict[str, Any], rule_id: str) -> dict[str, Any]:
    return next(r for r in cfg["workloads"][WORKLOAD]["standing"] if r["id"] == rule_id)


def wait_for(predicate: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


# -- a bad file changes nothing ------------------------------------------------------
BAD_HOST_LINE = "      host: '*foo.com'"


def _bad(cfg: dict[str, Any]) -> tuple[str, int]:
    """The config with one bad rule host, and the line it is on (1-based)."""
    bad = copy.deepcopy(cfg)
    standing(bad, "plain-read")["host"] = "*foo.com"
    text = yaml.safe_dump(bad, sort_keys=False)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "*foo.com" in t)
    return text, line


def test_bad_file_via_control_plane_changes_nothing(gw: Gateway, cfg: dict[str, Any],
                                                    upstream: Upstream, keys: Keys) -> None:
    text, line = _bad(cfg)
    before = len(reload_records(gw))
    r = reload_with(gw, text)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_config"
    assert f"{gw.config_path}:{line}: " in body["reason"]
    assert 'workloads["spiffe://acme.test/agent/triage"].standing[0].host' in body["reason"]
    assert body["request_id"]
    with gw.client(keys.token()) as c:  # the old rules still hold
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/still").status_code == 200
    rec = reload_records(gw)[before:]
    assert len(rec) == 1 and rec[0]["decision"] == "error"
    assert "asked by POST /v1/reload from 127.0.0.1: refused, the running config stays" \
        in rec[0]["reason"]
    assert f":{line}: " in rec[0]["reason"]


def test_bad_file_via_sighup_changes_nothing(gw: Gateway, cfg: dict[str, Any],
                                             upstream: Upstream, keys: Keys) -> None:
    text, line = _bad(cfg)
    before = len(reload_records(gw))
    write(gw, text)
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    rec = wait_for(lambda: reload_records(gw)[before:])
    assert gw.proc.poll() is None  # SIGHUP no longer ends the process
    assert rec[0]["decision"] == "error" and "asked by signal SIGHUP" in rec[0]["reason"]
    assert f"{gw.config_path}:{line}: " in rec[0]["reason"]
    with gw.client(keys.token()) as c:
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x").status_code == 200


def test_cli_reload(gw: Gateway, cfg: dict[str, Any]) -> None:
    text, line = _bad(cfg)
    write(gw, text)
    before = len(reload_records(gw))
    cmd = [*PYTHON, "-m", "proxy", "reload", "-c", str(gw.config_path)]
    bad = subprocess.run(cmd, cwd=gw.dir, env=gw.env, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 1
    assert f"{gw.config_path}:{line}: " in bad.stderr and "was not asked" in bad.stderr
    assert len(reload_records(gw)) == before  # refused here; the gateway was not asked
    changed = copy.deepcopy(cfg)
    standing(changed, "plain-read")["paths"].append("/cli/**")
    write(gw, changed)
    ok = subprocess.run(cmd, cwd=gw.dir, env=gw.env, capture_output=True, text=True,
                        timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"reloaded {gw.config_path}: config sha256:")
    rec = reload_records(gw)[-1]
    assert rec["decision"] == "allow" and "asked by taskgate reload from 127.0.0.1" \
        in rec["reason"]


def test_reload_needs_the_admin_token(gw: Gateway) -> None:
    r = httpx.post(f"{gw.control_url}/v1/reload", timeout=10)
    assert r.status_code == 401


# -- a good file applies to the next call -----------------------------------------------
def test_next_call_in_an_open_tunnel_is_judged_on_new_rules(gw: Gateway, cfg: dict[str, Any],
                                                            upstream: Upstream,
                                                            keys: Keys) -> None:
    tunnel = Tunnel(gw, keys.token(), "localhost", upstream.https_port)
    try:
        assert tunnel.get("/allowed/before")[0] == 200
        assert tunnel.get("/moved/before")[0] == 403
        changed = copy.deepcopy(cfg)
        standing(changed, "tls-read")["paths"] = ["/moved/**"]
        r = reload_with(gw, changed)
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["applied"] and view["old_digest"] != view["new_digest"]
        assert view["config"] == str(gw.config_path)
        assert view["restart_needed"] == [] and view["revoked_tasks"] == []
        assert view["secrets_refetched"] == []  # no secret spec changed
        status, body = tunnel.get("/allowed/after")  # the same tunnel, the same connection
        assert status == 403 and body["reason"] == "no rule for this host allows this path"
        assert tunnel.get("/moved/after")[0] == 200
    finally:
        tunnel.close()
    rec = reload_records(gw)[-1]
    assert rec["decision"] == "allow"
    assert f"sha256:{view['old_digest'][:16]} -> sha256:{view['new_digest'][:16]}" \
        in rec["reason"]


def test_call_in_flight_finishes_on_old_rules(gw: Gateway, cfg: dict[str, Any],
                                              upstream: Upstream, keys: Keys) -> None:
    result: dict[str, Any] = {}

    def slow() -> None:
        with gw.client(keys.token()) as c:
            r = c.get(f"http://127.0.0.1:{upstream.http_port}/slow?s=1&reload=inflight")
            result.update(status=r.status_code, id=r.headers["X-Taskgate-Request-Id"])

    seen = len(upstream.seen)
    t = threading.Thread(target=slow)
    t.start()
    wait_for(lambda: any("reload=inflight" in s["path"] for s in upstream.seen[seen:]))
    changed = copy.deepcopy(cfg)
    standing(changed, "plain-read")["paths"] = ["/allowed/**"]  # /slow no longer allowed
    assert reload_with(gw, changed).status_code == 200
    t.join(20)
    assert result["status"] == 200
    assert gw.records_for(result["id"])[0]["decision"] == "allow"
    with gw.client(keys.token()) as c:
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/slow?s=0").status_code == 403


def test_lowered_ceiling_revokes_tasks_beyond_it(gw: Gateway, cfg: dict[str, Any],
                                                 upstream: Upstream) -> None:
    wide = create_task(gw, upstream, [http_rule(upstream, paths=["/allowed/**"])])
    narrow = create_task(gw, upstream, [http_rule(upstream, paths=["/slow"])])
    changed = copy.deepcopy(cfg)
    up_http = next(r for r in changed["workloads"][WORKLOAD]["ceiling"] if r["id"] == "up-http")
    up_http["paths"] = ["/slow"]
    r = reload_with(gw, changed)
    assert r.status_code == 200, r.text
    assert r.json()["revoked_tasks"] == [wide["task_id"]]
    assert show(gw, wide["task_id"])["status"] == "revoked"
    assert show(gw, narrow["task_id"])["status"] == "active"
    with client(gw, wide) as c:
        refused = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
    assert refused.status_code == 407 and refused.json()["reason"] == "task revoked"
    with client(gw, narrow) as c:
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/slow?s=0").status_code == 200
    rec = [x for x in reload_records(gw) if x["task"] == wide["task_id"]]
    assert len(rec) == 1 and rec[0]["decision"] == "deny"
    assert rec[0]["reason"].startswith("task revoked at config reload: rules[0] 'plain' no "
                                       f"longer fits the ceiling of workload {WORKLOAD!r}")
    assert "1 tasks revoked" in reload_records(gw)[-1]["reason"]


def test_changed_secret_is_fetched_anew(gw: Gateway, cfg: dict[str, Any],
                                        upstream: Upstream, keys: Keys) -> None:
    url = f"http://127.0.0.1:{upstream.http_port}/secret/"

    def sent(tag: str) -> str:
        with gw.client(keys.token()) as c:
            assert c.get(url + tag).status_code == 200
        return next(s for s in upstream.seen if s["path"] == f"/secret/{tag}"
                    )["headers"]["Authorization"]

    assert sent("one") == f"Bearer {SECRET}"
    changed = copy.deepcopy(cfg)
    changed["secrets"]["demo-key"]["inject"]["value"] = "Token {token}"
    r = reload_with(gw, changed)
    assert r.status_code == 200 and r.json()["secrets_refetched"] == ["demo-key"]
    assert sent("two") == f"Token {SECRET}"
    assert "secrets to fetch anew: demo-key" in reload_records(gw)[-1]["reason"]


def test_changed_listener_is_reported_not_applied(gw: Gateway, cfg: dict[str, Any],
                                                  upstream: Upstream, keys: Keys) -> None:
    changed = copy.deepcopy(cfg)
    changed["listen"] = {**cfg["listen"], "proxy": "127.0.0.1:1"}
    changed["proxy"] = {**changed.get("proxy", {}), "max_connections": 77}
    r = reload_with(gw, changed)
    assert r.status_code == 200, r.text
    assert r.json()["restart_needed"] == ["listen.proxy", "proxy.max_connections"]
    assert "needs a restart to change: listen.proxy, proxy.max_connections" in \
        reload_records(gw)[-1]["reason"]
    with gw.client(keys.token()) as c:  # still where it was
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x").status_code == 200


# -- under load ------------------------------------------------------------------------
def _toggled(cfg: dict[str, Any], on: bool) -> dict[str, Any]:
    changed = copy.deepcopy(cfg)
    if on:
        standing(changed, "plain-read")["paths"].append("/probe/**")
    return changed


async def _load_and_reload(gw: Gateway, cfg: dict[str, Any], upstream: Upstream,
                           token: str, reloads: int) -> tuple[int, int, list[float]]:
    auth = "Basic " + base64.b64encode(f"agent:{token}".encode()).decode()
    proxy = ("127.0.0.1", gw.proxy_port)
    tls = ssl.create_default_context(cafile=str(gw.ca))
    targets = [Target("http", "127.0.0.1", upstream.http_port, "/allowed/load", proxy, auth),
               Target("https", "localhost", upstream.https_port, "/allowed/load", proxy, auth,
                      tls)]
    clients = [Client(targets[i % 2]) for i in range(6)]
    probe = Client(Target("http", "127.0.0.1", upstream.http_port, "/probe/x", proxy, auth))
    await asyncio.gather(*(c.connect() for c in [*clients, probe]))
    stop = asyncio.Event()
    done, failures = 0, []

    async def worker(c: Client) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                await c.call()
                done += 1
            except (ClientError, OSError, asyncio.IncompleteReadError) as e:
                failures.append(repr(e))
                return

    async def probe_allowed() -> bool:
        try:
            await probe.call()
            return True
        except ClientError as e:
            assert "403" in str(e), e
            return False

    workers = [asyncio.create_task(worker(c)) for c in clients]
    took: list[float] = []
    assert gw.proc is not None
    try:
        await asyncio.sleep(0.5)  # the load runs
        for i in range(reloads):
            on = i % 2 == 0
            write(gw, _toggled(cfg, on))
            t0 = time.perf_counter()
            gw.proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while await probe_allowed() != on:
                    pass
            took.append(time.perf_counter() - t0)
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await asyncio.gather(*(c.close() for c in [*clients, probe]))
    assert not failures, failures[:3]
    return done, len(failures), took


def test_ten_reloads_under_load_fail_no_call(gw: Gateway, cfg: dict[str, Any],
                                             upstream: Upstream, keys: Keys) -> None:
    before = len(reload_records(gw))
    done, failed, took = asyncio.run(_load_and_reload(gw, cfg, upstream, keys.token(), 10))
    assert failed == 0 and done > 100
    applied = [r for r in reload_records(gw)[before:] if r["decision"] == "allow"]
    assert len(applied) == 10 and all("asked by signal SIGHUP" in r["reason"] for r in applied)
    ms = sorted(t * 1000 for t in took)
    inside = [float(m) for m in re.findall(r"config reloaded \(.*\) in ([\d.]+) ms",
                                           gw.output())[-10:]]
    print(f"\nreload under load: {done} calls, {failed} failed; SIGHUP -> new rules applied: "
          f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms (10 reloads); "
          f"read+validate+swap in the gateway: median {statistics.median(inside):.1f} ms")
    assert ms[-1] < 5000
