"""Shared state on Redis: two real gateways (A and B) against one private Redis.

Tasks, budgets, revocations, approvals and signing keys are shared; Redis away means
503 and not ready, Redis back means recovery without a restart, Redis emptied means
every task is unknown (407). The destructive cases (kill -9, Redis stopped, flushed)
run last in the module, in file order.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ceiling_config
from tests.redis_support import RedisServer, redis_available
from tests.support import WORKLOAD, Gateway, Upstream
from tests.tasks_support import Tunnel, admin, admin_token, client, create_task, revoke, show

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer(persist=True)
    server.start()
    yield server
    server.close()


def _config(shared_files: dict[str, Path], upstream: Upstream, redis: RedisServer,
            replica: str) -> dict[str, Any]:
    cfg = ceiling_config(shared_files, upstream)
    cfg["state"] = {"backend": "redis", "redis_url": redis.url, "key_prefix": "tg-test:"}
    cfg["replica_id"] = replica
    cfg["approval_timeout_seconds"] = 30
    return cfg


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
         upstream: Upstream, redis: RedisServer) -> Iterator[tuple[Gateway, Gateway]]:
    a = Gateway(tmp_path_factory.mktemp("gw-a"), _config(shared_files, upstream, redis, "a"))
    b = Gateway(tmp_path_factory.mktemp("gw-b"), _config(shared_files, upstream, redis, "b"))
    a.start(wait=False)
    b.start(wait=False)
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


def _tag() -> str:
    return uuid.uuid4().hex[:12]


def _reached(up: Upstream, tag: str) -> int:
    return sum(1 for s in up.seen if tag in s["path"])


def _on(gw: Gateway, task: dict[str, Any]) -> dict[str, Any]:
    """The task as handed out by another replica, used through ``gw``."""
    return {**task, "proxy_url": f"http://agent:{task['token']}@127.0.0.1:{gw.proxy_port}"}


def _ready(gw: Gateway) -> httpx.Response:
    return httpx.get(f"{gw.control_url}/readyz", timeout=5)


def _wait(what: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_token_minted_on_a_works_on_b(pair: tuple[Gateway, Gateway], upstream: Upstream
                                      ) -> None:
    a, b = pair
    task = create_task(a, upstream)
    tag = _tag()
    with client(b, _on(b, task)) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/{tag}")
    assert r.status_code == 200, r.text
    assert _reached(upstream, tag) == 1
    _wait(lambda: httpx.get(f"{b.control_url}/v1/tasks/{task['task_id']}", headers=admin(b),
                            timeout=5).status_code == 200)
    with client(b, _on(b, task)) as c:  # beyond its grant: still refused on B
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/other").status_code == 403


def test_forged_task_token_refused_on_both(pair: tuple[Gateway, Gateway], upstream: Upstream
                                          ) -> None:
    a, b = pair
    task = create_task(a, upstream)
    head, body, sig = task["token"].split(".")
    forged = f"{head}.{body}.{sig[:-4]}AAAA"
    for gw in pair:
        with client(gw, {**task, "proxy_url": gw.proxy_url_with(forged)}) as c:
            r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
        assert r.status_code == 407, r.text


def test_binding_made_on_a_holds_on_b(pair: tuple[Gateway, Gateway], upstream: Upstream
                                      ) -> None:
    """A task's terms (its binding) travel with it: bound elsewhere on B too."""
    a, b = pair
    task = create_task(a, upstream, bind={"client_cidrs": ["10.9.8.0/24"]})
    with client(b, _on(b, task)) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/{_tag()}")
    assert r.status_code == 407 and "bound elsewhere" in r.json()["reason"], r.text


async def _spread(a: Gateway, b: Gateway, token: str, urls: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(urls), max_keepalive_connections=0)
    clients = [httpx.AsyncClient(proxy=gw.proxy_url_with(token), limits=limits, timeout=30,
                                 trust_env=False) for gw in (a, b)]
    try:
        return await asyncio.gather(*(clients[i % 2].get(u) for i, u in enumerate(urls)))
    finally:
        for c in clients:
            await c.aclose()


