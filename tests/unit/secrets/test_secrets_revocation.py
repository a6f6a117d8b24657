"""Revocation bookkeeping in process: the backoff, the sealing of what the store keeps,
the config keys, and the broker's jobs under failure (a bug in the retry loop, in
one attempt, in a fetch; a store that cannot record; a handle that does not open;
a credential expired before its task ended) — against the Vault stand-in, with
the real state store and audit log. End to end: tests/e2e/test_revocation.py.
"""

from __future__ import annotations

import base64
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from proxy.audit import AuditLog
from proxy.config._model import parse_config
from proxy.gateway import trust_bundle
from proxy.gateway._upstream import client_session
from proxy.identity import Caller
from proxy.policy import Rule, parse_rule
from proxy.secrets import ProviderError, SecretBroker, SecretValue, parse_secret
from proxy.secrets.revocation import backoff
from proxy.secrets.seal import Sealer
from proxy.store import TaskStore
from tests.standins import VaultServer, server_tls
from tests.support import ISSUER, WORKLOAD


# -- the backoff --------------------------------------------------------------------
@pytest.mark.parametrize(("attempts", "first", "cap", "draw", "expected"), [
    (1, 1.0, 300.0, 0.0, 0.5),      # half of the first wait at the least
    (1, 1.0, 300.0, 1.0, 1.0),      # all of it at the most
    (2, 1.0, 300.0, 1.0, 2.0),      # doubled per failure
    (5, 1.0, 300.0, 1.0, 16.0),
    (5, 1.0, 300.0, 0.5, 12.0),
    (9, 1.0, 300.0, 1.0, 256.0),
    (10, 1.0, 300.0, 1.0, 300.0),   # capped
    (10, 1.0, 300.0, 0.0, 150.0),
    (10_000, 1.0, 300.0, 1.0, 300.0),  # no overflow, however long it fails
    (3, 0.05, 0.3, 1.0, 0.2),
    (4, 0.05, 0.3, 1.0, 0.3),
    (0, 2.0, 10.0, 1.0, 2.0),       # before any failure: the first wait
])
def test_backoff_doubles_with_jitter_up_to_the_cap(attempts: int, first: float, cap: float,
                                                   draw: float, expected: float) -> None:
    assert backoff(attempts, first, cap, lambda: draw) == pytest.approx(expected)


def test_backoff_jitter_spreads_retries() -> None:
    import random

    rng = random.Random(7)
    waits = {round(backoff(6, 1.0, 300.0, rng.random), 6) for _ in range(50)}
    assert len(waits) > 40 and all(16.0 <= w <= 32.0 for w in waits)


# -- sealing --------------------------------------------------------------------------
def _tampered(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


@pytest.mark.parametrize(("name", "change"), [
    ("another row", lambda blob, ctx, key: (blob, ctx + b"x", key)),
    ("no context", lambda blob, ctx, key: (blob, b"", key)),
    ("another key", lambda blob, ctx, key: (blob, ctx, os.urandom(32))),
    ("a flipped bit", lambda blob, ctx, key: (_tampered(blob), ctx, key)),
    ("cut short", lambda blob, ctx, key: (blob[:20], ctx, key)),
    ("empty", lambda blob, ctx, key: (b"", ctx, key)),
    ("another nonce", lambda blob, ctx, key: (os.urandom(12) + blob[12:], ctx, key)),
])
def test_a_sealed_handle_opens_only_as_sealed(name: str, change: Callable[..., Any]) -> None:
    key = os.urandom(32)
    ctx = b"row-1\0vault-db\0vault_lease"
    blob = Sealer(key).seal(SecretValue("database/creds/readonly/abc123"), ctx)
    assert b"abc123" not in blob
    assert Sealer(key).open(blob, ctx).reveal() == "database/creds/readonly/abc123"
    blob2, ctx2, key2 = change(blob, ctx, key)
    with pytest.raises(ValueError, match="does not open"):
        Sealer(key2).open(blob2, ctx2)


def test_the_sealing_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "revocation.key")
    first = Sealer.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    blob = first.seal(SecretValue("ghs_token"), b"c")
    again = Sealer.load_or_create(path)  # never overwritten
    assert again.open(blob, b"c").reveal() == "ghs_token"
    assert repr(again) == "Sealer([secure])"


