"""Revocation of minted credentials that fails, end to end: the real gateway, tasks on
its control plane, the Vault and GitHub stand-ins failing revocations on demand
(503, or a reset connection) and then succeeding.

A credential whose revocation fails stays on its task (``GET /v1/tasks/{id}``,
``taskgate task show``) as pending until it is revoked or expires; every attempt
is an audit record and a count in /metrics; a pending revocation survives a
restart (kept in the state store, sealed) and is tried at shutdown. The last
test scans everything the gateway wrote or said for any secret value.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.standins import EchoApi, GitHubServer, VaultServer, rsa_key_pem, server_tls, spellings
from tests.support import AUDIENCE, ISSUER, PYTHON, WORKLOAD, Gateway, python_env

APP_ID, INSTALLATION = "4242", "77"
RECEIVED: list[bytes] = []  # every answer the orchestrator got here, and the CLI's output
BACKOFF = {"revoke_backoff_seconds": 0.05, "revoke_max_backoff_seconds": 0.3}


@dataclass
class World:
    gw: Gateway
    api: EchoApi
    github: GitHubServer
    vault: VaultServer
    admin: dict[str, str]

    def issues(self) -> str:
        return f"https://localhost:{self.github.https_port}/repos/acme/widgets/issues"

    def db(self) -> str:
        return f"https://localhost:{self.api.https_port}/db/echo"

    def canaries(self) -> set[str]:
        return {self.vault.vault_token, *(t.token for t in self.github.tokens),
                *(x.value for x in self.vault.leases), *(x.lease_id for x in self.vault.leases)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA,
          shared_files: dict[str, Path]) -> Iterator[World]:
    tls = server_tls(test_ca)
    private, public = rsa_key_pem()
    outside = tmp_path_factory.mktemp("revocation-provider-creds")
    (outside / "app.pem").write_bytes(private)
    servers = [EchoApi(tls), GitHubServer(tls, public, APP_ID, INSTALLATION), VaultServer(tls)]
    api, github, vault = servers
    for s in servers:
        s.start()
    (outside / "vault-token").write_text(vault.vault_token)
    config = {
        "upstream": {"ca_file": str(shared_files["upstream_ca"])},
        "identity": {"issuers": [{"issuer": ISSUER, "audience": AUDIENCE,
                                  "jwks_file": str(shared_files["jwks"])}]},
        "secrets": {
            "github": {"provider": "github_app", "app_id": APP_ID,
                       "installation_id": INSTALLATION,
                       "private_key_file": str(outside / "app.pem"),
                       "api_url": f"https://localhost:{github.https_port}", **BACKOFF},
            "vault-db": {"provider": "vault", "engine": "dynamic",
                         "address": f"https://localhost:{vault.https_port}",
                         "token_file": str(outside / "vault-token"),
                         "path": "database/creds/readonly", "field": "password",
                         "inject": {"header": "Authorization", "value": "Bearer {token}"},
                         **BACKOFF},
        },
        "workloads": {WORKLOAD: {"owner": "platform@acme.test", "ceiling": [
            {"id": "gh", "host": "localhost", "allow_private": True,
             "port": github.https_port, "methods": ["GET"],
             "paths": ["/repos/acme/**"], "secret": "github", "repositories": ["widgets"],
             "permissions": {"issues": "read"}},
            {"id": "db", "host": "localhost", "allow_private": True,
             "port": api.https_port, "methods": ["GET"],
             "paths": ["/db/**"], "secret": "vault-db"},
        ]}},
    }
    gw = Gateway(tmp_path_factory.mktemp("gw-revocation"), config).start()
    admin = {"Authorization": f"Bearer {(gw.home / 'admin-token').read_text().strip()}"}
    try:
        yield World(gw, api, github, vault, admin)
    finally:
        gw.stop()
        for s in servers:
            s.stop()


# -- helpers ----------------------------------------------------------------------
def kept(r: httpx.Response) -> httpx.Response:
    RECEIVED.append(r.content)
    return r


def gh_rule(w: World) -> dict[str, Any]:
    return {"id": "gh-read", "host": "localhost", "allow_private": True,
            "port": w.github.https_port,
            "methods": ["GET"], "paths": ["/repos/acme/*/issues"], "secret": "github",
            "repositories": ["widgets"], "permissions": {"issues": "read"}}


def db_rule(w: World) -> dict[str, Any]:
    return {"id": "db-read", "host": "localhost", "allow_private": True, "port": w.api.https_port,
            "methods": ["GET"], "paths": ["/db/**"], "secret": "vault-db"}


def new_task(w: World, *rules: dict[str, Any]) -> dict[str, Any]:
    r = kept(httpx.post(f"{w.gw.control_url}/v1/tasks", headers=w.admin, timeout=10,
                        json={"workload": WORKLOAD, "ttl_seconds": 300, "rules": list(rules),
                              "owner": "alice@acme.test"}))
    assert r.status_code == 201, r.text
    return r.json()


def use(w: World, task: dict[str, Any], url: str) -> None:
    with httpx.Client(proxy=task["proxy_url"], verify=w.gw.ssl_context(), timeout=10,
                      trust_env=False) as c:
        r = c.get(url)
    assert r.status_code == 200, r.text


def mint_vault(w: World, task: dict[str, Any]) -> str:
    """Make the task use its Vault secret; the lease id minted for it."""
    before = len(w.vault.leases)
    use(w, task, w.db())
    assert len(w.vault.leases) == before + 1
    return w.vault.leases[-1].lease_id


def mint_github(w: World, task: dict[str, Any]) -> str:
    before = len(w.github.tokens)
    use(w, task, w.issues())
    assert len(w.github.tokens) == before + 1
    return w.github.tokens[-1].token


def vault_lease(w: World, lease_id: str) -> Any:
    return next(x for x in w.vault.leases if x.lease_id == lease_id)


def revoke(w: World, task: dict[str, Any]) -> dict[str, Any]:
    r = kept(httpx.delete(f"{w.gw.control_url}/v1/tasks/{task['task_id']}", headers=w.admin,
                          timeout=30))
    assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
    return r.json()


def show(w: World, task: dict[str, Any]) -> dict[str, Any]:
    r = kept(httpx.get(f"{w.gw.control_url}/v1/tasks/{task['task_id']}", headers=w.admin,
                       timeout=10))
    assert r.status_code == 200, r.text
    return r.json()


def cli_show(w: World, task: dict[str, Any]) -> str:
    out = subprocess.run([*PYTHON, "-m", "proxy", "task", "show", "-c", str(w.gw.config_path),
                          task["task_id"]], cwd=w.gw.dir, env=python_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    RECEIVED.append(out.stdout.encode() + out.stderr.encode())
    return out.stdout


def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.05)


def revocation_records(w: World, task: dict[str, Any], secret: str) -> list[dict[str, Any]]:
    return [r for r in w.gw.audit() if r["task"] == task["task_id"] and r["secret"] == secret
            and (r["reason"] or "").startswith("secret revocation:")]


def metric(w: World, name: str, **labels: str) -> float:
    text = kept(httpx.get(f"{w.gw.control_url}/metrics", timeout=10)).text
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")) == labels:
            return float(m.group(2))
    return 0.0


def stored_credentials(w: World, tasks: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Rows of the store's credential table for ``tasks`` (the gateway is stopped)."""
    ids = {t["task_id"] for t in tasks}
    with sqlite3.connect(w.gw.home / "tasks.db") as db:
        rows = db.execute("SELECT task, secret, kind, state, attempts, handle "
                          "FROM secret_credentials").fetchall()
    return [r for r in rows if r[0] in ids]


