"""Secrets on task grants, end to end: the real gateway, tasks made on its control
plane, the GitHub and Vault stand-ins, an upstream that records what it received.

A task's rule names a secret: the token is minted for that task (down-scoped to
what the task rule names), cached for it, and revoked at the stand-in when the
task is revoked or expires. The last test scans everything the gateway wrote or
said, and every answer an agent or the orchestrator got, for any canary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trustme

from tests.standins import (
    EchoApi,
    GitHubServer,
    VaultServer,
    canary,
    rsa_key_pem,
    server_tls,
    spellings,
)
from tests.support import AUDIENCE, ISSUER, WORKLOAD, Gateway

ADD_VALUE = canary("mcpadd")
SEARCH_VALUE = canary("mcpsearch")
APP_ID, INSTALLATION = "4242", "77"
OWNER = "alice@acme.test"
RECEIVED: list[bytes] = []  # every answer an agent or the orchestrator got here
TASK_TOKENS: list[str] = []


@dataclass
class World:
    gw: Gateway
    api: EchoApi
    github: GitHubServer
    vault: VaultServer
    admin: dict[str, str]

    def api_url(self, path: str) -> str:
        return f"https://localhost:{self.api.https_port}{path}"

    def issues(self, repo: str = "widgets") -> str:
        return f"https://localhost:{self.github.https_port}/repos/acme/{repo}/issues"

    def canaries(self) -> set[str]:
        return {ADD_VALUE, SEARCH_VALUE, self.vault.vault_token,
                *(t.token for t in self.github.tokens), *(x.value for x in self.vault.leases)}


def kept(r: httpx.Response) -> httpx.Response:
    RECEIVED.append(b"".join(f"{k}: {v}\n".encode() for k, v in r.headers.multi_items())
                    + b"\n" + r.content)
    return r


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, test_ca: trustme.CA,
          shared_files: dict[str, Path]) -> Iterator[World]:
    tls = server_tls(test_ca)
    private, public = rsa_key_pem()
    outside = tmp_path_factory.mktemp("task-provider-creds")  # not the gateway's folder
    (outside / "app.pem").write_bytes(private)
    servers = [EchoApi(tls), GitHubServer(tls, public, APP_ID, INSTALLATION), VaultServer(tls)]
    api, github, vault = servers
    for s in servers:
        s.start()
    (outside / "vault-token").write_text(vault.vault_token)
    bearer = {"header": "Authorization", "value": "Bearer {token}"}
    a, g = api.https_port, github.https_port
    config = {
        "upstream": {"ca_file": str(shared_files["upstream_ca"])},
        "identity": {"issuers": [{"issuer": ISSUER, "audience": AUDIENCE,
                                  "jwks_file": str(shared_files["jwks"])}]},
        "secrets": {
            "github": {"provider": "github_app", "app_id": APP_ID,
                       "installation_id": INSTALLATION,
                       "private_key_file": str(outside / "app.pem"),
                       "api_url": f"https://localhost:{g}"},
            "vault-db": {"provider": "vault", "engine": "dynamic",
                         "address": f"https://localhost:{vault.https_port}",
                         "token_file": str(outside / "vault-token"),
                         "path": "database/creds/readonly", "field": "password",
                         "inject": bearer},
            "mcp-add": {"provider": "env", "var": "TG_MCP_ADD", "inject": bearer},
            "mcp-search": {"provider": "env", "var": "TG_MCP_SEARCH", "inject": bearer},
        },
        "workloads": {WORKLOAD: {"owner": "platform@acme.test", "ceiling": [
            {"id": "gh", "host": "localhost", "allow_private": True, "port": g, "methods": ["GET"],
             "paths": ["/repos/acme/**"], "secret": "github",
             "repositories": ["widgets", "gadgets"],
             "permissions": {"issues": "write", "metadata": "read"}},
            {"id": "db", "host": "localhost", "allow_private": True, "port": a, "methods": ["GET"],
             "paths": ["/db/**"], "secret": "vault-db"},
            {"id": "db-pay", "host": "localhost", "allow_private": True,
             "port": a, "methods": ["POST"],
             "paths": ["/pay/**"], "secret": "vault-db", "approval": "required"},
            {"id": "mcp-add", "host": "localhost", "allow_private": True,
             "port": a, "paths": ["/mcp/echo"],
             "mcp": {"tools": ["add"]}, "secret": "mcp-add"},
            {"id": "mcp-search", "host": "localhost", "allow_private": True,
             "port": a, "paths": ["/mcp/echo"],
             "mcp": {"tools": ["search"]}, "secret": "mcp-search"},
            {"id": "open", "host": "localhost", "allow_private": True,
             "port": a, "methods": ["GET"],
             "paths": ["/open/**"]},
        ]}},
    }
    gw = Gateway(tmp_path_factory.mktemp("gw-task-secrets"), config,
                 env={"TG_MCP_ADD": ADD_VALUE, "TG_MCP_SEARCH": SEARCH_VALUE}).start()
    admin = {"Authorization": f"Bearer {(gw.home / 'admin-token').read_text().strip()}"}
    try:
        yield World(gw, api, github, vault, admin)
    finally:
        gw.stop()
        for s in servers:
            s.stop()


# -- helpers ----------------------------------------------------------------------
def post_task(w: World, rules: list[dict[str, Any]], **body: Any) -> httpx.Response:
    payload = {"workload": WORKLOAD, "ttl_seconds": 300, "rules": rules, **body}
    return kept(httpx.post(f"{w.gw.control_url}/v1/tasks", json=payload, headers=w.admin,
                           timeout=10))


def new_task(w: World, rules: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    r = post_task(w, rules, **body)
    assert r.status_code == 201, r.text
    TASK_TOKENS.append(r.json()["token"])
    return r.json()


def revoke(w: World, task_id: str) -> None:
    r = kept(httpx.delete(f"{w.gw.control_url}/v1/tasks/{task_id}", headers=w.admin,
                          timeout=10))
    assert r.status_code == 200 and r.json()["status"] == "revoked", r.text


def agent(w: World, task: dict[str, Any]) -> httpx.Client:
    return httpx.Client(proxy=task["proxy_url"], verify=w.gw.ssl_context(), timeout=10,
                        trust_env=False)


def call(w: World, task: dict[str, Any], method: str, url: str, **kw: Any) -> httpx.Response:
    with agent(w, task) as c:
        return kept(c.request(method, url, **kw))


def eventually(check: Callable[[], bool], what: str, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.05)


def gh_rule(**kw: Any) -> dict[str, Any]:
    """A task rule within the ceiling's 'gh' (port: see :func:`with_port`): any
    repository's issues, with a token for 'widgets' only."""
    return {"id": "gh-read", "host": "localhost", "allow_private": True, "methods": ["GET"],
            "paths": ["/repos/acme/*/issues"], "secret": "github",
            "repositories": ["widgets"], "permissions": {"issues": "read"}, **kw}


