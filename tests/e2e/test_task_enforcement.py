"""Task grants enforced on every call, on the real gateway: budget, expiry, revocation,
tokens, and what survives a restart."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ceiling_config
from tests.support import Gateway, Upstream
from tests.tasks_support import (
    Tunnel,
    client,
    create_task,
    http_rule,
    revoke,
    show,
)


def _tag() -> str:
    return uuid.uuid4().hex[:12]


def reached(up: Upstream, tag: str) -> int:
    return sum(1 for s in up.seen if tag in s["path"])


async def _parallel_gets(proxy_url: str, urls: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(urls), max_keepalive_connections=0)
    async with httpx.AsyncClient(proxy=proxy_url, limits=limits, timeout=20,
                                 trust_env=False) as c:
        return await asyncio.gather(*(c.get(u) for u in urls))


def test_budget_under_concurrency(ceiling_gateway: Gateway, upstream: Upstream) -> None:
    """50 parallel calls against max_calls 10: exactly 10 reach the upstream."""
    gw = ceiling_gateway
    task = create_task(gw, upstream, max_calls=10)
    tag = _tag()
    urls = [f"http://127.0.0.1:{upstream.http_port}/slow?s=0.3&tag={tag}{i}" for i in range(50)]
    responses = asyncio.run(_parallel_gets(task["proxy_url"], urls))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10, codes
    assert codes.count(403) == 40, codes
    assert all(r.json()["reason"] == "task budget spent: all 10 calls used"
               for r in responses if r.status_code == 403)
    assert reached(upstream, tag) == 10
    state = show(gw, task["task_id"])
    assert (state["calls_used"], state["calls_left"], state["status"]) == (10, 0, "spent")
    records = [r for r in gw.audit() if r["task"] == task["task_id"]]
    assert sum(r["decision"] == "allow" for r in records) == 10
    assert sum(r["decision"] == "deny" for r in records) == 40
    assert all(r["reason"] == "task budget spent: all 10 calls used"
               for r in records if r["decision"] == "deny")


def test_refusals_are_not_counted(ceiling_gateway: Gateway, upstream: Upstream) -> None:
    gw = ceiling_gateway
    task = create_task(gw, upstream, max_calls=2)
    base = f"http://127.0.0.1:{upstream.http_port}"
    with client(gw, task) as c:
        for _ in range(5):
            r = c.get(f"{base}/not-granted")
            assert r.status_code == 403 and "no rule" in r.json()["reason"]
        assert c.post(f"{base}/allowed/x").status_code == 403  # method not granted
        assert show(gw, task["task_id"])["calls_used"] == 0
        assert c.get(f"{base}/allowed/1").status_code == 200
        assert c.get(f"{base}/allowed/2").status_code == 200
        r = c.get(f"{base}/allowed/3")
    assert r.status_code == 403 and r.json()["reason"].startswith("task budget spent")
    assert show(gw, task["task_id"])["calls_used"] == 2


def test_budget_spent_inside_an_open_https_tunnel(ceiling_gateway: Gateway,
                                                  upstream: Upstream) -> None:
    gw = ceiling_gateway
    task = create_task(gw, upstream, max_calls=2)
    tunnel = Tunnel(gw, task["token"], "localhost", upstream.https_port)
    try:
        assert tunnel.get("/allowed/a")[0] == 200
        assert tunnel.get("/allowed/b")[0] == 200
        status, body = tunnel.get("/allowed/c")
    finally:
        tunnel.close()
    assert status == 403 and body["reason"].startswith("task budget spent")


def test_expiry_is_enforced(ceiling_gateway: Gateway, upstream: Upstream) -> None:
    gw = ceiling_gateway
    task = create_task(gw, upstream, ttl_seconds=3)
    tunnel = Tunnel(gw, task["token"], "localhost", upstream.https_port)
    try:
        with client(gw, task) as c:
            assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/e").status_code == 200
            assert tunnel.get("/allowed/e")[0] == 200
            time.sleep(max(0.0, show(gw, task["task_id"])["expires_in_seconds"]) + 0.2)
            r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/e")  # keep-alive
            assert r.status_code == 407 and r.json()["reason"] == "task expired"
            assert r.headers["proxy-authenticate"] == 'Basic realm="taskgate"'
        status, body = tunnel.get("/allowed/e")  # the tunnel opened before expiry
        assert status == 407 and body["reason"] == "task expired"
    finally:
        tunnel.close()
    with client(gw, task) as c:  # a fresh connection, the token verified anew
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/e")
        assert r.status_code == 407 and r.json()["reason"] == "task expired"
    deadline = time.monotonic() + 5
    while show(gw, task["task_id"])["status"] != "expired" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert show(gw, task["task_id"])["status"] == "expired"


def test_revocation_inside_open_https_keepalive_connection(ceiling_gateway: Gateway,
                                                           upstream: Upstream) -> None:
    gw = ceiling_gateway
    task = create_task(gw, upstream)
    tunnel = Tunnel(gw, task["token"], "localhost", upstream.https_port)
    tag = _tag()
    try:
        assert tunnel.get(f"/allowed/{tag}/1")[0] == 200
        revoked = revoke(gw, task["task_id"])
        assert revoked["status"] == "revoked" and revoked["revoked_at"]
        status, body = tunnel.get(f"/allowed/{tag}/2")  # same TLS connection, same tunnel
    finally:
        tunnel.close()
    assert status == 407 and body["reason"] == "task revoked"
    assert reached(upstream, tag) == 1
    rec = gw.records_for(body["request_id"])[0]
    assert rec["task"] == task["task_id"] and rec["decision"] == "deny"
    assert rec["reason"] == "task revoked"


def test_revocation_inside_plain_keepalive_connection(ceiling_gateway: Gateway,
                                                      upstream: Upstream) -> None:
    gw = ceiling_gateway
    task = create_task(gw, upstream)
    with client(gw, task) as c:
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/k").status_code == 200
        revoke(gw, task["task_id"])
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/k")
    assert r.status_code == 407 and r.json()["reason"] == "task revoked"


def test_task_token_used_after_revocation(ceiling_gateway: Gateway,
                                          upstream: Upstream) -> None:
    gw = ceiling_gateway
    task = create_task(gw, upstream)
    revoke(gw, task["task_id"])
    again = revoke(gw, task["task_id"])  # idempotent
    assert again["status"] == "revoked"
    with client(gw, task) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/r")
        assert r.status_code == 407 and r.json()["reason"] == "task revoked"
        with pytest.raises(httpx.ProxyError, match="407"):
            c.get(f"https://localhost:{upstream.https_port}/allowed/r")  # refused at CONNECT


def _forge(token: str, **changes: Any) -> str:
    h, p, s = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims.update(changes)
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{h}.{body}.{s}"


@pytest.mark.parametrize("change", ["other-task", "longer-expiry", "other-workload",
                                    "bad-signature"])
def test_tampered_task_token_is_refused(ceiling_gateway: Gateway, upstream: Upstream,
                                        change: str) -> None:
    gw = ceiling_gateway
    mine = create_task(gw, upstream, max_calls=1)
    other = create_task(gw, upstream)
    claims = json.loads(base64.urlsafe_b64decode(mine["token"].split(".")[1] + "=="))
    if change == "other-task":
        forged = _forge(mine["token"], task=other["task_id"])
    elif change == "longer-expiry":
        forged = _forge(mine["token"], exp=claims["exp"] + 86400)
    elif change == "other-workload":
        forged = _forge(mine["token"], sub="spiffe://acme.test/agent/other")
    else:
        forged = mine["token"][:-4] + ("AAAA" if not mine["token"].endswith("AAAA") else "BBBB")
    with gw.client(forged) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/t")
    assert r.status_code == 407, r.text
    assert "signature does not verify" in r.json()["reason"]
    assert show(gw, mine["task_id"])["calls_used"] == 0


def test_task_id_in_proxy_user_is_not_trusted(ceiling_gateway: Gateway,
                                              upstream: Upstream) -> None:
    """The user part of proxy_url is a label; the token alone names the task."""
    gw = ceiling_gateway
    spent = create_task(gw, upstream, max_calls=1)
    fresh = create_task(gw, upstream, max_calls=5)
    url = f"http://{spent['task_id']}:{fresh['token']}@127.0.0.1:{gw.proxy_port}"
    with httpx.Client(proxy=url, trust_env=False, timeout=10) as c:
        assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/u").status_code == 200
    assert show(gw, fresh["task_id"])["calls_used"] == 1
    assert show(gw, spent["task_id"])["calls_used"] == 0


# -- restart ----------------------------------------------------------------------
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "crash"])
def test_restart_keeps_tasks_counters_and_revocations(tmp_path: Path,
                                                      shared_files: dict[str, Path],
                                                      upstream: Upstream,
                                                      how: signal.Signals) -> None:
    gw = Gateway(tmp_path, ceiling_config(shared_files, upstream)).start()
    try:
        budget = create_task(gw, upstream, max_calls=5)
        gone = create_task(gw, upstream)
        plain = create_task(gw, upstream, rules=[http_rule(upstream)])
        with client(gw, budget) as c:
            for i in range(3):
                assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/{i}"
                             ).status_code == 200
        revoke(gw, gone["task_id"])
        keys_before = (gw.home / "task-keys.json").read_text()
    finally:
        code = gw.stop(how)
    assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    before = gw
    gw = Gateway(tmp_path, before.config).start()  # same folder, same ports (its config)
    try:
        assert (gw.home / "task-keys.json").read_text() == keys_before
        state = show(gw, budget["task_id"])
        assert (state["calls_used"], state["calls_left"]) == (3, 2)
        assert show(gw, gone["task_id"])["status"] == "revoked"
        with client(gw, budget) as c:
            codes = [c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x").status_code
                     for _ in range(3)]
        assert codes == [200, 200, 403]
        with client(gw, gone) as c:
            r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
            assert r.status_code == 407 and r.json()["reason"] == "task revoked"
        with client(gw, plain) as c:  # tokens signed before the restart still verify
            assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x").status_code == 200
        assert show(gw, budget["task_id"])["calls_used"] == 5
    finally:
        gw.stop()


def test_token_from_another_gateway_is_refused(tmp_path: Path, shared_files: dict[str, Path],
                                               upstream: Upstream,
                                               ceiling_gateway: Gateway) -> None:
    """Each gateway home has its own signing key: a token from elsewhere is worthless."""
    other = Gateway(tmp_path, ceiling_config(shared_files, upstream)).start()
    try:
        foreign = create_task(other, upstream)
    finally:
        other.stop()
    with ceiling_gateway.client(foreign["token"]) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/f")
    assert r.status_code == 407
    assert r.json()["reason"] == "task token is signed with a key taskgate does not hold"


def test_key_rotation_keeps_old_tokens_working(tmp_path: Path, shared_files: dict[str, Path],
                                               upstream: Upstream) -> None:
    from tests.tasks_support import admin

    gw = Gateway(tmp_path, ceiling_config(shared_files, upstream)).start()
    try:
        old = create_task(gw, upstream)
        r = httpx.post(f"{gw.control_url}/v1/task-keys/rotate", headers=admin(gw))
        assert r.status_code == 200 and len(r.json()["keys"]) == 2
        new = create_task(gw, upstream)
        kid = json.loads(base64.urlsafe_b64decode(new["token"].split(".")[0] + "=="))["kid"]
        assert kid == r.json()["current"]
        for task in (old, new):
            with client(gw, task) as c:
                assert c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/k"
                             ).status_code == 200
        jwks = httpx.get(f"{gw.control_url}/v1/task-keys", headers=admin(gw)).json()
        assert {k["kid"] for k in jwks["keys"]} >= {kid}
        assert all("d" not in k for k in jwks["keys"])  # public halves only
    finally:
        gw.stop()