KINDS = {"vault-db": "vault_lease", "github": "github_installation_token"}
FAILED = {"503": "the provider refused the request (HTTP 503)",
          "reset": "the provider could not be reached",
          "stopped": "no answer before the gateway stopped"}


def assert_attempt_records(recs: list[dict[str, Any]], secret: str, mode: str,
                           failures: int | None = None, *, shutdown: bool = False) -> int:
    """Failed attempts (``failures`` of them, if given) as ``error`` records, then one
    ``allow``: the revocation call named, the value never. Returns how many failed.

    A reset connection is not always a failed attempt: aiohttp sends an idempotent
    request (PUT, DELETE) once more when a kept-alive connection is reset. With
    ``shutdown``, one attempt may have been cut off by the end of the shutdown (its
    record says so; the issuer may not have seen it: one record more)."""
    k = len(recs) - 1
    assert k >= 0 and [r["decision"] for r in recs] == ["error"] * k + ["allow"], recs
    assert failures is None or k == failures or (shutdown and k == failures + 1), \
        (k, failures)
    cut = [i for i, r in enumerate(recs[:-1]) if FAILED["stopped"] in r["reason"]]
    assert len(cut) <= (1 if shutdown else 0), recs
    kind = KINDS[secret]
    method, path = (("PUT", "/v1/sys/leases/revoke") if secret == "vault-db"
                    else ("DELETE", "/installation/token"))
    for i, rec in enumerate(recs[:-1], start=1):
        why = FAILED["stopped"] if i - 1 in cut else FAILED[mode]
        assert rec["reason"].startswith(f"secret revocation: {kind} of secret {secret!r}: "
                                        f"attempt {i} failed: {why}; next attempt in"), rec
    assert recs[-1]["reason"] == (f"secret revocation: {kind} of secret {secret!r} revoked "
                                  f"(attempt {k + 1})")
    for rec in recs:
        assert (rec["method"], rec["path"], rec["host"], rec["scheme"]) == (
            method, path, "localhost", "https"), rec
        assert rec["workload"] == WORKLOAD and rec["owner"] == "alice@acme.test"
        assert rec["rule"] is None and rec["status"] is None and rec["seq"] and rec["hash"]
    return k


