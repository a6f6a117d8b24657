"""``secrets.<name>`` in the config: plain data → validated, immutable specs.

Each provider has its own keys (SPEC, section Secrets) plus the common ones::

    secrets:
      github-read:
        provider: github_app          # env | file | oauth2_client_credentials | github_app | vault
        app_id: 12345
        private_key_file: /run/keys/app.pem
        installation_id: 678
        inject: {header: Authorization, value: "Bearer {token}"}
        refresh_skew_seconds: 60      # refresh once less than min(half the life, this) is left
        default_ttl_seconds: 300      # lifetime of a value whose issuer gives none
        timeout_seconds: 10           # per provider request
        revoke_backoff_seconds: 1     # github_app, vault: first wait after a failed
        revoke_max_backoff_seconds: 300  # revocation, doubling (jittered) up to this

``inject`` is read by :mod:`proxy.secrets.placement`. Errors are
``ValueError``s that start with the key path (``secrets["github-read"].app_id:
…``) so the config loader can add the line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.errors import InvalidField
from proxy.policy import Rule

from ._keys import Keys
from .placement import InjectSpec, parse_inject

__all__ = [
    "EnvOptions",
    "FileOptions",
    "GitHubAppOptions",
    "OAuth2Options",
    "SecretSpec",
    "VaultOptions",
    "check_token_scope",
    "parse_secret",
]

PROVIDERS = ("env", "file", "oauth2_client_credentials", "github_app", "vault")
COMMON = ("provider", "inject", "refresh_skew_seconds", "default_ttl_seconds", "timeout_seconds")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class EnvOptions:
    var: str


@dataclass(frozen=True, slots=True)
class FileOptions:
    path: str


@dataclass(frozen=True, slots=True)
class OAuth2Options:
    token_url: str
    client_id: str
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    scope: str | None = None
    audience: str | None = None
    auth_method: str = "client_secret_basic"
    per_task: bool = False


@dataclass(frozen=True, slots=True)
class GitHubAppOptions:
    app_id: str
    private_key_file: str
    installation_id: str
    api_url: str = "https://api.github.com"


@dataclass(frozen=True, slots=True)
class VaultOptions:
    address: str
    path: str
    field: str
    token_env: str | None = None
    token_file: str | None = None
    engine: str = "kv2"
    mount: str = "secret"
    namespace: str | None = None


Options = EnvOptions | FileOptions | OAuth2Options | GitHubAppOptions | VaultOptions


@dataclass(frozen=True, slots=True)
class SecretSpec:
    """One validated ``secrets.<name>`` entry."""

    name: str
    provider: str
    options: Options
    inject: InjectSpec
    refresh_skew_seconds: float = 60.0
    default_ttl_seconds: float = 300.0
    timeout_seconds: float = 10.0
    revoke_backoff_seconds: float = 1.0
    revoke_max_backoff_seconds: float = 300.0


def _one_source(k: Keys, env_key: str, file_key: str) -> tuple[str | None, str | None]:
    env, path = k.env_var(env_key), k.file(file_key)
    if (env is None) == (path is None):
        raise k.fail(None, f"give exactly one of {env_key} or {file_key}")
    return env, path


def _env(k: Keys) -> EnvOptions:
    return EnvOptions(k.env_var("var", required=True))  # type: ignore[arg-type]


def _file(k: Keys) -> FileOptions:
    return FileOptions(k.file("path", required=True))  # type: ignore[arg-type]


def _oauth2(k: Keys) -> OAuth2Options:
    env, path = _one_source(k, "client_secret_env", "client_secret_file")
    scope = k.data.get("scope")
    if isinstance(scope, list):
        if not all(isinstance(s, str) and s and " " not in s for s in scope):
            raise k.fail("scope", "a list of scopes holds non-empty strings without spaces")
        scope = " ".join(scope) or None
    elif scope is not None:
        scope = k.str("scope")
    return OAuth2Options(
        token_url=k.url("token_url"), client_id=k.str("client_id", required=True),  # type: ignore[arg-type]
        client_secret_env=env, client_secret_file=path, scope=scope,
        audience=k.str("audience"),
        auth_method=k.one_of("auth_method", ("client_secret_basic", "client_secret_post"),
                             "client_secret_basic"),
        per_task=k.flag("per_task"),
    )


def _positive_id(k: Keys, key: str) -> str:
    value = k.str(key, required=True)
    assert value is not None
    if not value.isdigit() or value.startswith("0"):
        raise k.fail(key, f"{value!r} is not a GitHub id (a positive number)")
    return value


def _github(k: Keys) -> GitHubAppOptions:
    return GitHubAppOptions(
        app_id=_positive_id(k, "app_id"),
        private_key_file=k.file("private_key_file", required=True),  # type: ignore[arg-type]
        installation_id=_positive_id(k, "installation_id"),
        api_url=k.url("api_url", "https://api.github.com"),
    )


_VAULT_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def _vault(k: Keys) -> VaultOptions:
    env, path = _one_source(k, "token_env", "token_file")
    engine = k.one_of("engine", ("kv2", "dynamic"), "kv2")
    secret_path = k.str("path", required=True)
    assert secret_path is not None
    if not _VAULT_PATH.match(secret_path) or any(p in (".", "..") for p in secret_path.split("/")):
        raise k.fail("path", f"{secret_path!r} is not a Vault path such as 'team/github'")
    mount = k.str("mount", "secret")
    assert mount is not None
    if engine == "dynamic" and "mount" in k.data:
        raise k.fail("mount", "a dynamic secret's path is the full path "
                              "(e.g. 'database/creds/readonly'); leave mount out")
    if not _VAULT_PATH.match(mount):
        raise k.fail("mount", f"{mount!r} is not a mount path such as 'secret'")
    return VaultOptions(
        address=k.url("address"), path=secret_path, field=k.str("field", required=True),  # type: ignore[arg-type]
        token_env=env, token_file=path, engine=engine, mount=mount,
        namespace=k.str("namespace"),
    )


REVOKE_KEYS = ("revoke_backoff_seconds", "revoke_max_backoff_seconds")
_PROVIDER_KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "env": (("var",), _env),
    "file": (("path",), _file),
    "oauth2_client_credentials": (
        ("token_url", "client_id", "client_secret_env", "client_secret_file", "scope",
         "audience", "auth_method", "per_task", "unsafe_allow_http"), _oauth2),
    "github_app": (("app_id", "private_key_file", "installation_id", "api_url",
                    "unsafe_allow_http", *REVOKE_KEYS), _github),
    "vault": (("address", "token_env", "token_file", "path", "field", "engine", "mount",
               "namespace", "unsafe_allow_http", *REVOKE_KEYS), _vault),
}


def parse_secret(name: str, data: Any, where: str = "") -> SecretSpec:
    """Validate one ``secrets.<name>`` entry; the ``ValueError`` names the key and the fix."""
    where = where or f"secrets.{name}"
    if not NAME.match(name):
        raise ValueError(f"{where}: {name!r} is not a secret name (letters, digits, '_', '.', "
                         "'-'; at most 64)")
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping with a 'provider' and its settings")
    k = Keys(where, data)
    provider = data.get("provider")
    if provider not in PROVIDERS:
        raise k.fail("provider", f"{provider!r}: use one of {', '.join(PROVIDERS)}")
    keys, parse = _PROVIDER_KEYS[provider]
    for key in data:
        if key not in COMMON and key not in keys:
            raise k.fail(str(key), f"unknown key for provider {provider!r}; "
                                   f"expected one of {', '.join(COMMON + keys)}")
    options = parse(k)
    backoff = k.number("revoke_backoff_seconds", 1.0, 0.01, 3600)
    max_backoff = k.number("revoke_max_backoff_seconds", 300.0, 0.01, 86400)
    if max_backoff < backoff:
        raise k.fail("revoke_max_backoff_seconds",
                     f"{max_backoff:g} is less than revoke_backoff_seconds ({backoff:g})")
    return SecretSpec(
        name=name, provider=provider, options=options,
        inject=parse_inject(f"{where}.inject", data.get("inject")),
        refresh_skew_seconds=k.number("refresh_skew_seconds", 60.0, 0, 3600),
        default_ttl_seconds=k.number("default_ttl_seconds", 300.0, 1, 86400),
        timeout_seconds=k.number("timeout_seconds", 10.0, 0.1, 120),
        revoke_backoff_seconds=backoff, revoke_max_backoff_seconds=max_backoff,
    )


def check_token_scope(rule: Rule, secrets: Mapping[str, SecretSpec]) -> None:
    """``repositories``/``permissions`` only where they limit a token: a github_app secret.

    Elsewhere the provider would ignore them, and the rule would look narrower than
    the credential it gets. The one place this is checked, for the config's rules and
    for a task's; :class:`InvalidField` with a path relative to the rule."""
    if not (rule.repositories or rule.permissions is not None) or rule.secret is None:
        return
    spec = secrets.get(rule.secret)
    if spec is None or spec.provider == "github_app":
        return
    raise InvalidField(("repositories",) if rule.repositories else ("permissions",),
                       f"rule {rule.id!r} limits repositories/permissions, which only a "
                       f"github_app secret can do; secret {rule.secret!r} is {spec.provider}",
                       rule=rule.id)
