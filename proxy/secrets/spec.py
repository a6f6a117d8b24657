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

``inject`` is one of ``{header: NAME, value: TEMPLATE}``, ``{query: PARAM}`` or
``{basic: {username: TEMPLATE, password: TEMPLATE}}``; templates may use
``{token}`` and nothing else. Errors are ``ValueError``s that start with the key
path (``secrets["github-read"].app_id: …``) so the config loader can add the
line.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus

from .value import SecretValue

__all__ = [
    "EnvOptions",
    "FileOptions",
    "GitHubAppOptions",
    "InjectSpec",
    "OAuth2Options",
    "Placement",
    "SecretSpec",
    "VaultOptions",
    "parse_secret",
    "set_query_param",
]

PROVIDERS = ("env", "file", "oauth2_client_credentials", "github_app", "vault")
COMMON = ("provider", "inject", "refresh_skew_seconds", "default_ttl_seconds", "timeout_seconds")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_QUERY_NAME = re.compile(r"^[A-Za-z0-9_.~-]{1,64}$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_TOKEN = "{token}"  # noqa: S105 - the placeholder, not a password
# Headers the gateway or HTTP itself owns; a secret never goes there.
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
    "proxy-authorization", "proxy-connection", "keep-alive", "x-taskgate-request-id",
})


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one injected value goes: a header (``query`` False) or a query parameter."""

    name: str
    value: SecretValue
    query: bool = False


@dataclass(frozen=True, slots=True)
class InjectSpec:
    """How a secret's value is put on the outbound request."""

    kind: str  # "header" | "query" | "basic"
    name: str  # header name (Authorization for basic) or query parameter
    template: str = _TOKEN
    username: str = ""
    password: str = _TOKEN

    def render(self, token: SecretValue) -> Placement:
        value = token.reveal()
        if self.kind == "basic":
            pair = (self.username.replace(_TOKEN, value) + ":"
                    + self.password.replace(_TOKEN, value))
            text = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
            return Placement(self.name, SecretValue(text))
        text = self.template.replace(_TOKEN, value)
        return Placement(self.name, SecretValue(text), query=self.kind == "query")


def set_query_param(target: bytes, name: str, value: str) -> bytes:
    """``target`` with every ``name`` parameter (however encoded) replaced by one ``value``.

    Works on the raw request target so the agent's other parameters keep their
    exact bytes.
    """
    path, sep, query = target.partition(b"?")
    kept = [item for item in query.split(b"&") if item
            and unquote_plus(item.partition(b"=")[0].decode("latin-1")) != name] if sep else []
    kept.append(f"{quote(name, safe='')}={quote(value, safe='')}".encode("ascii"))
    return path + b"?" + b"&".join(kept)


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

    def to_dict(self) -> dict[str, Any]:
        """Provider and injection, for display: names, never values (there are none here)."""
        return {"name": self.name, "provider": self.provider, "inject": self.inject.kind}


