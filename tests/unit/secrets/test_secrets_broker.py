"""The secret broker and its providers, in process, against the HTTPS stand-ins.

The gateway's services are built as ``taskgate run`` builds them (without
mitmproxy), with the gateway's own aiohttp session, so provider calls trust
exactly the bundle with ``upstream.ca_file``; task end is driven through the
task registry's ``notify_ended`` — what it runs when a task is revoked or expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.config._model import parse_config
from proxy.errors import Refused
from proxy.gateway import Services, build
from proxy.identity import Caller
from proxy.policy import Rule, parse_rule
from proxy.secrets import ProviderError, SecretBroker
from tests.standins import (
    GitHubServer,
    OAuthClient,
    OAuthServer,
    VaultServer,
    canary,
    rsa_key_pem,
    server_tls,
)
from tests.support import ISSUER, WORKLOAD, dead_port

APP_ID, INSTALLATION = "4242", "77"
CLIENT_SECRET = canary("clientsecret")


class Clock:
    """A clock the test moves; starts at the real time (the stand-ins check JWT times)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tls(test_ca: trustme.CA) -> Any:
    return server_tls(test_ca)


@pytest.fixture(scope="module")
def app_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    private, public = rsa_key_pem()
    path = tmp_path_factory.mktemp("ghkey") / "app.pem"
    path.write_bytes(private)
    return path, public


@pytest.fixture(scope="module")
def oauth(tls: Any) -> Iterator[OAuthServer]:
    server = OAuthServer(tls).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def github(tls: Any, app_key: tuple[Path, bytes]) -> Iterator[GitHubServer]:
    server = GitHubServer(tls, app_key[1], APP_ID, INSTALLATION).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vault(tls: Any) -> Iterator[VaultServer]:
    server = VaultServer(tls).start()
    server.kv["secret/team/api"] = {"key": canary("kv"), "short": "abc", "bad": "x\r\nInjected: 1"}
    yield server
    server.stop()


@pytest.fixture
def secret_files(tmp_path: Path, vault: VaultServer) -> dict[str, Path]:
    client = tmp_path / "client-secret"
    client.write_text(CLIENT_SECRET + "\n")
    vtoken = tmp_path / "vault-token"
    vtoken.write_text(vault.vault_token)
    return {"client": client, "vault": vtoken}


def _oauth(oauth: OAuthServer, client_id: str, **extra: Any) -> dict[str, Any]:
    return {"provider": "oauth2_client_credentials", "client_id": client_id,
            "token_url": f"https://localhost:{oauth.https_port}/token", **extra}


@pytest.fixture
async def gateway(tmp_path: Path, shared_files: dict[str, Path], oauth: OAuthServer,
                  github: GitHubServer, vault: VaultServer, app_key: tuple[Path, bytes],
                  secret_files: dict[str, Path]) -> AsyncIterator[Services]:
    for cid, client in {"basic": OAuthClient(CLIENT_SECRET),
                        "post": OAuthClient(CLIENT_SECRET),
                        "slow": OAuthClient(CLIENT_SECRET, delay=0.3),
                        "hundred": OAuthClient(CLIENT_SECRET, expires_in=100),
                        "no-expiry": OAuthClient(CLIENT_SECRET, expires_in=None)}.items():
        oauth.clients[cid] = client
    cs = str(secret_files["client"])
    vault_common = {"provider": "vault", "address": f"https://localhost:{vault.https_port}",
                    "token_file": str(secret_files["vault"])}
    doc = {
        "home": str(tmp_path / "home"), "audit": {"path": str(tmp_path / "audit.jsonl")},
        "upstream": {"ca_file": str(shared_files["upstream_ca"])},
        "secrets": {
            "oauth-basic": _oauth(oauth, "basic", client_secret_file=cs,
                                  scope=["repo:read", "issues"], audience="https://api.test"),
            "oauth-post": _oauth(oauth, "post", client_secret_file=cs,
                                 auth_method="client_secret_post"),
            "oauth-slow": _oauth(oauth, "slow", client_secret_file=cs),
            "oauth-hundred": _oauth(oauth, "hundred", client_secret_file=cs),
            "oauth-per-task": _oauth(oauth, "basic", client_secret_file=cs, per_task=True),
            "oauth-no-expiry": _oauth(oauth, "no-expiry", client_secret_file=cs,
                                      default_ttl_seconds=30),
            "oauth-down": {**_oauth(oauth, "basic", client_secret_file=cs),
                           "token_url": f"https://127.0.0.1:{dead_port()}/token",
                           "timeout_seconds": 2},
            "github": {"provider": "github_app", "app_id": int(APP_ID),
                       "installation_id": INSTALLATION, "private_key_file": str(app_key[0]),
                       "api_url": f"https://localhost:{github.https_port}"},
            "vault-kv": {**vault_common, "mount": "secret", "path": "team/api", "field": "key"},
            "vault-short": {**vault_common, "path": "team/api", "field": "short"},
            "vault-crlf": {**vault_common, "path": "team/api", "field": "bad"},
            "vault-db": {**vault_common, "engine": "dynamic", "path": "database/creds/readonly",
                         "field": "password", "namespace": "team-a"},
            "env-unset": {"provider": "env", "var": "TASKGATE_TEST_SURELY_UNSET"},
        },
    }
    async with build(parse_config(doc, "<test>")) as services:
        yield services