def seconds(rec: dict[str, Any]) -> float:
    return datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC).timestamp()


# -- 1. retried until revoked ----------------------------------------------------------
def test_a_failing_revocation_is_retried_shown_on_the_task_then_gone(world: World) -> None:
    """Vault answers 503 for as long as it takes to look: the lease is pending on the
    task (API and CLI), counted, and revoked once Vault answers again."""
    w, vault = world, world.vault
    task = new_task(w, db_rule(w))
    lease_id = mint_vault(w, task)
    live = show(w, task)["credentials"]
    assert [(c["secret"], c["kind"], c["state"], c["attempts"]) for c in live] == [
        ("vault-db", "vault_lease", "live", 0)]
    failed = metric(w, "taskgate_secret_revocations_total", secret="vault-db",
                    outcome="failed")
    revoked = metric(w, "taskgate_secret_revocations_total", secret="vault-db",
                     outcome="revoked")
    vault.fail_revocations(10_000)
    try:
        body = revoke(w, task)  # the first attempt ran and failed
        [cred] = body["credentials"]
        assert cred["state"] == "pending_revocation" and cred["attempts"] >= 1, cred
        assert cred["last_error"] == FAILED["503"] and cred["next_attempt_at"]
        eventually(lambda: len(vault.attempts_for(lease_id)) >= 3, "three attempts")
        [cred] = show(w, task)["credentials"]
        assert cred["state"] == "pending_revocation" and cred["attempts"] >= 3, cred
        assert cred["expires_at"] and cred["secret"] == "vault-db"
        assert set(cred) == {"secret", "kind", "state", "issued_at", "expires_at",
                             "attempts", "last_error", "next_attempt_at"}
        printed = cli_show(w, task)
        assert "credentials\n  - vault-db (vault_lease): pending revocation, expires " \
            in printed, printed
        assert f"last error: {FAILED['503']}" in printed
        assert metric(w, "taskgate_secret_revocations_pending") >= 1
        assert not vault_lease(w, lease_id).revoked
    finally:
        vault.fail_revocations(0)
    eventually(lambda: vault_lease(w, lease_id).revoked, "the lease revoked")
    eventually(lambda: show(w, task)["credentials"] == [], "the credential gone")
    assert "credentials  none live, none pending revocation" in cli_show(w, task)
    attempts = vault.attempts_for(lease_id)
    assert attempts[-1] == "ok" and set(attempts[:-1]) == {"503"}
    recs = revocation_records(w, task, "vault-db")
    assert_attempt_records(recs, "vault-db", "503", len(attempts) - 1)
    assert metric(w, "taskgate_secret_revocations_total", secret="vault-db",
                  outcome="failed") == failed + len(attempts) - 1
    assert metric(w, "taskgate_secret_revocations_total", secret="vault-db",
                  outcome="revoked") == revoked + 1
    assert metric(w, "taskgate_secret_revocations_pending") == 0