@pytest.mark.parametrize("content", [b"not base64 !", base64.b64encode(b"short"), b""])
def test_an_unusable_sealing_key_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "revocation.key"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        Sealer.load_or_create(str(path))


# -- the config keys ----------------------------------------------------------------------
VAULT = {"provider": "vault", "engine": "dynamic", "address": "https://vault.test",
         "token_env": "VAULT_TOKEN", "path": "database/creds/ro", "field": "password"}


@pytest.mark.parametrize(("extra", "first", "cap"), [
    ({}, 1.0, 300.0),
    ({"revoke_backoff_seconds": 0.05, "revoke_max_backoff_seconds": 0.3}, 0.05, 0.3),
    ({"revoke_backoff_seconds": 5}, 5.0, 300.0),
    ({"revoke_max_backoff_seconds": 3600}, 1.0, 3600.0),
    ({"revoke_backoff_seconds": 2, "revoke_max_backoff_seconds": 2}, 2.0, 2.0),
])
def test_revoke_backoff_keys(extra: dict[str, Any], first: float, cap: float) -> None:
    spec = parse_secret("db", {**VAULT, **extra})
    assert (spec.revoke_backoff_seconds, spec.revoke_max_backoff_seconds) == (first, cap)


@pytest.mark.parametrize(("data", "message"), [
    ({**VAULT, "revoke_backoff_seconds": 0}, "revoke_backoff_seconds: 0 is not a number"),
    ({**VAULT, "revoke_backoff_seconds": -1}, "revoke_backoff_seconds: -1 is not a number"),
    ({**VAULT, "revoke_backoff_seconds": "1"}, "revoke_backoff_seconds: '1' is not a number"),
    ({**VAULT, "revoke_backoff_seconds": True}, "revoke_backoff_seconds: True is not"),
    ({**VAULT, "revoke_max_backoff_seconds": 100_000}, "revoke_max_backoff_seconds: 100000"),
    ({**VAULT, "revoke_backoff_seconds": 10, "revoke_max_backoff_seconds": 5},
     "revoke_max_backoff_seconds: 5 is less than revoke_backoff_seconds (10)"),
    ({"provider": "env", "var": "X", "revoke_backoff_seconds": 1},
     "revoke_backoff_seconds: unknown key for provider 'env'"),
    ({"provider": "oauth2_client_credentials", "token_url": "https://t.test/token",
      "client_id": "c", "client_secret_env": "S", "revoke_max_backoff_seconds": 1},
     "revoke_max_backoff_seconds: unknown key for provider"),
])
def test_bad_revoke_backoff_keys_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^secrets.db." + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_secret("db", data)


# -- the broker's jobs under failure ------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    broker: SecretBroker
    store: TaskStore
    audit: AuditLog
    vault: VaultServer
    home: Path
    errors: list[str] = field(default_factory=list)
    outcomes: list[tuple[str, str]] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        path = Path(self.audit.path)
        return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []

    def rows(self) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.home / "tasks.db") as db:
            return db.execute("SELECT task, state, attempts, handle FROM "
                              "secret_credentials").fetchall()


@pytest.fixture(scope="module")
def vault(test_ca: trustme.CA) -> Iterator[VaultServer]:
    server = VaultServer(server_tls(test_ca)).start()
    yield server
    server.stop()