def broker(gw: Services) -> SecretBroker:
    return gw.secrets


def caller(task: str | None = "task-1") -> Caller:
    return Caller(WORKLOAD, ISSUER, time.time() + 600, task=task)


def rule(secret: str, **extra: Any) -> Rule:
    return parse_rule({"id": f"r-{secret}", "host": "api.test", "methods": ["GET"],
                       "secret": secret, **extra})


GH_RULE = {"repositories": ["widgets"], "permissions": {"issues": "read"}}


# -- GitHub App ---------------------------------------------------------------
async def test_github_token_is_minted_with_an_app_jwt_and_down_scoped(
        gateway: Services, github: GitHubServer) -> None:
    before = len(github.tokens)
    minted = await broker(gateway).token("github", caller(), rule("github", **GH_RULE))
    now = time.time()
    assert len(github.tokens) == before + 1
    issued = github.tokens[-1]
    assert minted.value.reveal() == issued.token
    assert github.requests[-1] == {"repositories": ["widgets"],
                                   "permissions": {"issues": "read"}}
    claims = github.jwt_claims[-1]
    assert claims["iss"] == APP_ID
    assert abs(claims["iat"] - (now - 60)) <= 5
    assert claims["exp"] - claims["iat"] <= 600 and claims["exp"] <= now + 600
    assert claims["_headers"]["X-GitHub-Api-Version"] == "2022-11-28"
    assert minted.expires_at is not None and abs(minted.expires_at - issued.expires_at) < 2
    assert broker(gateway).label(minted) == "github"  # the audit field: the name only


async def test_github_tokens_are_cached_per_task_and_scope(
        gateway: Services, github: GitHubServer) -> None:
    b, before = broker(gateway), len(github.tokens)
    first = await b.token("github", caller("t-a"), rule("github", **GH_RULE))
    again = await b.token("github", caller("t-a"), rule("github", **GH_RULE))
    wider = await b.token("github", caller("t-a"),
                          rule("github", repositories=["widgets"],
                               permissions={"issues": "write"}))
    other = await b.token("github", caller("t-b"), rule("github", **GH_RULE))
    assert again is first
    assert len({first.value, wider.value, other.value}) == 3
    assert len(github.tokens) == before + 3
    assert github.requests[-2]["permissions"] == {"issues": "write"}


async def test_github_tokens_are_revoked_when_the_task_ends(
        gateway: Services, github: GitHubServer) -> None:
    b = broker(gateway)
    ended = await b.token("github", caller("t-end"), rule("github", **GH_RULE))
    ended2 = await b.token("github", caller("t-end"), rule("github"))
    kept = await b.token("github", caller("t-keep"), rule("github", **GH_RULE))
    await gateway.tasks.notify_ended("t-end")
    assert set(github.revocations) >= {ended.value.reveal(), ended2.value.reveal()}
    assert kept.value.reveal() not in github.revocations
    with pytest.raises(Refused):
        await b.token("github", caller("t-end"), rule("github", **GH_RULE))
    assert (await b.token("github", caller("t-keep"), rule("github", **GH_RULE))) is kept


async def test_a_token_that_lands_after_its_task_ended_is_revoked(
        gateway: Services, github: GitHubServer) -> None:
    github.delay = 0.5
    try:
        pending = asyncio.create_task(
            broker(gateway).token("github", caller("t-race"), rule("github", **GH_RULE)))
        await asyncio.sleep(0.2)
        await gateway.tasks.notify_ended("t-race")
        with pytest.raises(Refused):
            await pending
    finally:
        github.delay = 0.0
    assert github.tokens[-1].token in github.revocations