def with_port(rule: dict[str, Any], port: int) -> dict[str, Any]:
    return {**rule, "port": port}


def db_rule(w: World) -> dict[str, Any]:
    return {"id": "db-read", "host": "localhost", "allow_private": True, "port": w.api.https_port,
            "methods": ["GET"], "paths": ["/db/**"], "secret": "vault-db"}


def record(w: World, r: httpx.Response) -> dict[str, Any]:
    """The call's final audit record (a held call also has a ``held`` one before it)."""
    recs = w.gw.records_for(r.headers["x-taskgate-request-id"])
    assert recs and all(x["decision"] == "held" for x in recs[:-1]), recs
    return recs[-1]


def refused_at_connect(w: World, task: dict[str, Any], url: str) -> None:
    """The task ended: its token is a dead credential, 407 already at CONNECT."""
    with agent(w, task) as c, pytest.raises(httpx.ProxyError, match="407"):
        c.get(url)


# -- 1. GitHub App tokens per task ---------------------------------------------------
def test_github_token_is_down_scoped_to_the_task_rule_and_cached_per_task(world: World) -> None:
    w, gh = world, world.github
    task = new_task(w, [with_port(gh_rule(), gh.https_port)])
    mints = len(gh.requests)
    first = call(w, task, "GET", w.issues())
    assert first.status_code == 200, first.text
    assert gh.requests[mints:] == [{"repositories": ["widgets"],
                                    "permissions": {"issues": "read"}}]
    token = gh.tokens[-1]
    assert token.repositories == ["widgets"] and token.permissions == {"issues": "read"}
    # The token is down-scoped for real: the rule lets the call through to another
    # repository, GitHub refuses it with the task's token.
    other = call(w, task, "GET", w.issues("gadgets"))
    assert other.status_code == 404, other.text
    again = call(w, task, "GET", w.issues())
    assert again.status_code == 200, again.text
    assert len(gh.requests) == mints + 1  # three calls, one mint
    second = new_task(w, [with_port(gh_rule(), gh.https_port)])
    assert call(w, second, "GET", w.issues()).status_code == 200
    assert len(gh.requests) == mints + 2 and gh.tokens[-1].token != token.token