@pytest.mark.parametrize("mode", ["503", "reset"])
@pytest.mark.parametrize("secret", ["vault-db", "github"])
def test_the_first_revocations_fail_then_one_succeeds(world: World, secret: str,
                                                      mode: str) -> None:
    """The issuer fails the first three revocations (503, or a reset connection):
    an ``error`` record per failed attempt, with backoff between them, then the
    revocation."""
    w = world
    standin = w.vault if secret == "vault-db" else w.github
    task = new_task(w, db_rule(w) if secret == "vault-db" else gh_rule(w))
    subject = mint_vault(w, task) if secret == "vault-db" else mint_github(w, task)
    standin.fail_revocations(3, mode)
    try:
        revoke(w, task)
        eventually(lambda: standin.attempts_for(subject)[-1:] == ["ok"], "revoked")
    finally:
        standin.fail_revocations(0)
    assert standin.attempts_for(subject) == [mode] * 3 + ["ok"]
    if secret == "vault-db":
        assert vault_lease(w, subject).revoked
    else:
        assert subject in w.github.revocations
    eventually(lambda: show(w, task)["credentials"] == [], "the credential gone")
    recs = revocation_records(w, task, secret)
    failed = assert_attempt_records(recs, secret, mode, 3 if mode == "503" else None)
    assert failed >= 1
    # Backoff: not hammered back to back (the first wait is 0.025 to 0.05 s here). With a
    # reset, aiohttp's own second try follows at once: the records' times are compared.
    if mode == "503":
        times = [t for s, _, t in standin.revocation_attempts if s == subject]
        assert all(b - a >= 0.02 for a, b in zip(times, times[1:], strict=False)), times
    else:
        times = [seconds(r) for r in recs]
        assert all(b - a >= 0.01 for a, b in zip(times, times[1:], strict=False)), times


# -- 2. expiry ends the retries ----------------------------------------------------------
@pytest.mark.parametrize("secret", ["vault-db", "github"])
def test_a_credential_that_expires_before_it_is_revoked_is_recorded_expired(
        world: World, secret: str) -> None:
    w = world
    standin: Any = w.vault if secret == "vault-db" else w.github
    lifetime = "lease_duration" if secret == "vault-db" else "lifetime"
    old = getattr(standin, lifetime)
    setattr(standin, lifetime, 3)
    try:
        task = new_task(w, db_rule(w) if secret == "vault-db" else gh_rule(w))
        subject = mint_vault(w, task) if secret == "vault-db" else mint_github(w, task)
    finally:
        setattr(standin, lifetime, old)
    expired = metric(w, "taskgate_secret_revocations_total", secret=secret, outcome="expired")
    standin.fail_revocations(10_000)
    try:
        revoke(w, task)
        eventually(lambda: any(r["reason"].endswith("nothing left to revoke")
                               for r in revocation_records(w, task, secret)), "expired", 8)
        eventually(lambda: show(w, task)["credentials"] == [], "the credential gone")
        tries = len(standin.attempts_for(subject))
        time.sleep(0.8)  # more than the longest backoff: no attempt follows
        assert len(standin.attempts_for(subject)) == tries >= 1
    finally:
        standin.fail_revocations(0)
    recs = revocation_records(w, task, secret)
    assert [r["decision"] for r in recs] == ["error"] * (tries + 1)
    assert recs[-1]["reason"] == (f"secret revocation: {KINDS[secret]} of secret {secret!r} "
                                  f"expired before it could be revoked ({tries} attempts "
                                  "failed); nothing left to revoke")
    assert metric(w, "taskgate_secret_revocations_total", secret=secret,
                  outcome="expired") == expired + 1


# -- 3. shutdown and restart -----------------------------------------------------------------
def test_live_credentials_are_revoked_at_shutdown_even_after_a_failure(world: World) -> None:
    w = world
    task = new_task(w, db_rule(w), gh_rule(w))
    lease_id, token = mint_vault(w, task), mint_github(w, task)
    w.vault.fail_revocations(1, "503")
    w.github.fail_revocations(1, "503")
    try:
        assert w.gw.stop() == 0
    finally:
        w.vault.fail_revocations(0)
        w.github.fail_revocations(0)
        stored = stored_credentials(w, [task])
        w.gw.start()
    assert w.vault.attempts_for(lease_id) == ["503", "ok"] and vault_lease(w, lease_id).revoked
    assert w.github.attempts_for(token) == ["503", "ok"] and token in w.github.revocations
    assert stored == []  # nothing left for the next start
    assert_attempt_records(revocation_records(w, task, "vault-db"), "vault-db", "503", 1)
    assert_attempt_records(revocation_records(w, task, "github"), "github", "503", 1)


