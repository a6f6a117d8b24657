"""Minted credentials with shared state: revoked exactly once at task end, whichever
replica minted them and whichever noticed the end — also when the minting replica was
killed (another takes its credentials over). Two gateways, one private Redis, the
GitHub App stand-in."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.redis_support import RedisServer, redis_available
from tests.standins import GitHubServer, rsa_key_pem, server_tls
from tests.support import AUDIENCE, ISSUER, WORKLOAD, Gateway

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")

APP_ID, INSTALLATION = "4242", "77"


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    github: GitHubServer

    def admin(self, gw: Gateway) -> dict[str, str]:
        return {"Authorization": f"Bearer {(gw.home / 'admin-token').read_text().strip()}"}

    def issues(self) -> str:
        return f"https://localhost:{self.github.https_port}/repos/acme/widgets/issues"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA,
         shared_files: dict[str, Path]) -> Iterator[Pair]:
    private, public = rsa_key_pem()
    outside = tmp_path_factory.mktemp("cred-provider")
    (outside / "app.pem").write_bytes(private)
    github = GitHubServer(server_tls(test_ca), public, APP_ID, INSTALLATION)
    github.start()
    redis = RedisServer()
    redis.start()
    sealing_key = base64.b64encode(os.urandom(32)) + b"\n"  # the same on every replica
    gws = []
    for name in ("a", "b"):
        d = tmp_path_factory.mktemp(f"gw-cred-{name}")
        (d / ".taskgate").mkdir(mode=0o700)
        fd = os.open(d / ".taskgate" / "revocation.key", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, sealing_key)
        os.close(fd)
        gws.append(Gateway(d, {
            "upstream": {"ca_file": str(shared_files["upstream_ca"])},
            "identity": {"issuers": [{"issuer": ISSUER, "audience": AUDIENCE,
                                      "jwks_file": str(shared_files["jwks"])}]},
            "state": {"backend": "redis", "redis_url": redis.url},
            "replica_id": name,
            "secrets": {"github": {
                "provider": "github_app", "app_id": APP_ID, "installation_id": INSTALLATION,
                "private_key_file": str(outside / "app.pem"),
                "api_url": f"https://localhost:{github.https_port}",
                "revoke_backoff_seconds": 0.05, "revoke_max_backoff_seconds": 0.3}},
            "workloads": {WORKLOAD: {"owner": "platform@acme.test", "ceiling": [
                {"id": "gh", "host": "localhost", "allow_private": True,
                 "port": github.https_port, "methods": ["GET"], "paths": ["/repos/acme/**"],
                 "secret": "github", "repositories": ["widgets"],
                 "permissions": {"issues": "read"}}]}},
        }).start(wait=False))
    try:
        for gw in gws:
            gw.wait_ready()
        yield Pair(gws[0], gws[1], github)
    finally:
        for gw in gws:
            gw.stop()
        redis.close()
        github.stop()


def _task(p: Pair, gw: Gateway) -> dict[str, Any]:
    rule = {"id": "gh-read", "host": "localhost", "allow_private": True,
            "port": p.github.https_port, "methods": ["GET"], "paths": ["/repos/acme/*/issues"],
            "secret": "github", "repositories": ["widgets"], "permissions": {"issues": "read"}}
    r = httpx.post(f"{gw.control_url}/v1/tasks", headers=p.admin(gw), timeout=10,
                   json={"workload": WORKLOAD, "ttl_seconds": 300, "rules": [rule]})
    assert r.status_code == 201, r.text
    return r.json()


def _mint(p: Pair, gw: Gateway, task: dict[str, Any]) -> str:
    before = len(p.github.tokens)
    with httpx.Client(proxy=gw.proxy_url_with(task["token"]), verify=gw.ssl_context(),
                      timeout=10, trust_env=False) as c:
        assert c.get(p.issues()).status_code == 200
    assert len(p.github.tokens) == before + 1
    return p.github.tokens[-1].token


def _revoked_records(gw: Gateway, task_id: str) -> list[dict[str, Any]]:
    return [r for r in gw.audit() if r.get("task") == task_id
            and str(r.get("reason", "")).startswith("secret revocation")]


def _eventually(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_minted_on_a_revoked_once_when_b_ends_the_task(pair: Pair) -> None:
    p = pair
    task = _task(p, p.a)
    token = _mint(p, p.a, task)
    r = httpx.delete(f"{p.b.control_url}/v1/tasks/{task['task_id']}", headers=p.admin(p.b),
                     timeout=10)
    assert r.status_code == 200, r.text
    _eventually(lambda: token in p.github.revocations, 5)
    time.sleep(0.5)
    assert p.github.revocations.count(token) == 1
    recs = _revoked_records(p.a, task["task_id"]) + _revoked_records(p.b, task["task_id"])
    assert [r["decision"] for r in recs] == ["allow"], recs


def test_minted_on_a_killed_taken_over_and_revoked_once_by_b(pair: Pair) -> None:
    p = pair
    task = _task(p, p.a)
    token = _mint(p, p.a, task)
    p.a.stop(signal.SIGKILL)  # no shutdown revocation: the credential stays live
    assert token not in p.github.revocations
    r = httpx.delete(f"{p.b.control_url}/v1/tasks/{task['task_id']}", headers=p.admin(p.b),
                     timeout=10)
    assert r.status_code == 200, r.text
    # A's heartbeat expires (5 s), B looks for orphans every 5 s, then revokes.
    _eventually(lambda: token in p.github.revocations, 20)
    time.sleep(0.5)
    assert p.github.revocations.count(token) == 1
    recs = _revoked_records(p.b, task["task_id"])
    assert [r["decision"] for r in recs] == ["allow"], recs