def test_revoking_the_task_revokes_its_github_token(world: World) -> None:
    w, gh = world, world.github
    task = new_task(w, [with_port(gh_rule(), gh.https_port)])
    other = new_task(w, [with_port(gh_rule(), gh.https_port)])
    assert call(w, task, "GET", w.issues()).status_code == 200
    mine = gh.tokens[-1].token
    assert call(w, other, "GET", w.issues()).status_code == 200
    theirs = gh.tokens[-1].token
    revoke(w, task["task_id"])  # returns once the task-end hooks ran
    assert mine in gh.revocations and theirs not in gh.revocations
    mints = len(gh.requests)
    refused_at_connect(w, task, w.issues())
    assert call(w, other, "GET", w.issues()).status_code == 200  # its token lives on
    assert len(gh.requests) == mints


def test_an_expired_task_has_its_github_token_revoked(world: World) -> None:
    w, gh = world, world.github
    task = new_task(w, [with_port(gh_rule(), gh.https_port)], ttl_seconds=2)
    assert call(w, task, "GET", w.issues()).status_code == 200
    token = gh.tokens[-1].token
    assert token not in gh.revocations
    eventually(lambda: token in gh.revocations, "the expired task's token revoked")
    assert kept(httpx.get(f"{w.gw.control_url}/v1/tasks/{task['task_id']}",
                          headers=w.admin)).json()["status"] == "expired"
    refused_at_connect(w, task, w.issues())


def test_a_task_rule_without_the_secret_is_within_a_ceiling_rule_with_one(
        world: World) -> None:
    """Less than the ceiling: the call goes without a token, so the ceiling's token
    scope does not apply (and nothing is minted)."""
    w, gh = world, world.github
    bare = {k: v for k, v in gh_rule().items()
            if k not in ("secret", "repositories", "permissions")}
    task = new_task(w, [with_port(bare, gh.https_port)])
    mints = len(gh.requests)
    r = call(w, task, "GET", w.issues(), headers={"Authorization": "token agent-own"})
    assert r.status_code == 401 and r.json()["message"] == "Bad credentials", r.text
    assert len(gh.requests) == mints and record(w, r)["secret"] is None


def test_after_a_restart_the_task_gets_a_fresh_token_of_its_scope(world: World) -> None:
    w, gh = world, world.github
    task = new_task(w, [with_port(gh_rule(), gh.https_port)])
    assert call(w, task, "GET", w.issues()).status_code == 200
    before = gh.tokens[-1].token
    assert w.gw.stop() == 0
    assert before in gh.revocations  # minted tokens die with the process
    w.gw.start()
    r = call(w, task, "GET", w.issues())
    assert r.status_code == 200, r.text
    assert gh.requests[-1] == {"repositories": ["widgets"], "permissions": {"issues": "read"}}
    assert gh.tokens[-1].token != before and record(w, r)["task"] == task["task_id"]