async def test_shutdown_revokes_every_live_token(gateway: Services, github: GitHubServer,
                                                 vault: VaultServer) -> None:
    b = broker(gateway)
    gh = await b.token("github", caller(None), rule("github"))
    db = await b.token("vault-db", caller("t-shut"), rule("vault-db"))
    await b.close()
    assert gh.value.reveal() in github.revocations
    assert db.revoke in vault.revocations


# -- Vault --------------------------------------------------------------------
async def test_vault_kv2_read_is_shared_by_every_caller(gateway: Services,
                                                        vault: VaultServer) -> None:
    b, before = broker(gateway), len(vault.requests)
    one = await b.token("vault-kv", caller("t-1"), rule("vault-kv"))
    two = await b.token("vault-kv", caller("t-2"), rule("vault-kv"))
    assert one is two and one.value.reveal() == vault.kv["secret/team/api"]["key"]
    assert [r["path"] for r in vault.requests[before:]] == ["/v1/secret/data/team/api"]


async def test_vault_dynamic_leases_are_revoked_when_the_task_ends(
        gateway: Services, vault: VaultServer) -> None:
    b = broker(gateway)
    ended = await b.token("vault-db", caller("v-end"), rule("vault-db"))
    kept = await b.token("vault-db", caller("v-keep"), rule("vault-db"))
    assert vault.requests[-1]["namespace"] == "team-a"
    lease = next(x for x in vault.leases if x.value == ended.value.reveal())
    assert ended.revoke == lease.lease_id and ended.reported
    assert ended.expires_at is not None and 3590 < ended.expires_at - time.time() <= 3600
    await gateway.tasks.notify_ended("v-end")
    assert lease.revoked and lease.lease_id in vault.revocations
    assert not next(x for x in vault.leases if x.value == kept.value.reveal()).revoked


@pytest.mark.parametrize("secret", ["vault-short", "vault-crlf"])
async def test_values_that_cannot_be_injected_are_refused(gateway: Services,
                                                          secret: str) -> None:
    with pytest.raises(ProviderError) as e:
        await broker(gateway).token(secret, caller(), rule(secret))
    assert e.value.kind == "bad_response" and secret in str(e.value)


# -- OAuth 2.0 client credentials ---------------------------------------------
async def test_oauth_client_secret_basic_with_scope_and_audience(
        gateway: Services, oauth: OAuthServer) -> None:
    minted = await broker(gateway).token("oauth-basic", caller(), rule("oauth-basic"))
    sent = [r for r in oauth.requests if r["client_id"] == "basic"][-1]
    assert sent == {**sent, "method": "basic", "grant_type": "client_credentials",
                    "scope": "repo:read issues", "audience": "https://api.test"}
    assert minted.value.reveal() == oauth.tokens("basic")[-1]
    assert minted.lifetime == 3600 and minted.reported


async def test_oauth_client_secret_post(gateway: Services, oauth: OAuthServer) -> None:
    minted = await broker(gateway).token("oauth-post", caller(), rule("oauth-post"))
    sent = [r for r in oauth.requests if r["client_id"] == "post"][-1]
    assert sent["method"] == "post" and sent["scope"] is None
    assert minted.value.reveal() == oauth.tokens("post")[-1]


async def test_oauth_token_is_shared_unless_per_task(gateway: Services) -> None:
    b = broker(gateway)
    shared = {(await b.token("oauth-basic", caller(t), rule("oauth-basic"))).value
              for t in ("o-1", "o-2")}
    per_task = {(await b.token("oauth-per-task", caller(t), rule("oauth-per-task"))).value
                for t in ("o-1", "o-2")}
    assert len(shared) == 1 and len(per_task) == 2


async def test_fifty_waiting_calls_make_one_fetch(gateway: Services, oauth: OAuthServer) -> None:
    before = oauth.fetches("slow")
    got = await asyncio.gather(*(broker(gateway).token("oauth-slow", caller(), rule("oauth-slow"))
                                 for _ in range(50)))
    assert oauth.fetches("slow") == before + 1
    assert len({m.value for m in got}) == 1


async def test_refresh_starts_before_expiry(gateway: Services, oauth: OAuthServer) -> None:
    clock = Clock()
    b = SecretBroker(gateway.config.secrets, gateway.http, clock=clock)
    r = rule("oauth-hundred")
    first = await b.token("oauth-hundred", caller(), r)
    clock.now += 45  # 55 s of 100 left: more than min(half, skew 60) = 50
    assert (await b.token("oauth-hundred", caller(), r)) is first
    clock.now += 6  # 49 s left: refreshed, though the old one is still valid
    second = await b.token("oauth-hundred", caller(), r)
    assert second.value != first.value and first.usable(clock.now)
    assert oauth.tokens("hundred")[-2:] == [first.value.reveal(), second.value.reveal()]