class _Keys:
    """Reads one mapping, remembering the path for messages."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where, self.data = where, data

    def fail(self, key: str | None, msg: str) -> ValueError:
        return ValueError(f"{self.where}.{key}: {msg}" if key else f"{self.where}: {msg}")

    def str(self, key: str, default: str | None = None, *, required: bool = False
            ) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise self.fail(key, f"{value!r} is not a non-empty string")
        return str(value)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise self.fail(key, f"{value!r} is not a number between {lo:g} and {hi:g}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, f"{value!r} is not true or false")
        return value

    def one_of(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.data.get(key, default)
        if value not in choices:
            raise self.fail(key, f"{value!r}: use one of {', '.join(choices)}")
        return value

    def env_var(self, key: str, *, required: bool = False) -> str | None:
        value = self.str(key, required=required)
        if value is not None and not _ENV_VAR.match(value):
            raise self.fail(key, f"{value!r} is not an environment variable name")
        return value

    def file(self, key: str, *, required: bool = False) -> str | None:
        value = self.str(key, required=required)
        if value is not None and not os.path.isfile(value):
            raise self.fail(key, f"{value!r} does not exist")
        return value

    def url(self, key: str, default: str | None = None) -> str:
        value = self.str(key, default, required=default is None)
        assert value is not None
        value = value.rstrip("/")
        if value.startswith("http://") and self.flag("unsafe_allow_http"):
            return value
        if not value.startswith("https://") or len(value) <= len("https://"):
            raise self.fail(key, f"{value!r}: providers are called over https only "
                                 "(set unsafe_allow_http: true to allow http)")
        return value


def _one_source(k: _Keys, env_key: str, file_key: str) -> tuple[str | None, str | None]:
    env, path = k.env_var(env_key), k.file(file_key)
    if (env is None) == (path is None):
        raise k.fail(None, f"give exactly one of {env_key} or {file_key}")
    return env, path


def _env(k: _Keys) -> EnvOptions:
    return EnvOptions(k.env_var("var", required=True))  # type: ignore[arg-type]


def _file(k: _Keys) -> FileOptions:
    return FileOptions(k.file("path", required=True))  # type: ignore[arg-type]


def _oauth2(k: _Keys) -> OAuth2Options:
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


def _positive_id(k: _Keys, key: str) -> str:
    value = k.str(key, required=True)
    assert value is not None
    if not value.isdigit() or value.startswith("0"):
        raise k.fail(key, f"{value!r} is not a GitHub id (a positive number)")
    return value


def _github(k: _Keys) -> GitHubAppOptions:
    return GitHubAppOptions(
        app_id=_positive_id(k, "app_id"),
        private_key_file=k.file("private_key_file", required=True),  # type: ignore[arg-type]
        installation_id=_positive_id(k, "installation_id"),
        api_url=k.url("api_url", "https://api.github.com"),
    )


_VAULT_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def _vault(k: _Keys) -> VaultOptions:
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


_PROVIDER_KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "env": (("var",), _env),
    "file": (("path",), _file),
    "oauth2_client_credentials": (
        ("token_url", "client_id", "client_secret_env", "client_secret_file", "scope",
         "audience", "auth_method", "per_task", "unsafe_allow_http"), _oauth2),
    "github_app": (("app_id", "private_key_file", "installation_id", "api_url",
                    "unsafe_allow_http"), _github),
    "vault": (("address", "token_env", "token_file", "path", "field", "engine", "mount",
               "namespace", "unsafe_allow_http"), _vault),
}


def _template(k: _Keys, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise k.fail(key, f"{value!r} is not a string template such as 'Bearer {{token}}'")
    rest = value.replace(_TOKEN, "")
    if "{" in rest or "}" in rest:
        raise k.fail(key, f"{value!r}: the only placeholder is {{token}}")
    if any(c in value for c in "\r\n\0"):
        raise k.fail(key, "a template cannot hold line breaks or NUL")
    return value


def _inject(where: str, data: Any) -> InjectSpec:
    if data is None:
        return InjectSpec("header", "Authorization", "Bearer {token}")
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected {{header: NAME, value: 'Bearer {{token}}'}}, "
                         "{query: PARAM} or {basic: {username: ..., password: '{token}'}}")
    k = _Keys(where, data)
    kinds = [kind for kind in ("header", "query", "basic") if kind in data]
    if len(kinds) != 1:
        raise k.fail(None, "give exactly one of header, query or basic")
    kind = kinds[0]
    allowed = {"header": ("header", "value"), "query": ("query",), "basic": ("basic",)}[kind]
    for key in data:
        if key not in allowed:
            raise k.fail(key, f"unknown key; with {kind!r} use {', '.join(allowed)}")
    if kind == "header":
        name = k.str("header")
        assert name is not None
        if not _HEADER_NAME.match(name) or name.lower() in _RESERVED_HEADERS:
            raise k.fail("header", f"{name!r} cannot carry a secret")
        template = _template(k, "value", data.get("value", _TOKEN))
        if _TOKEN not in template:
            raise k.fail("value", f"{template!r} does not use {{token}}")
        return InjectSpec("header", name, template)
    if kind == "query":
        name = k.str("query")
        assert name is not None
        if not _QUERY_NAME.match(name):
            raise k.fail("query", f"{name!r} is not a plain query parameter name")
        return InjectSpec("query", name)
    basic = data["basic"]
    bk = _Keys(f"{where}.basic", basic if isinstance(basic, Mapping) else {})
    if not isinstance(basic, Mapping):
        raise bk.fail(None, "expected {username: TEMPLATE, password: TEMPLATE}")
    for key in basic:
        if key not in ("username", "password"):
            raise bk.fail(key, "unknown key; use username and password")
    user = _template(bk, "username", basic.get("username", ""))
    password = _template(bk, "password", basic.get("password", _TOKEN))
    if ":" in user.replace(_TOKEN, ""):
        raise bk.fail("username", "a basic-auth username cannot contain ':'")
    if _TOKEN not in user + password:
        raise bk.fail(None, "username or password must use {token}")
    return InjectSpec("basic", "Authorization", username=user, password=password)


def parse_secret(name: str, data: Any, where: str = "") -> SecretSpec:
    """Validate one ``secrets.<name>`` entry; the ``ValueError`` names the key and the fix."""
    where = where or f"secrets.{name}"
    if not NAME.match(name):
        raise ValueError(f"{where}: {name!r} is not a secret name (letters, digits, '_', '.', "
                         "'-'; at most 64)")
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping with a 'provider' and its settings")
    k = _Keys(where, data)
    provider = data.get("provider")
    if provider not in PROVIDERS:
        raise k.fail("provider", f"{provider!r}: use one of {', '.join(PROVIDERS)}")
    keys, parse = _PROVIDER_KEYS[provider]
    for key in data:
        if key not in COMMON and key not in keys:
            raise k.fail(str(key), f"unknown key for provider {provider!r}; "
                                   f"expected one of {', '.join(COMMON + keys)}")
    options = parse(k)
    return SecretSpec(
        name=name, provider=provider, options=options,
        inject=_inject(f"{where}.inject", data.get("inject")),
        refresh_skew_seconds=k.number("refresh_skew_seconds", 60.0, 0, 3600),
        default_ttl_seconds=k.number("default_ttl_seconds", 300.0, 1, 86400),
        timeout_seconds=k.number("timeout_seconds", 10.0, 0.1, 120),
    )