# -- 2. Vault dynamic secrets per task -------------------------------------------------
def test_revoking_the_task_revokes_its_vault_lease(world: World) -> None:
    w, vault = world, world.vault
    task = new_task(w, [db_rule(w)])
    r = call(w, task, "GET", w.api_url("/db/echo"))
    assert r.status_code == 200, r.text
    lease = vault.leases[-1]
    assert w.api.seen[-1]["authorization"] == [f"Bearer {lease.value}"]
    assert call(w, task, "GET", w.api_url("/db/echo")).status_code == 200
    assert vault.leases[-1] is lease  # one lease per task
    revoke(w, task["task_id"])
    assert lease.revoked and lease.lease_id in vault.revocations


def test_an_expired_task_has_its_vault_lease_revoked(world: World) -> None:
    w, vault = world, world.vault
    task = new_task(w, [db_rule(w)], ttl_seconds=2)
    assert call(w, task, "GET", w.api_url("/db/echo")).status_code == 200
    lease = vault.leases[-1]
    assert not lease.revoked
    eventually(lambda: lease.revoked, "the expired task's lease revoked")
    assert lease.lease_id in vault.revocations


# -- 3. Secrets and token scopes within the ceiling ---------------------------------------
BEYOND = [
    ("secret-where-the-ceiling-names-none",
     lambda w: {"id": "r", "host": "localhost", "allow_private": True,
                "port": w.api.https_port, "methods": ["GET"],
                "paths": ["/open/**"], "secret": "vault-db"},
     "rules[0].secret", "secret 'vault-db' is not one the ceiling names"),
    ("another-secret-than-the-ceilings",
     lambda w: with_port(gh_rule(secret="mcp-add"), w.github.https_port),
     "rules[0].secret", "secret 'mcp-add' is not one the ceiling names"),
    ("repository-beyond",
     lambda w: with_port(gh_rule(repositories=["widgets", "payroll"]), w.github.https_port),
     "rules[0].secret", "repositories ['payroll'] are beyond the ceiling's"),
    ("whole-installation",
     lambda w: with_port({k: v for k, v in gh_rule().items() if k != "repositories"},
                         w.github.https_port),
     "rules[0].secret", "the ceiling limits the token to repositories"),
    ("permission-level-beyond",
     lambda w: with_port(gh_rule(permissions={"issues": "admin"}), w.github.https_port),
     "rules[0].secret", "permission issues: admin is beyond the ceiling's write"),
    ("permission-not-in-ceiling",
     lambda w: with_port(gh_rule(permissions={"contents": "read"}), w.github.https_port),
     "rules[0].secret", "permission contents: read is beyond the ceiling's none"),
    ("all-permissions",
     lambda w: with_port({k: v for k, v in gh_rule().items() if k != "permissions"},
                         w.github.https_port),
     "rules[0].secret", "the ceiling limits the token's permissions"),
]


@pytest.mark.parametrize(("make", "field", "why"), [b[1:] for b in BEYOND],
                         ids=[b[0] for b in BEYOND])
def test_a_task_beyond_the_ceilings_secret_or_scope_is_refused(
        world: World, make: Callable[[World], dict[str, Any]], field: str, why: str) -> None:
    mints = len(world.github.requests)
    r = post_task(world, [make(world)])
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "beyond_ceiling" and body["field"] == field
    assert body["rule"] == make(world)["id"] and why in body["reason"], body
    assert len(world.github.requests) == mints


def test_token_scope_on_a_secret_that_mints_no_github_token_is_refused(world: World) -> None:
    """The ceiling names no repositories for 'vault-db', but the provider would ignore
    them: a task that looks narrower than the credential it gets is refused."""
    leases = len(world.vault.leases)
    r = post_task(world, [{**db_rule(world), "repositories": ["widgets"]}])
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "rules[0].repositories" and r.json()["rule"] == "db-read"
    assert "secret 'vault-db' is vault" in r.json()["reason"]
    r = post_task(world, [{**db_rule(world), "permissions": {"issues": "read"}}])
    assert r.status_code == 422 and r.json()["field"] == "rules[0].permissions", r.text
    assert len(world.vault.leases) == leases


# -- 4. MCP: the secret of the rule that allowed the tool --------------------------------
def rpc(tool: str, **arguments: Any) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                         "params": {"name": tool, "arguments": arguments}})