def _config(home: Path, vault: VaultServer, shared_files: dict[str, Path]) -> Any:
    token = home / "vault-token"
    token.write_text(vault.vault_token)
    common = {"provider": "vault", "engine": "dynamic",
              "address": f"https://localhost:{vault.https_port}", "token_file": str(token),
              "path": "database/creds/readonly", "field": "password",
              "revoke_backoff_seconds": 0.02, "revoke_max_backoff_seconds": 0.1}
    return parse_config({"home": str(home), "audit": {"path": str(home / "audit.jsonl")},
                         "upstream": {"ca_file": str(shared_files["upstream_ca"])},
                         "secrets": {"vault-db": common, "vault-other": common}}, "<test>")


@pytest.fixture
async def rig_factory(tmp_path: Path, vault: VaultServer, shared_files: dict[str, Path]
                      ) -> AsyncIterator[Callable[..., Any]]:
    home = tmp_path / "home"
    home.mkdir()
    config = _config(home, vault, shared_files)
    session = client_session(config, trust_bundle(config))
    made: list[Rig] = []

    async def make(clock: Any = time.time, secrets: Any = None) -> Rig:
        store = TaskStore(str(home / "tasks.db"))
        await store.start()
        audit = AuditLog(str(home / "audit.jsonl"))
        await audit.start()
        broker = SecretBroker(secrets or config.secrets, session, clock=clock, store=store,
                              key_path=str(home / "revocation.key"), audit=audit.write)
        rig = Rig(broker, store, audit, vault, home)
        broker.on_background_error = rig.errors.append
        broker.revocations.on_outcome = lambda s, o: rig.outcomes.append((s, o))
        broker.start()
        await broker.revocations.loaded()
        made.append(rig)
        return rig

    yield make
    vault.fail_revocations(0)
    for rig in made:
        await rig.broker.close(0.5)
        await rig.store.close()
        await rig.audit.close()
    await session.close()


def caller(task: str) -> Caller:
    return Caller(WORKLOAD, ISSUER, time.time() + 600, task=task)


def rule(name: str = "vault-db") -> Rule:
    return parse_rule({"id": "db", "host": "api.test", "methods": ["GET"], "secret": name})


async def eventually(check: Callable[[], bool], what: str, within: float = 5.0) -> None:
    import asyncio

    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.02)


def lease_of(vault: VaultServer, value: SecretValue) -> Any:
    return next(x for x in vault.leases if x.value == value.reveal())


