"""``secrets.<name>`` validation: every bad input names its key; check-config catches it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config._model import parse_config
from proxy.errors import ConfigError
from proxy.secrets.placement import InjectSpec, set_query_param
from proxy.secrets.spec import GitHubAppOptions, OAuth2Options, VaultOptions
from proxy.secrets.value import SecretValue
from tests.support import REPO


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name in ("key.pem", "secret.txt", "token.txt"):
        (tmp_path / name).write_text("x" * 16)
        out[name] = str(tmp_path / name)
    # config checks load the GitHub App key: a real RSA key (issue 10 item 14)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    (tmp_path / "key.pem").write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out


def oauth(files: dict[str, str], **kw: Any) -> dict[str, Any]:
    return {"provider": "oauth2_client_credentials", "token_url": "https://idp.test/token",
            "client_id": "gw", "client_secret_file": files["secret.txt"], **kw}


def github(files: dict[str, str], **kw: Any) -> dict[str, Any]:
    return {"provider": "github_app", "app_id": 123, "installation_id": "456",
            "private_key_file": files["key.pem"], **kw}


def vault(files: dict[str, str], **kw: Any) -> dict[str, Any]:
    return {"provider": "vault", "address": "https://vault.test:8200",
            "token_file": files["token.txt"], "path": "team/api", "field": "key", **kw}


def env(**kw: Any) -> dict[str, Any]:
    return {"provider": "env", "var": "API_KEY", **kw}


def check(secret: Any, name: str = "s", rules: list[dict[str, Any]] | None = None) -> Any:
    doc: dict[str, Any] = {"secrets": {name: secret}}
    if rules is not None:
        doc["workloads"] = {"spiffe://w": {"standing": rules}}
    return parse_config(doc, "t.yaml")


def test_every_provider_parses(files: dict[str, str]) -> None:
    doc = {"secrets": {
        "a": env(inject={"header": "X-Api-Key"}),
        "b": {"provider": "file", "path": files["secret.txt"], "inject": {"query": "key"}},
        "c": oauth(files, scope=["read", "write"], audience="https://api.test",
                   auth_method="client_secret_post", per_task=True),
        "d": github(files, api_url="https://ghe.acme.test/api/v3/"),
        "e": vault(files, engine="dynamic", path="database/creds/ro", field="password"),
        "f": vault(files, address="http://127.0.0.1:8200", unsafe_allow_http=True,
                   inject={"basic": {"username": "svc"}}),
    }}
    s = parse_config(doc, "t.yaml").secrets
    assert s["a"].inject == InjectSpec("header", "X-Api-Key", "{token}")
    assert s["b"].inject.kind == "query" and s["b"].default_ttl_seconds == 300
    assert s["c"].options == OAuth2Options(
        "https://idp.test/token", "gw", None, files["secret.txt"], "read write",
        "https://api.test", "client_secret_post", True)
    assert s["d"].options == GitHubAppOptions("123", files["key.pem"], "456",
                                              "https://ghe.acme.test/api/v3")
    assert isinstance(s["e"].options, VaultOptions) and s["e"].options.engine == "dynamic"
    assert s["f"].inject.kind == "basic"
    assert s["a"].refresh_skew_seconds == 60 and s["a"].timeout_seconds == 10


def test_default_injection_is_a_bearer_authorization_header() -> None:
    spec = check(env()).secrets["s"].inject
    place = spec.render(SecretValue("tok123456"))
    assert (place.name, place.value.reveal(), place.query) == (
        "Authorization", "Bearer tok123456", False)
    assert repr(place).count("[secure]") == 1 and "tok123456" not in repr(place)


BAD: list[tuple[str, Any, str]] = [
    ("no provider", {"var": "X"}, 'secrets.s: a secret needs a \'provider\''),
    ("unknown provider", {"provider": "aws"}, "secrets.s.provider: 'aws': use one of env"),
    ("env without var", {"provider": "env"}, "secrets.s.var: is required"),
    ("env bad var", env(var="1BAD"), "secrets.s.var: '1BAD' is not an environment variable"),
    ("key of another provider", env(token_url="https://x"),
     "secrets.s.token_url: unknown key for provider 'env'"),
    ("file missing", {"provider": "file", "path": "/nonexistent/x"},
     "secrets.s.path: '/nonexistent/x' does not exist"),
    ("oauth two secrets", "OAUTH_BOTH",
     "secrets.s: give exactly one of client_secret_env or client_secret_file"),
    ("oauth no secret", "OAUTH_NONE",
     "secrets.s: give exactly one of client_secret_env or client_secret_file"),
    ("oauth http", "OAUTH_HTTP", "secrets.s.token_url: 'http://idp.test/token': providers "
                                 "are called over https only"),
    ("oauth auth method", "OAUTH_METHOD",
     "secrets.s.auth_method: 'private_key_jwt': use one of client_secret_basic"),
    ("oauth per_task", "OAUTH_PER_TASK", "secrets.s.per_task: 'yes' is not true or false"),
    ("oauth scope", "OAUTH_SCOPE", "secrets.s.scope: a list of scopes holds non-empty strings"),
    ("oauth no client id", "OAUTH_NO_ID", "secrets.s.client_id: is required"),
    ("github app id", "GH_APP_ID", "secrets.s.app_id: 'abc' is not a GitHub id"),
    ("github no key", "GH_NO_KEY", "secrets.s.private_key_file: is required"),
    ("github http api", "GH_HTTP", "secrets.s.api_url: 'http://ghe.test': providers are "
                                   "called over https only"),
    ("vault engine", "VAULT_ENGINE", "secrets.s.engine: 'kv1': use one of kv2, dynamic"),
    ("vault dot path", "VAULT_DOTS", "secrets.s.path: 'team/../root' is not a Vault path"),
    ("vault dynamic mount", "VAULT_DYN_MOUNT", "secrets.s.mount: a dynamic secret's path is "
                                               "the full path"),
    ("vault no field", "VAULT_NO_FIELD", "secrets.s.field: is required"),
    ("vault two tokens", "VAULT_TWO_TOKENS",
     "secrets.s: give exactly one of token_env or token_file"),
    ("two placements", env(inject={"header": "X-Key", "query": "k"}),
     "secrets.s.inject: give exactly one of header, query or basic"),
    ("inject not a mapping", env(inject="Bearer"), "secrets.s.inject: expected {header"),
    ("reserved header", env(inject={"header": "Host"}),
     "secrets.s.inject.header: 'Host' cannot carry a secret"),
    ("proxy header", env(inject={"header": "Proxy-Authorization"}),
     "secrets.s.inject.header: 'Proxy-Authorization' cannot carry a secret"),
    ("template without token", env(inject={"header": "Authorization", "value": "Bearer"}),
     "secrets.s.inject.value: 'Bearer' does not use {token}"),
    ("template other field", env(inject={"header": "X-Key", "value": "{token}{user}"}),
     "secrets.s.inject.value: '{token}{user}': the only placeholder is {token}"),
    ("template line break", env(inject={"header": "X-Key", "value": "{token}\r\nX: 1"}),
     "secrets.s.inject.value: a template cannot hold line breaks"),
    ("header extra key", env(inject={"header": "X-Key", "prefix": "Bearer"}),
     "secrets.s.inject.prefix: unknown key; with 'header' use header, value"),
    ("bad query name", env(inject={"query": "a&b"}),
     "secrets.s.inject.query: 'a&b' is not a plain query parameter name"),
    ("basic without token", env(inject={"basic": {"username": "u", "password": "p"}}),
     "secrets.s.inject.basic: username or password must use {token}"),
    ("basic colon", env(inject={"basic": {"username": "a:b"}}),
     "secrets.s.inject.basic.username: a basic-auth username cannot contain ':'"),
    ("basic extra key", env(inject={"basic": {"user": "u"}}),
     "secrets.s.inject.basic.user: unknown key; use username and password"),
    ("negative skew", env(refresh_skew_seconds=-1),
     "secrets.s.refresh_skew_seconds: -1 is not a number between 0 and 3600"),
    ("zero ttl", env(default_ttl_seconds=0),
     "secrets.s.default_ttl_seconds: 0 is not a number between 1 and 86400"),
    ("bool timeout", env(timeout_seconds=True),
     "secrets.s.timeout_seconds: True is not a number"),
]


def _resolve(secret: Any, files: dict[str, str]) -> Any:
    if not isinstance(secret, str):
        return secret
    return {
        "OAUTH_BOTH": oauth(files, client_secret_env="X"),
        "OAUTH_NONE": {k: v for k, v in oauth(files).items() if k != "client_secret_file"},
        "OAUTH_HTTP": oauth(files, token_url="http://idp.test/token"),
        "OAUTH_METHOD": oauth(files, auth_method="private_key_jwt"),
        "OAUTH_PER_TASK": oauth(files, per_task="yes"),
        "OAUTH_SCOPE": oauth(files, scope=["read write"]),
        "OAUTH_NO_ID": {k: v for k, v in oauth(files).items() if k != "client_id"},
        "GH_APP_ID": github(files, app_id="abc"),
        "GH_NO_KEY": {k: v for k, v in github(files).items() if k != "private_key_file"},
        "GH_HTTP": github(files, api_url="http://ghe.test"),
        "VAULT_ENGINE": vault(files, engine="kv1"),
        "VAULT_DOTS": vault(files, path="team/../root"),
        "VAULT_DYN_MOUNT": vault(files, engine="dynamic", mount="db"),
        "VAULT_NO_FIELD": {k: v for k, v in vault(files).items() if k != "field"},
        "VAULT_TWO_TOKENS": vault(files, token_env="VAULT_TOKEN"),
    }[secret]


@pytest.mark.parametrize(("case", "secret", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_secret_is_refused_naming_the_key(case: str, secret: Any, message: str,
                                              files: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as e:
        check(_resolve(secret, files))
    assert message in str(e.value), str(e.value)


def test_bad_secret_name() -> None:
    with pytest.raises(ConfigError, match=r"'bad name' is not a secret name"):
        check(env(), name="bad name")


RULE = {"id": "r", "host": "api.github.com", "methods": ["GET"], "secret": "s"}
BAD_RULES: list[tuple[str, dict[str, Any], Any, str]] = [
    ("undefined secret", {**RULE, "secret": "other"}, None,
     "standing rule 'r' names secret 'other', which is not defined"),
    ("scope for a non-github secret", {**RULE, "repositories": ["widgets"]}, "env",
     "standing rule 'r' limits repositories/permissions, which only a github_app secret"),
    ("scope without a secret", {k: v for k, v in {**RULE, "permissions": {"issues": "read"}
                                                  }.items() if k != "secret"}, "github",
     ".permissions: repositories and permissions limit a secret's token"),
    ("repository with owner", {**RULE, "repositories": ["acme/widgets"]}, "github",
     ".repositories[0]: 'acme/widgets' is not a repository name (without the owner"),
    ("empty repositories", {**RULE, "repositories": []}, "github",
     ".repositories: repositories must be a list of 1-500"),
    ("bad permission level", {**RULE, "permissions": {"issues": "execute"}}, "github",
     ".permissions.issues: 'execute': use one of read, write, admin"),
    ("bad permission name", {**RULE, "permissions": {"Issues!": "read"}}, "github",
     "'Issues!' is not a permission name"),
]


@pytest.mark.parametrize(("case", "rule", "kind", "message"), BAD_RULES,
                         ids=[b[0] for b in BAD_RULES])
def test_bad_rule_secret_scope_is_refused(case: str, rule: dict[str, Any], kind: Any,
                                          message: str, files: dict[str, str]) -> None:
    secret = github(files) if kind == "github" else env()
    with pytest.raises(ConfigError) as e:
        check(secret, rules=[rule])
    assert message in str(e.value), str(e.value)


def test_rule_scope_round_trips(files: dict[str, str]) -> None:
    rule = {**RULE, "repositories": ["widgets", "gears", "widgets"],
            "permissions": {"issues": "read", "contents": "write"}}
    parsed = check(github(files), rules=[rule]).workloads["spiffe://w"].standing[0]
    assert parsed.repositories == ("gears", "widgets")
    assert parsed.to_dict()["permissions"] == {"issues": "read", "contents": "write"}


@pytest.mark.parametrize(("target", "expected"), [
    (b"/a", b"/a?k=v%2F1"),
    (b"/a?", b"/a?k=v%2F1"),
    (b"/a?x=1&k=agent&y", b"/a?x=1&y&k=v%2F1"),
    (b"/a?k%3D=1&k=2&%6B=3&k", b"/a?k%3D=1&k=v%2F1"),
    (b"/a?x=%20+&k=agent", b"/a?x=%20+&k=v%2F1"),
])
def test_query_injection_replaces_every_spelling(target: bytes, expected: bytes) -> None:
    assert set_query_param(target, "k", "v/1") == expected


@pytest.mark.parametrize(("target", "expected"), [
    (b"/a", b"/a"),
    (b"/a?k=agent", b"/a"),
    (b"/a?x=1&k=agent&%6B=again&y", b"/a?x=1&y"),
])
def test_query_param_removed_in_every_spelling(target: bytes, expected: bytes) -> None:
    assert set_query_param(target, "k", None) == expected


def test_check_config_names_file_line_and_key(tmp_path: Path, files: dict[str, str]) -> None:
    cfg = tmp_path / "taskgate.yaml"
    cfg.write_text(
        "secrets:\n"
        "  gh:\n"
        "    provider: github_app\n"
        "    app_id: 1\n"
        f"    private_key_file: {files['key.pem']}\n"
        "    installation_id: 2\n"
        "    inject:\n"
        "      value: 'Bearer {token}'\n"
        "      header: Host\n")
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out
    assert out.stderr.strip() == (f"taskgate: {cfg}:9: secrets.gh.inject.header: 'Host' "
                                  "cannot carry a secret")