def test_budget_exact_across_replicas(pair: tuple[Gateway, Gateway], upstream: Upstream
                                      ) -> None:
    """50 concurrent calls, half on A and half on B, against max_calls 10: exactly 10."""
    a, b = pair
    task = create_task(a, upstream, max_calls=10)
    tag = _tag()
    urls = [f"http://127.0.0.1:{upstream.http_port}/slow?s=0.3&tag={tag}{i}" for i in range(50)]
    codes = [r.status_code for r in asyncio.run(_spread(a, b, task["token"], urls))]
    assert codes.count(200) == 10 and codes.count(403) == 40, codes
    assert _reached(upstream, tag) == 10
    state = show(b, task["task_id"])
    assert (state["calls_used"], state["status"]) == (10, "spent")


def test_revocation_on_a_reaches_open_tunnel_on_b(pair: tuple[Gateway, Gateway],
                                                  upstream: Upstream) -> None:
    a, b = pair
    task = create_task(a, upstream)
    tunnel = Tunnel(b, task["token"], "localhost", upstream.https_port)
    tag = _tag()
    try:
        assert tunnel.get(f"/allowed/{tag}/1")[0] == 200
        revoke(a, task["task_id"])
        revoked_at = time.monotonic()
        status, body = tunnel.get(f"/allowed/{tag}/2")  # same tunnel on B
        while status == 200 and time.monotonic() - revoked_at < 1.0:
            status, body = tunnel.get(f"/allowed/{tag}/2")
        took = time.monotonic() - revoked_at
    finally:
        tunnel.close()
    assert status == 407 and body["reason"] == "task revoked", body
    assert took < 1.0
    assert body["request_id"]


def _approve_rule(up: Upstream) -> dict[str, Any]:
    return {"id": "open-pr", "host": "localhost", "allow_private": True,
            "port": up.https_port, "methods": ["POST"], "paths": ["/approve/**"],
            "approval": "required"}


