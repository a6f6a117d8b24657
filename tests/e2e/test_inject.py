"""Secrets injected at the edge, end to end: the real gateway, real clients, the stand-ins.

One gateway runs for the module with canary values in every secret; every
response an agent gets is kept, and the last test scans it all — with the
gateway's files and output — for any spelling of any canary.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.e2e import assert_refusal
from tests.standins import (
    EchoApi,
    GitHubServer,
    OAuthClient,
    OAuthServer,
    VaultServer,
    canary,
    rsa_key_pem,
    server_tls,
    spellings,
)
from tests.support import AUDIENCE, ISSUER, WORKLOAD, Gateway, Keys, dead_port
from tests.wire import Tunnel, request_bytes

ENV_VALUE = canary("env")
QUERY_VALUE = canary("query")
BASIC_VALUE = canary("basic")
CLIENT_SECRET = canary("clientsecret")
APP_ID, INSTALLATION = "31337", "9"
RECEIVED: list[bytes] = []  # every response an agent received in this module


@dataclass
class World:
    gw: Gateway
    api: EchoApi
    oauth: OAuthServer
    github: GitHubServer
    vault: VaultServer
    token: str

    def https(self, path: str) -> str:
        return f"https://localhost:{self.api.https_port}{path}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.api.http_port}{path}"

    def canaries(self) -> set[str]:
        issued = [t for _, t, _ in self.oauth.issued] + [t.token for t in self.github.tokens]
        issued += [x.value for x in self.vault.leases]
        issued += [v for kv in self.vault.kv.values() for v in kv.values()]
        return {ENV_VALUE, QUERY_VALUE, BASIC_VALUE, CLIENT_SECRET, self.vault.vault_token,
                *issued}


def kept(r: httpx.Response) -> httpx.Response:
    RECEIVED.append(b"".join(f"{k}: {v}\n".encode() for k, v in r.headers.multi_items())
                    + b"\n" + r.content)
    return r


def rule(rid: str, host: str, port: int, paths: list[str], secret: str | None = None,
         **extra: Any) -> dict[str, Any]:
    out = {"id": rid, "host": host, "port": port, "methods": ["GET", "POST"], "paths": paths,
           "allow_private": True, **extra}
    if secret:
        out["secret"] = secret
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA,
          shared_files: dict[str, Path], keys: Keys) -> Iterator[World]:
    tls = server_tls(test_ca)
    private, public = rsa_key_pem()
    outside = tmp_path_factory.mktemp("provider-creds")  # not the gateway's folder
    (outside / "app.pem").write_bytes(private)
    (outside / "client-secret").write_text(CLIENT_SECRET)
    servers = [EchoApi(tls), OAuthServer(tls), GitHubServer(tls, public, APP_ID, INSTALLATION),
               VaultServer(tls)]
    api, oauth, github, vault = servers
    for s in servers:
        s.start()
    (outside / "vault-token").write_text(vault.vault_token)
    vault.kv["kv/team/api"] = {"key": canary("kv")}
    oauth.clients.update({"gw": OAuthClient(CLIENT_SECRET),
                          "gw-slow": OAuthClient(CLIENT_SECRET, delay=1.0),
                          "gw-short": OAuthClient(CLIENT_SECRET, expires_in=6)})
    oauth_common = {"provider": "oauth2_client_credentials",
                    "token_url": f"https://localhost:{oauth.https_port}/token",
                    "client_secret_file": str(outside / "client-secret")}
    a, h = api.https_port, api.http_port
    config = {
        "upstream": {"ca_file": str(shared_files["upstream_ca"])},
        "identity": {"issuers": [{"issuer": ISSUER, "audience": AUDIENCE,
                                  "jwks_file": str(shared_files["jwks"])}]},
        "proxy": {"stream_threshold_bytes": 1024},
        "secrets": {
            "env-key": {"provider": "env", "var": "TG_TEST_ENV_KEY",
                        "inject": {"header": "Authorization", "value": "Bearer {token}"}},
            "env-query": {"provider": "env", "var": "TG_TEST_QUERY_KEY",
                          "inject": {"query": "api_key"}},
            "env-basic": {"provider": "env", "var": "TG_TEST_BASIC_KEY",
                          "inject": {"basic": {"username": "x-access-token"}}},
            "oauth": {**oauth_common, "client_id": "gw", "scope": "read"},
            "oauth-slow": {**oauth_common, "client_id": "gw-slow"},
            "oauth-short": {**oauth_common, "client_id": "gw-short"},
            "oauth-down": {**oauth_common, "client_id": "gw",
                           "token_url": f"https://127.0.0.1:{dead_port()}/token"},
            "github": {"provider": "github_app", "app_id": APP_ID,
                       "installation_id": INSTALLATION,
                       "private_key_file": str(outside / "app.pem"),
                       "api_url": f"https://localhost:{github.https_port}"},
            "vault-kv": {"provider": "vault", "address": f"https://localhost:{vault.https_port}",
                         "token_file": str(outside / "vault-token"), "mount": "kv",
                         "path": "team/api", "field": "key",
                         "inject": {"header": "X-Api-Key"}},
        },
        "workloads": {WORKLOAD: {"standing": [
            rule("env", "localhost", a, ["/env/**"], "env-key"),
            rule("query", "localhost", a, ["/query/**"], "env-query"),
            rule("basic", "localhost", a, ["/basic/**"], "env-basic"),
            rule("oauth", "localhost", a, ["/oauth/**"], "oauth"),
            rule("oauth-slow", "localhost", a, ["/slow/**"], "oauth-slow"),
            rule("oauth-short", "localhost", a, ["/short/**"], "oauth-short"),
            rule("down", "localhost", a, ["/down/**"], "oauth-down"),
            rule("vault", "localhost", a, ["/vault/**"], "vault-kv"),
            rule("warm", "localhost", a, ["/warm/**"]),
            rule("open", "127.0.0.1", a, ["/open/**"]),
            rule("plain-env", "127.0.0.1", h, ["/env/**"], "env-key"),
            rule("plain-ok", "127.0.0.1", h, ["/plain-ok/**"], "env-key", scheme="http"),
            rule("gh-issues", "localhost", github.https_port, ["/repos/acme/widgets/issues"],
                 "github", repositories=["widgets"], permissions={"issues": "read"}),
        ]}},
    }
    env = {"TG_TEST_ENV_KEY": ENV_VALUE, "TG_TEST_QUERY_KEY": QUERY_VALUE,
           "TG_TEST_BASIC_KEY": BASIC_VALUE}
    gw = Gateway(tmp_path_factory.mktemp("gw-secrets"), config, env=env).start()
    try:
        yield World(gw, api, oauth, github, vault, keys.token())
    finally:
        gw.stop()
        for s in servers:
            s.stop()


def get(w: World, url: str, **kw: Any) -> httpx.Response:
    with w.gw.client(w.token) as c:
        return kept(c.get(url, **kw))


def last_seen(w: World) -> dict[str, Any]:
    return w.api.seen[-1]


# -- injection ----------------------------------------------------------------
def test_secret_is_injected_into_an_authorized_https_call(world: World) -> None:
    r = get(world, world.https("/env/echo"))
    assert r.status_code == 200, r.text
    assert last_seen(world)["authorization"] == [f"Bearer {ENV_VALUE}"]
    assert ENV_VALUE not in r.text and "REDACTED" in r.text
    rec = world.gw.records_for(r.headers["x-taskgate-request-id"])
    assert [(x["decision"], x["secret"], x["rule"]) for x in rec] == [("allow", "env-key", "env")]


def test_the_agents_own_authorization_is_replaced(world: World) -> None:
    r = get(world, world.https("/env/echo"), headers={"Authorization": "Bearer agent-own-1"})
    assert r.status_code == 200, r.text
    assert last_seen(world)["authorization"] == [f"Bearer {ENV_VALUE}"]
    assert "agent-own-1" not in str(last_seen(world)["headers"])


def test_query_parameter_injection_replaces_the_agents(world: World) -> None:
    r = get(world, world.https("/query/echo?x=1&api_key=mine&api%5Fkey=again"))
    assert r.status_code == 200, r.text
    seen = last_seen(world)
    assert seen["query_string"] == f"x=1&api_key={QUERY_VALUE}", seen["query_string"]
    assert QUERY_VALUE not in r.text
    rec = world.gw.records_for(r.headers["x-taskgate-request-id"])[0]
    assert QUERY_VALUE not in rec["path"]


def test_the_agents_own_credentials_are_stripped_on_query_injection(world: World) -> None:
    """The secret goes in the query; the agent's Authorization and Cookie are its own
    credentials and never reach the upstream beside it."""
    r = get(world, world.https("/query/echo?x=1"),
            headers={"Authorization": "Bearer agent-own-2", "Cookie": "session=agent-own-3"})
    assert r.status_code == 200, r.text
    seen = last_seen(world)
    assert seen["query_string"] == f"x=1&api_key={QUERY_VALUE}", seen["query_string"]
    assert seen["authorization"] == []
    assert "agent-own" not in str(seen["headers"])
    assert "cookie" not in {k.lower() for k in seen["headers"]}


def test_the_agents_own_credentials_are_stripped_on_header_injection(world: World) -> None:
    r = get(world, world.https("/env/echo?x=1&access_token=agent-own-4&access%5Ftoken=again"),
            headers={"Cookie": "session=agent-own-5"})
    assert r.status_code == 200, r.text
    seen = last_seen(world)
    assert seen["authorization"] == [f"Bearer {ENV_VALUE}"]
    assert seen["query_string"] == "x=1", seen["query_string"]
    assert "agent-own" not in str(seen["headers"])


def test_absolute_url_in_tunnel_never_carries_the_secret(world: World) -> None:
    """Inside a tunnel to the rule's host, a request line naming another host would take
    the injected secret to whoever the upstream (or a CDN in front of it) routes it to."""
    target = f"localhost:{world.api.https_port}"
    before = len(world.api.seen)
    with Tunnel(world.gw.proxy_port, target, world.token) as t:
        t.start_tls(world.gw.ca, "localhost")
        reply = t.request(request_bytes("GET", "https://attacker.example/env/echo", target,
                                        None))
        ok = t.request(request_bytes("GET", f"https://{target}/env/echo", target, None))
    RECEIVED.append(reply.body + ok.body)
    assert_refusal(reply.status, reply.headers, reply.body, 403, "CONNECT target")
    assert ok.status == 200, ok.body
    assert len(world.api.seen) == before + 1
    assert world.api.seen[-1]["path"] == "/env/echo"
    assert world.api.seen[-1]["authorization"] == [f"Bearer {ENV_VALUE}"]


def test_basic_auth_injection(world: World) -> None:
    r = get(world, world.https("/basic/echo"))
    assert r.status_code == 200, r.text
    expected = base64.b64encode(f"x-access-token:{BASIC_VALUE}".encode()).decode()
    assert last_seen(world)["authorization"] == [f"Basic {expected}"]
    assert expected not in r.text


def test_no_secret_over_plain_http_without_scheme_http(world: World) -> None:
    before = len(world.api.seen)
    r = get(world, world.http("/env/echo"))
    assert r.status_code == 403, r.text
    assert "https only" in r.json()["reason"] and "env-key" in r.json()["reason"]
    assert len(world.api.seen) == before


def test_secret_over_plain_http_when_the_rule_says_scheme_http(world: World) -> None:
    r = get(world, world.http("/plain-ok/echo"))
    assert r.status_code == 200, r.text
    assert last_seen(world)["authorization"] == [f"Bearer {ENV_VALUE}"]
    assert last_seen(world)["scheme"] == "http"


def test_oauth_token_is_injected_and_its_name_audited(world: World) -> None:
    r = get(world, world.https("/oauth/echo"))
    assert r.status_code == 200, r.text
    token = world.oauth.tokens("gw")[-1]
    assert last_seen(world)["authorization"] == [f"Bearer {token}"]
    rec = world.gw.records_for(r.headers["x-taskgate-request-id"])[0]
    assert rec["secret"] == "oauth"  # SPEC: "secret (its name)", not its token's expiry


def test_github_installation_token_is_minted_and_used(world: World) -> None:
    url = f"https://localhost:{world.github.https_port}/repos/acme/widgets/issues"
    r = get(world, url, headers={"Authorization": "token agent-guess"})
    assert r.status_code == 200, r.text
    assert world.github.requests[-1] == {"repositories": ["widgets"],
                                         "permissions": {"issues": "read"}}
    assert r.json()[0]["seen_authorization"].startswith("Bearer REDACTED")


def test_vault_kv_value_is_injected_in_its_header(world: World) -> None:
    r = get(world, world.https("/vault/echo"))
    assert r.status_code == 200, r.text
    assert last_seen(world)["headers"]["X-Api-Key"] == world.vault.kv["kv/team/api"]["key"]


async def test_fifty_concurrent_calls_make_one_token_fetch(world: World) -> None:
    proxy = world.gw.proxy_url_with(world.token)
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    async with httpx.AsyncClient(proxy=proxy, verify=world.gw.ssl_context(), timeout=30,
                                 trust_env=False, limits=limits) as c:
        # Open 50 tunnels first, so the 50 calls below reach the gateway together.
        warm = await asyncio.gather(*(c.get(world.https("/warm/x")) for _ in range(50)))
        assert {x.status_code for x in warm} == {200}
        got = await asyncio.gather(*(c.get(world.https("/slow/echo")) for _ in range(50)))
    for r in got:
        kept(r)
    assert {x.status_code for x in got} == {200}, [x.text for x in got if x.status_code != 200]
    assert world.oauth.fetches("gw-slow") == 1
    token = world.oauth.tokens("gw-slow")[0]
    seen = [s for s in world.api.seen if s["path"] == "/slow/echo"]
    assert len(seen) == 50 and all(s["authorization"] == [f"Bearer {token}"] for s in seen)
    # They overlapped: most calls were in the gateway before the one token was issued.
    issued_at = world.oauth.issued[[t for _, t, _ in world.oauth.issued].index(token)][2]
    ids = {r.headers["x-taskgate-request-id"] for r in got}
    started = [rec["ts"] for rec in world.gw.audit() if rec["request_id"] in ids]
    waited = sum(1 for ts in started if _epoch(ts) < issued_at)
    assert waited >= 40, waited


def _epoch(ts: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_token_is_refreshed_before_it_expires(world: World) -> None:
    first = get(world, world.https("/short/echo"))
    assert first.status_code == 200, first.text
    _, token1, issued = world.oauth.issued[-1]
    assert get(world, world.https("/short/echo")).status_code == 200
    assert world.oauth.fetches("gw-short") == 1
    time.sleep(max(0.0, issued + 3.5 - time.time()))  # 2.5 s of 6 left: < min(3, 60)
    third = get(world, world.https("/short/echo"))
    assert third.status_code == 200, third.text
    assert time.time() < issued + 6  # the first token had not expired yet
    assert world.oauth.fetches("gw-short") == 2
    token2 = world.oauth.tokens("gw-short")[-1]
    assert token2 != token1 and last_seen(world)["authorization"] == [f"Bearer {token2}"]


def test_provider_down_is_a_502_naming_the_secret(world: World) -> None:
    before = len(world.api.seen)
    r = get(world, world.https("/down/echo"))
    assert r.status_code == 502, r.text
    body = r.json()
    assert body["error"]["code"] == "secret_unavailable"
    assert body["reason"] == ("secret 'oauth-down' is unavailable: the provider could not be "
                              "reached")
    assert body["request_id"] == r.headers["x-taskgate-request-id"]
    assert len(world.api.seen) == before
    rec = world.gw.records_for(body["request_id"])
    assert [(x["decision"], x["status"], x["secret"]) for x in rec] == [
        ("error", 502, "oauth-down")]
    assert get(world, world.https("/env/echo")).status_code == 200  # the rest keeps flowing


# -- redaction ------------------------------------------------------------------
def test_echo_in_response_headers_is_redacted(world: World) -> None:
    r = get(world, world.https("/env/header"))
    assert r.status_code == 302
    assert r.headers["x-echo"] == "Bearer REDACTED"
    assert r.headers["location"] == "/landing?token=REDACTED"


def test_base64_echo_in_a_body_is_redacted(world: World) -> None:
    r = get(world, world.https("/env/b64"))
    assert r.status_code == 200, r.text
    for spelling in spellings(ENV_VALUE):
        assert spelling not in r.content, spelling
    assert "REDACTED" in r.json()["token_b64url"]


def test_sse_echo_split_across_chunks_is_redacted(world: World) -> None:
    chunks: list[bytes] = []
    with world.gw.client(world.token) as c, c.stream("GET", world.https("/env/sse")) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks.extend(r.iter_raw())
        RECEIVED.append(b"".join(chunks))
    body = b"".join(chunks)
    assert len(chunks) > 1
    assert ENV_VALUE.encode() not in body
    assert body.startswith(b"data: Bearer REDACTED\n\n")
    assert body.endswith(b"data: done\n\n")


def test_large_streamed_body_is_scanned_without_a_length(world: World) -> None:
    """The marker is not the value's length: a scanned stream goes out chunked."""
    r = get(world, world.https("/env/large"))
    assert r.status_code == 200
    assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
    assert len(r.content) == 6000 + len("Bearer REDACTED")
    assert ENV_VALUE.encode() not in r.content and b"REDACTED" in r.content