def test_pending_revocations_survive_a_restart_and_are_retried(world: World) -> None:
    """One task ended with its revocations failing, another still live: both issuers
    are down through the shutdown too. The store keeps all three credentials, sealed;
    the next start revokes them."""
    w = world
    ended = new_task(w, db_rule(w), gh_rule(w))
    ended_lease, ended_token = mint_vault(w, ended), mint_github(w, ended)
    live = new_task(w, db_rule(w))
    live_lease = mint_vault(w, live)
    w.vault.fail_revocations(10_000)
    w.github.fail_revocations(10_000, "reset")
    try:
        body = revoke(w, ended)
        assert sorted((c["secret"], c["state"]) for c in body["credentials"]) == [
            ("github", "pending_revocation"), ("vault-db", "pending_revocation")]
        assert w.gw.stop() == 0  # tries them all for a few seconds, in vain
        rows = stored_credentials(w, [ended, live])
    finally:
        w.vault.fail_revocations(0)
        w.github.fail_revocations(0)
    assert sorted((r[1], r[2], r[3]) for r in rows) == [
        ("github", "github_installation_token", "pending"),
        ("vault-db", "vault_lease", "pending"), ("vault-db", "vault_lease", "pending")]
    assert all(r[4] >= 2 for r in rows), rows  # at task end and at shutdown, at least
    sealed = b"".join(r[5] for r in rows)
    for value in (ended_lease, ended_token, live_lease):
        assert not any(s in sealed for s in spellings(value))
    fails = {s: len(w.vault.attempts_for(s)) for s in (ended_lease, live_lease)}
    w.gw.start()
    eventually(lambda: vault_lease(w, ended_lease).revoked
               and vault_lease(w, live_lease).revoked
               and ended_token in w.github.revocations, "revoked after the restart")
    for task in (ended, live):
        eventually(lambda task=task: show(w, task)["credentials"] == [], "credentials gone")
    assert w.vault.attempts_for(live_lease) == ["503"] * fails[live_lease] + ["ok"]
    assert_attempt_records(revocation_records(w, ended, "vault-db"), "vault-db", "503",
                           fails[ended_lease], shutdown=True)
    assert assert_attempt_records(revocation_records(w, ended, "github"), "github",
                                  "reset", shutdown=True) >= 2
    assert_attempt_records(revocation_records(w, live, "vault-db"), "vault-db", "503",
                           fails[live_lease], shutdown=True)
    assert show(w, live)["status"] == "active"  # the task lives on; its old lease does not
    assert mint_vault(w, live) != live_lease


# -- 4. never leaked ---------------------------------------------------------------------
def test_no_secret_value_in_records_logs_store_or_answers(world: World) -> None:
    w = world
    metrics = kept(httpx.get(f"{w.gw.control_url}/metrics", timeout=5))
    assert 'taskgate_secret_revocations_total{outcome="revoked",secret="vault-db"}' \
        in metrics.text  # counts of this run (the restart before reset them)
    assert "taskgate_secret_revocations_pending 0.0" in metrics.text
    kept(httpx.get(f"{w.gw.control_url}/v1/tasks?limit=1000", headers=w.admin, timeout=5))
    assert w.gw.stop() == 0
    blobs = {"gateway output": w.gw.output().encode()}
    for f in w.gw.dir.rglob("*"):
        if f.is_file():
            blobs[str(f.relative_to(w.gw.dir))] = f.read_bytes()
    blobs.update({f"answer {i}": b for i, b in enumerate(RECEIVED)})
    assert any(n.endswith("tasks.db") for n in blobs) and len(RECEIVED) > 20
    canaries = w.canaries()
    assert len(canaries) >= 20
    leaks = [(name, value[:12]) for value in canaries for spelling in spellings(value)
             for name, blob in blobs.items() if spelling in blob]
    assert leaks == []
    w.gw.start()