def test_mcp_call_gets_the_secret_of_the_rule_that_allowed_its_tool(world: World) -> None:
    w = world
    where = {"host": "localhost", "allow_private": True,
             "port": w.api.https_port, "paths": ["/mcp/echo"]}
    task = new_task(w, [{"id": "t-add", **where, "mcp": {"tools": ["add"]}, "secret": "mcp-add"},
                        {"id": "t-search", **where, "mcp": {"tools": ["search"]},
                         "secret": "mcp-search"}])
    headers = {"Content-Type": "application/json", "Authorization": "Bearer agent-own",
               "Accept": "application/json, text/event-stream"}
    url = w.api_url("/mcp/echo")
    for tool, rule, secret, value in (("search", "t-search", "mcp-search", SEARCH_VALUE),
                                      ("add", "t-add", "mcp-add", ADD_VALUE),
                                      ("search", "t-search", "mcp-search", SEARCH_VALUE)):
        r = call(w, task, "POST", url, content=rpc(tool, a=1), headers=headers)
        assert r.status_code == 200, r.text
        assert w.api.seen[-1]["authorization"] == [f"Bearer {value}"], tool
        rec = record(w, r)
        assert (rec["decision"], rec["rule"], rec["secret"]) == ("allow", rule, secret)
        assert rec["tool"]["name"] == tool and rec["task"] == task["task_id"]
    before = len(w.api.seen)
    refused = call(w, task, "POST", url, content=rpc("danger"), headers=headers)
    assert refused.status_code == 200 and refused.json()["error"]["code"] < 0, refused.text
    assert len(w.api.seen) == before
    assert record(w, refused)["secret"] is None
    # A batch is never split across rules: one body would carry one rule's secret
    # to a tool another rule granted.
    batch = b"[" + rpc("add", a=1) + b"," + rpc("search", q="x").replace(b'"id":7', b'"id":8') \
        + b"]"
    mixed = call(w, task, "POST", url, content=batch, headers=headers)
    assert mixed.status_code == 200, mixed.text
    assert all("no single rule" in e["error"]["message"] for e in mixed.json()), mixed.text
    assert len(w.api.seen) == before
    assert record(w, mixed)["secret"] is None


# -- 5. Approval, then the secret --------------------------------------------------------
async def _held(w: World, marker: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=w.gw.control_url, headers=w.admin, timeout=10,
                                 trust_env=False) as ctl, asyncio.timeout(10):
        while True:
            r = await ctl.get("/v1/approvals")
            found = [h for h in r.json()["approvals"] if marker in h["url"]]
            if found:
                return found[0]
            await asyncio.sleep(0.05)


async def _answer(w: World, approval: dict[str, Any], verb: str) -> None:
    async with httpx.AsyncClient(base_url=w.gw.control_url, headers=w.admin, timeout=10,
                                 trust_env=False) as ctl:
        r = await ctl.post(f"/v1/approvals/{approval['id']}/{verb}", json={"by": "bob"})
        kept(r)
        assert r.status_code == 200, r.text


def pay_rule(w: World) -> dict[str, Any]:
    return {"id": "pay", "host": "localhost", "allow_private": True,
            "port": w.api.https_port, "methods": ["POST"],
            "paths": ["/pay/**"], "secret": "vault-db", "approval": "required"}