async def _held_on(ctl: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            r = await ctl.get("/v1/approvals")
            assert r.status_code == 200, r.text
            found = [h for h in r.json()["approvals"] if h["task"] == task_id]
            if found:
                return found[0]
            await asyncio.sleep(0.05)


def _control(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.control_url, timeout=10, trust_env=False,
                             headers=admin(gw))


async def test_approval_held_on_a_is_answered_on_b(pair: tuple[Gateway, Gateway],
                                                   upstream: Upstream) -> None:
    a, b = pair
    task = create_task(a, upstream, [_approve_rule(upstream)], max_calls=3)
    m = uuid.uuid4().hex
    url = f"https://localhost:{upstream.https_port}/approve/{m}"
    async with (httpx.AsyncClient(proxy=task["proxy_url"], verify=a.ssl_context(), timeout=30,
                                  trust_env=False) as agent,
                _control(a) as on_a, _control(b) as on_b):
        call = asyncio.create_task(agent.post(url, json={"title": "fix"}))
        held = await _held_on(on_b, task["task_id"])  # held on A, listed on B
        assert held["state"] == "waiting" and held["url"] == url
        assert (await on_b.get(f"/v1/approvals/{held['id']}")).json()["state"] == "waiting"
        await asyncio.sleep(0.2)
        assert not call.done()
        r = await on_b.post(f"/v1/approvals/{held['id']}/approve", json={"by": "carol"})
        assert r.status_code == 200, r.text
        resp = await asyncio.wait_for(call, 10)
        assert resp.status_code == 200, resp.text
        for ctl in (on_a, on_b):  # a second answer anywhere
            r = await ctl.post(f"/v1/approvals/{held['id']}/deny", json={"by": "dave"})
            assert r.status_code == 409, r.text
            assert "approved by carol" in r.json()["reason"] and r.json()["request_id"]
        assert all(h["id"] != held["id"]
                   for h in (await on_b.get("/v1/approvals")).json()["approvals"])
    final = a.records_for(resp.headers["x-taskgate-request-id"])[-1]
    assert final["decision"] == "approved" and final["approval"]["by"] == "carol"


async def test_held_call_denied_on_b_and_task_end_on_b_refuses_hold_on_a(
        pair: tuple[Gateway, Gateway], upstream: Upstream) -> None:
    a, b = pair
    task = create_task(a, upstream, [_approve_rule(upstream)])
    url = f"https://localhost:{upstream.https_port}/approve/{uuid.uuid4().hex}"
    async with (httpx.AsyncClient(proxy=task["proxy_url"], verify=a.ssl_context(), timeout=30,
                                  trust_env=False) as agent, _control(b) as on_b):
        call = asyncio.create_task(agent.post(url, json={}))
        held = await _held_on(on_b, task["task_id"])
        r = await on_b.post(f"/v1/approvals/{held['id']}/deny", json={"by": "erin"})
        assert r.status_code == 200 and r.json()["state"] == "denied", r.text
        resp = await asyncio.wait_for(call, 10)
        assert resp.status_code == 403 and "denied by erin" in resp.json()["reason"]
        # A second call held on A; the task revoked on B refuses it on A at once.
        call = asyncio.create_task(agent.post(url, json={}))
        held = await _held_on(on_b, task["task_id"])
        assert (await on_b.delete(f"/v1/tasks/{task['task_id']}")).status_code == 200
        resp = await asyncio.wait_for(call, 5)
        assert resp.status_code == 403, resp.text
        assert resp.json()["reason"] == "the task was revoked while the call was held for approval"
        r = await on_b.post(f"/v1/approvals/{held['id']}/approve", json={"by": "carol"})
        assert r.status_code == 409, r.text


async def test_a_hold_that_runs_out_on_a_is_409_on_b(pair: tuple[Gateway, Gateway],
                                                     upstream: Upstream) -> None:
    """The deadline (here: the task's expiry, before the approval timeout) is one more
    answer decided in Redis: an approval on B afterwards is 409."""
    a, b = pair
    task = create_task(a, upstream, [_approve_rule(upstream)], ttl_seconds=2)
    url = f"https://localhost:{upstream.https_port}/approve/{uuid.uuid4().hex}"
    async with (httpx.AsyncClient(proxy=task["proxy_url"], verify=a.ssl_context(), timeout=30,
                                  trust_env=False) as agent, _control(b) as on_b):
        call = asyncio.create_task(agent.post(url, json={}))
        held = await _held_on(on_b, task["task_id"])
        resp = await asyncio.wait_for(call, 10)
        assert resp.status_code == 403, resp.text
        r = await on_b.post(f"/v1/approvals/{held['id']}/approve", json={"by": "carol"})
        assert r.status_code == 409, r.text


def test_review_session_signed_in_on_a_works_on_b(pair: tuple[Gateway, Gateway]) -> None:
    a, b = pair
    r = httpx.post(f"{a.control_url}/ui/login", data={"token": admin_token(a)}, timeout=10)
    assert r.status_code == 303, r.text
    cookies = {"taskgate_session": r.cookies["taskgate_session"]}
    page = httpx.get(f"{b.control_url}/ui", cookies=cookies, timeout=10)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert page.status_code == 200 and csrf is not None, page.text[:300]
    assert httpx.get(f"{b.control_url}/v1/approvals", cookies=cookies,
                     timeout=10).status_code == 200
    r = httpx.post(f"{b.control_url}/ui/logout", cookies=cookies, timeout=10,
                   headers={"X-CSRF-Token": csrf.group(1)})
    assert r.status_code == 200, r.text
    for gw in pair:  # signed out everywhere
        r = httpx.get(f"{gw.control_url}/v1/approvals", cookies=cookies, timeout=10)
        assert r.status_code == 401, r.text


def test_key_rotation_on_a_reaches_b(pair: tuple[Gateway, Gateway], upstream: Upstream
                                     ) -> None:
    a, b = pair
    before = create_task(a, upstream)
    r = httpx.post(f"{a.control_url}/v1/task-keys/rotate", headers=admin(a), timeout=10)
    assert r.status_code == 200, r.text
    kid = r.json()["current"]
    after = create_task(a, upstream)  # signed with the new key, used on B at once
    url = f"http://127.0.0.1:{upstream.http_port}/allowed/{_tag()}"
    for task in (before, after):
        with client(b, _on(b, task)) as c:
            assert c.get(url).status_code == 200
    _wait(lambda: kid in {k["kid"] for k in httpx.get(
        f"{b.control_url}/v1/task-keys", headers=admin(b), timeout=5).json()["keys"]})


# -- failures: these run last, in this order ---------------------------------------------
def test_kill_9_of_a_mid_call_b_keeps_serving_nothing_twice(
        pair: tuple[Gateway, Gateway], upstream: Upstream) -> None:
    a, b = pair
    task = create_task(b, upstream, max_calls=3)
    tag = _tag()
    result: list[Any] = []

    def slow_call() -> None:
        try:
            with client(a, _on(a, task)) as c:
                result.append(c.get(f"http://127.0.0.1:{upstream.http_port}/slow?s=3&tag={tag}"))
        except httpx.HTTPError as e:
            result.append(e)

    caller = threading.Thread(target=slow_call)
    caller.start()
    _wait(lambda: _reached(upstream, tag) == 1)  # counted on A, at the upstream now
    a.stop(signal.SIGKILL)
    caller.join(10)
    assert result and isinstance(result[0], httpx.HTTPError)  # the call died with A
    with client(b, _on(b, task)) as c:
        codes = [c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/{tag}/{i}").status_code
                 for i in range(4)]
    assert codes == [200, 200, 403, 403]  # A's call stays counted: 3 in all, never more
    assert _reached(upstream, tag) == 3
    a.start()  # back for the tests below; it finds every task in Redis
    with client(a, _on(a, task)) as c:
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x").status_code == 403


def test_redis_stopped_refuses_503_not_ready_then_recovers(
        pair: tuple[Gateway, Gateway], upstream: Upstream, redis: RedisServer) -> None:
    a, b = pair
    task = create_task(a, upstream)
    url = f"http://127.0.0.1:{upstream.http_port}/allowed/{_tag()}"
    for gw in pair:
        with client(gw, _on(gw, task)) as c:
            assert c.get(url).status_code == 200
    redis.stop()
    try:
        for gw in pair:
            _wait(lambda gw=gw: _ready(gw).status_code == 503, 3)
            ready = _ready(gw).json()
            assert ready["status"] == "not ready" and ready["checks"]["store"] is False
            with client(gw, _on(gw, task)) as c:
                r = c.get(url)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "unavailable" and "Redis" in r.json()["reason"]
            assert r.json()["request_id"]
        r = httpx.post(f"{a.control_url}/v1/tasks", headers=admin(a), timeout=10,
                       json={"workload": WORKLOAD, "ttl_seconds": 60,
                             "rules": [{"id": "r", "host": "127.0.0.1",
                                        "port": upstream.http_port, "scheme": "http",
                                        "methods": ["GET"], "paths": ["/allowed/**"]}]})
        assert r.status_code == 503 and r.json()["request_id"], r.text
    finally:
        redis.start()
    for gw in pair:  # back without a restart: the same token works again
        _wait(lambda gw=gw: _ready(gw).status_code == 200, 10)
        with client(gw, _on(gw, task)) as c:
            assert c.get(url).status_code == 200


def test_redis_flushed_tasks_gone_407(pair: tuple[Gateway, Gateway], upstream: Upstream,
                                      redis: RedisServer) -> None:
    a, b = pair
    task = create_task(a, upstream)
    url = f"http://127.0.0.1:{upstream.http_port}/allowed/{_tag()}"
    with client(b, _on(b, task)) as c:
        assert c.get(url).status_code == 200
    subprocess.run(["redis-cli", "-p", str(redis.port), "FLUSHALL"], check=True,
                   capture_output=True)
    deadline = time.monotonic() + 2.0
    for gw in pair:
        with client(gw, _on(gw, task)) as c:
            r = c.get(url)
            while r.status_code != 407 and time.monotonic() < deadline:
                assert r.status_code in (200, 503), r.text  # never allowed once it is known
                time.sleep(0.05)
                r = c.get(url)
        assert r.status_code == 407, r.text
        assert r.json()["reason"].startswith("task unknown")
    assert all(_ready(gw).status_code == 200 for gw in pair)