async def test_failed_refresh_uses_the_value_in_hand_but_never_an_expired_one(
        gateway: Services, oauth: OAuthServer, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    b = SecretBroker(gateway.config.secrets, gateway.http, clock=clock)
    r = rule("oauth-hundred")
    first = await b.token("oauth-hundred", caller(), r)
    oauth.clients["hundred"].secret = "rotated"
    try:
        clock.now += 80  # refresh window; the provider now refuses us
        assert (await b.token("oauth-hundred", caller(), r)) is first
        clock.now += 21  # expired
        with pytest.raises(ProviderError) as e:
            await b.token("oauth-hundred", caller(), r)
    finally:
        oauth.clients["hundred"].secret = CLIENT_SECRET
    assert e.value.kind == "rejected" and "HTTP 401, invalid_client" in str(e.value)
    assert first.value.reveal() not in caplog.text and CLIENT_SECRET not in caplog.text


async def test_token_without_expires_in_gets_the_configured_lifetime(
        gateway: Services, oauth: OAuthServer) -> None:
    clock = Clock()
    b = SecretBroker(gateway.config.secrets, gateway.http, clock=clock)
    r = rule("oauth-no-expiry")
    first = await b.token("oauth-no-expiry", caller(), r)
    assert first.lifetime == 30 and not first.reported
    assert b.label(first) == "oauth-no-expiry"
    clock.now += 16  # 14 s left < min(15, 60)
    assert (await b.token("oauth-no-expiry", caller(), r)).value != first.value


# -- failures -------------------------------------------------------------------
async def test_provider_down_names_the_secret_not_a_value(
        gateway: Services, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ProviderError) as e:
        await broker(gateway).token("oauth-down", caller(), rule("oauth-down"))
    assert e.value.status == 502 and e.value.kind == "unreachable"
    assert str(e.value) == ("secret 'oauth-down' is unavailable: "
                            "the provider could not be reached")
    assert CLIENT_SECRET not in caplog.text


async def test_missing_environment_variable_is_named(gateway: Services) -> None:
    with pytest.raises(ProviderError) as e:
        await broker(gateway).token("env-unset", caller(), rule("env-unset"))
    assert e.value.kind == "misconfigured" and "TASKGATE_TEST_SURELY_UNSET" in str(e.value)


async def test_unknown_secret_fails_closed(gateway: Services) -> None:
    with pytest.raises(ProviderError):
        await broker(gateway).token("nope", caller(), rule("nope"))


async def test_values_never_show_in_repr_or_logs(
        gateway: Services, github: GitHubServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    minted = await broker(gateway).token("github", caller("t-repr"), rule("github"))
    value = minted.value.reveal()
    logging.getLogger("test").info("minted %s %r %s", minted, minted, minted.value)
    texts = [repr(minted), str(minted), f"{minted.value}", f"{minted.value!r}",
             f"{minted.value}", repr(broker(gateway)._slots)]
    assert all(value not in t for t in texts), texts
    assert "[secure]" in repr(minted)
    assert value not in caplog.text
    await gateway.tasks.notify_ended("t-repr")
    assert value not in caplog.text


async def test_providers_trust_only_the_gateways_bundle(gateway: Services) -> None:
    """Without ``upstream.ca_file`` the stand-in's CA is not trusted: the call fails closed."""
    import aiohttp

    async with aiohttp.ClientSession() as default_trust:
        b = SecretBroker(gateway.config.secrets, default_trust)
        with pytest.raises(ProviderError) as e:
            await b.token("oauth-basic", caller(), rule("oauth-basic"))
    assert e.value.kind == "unreachable" and "TLS certificate is not trusted" in str(e.value)


async def test_standing_tokens_are_not_shared_between_workloads(gateway: Services) -> None:
    b = broker(gateway)
    mine = await b.token("github", caller(None), rule("github", **GH_RULE))
    again = await b.token("github", caller(None), rule("github", **GH_RULE))
    theirs = await b.token("github", Caller("spiffe://acme.test/other", ISSUER,
                                            time.time() + 600), rule("github", **GH_RULE))
    assert again is mine and theirs.value != mine.value