@pytest.mark.parametrize("verb", ["approve", "deny"])
async def test_secret_is_added_only_once_the_call_is_approved(world: World, verb: str) -> None:
    w = world
    task = new_task(w, [pay_rule(w)])
    marker = f"/pay/{verb}-{time.monotonic_ns()}"
    leases, seen = len(w.vault.leases), len(w.api.seen)
    async with httpx.AsyncClient(proxy=task["proxy_url"], verify=w.gw.ssl_context(),
                                 timeout=20, trust_env=False) as c:
        pending = asyncio.create_task(c.post(w.api_url(f"{marker}/echo"), content=b"{}",
                                             headers={"Authorization": "Bearer agent-own"}))
        approval = await _held(w, marker)
        await asyncio.sleep(0.3)
        assert not pending.done()
        assert len(w.api.seen) == seen and len(w.vault.leases) == leases  # nothing yet
        await _answer(w, approval, verb)
        r = kept(await pending)
    rec = record(w, r)
    if verb == "deny":
        assert r.status_code == 403 and rec["decision"] == "rejected", r.text
        assert len(w.api.seen) == seen and len(w.vault.leases) == leases
        return
    assert r.status_code == 200, r.text
    lease = w.vault.leases[-1]
    assert len(w.vault.leases) == leases + 1
    got = [s for s in w.api.seen[seen:] if s["path"].startswith(marker)]
    assert len(got) == 1 and got[0]["authorization"] == [f"Bearer {lease.value}"]
    assert (rec["decision"], rec["rule"]) == ("approved", "pay"), rec
    assert rec["secret"] == "vault-db", rec
    assert rec["approval"]["by"] == "bob"


# -- 7. The audit record of a task call with a secret -------------------------------------
def test_audit_record_names_task_owner_rule_and_secret_never_the_value(world: World) -> None:
    w, gh = world, world.github
    task = new_task(w, [with_port(gh_rule(), gh.https_port)], owner=OWNER,
                    purpose="triage issue 42")
    r = call(w, task, "GET", w.issues())
    assert r.status_code == 200, r.text
    token = gh.tokens[-1].token
    rec = record(w, r)
    assert rec["task"] == task["task_id"] and rec["owner"] == OWNER
    assert rec["workload"] == WORKLOAD and rec["rule"] == "gh-read"
    assert rec["decision"] == "allow" and rec["status"] == 200
    assert rec["secret"] == "github", rec
    raw = w.gw.audit_path.read_bytes()
    assert not any(s in raw for s in spellings(token))


# -- 6. Never leaked ----------------------------------------------------------------------
def test_canaries_and_task_tokens_appear_nowhere(world: World) -> None:
    """Last: no spelling of any secret value — nor of any task token — in the gateway's
    files, its output, /metrics, or any answer an agent or the orchestrator got
    (the task, audit and approval listings of the control plane included)."""
    w = world
    for path in ("/v1/tasks?limit=1000", "/v1/audit?limit=1000", "/v1/approvals"):
        r = kept(httpx.get(f"{w.gw.control_url}{path}", headers=w.admin, timeout=5))
        assert r.status_code == 200, (path, r.text)
    metrics = httpx.get(f"{w.gw.control_url}/metrics", timeout=5)
    assert metrics.status_code == 200
    for name in ("github", "vault-db", "mcp-add", "mcp-search"):
        assert f'secret="{name}"' in metrics.text, name
    assert "taskgate_active_tasks" in metrics.text
    live = {t.token for t in w.github.tokens if t.token not in w.github.revocations}
    assert w.gw.stop() == 0
    assert live <= set(w.github.revocations)  # the rest were revoked at shutdown
    blobs: dict[str, bytes] = {"gateway output": w.gw.output().encode(),
                               "/metrics": metrics.content}
    for f in w.gw.dir.rglob("*"):
        if f.is_file():
            blobs[str(f.relative_to(w.gw.dir))] = f.read_bytes()
    answers = {f"answer {i}": blob for i, blob in enumerate(RECEIVED)}
    assert len(RECEIVED) >= 30 and any(n.endswith("audit.jsonl") for n in blobs)
    canaries = w.canaries()
    assert len(canaries) >= 10
    leaks = [(name, value[:16]) for value in canaries for spelling in spellings(value)
             for name, blob in {**blobs, **answers}.items() if spelling in blob]
    # Task tokens: handed to the orchestrator on purpose (POST /v1/tasks), never
    # written by the gateway nor forwarded upstream (the echo would show them).
    upstream_answers = {n: b for n, b in answers.items() if b"proxy_url" not in b}
    leaks += [(name, "task token") for token in TASK_TOKENS for spelling in spellings(token)
              for name, blob in {**blobs, **upstream_answers}.items() if spelling in blob]
    assert leaks == []