async def test_a_minted_credential_is_in_the_store_sealed_until_revoked(
        rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    minted = await rig.broker.token("vault-db", caller("t-seal"), rule())
    lease = lease_of(rig.vault, minted.value)
    [(task, state, attempts, handle)] = rig.rows()
    assert (task, state, attempts) == ("t-seal", "live", 0)
    assert lease.lease_id.encode() not in handle and minted.value.reveal().encode() not in handle
    await rig.broker.task_ended("t-seal")
    assert lease.revoked and rig.rows() == [] and rig.outcomes == [("vault-db", "revoked")]


async def test_a_crashed_retry_loop_is_logged_counted_and_restarted(
        rig_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    rig = await rig_factory()
    revocations = rig.broker.revocations
    spawn, calls = revocations._spawn, []

    def crash_once(cred: Any) -> None:
        calls.append(cred)
        if len(calls) == 1:
            raise RuntimeError("a bug in the retry loop")
        spawn(cred)

    revocations._spawn = crash_once  # type: ignore[method-assign]
    minted = await rig.broker.token("vault-db", caller("t-loop"), rule())
    rig.vault.fail_revocations(1)
    await rig.broker.task_ended("t-loop")  # fails once: the loop takes over, and crashes
    await eventually(lambda: ("vault-db", "revoked") in rig.outcomes, "revoked anyway")
    assert lease_of(rig.vault, minted.value).revoked
    assert rig.errors == ["revocations"]
    assert "background job 'revocations' failed (1 times); restarting it" in caplog.text
    assert "a bug in the retry loop" in caplog.text  # the traceback is in the log
    assert rig.outcomes == [("vault-db", "failed"), ("vault-db", "revoked")]


async def test_a_bug_in_one_attempt_does_not_end_the_retries(
        rig_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    rig = await rig_factory()
    provider = rig.broker._providers["vault-db"]
    real, tries = provider.revoke, []

    async def broken(handle: SecretValue) -> None:
        tries.append(1)
        if len(tries) <= 2:
            raise KeyError("a bug in the provider")
        await real(handle)

    provider.revoke = broken  # type: ignore[method-assign]
    minted = await rig.broker.token("vault-db", caller("t-bug"), rule())
    await rig.broker.task_ended("t-bug")
    await eventually(lambda: ("vault-db", "revoked") in rig.outcomes, "revoked in the end")
    assert lease_of(rig.vault, minted.value).revoked
    assert rig.errors == ["revocation", "revocation"] and len(tries) == 3
    assert caplog.text.count("revoking a vault_lease failed unexpectedly") == 2
    assert "a bug in the provider" in caplog.text  # the traceback
    assert rig.outcomes == [("vault-db", "failed")] * 2 + [("vault-db", "revoked")]
    reasons = [r["reason"] for r in rig.records() if r["task"] == "t-bug"]
    assert reasons[0].startswith("secret revocation: vault_lease of secret 'vault-db': "
                                 "attempt 1 failed: the gateway failed while revoking it "
                                 "(see its log); next attempt in ")
    assert reasons[-1].endswith("revoked (attempt 3)") and len(reasons) == 3
    assert minted.value.reveal() not in caplog.text


async def test_an_unexpected_fetch_failure_is_said_counted_and_fails_closed(
        rig_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    rig = await rig_factory()
    provider = rig.broker._providers["vault-db"]
    real = provider.fetch

    async def broken(task: str | None, r: Rule) -> Any:
        raise AttributeError("a bug while fetching")

    provider.fetch = broken  # type: ignore[method-assign]
    with pytest.raises(ProviderError) as e:
        await rig.broker.token("vault-db", caller("t-fetch"), rule())
    assert e.value.kind == "internal" and e.value.status == 502
    assert str(e.value) == ("secret 'vault-db' is unavailable: the gateway failed while "
                            "fetching it (see its log)")
    assert rig.errors == ["fetch"] and "a bug while fetching" in caplog.text
    provider.fetch = real  # type: ignore[method-assign]
    minted = await rig.broker.token("vault-db", caller("t-fetch"), rule())  # fetched anew
    assert minted.value.reveal() == rig.vault.leases[-1].value


async def test_a_credential_the_store_cannot_record_is_revoked_and_not_handed_out(
        rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    await rig.store.close()  # every write fails from now on
    leases = len(rig.vault.leases)
    with pytest.raises(ProviderError) as e:
        await rig.broker.token("vault-db", caller("t-unrecorded"), rule())
    assert e.value.kind == "unrecorded" and e.value.status == 502
    assert len(rig.vault.leases) == leases + 1 and rig.vault.leases[-1].revoked
    assert "store" in rig.errors and rig.outcomes == [("vault-db", "revoked")]


async def test_a_credential_expired_before_its_task_ended_is_recorded_not_revoked(
        rig_factory: Callable[..., Any]) -> None:
    clock = Clock()
    rig = await rig_factory(clock=clock)
    minted = await rig.broker.token("vault-db", caller("t-old"), rule())
    lease = lease_of(rig.vault, minted.value)
    clock.now = minted.expires_at + 1  # type: ignore[operator]
    await rig.broker.task_ended("t-old")
    assert rig.vault.attempts_for(lease.lease_id) == [] and not lease.revoked
    assert rig.outcomes == [("vault-db", "expired")] and rig.rows() == []
    [rec] = [r for r in rig.records() if r["task"] == "t-old"]
    assert rec["decision"] == "error" and rec["secret"] == "vault-db"
    assert rec["reason"] == ("secret revocation: vault_lease of secret 'vault-db' expired "
                             "before it could be revoked (0 attempts failed); nothing left "
                             "to revoke")
    assert rig.broker.credentials("t-old") == []


async def test_what_an_earlier_run_left_is_revoked_or_abandoned_at_start(
        rig_factory: Callable[..., Any], tmp_path: Path) -> None:
    """Three credentials left pending by a run whose issuer was down: one revoked at
    the next start; one whose secret is gone from the config, and one whose sealed
    handle no longer opens, abandoned (recorded, forgotten: nothing can revoke them)."""
    first = await rig_factory()
    minted = {t: await first.broker.token(s, caller(t), rule(s))
              for t, s in (("t-a", "vault-db"), ("t-b", "vault-other"), ("t-c", "vault-db"))}
    first.vault.fail_revocations(10_000)
    await first.broker.close(0.2)
    first.vault.fail_revocations(0)
    rows = first.rows()
    assert sorted((r[0], r[1]) for r in rows) == [("t-a", "pending"), ("t-b", "pending"),
                                                  ("t-c", "pending")]
    with sqlite3.connect(first.home / "tasks.db") as db:  # t-c's handle: another row's
        handles = dict(db.execute("SELECT task, handle FROM secret_credentials"))
        db.execute("UPDATE secret_credentials SET handle = ? WHERE task = 't-c'",
                   (handles["t-a"],))
    await first.store.close()
    await first.audit.close()
    only_db = {k: v for k, v in first.broker.specs.items() if k == "vault-db"}
    second = await rig_factory(secrets=only_db)
    await eventually(lambda: second.rows() == [], "every stored credential settled")
    assert lease_of(second.vault, minted["t-a"].value).revoked
    assert not lease_of(second.vault, minted["t-b"].value).revoked
    assert not lease_of(second.vault, minted["t-c"].value).revoked
    assert sorted(second.outcomes) == [("vault-db", "abandoned"), ("vault-db", "revoked"),
                                       ("vault-other", "abandoned")]
    recs = {r["task"]: r for r in second.records()}  # each task's last: the outcome
    tried = {r[0]: r[2] for r in rows}  # attempts are counted across restarts
    assert recs["t-a"]["decision"] == "allow"
    assert recs["t-a"]["reason"].endswith(f"revoked (attempt {tried['t-a'] + 1})")
    assert recs["t-b"]["decision"] == recs["t-c"]["decision"] == "error"
    assert recs["t-b"]["reason"] == ("secret revocation: vault_lease of secret 'vault-other' "
                                     "cannot be revoked: the secret is no longer configured; "
                                     "it stays valid until it expires")
    assert recs["t-c"]["reason"].startswith("secret revocation: vault_lease of secret "
                                            "'vault-db' cannot be revoked: its stored handle "
                                            "does not open with ")
    text = (first.home / "audit.jsonl").read_bytes()
    for m in minted.values():
        assert m.value.reveal().encode() not in text


async def test_shutdown_tries_a_credential_whose_retry_was_queued_but_not_run(
        rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    minted = await rig.broker.token("vault-db", caller("t-queued"), rule())
    rig.vault.fail_revocations(1)
    await rig.broker.task_ended("t-queued")
    [cred] = rig.broker.revocations._pending.values()
    rig.broker.revocations._spawn(cred)  # the loop's next try: queued, cancelled unstarted
    await rig.broker.close(2.0)
    assert lease_of(rig.vault, minted.value).revoked and rig.rows() == []


async def test_shutdown_leaves_what_it_could_not_revoke_pending_in_the_store(
        rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    await rig.broker.token("vault-db", caller("t-live"), rule())
    rig.vault.fail_revocations(10_000)
    started = time.monotonic()
    await rig.broker.close(0.5)
    assert time.monotonic() - started < 1.5  # bounded
    [(task, state, attempts, _)] = rig.rows()
    assert (task, state) == ("t-live", "pending") and attempts >= 2
    assert rig.broker.credentials("t-live")[0]["state"] == "pending_revocation"