def test_gzip_body_is_decoded_and_redacted(world: World) -> None:
    r = get(world, world.https("/env/gzip"))
    assert r.status_code == 200
    assert last_seen(world)["headers"]["Accept-Encoding"] == "identity"
    assert r.json() == {"echo": "Bearer REDACTED"}


def test_redirect_never_carries_the_secret(world: World) -> None:
    target = f"https://127.0.0.1:{world.api.https_port}/open/echo"
    with world.gw.client(world.token, follow_redirects=True) as c:
        r = kept(c.get(world.https("/env/redirect"), params={"to": target}))
    assert r.status_code == 200, r.text
    hops = world.api.seen[-2:]
    assert hops[0]["path"] == "/env/redirect" and hops[0]["authorization"]
    assert hops[1]["path"] == "/open/echo" and hops[1]["authorization"] == []


# -- never leaked -----------------------------------------------------------------
def test_canary_values_appear_nowhere(world: World) -> None:
    """Last: no spelling of any canary in the gateway's files, output, /metrics, or replies.

    The gateway is stopped first, so what it writes on the way out is scanned too,
    and the GitHub token it minted must have been revoked on the way out.
    """
    for path in ("/env/echo", "/env/b64", "/oauth/echo", "/vault/echo", "/down/echo"):
        get(world, world.https(path))
    url = f"https://localhost:{world.github.https_port}/repos/acme/widgets/issues"
    assert get(world, url).status_code == 200
    metrics = httpx.get(f"{world.gw.control_url}/metrics", timeout=5)
    assert metrics.status_code == 200  # scanned below: the secrets' fetch counters are in it
    assert 'taskgate_secret_fetches_total{result="error",secret="oauth-down"}' in metrics.text
    assert world.gw.stop() == 0
    minted = {t.token for t in world.github.tokens}
    assert minted and set(world.github.revocations) == minted  # revoked at shutdown
    blobs: dict[str, bytes] = {"gateway output": world.gw.output().encode(),
                               "/metrics": metrics.content}
    for f in world.gw.dir.rglob("*"):
        if f.is_file():
            blobs[str(f.relative_to(world.gw.dir))] = f.read_bytes()
    for i, response in enumerate(RECEIVED):
        blobs[f"response {i}"] = response
    assert len(RECEIVED) >= 20 and any(n.endswith("audit.jsonl") for n in blobs)
    canaries = world.canaries()
    assert len(canaries) >= 10
    leaks = [(name, value[:12]) for value in canaries for spelling in spellings(value)
             for name, blob in blobs.items() if spelling in blob]
    assert leaks == []
