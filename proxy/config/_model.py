"""Configuration: one versioned YAML file → a validated, immutable model.

The file format is kept apart from the model: YAML is parsed with line
numbers (ruamel.yaml, which mitmproxy already ships), checked key by key, and
converted into :class:`Config`. Every key has a default; an unknown key, a
wrong type or a bad rule is an error naming the file, the line, the key path
and the fix, e.g.::

    taskgate.yaml:14: workloads["spiffe://acme.dev/agent/triage"].ceiling[2].host:
    '*foo.com' is not a valid pattern; use '*.foo.com'

Relative paths are read from the directory the gateway runs in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from proxy.config import _files as config_files
from proxy.errors import ConfigError, InvalidField
from proxy.policy import Rule, parse_rule
from proxy.secrets.spec import SecretSpec, check_token_scope, parse_secret

__all__ = ["Config", "IssuerConfig", "Network", "WorkloadConfig", "load_config", "parse_config"]

CONFIG_VERSION = 1
DEFAULT_FILE = "taskgate.yaml"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """A trusted issuer of workload tokens."""

    issuer: str
    audience: str
    jwks_file: str | None = None
    jwks_url: str | None = None


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """What a workload is: who answers for it, the most it may get, what it has always."""

    owner: str | None = None
    ceiling: tuple[Rule, ...] = ()
    standing: tuple[Rule, ...] = ()
    sources: tuple[Network, ...] = ()  # client addresses that are this workload (transparent)
    mode: str = "enforce"  # "report": calls the rules refuse go through, recorded would_deny
    report_allowed: bool = False  # a task of this workload may ask for "mode": "report"
    require_binding: bool = False  # a task of this workload must be bound ("bind")


@dataclass(frozen=True, slots=True)
class Config:
    source: str = "<embedded defaults>"
    digest: str | None = None  # sha256 of the file read (reload records name old and new)
    version: int = CONFIG_VERSION
    proxy_listen: tuple[str, int] = ("127.0.0.1", 8080)
    control_listen: tuple[str, int] = ("127.0.0.1", 8081)
    transparent_listen: tuple[str, int] | None = None  # mitmproxy's transparent mode, if set
    home: str = ".taskgate"
    admin_token_file: str = ".taskgate/admin-token"  # noqa: S105 - a path
    upstream_ca_file: str | None = None
    audit_path: str = ".taskgate/audit.jsonl"
    audit_hmac_key_file: str | None = None
    audit_max_bytes: int = 100 * 1024 * 1024  # rotate past this size; 0 never rotates
    issuers: tuple[IssuerConfig, ...] = ()
    leeway_seconds: float = 30.0
    workloads: Mapping[str, WorkloadConfig] = field(default_factory=dict)
    secrets: Mapping[str, SecretSpec] = field(default_factory=dict)
    approval_timeout_seconds: float = 300.0
    shutdown_grace_seconds: float = 10.0
    stream_threshold_bytes: int = 1024 * 1024
    max_inspect_bytes: int = 1024 * 1024
    max_connections: int = 10000  # agent connections open at once, from everyone
    max_connections_per_client: int = 256  # … from one client IP
    idle_timeout_seconds: int = 600  # a connection with no traffic either way is closed
    max_header_bytes: int = 64 * 1024  # an HTTP/1 request head longer than this: 431
    websocket_max_message_bytes: int = 16 * 1024 * 1024  # a longer one closes the socket (1009)
    header_timeout_seconds: int = 30  # a request head not in by then: the connection closes
    control_max_connections: int = 256  # control-plane connections open at once
    control_header_timeout_seconds: int = 10  # … to send a request head
    control_idle_timeout_seconds: int = 60  # … kept open with no request (keep-alive)
    # Where task-scoped state lives: "sqlite" (embedded, one process) or "redis" (shared
    # by workers and replicas; the URL, its password file and the key prefix below).
    state_backend: str = "sqlite"
    redis_url: str | None = None
    redis_password_file: str | None = None
    redis_key_prefix: str = "taskgate:"
    workers: int = 1  # proxy processes on this host sharing listen.proxy (SO_REUSEPORT)
    replica_id: str | None = None  # in every audit record; None: hostname-pid at start

    @property
    def ca_dir(self) -> str:
        return os.path.join(self.home, "ca")

    @property
    def ca_cert_file(self) -> str:
        return os.path.join(self.ca_dir, "mitmproxy-ca-cert.pem")


class _Where:
    """Where a value sits in the file, for error messages."""

    def __init__(self, source: str, path: str, line: int | None) -> None:
        self.source, self.path, self.line = source, path, line

    def fail(self, msg: str) -> ConfigError:
        loc = f"{self.source}:{self.line + 1}" if self.line is not None else self.source
        return ConfigError(f"{loc}: {self.path}: {msg}" if self.path else f"{loc}: {msg}")


def _line(node: Any, key: Any) -> int | None:
    lc = getattr(node, "lc", None)
    if lc is None:
        return None
    try:
        return (lc.key(key) if isinstance(key, str) else lc.item(key))[0]
    except (KeyError, IndexError, TypeError, AttributeError):
        return getattr(lc, "line", None)


def _child(where: _Where, node: Any, key: Any) -> _Where:
    if isinstance(key, int):
        path = f"{where.path}[{key}]"
    elif where.path == "workloads" or not key.isidentifier():
        path = f'{where.path}["{key}"]'
    else:
        path = f"{where.path}.{key}" if where.path else key
    line = _line(node, key)
    return _Where(where.source, path, line if line is not None else where.line)


def _mapping(where: _Where, node: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise where.fail(f"expected a mapping with keys {', '.join(allowed)}")
    for key in node:
        if not isinstance(key, str) or key not in allowed:
            w = _child(where, node, str(key))
            raise w.fail(f"unknown key {key!r}; expected one of {', '.join(allowed)}")
    return node


def _str(where: _Where, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise where.fail(f"{value!r} is not a non-empty string")
    return value


def _number(where: _Where, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise where.fail(f"{value!r} is not a number between {lo:g} and {hi:g}")
    return float(value)


def _int(where: _Where, value: Any, lo: int, hi: int) -> int:
    """A whole number in [lo, hi]: never a float (1.5 would become 1), a bool, a string."""
    want = f"a number between {lo} and {hi}"
    if isinstance(value, float) and not isinstance(value, bool):
        raise where.fail(f"{value!r} is not a whole number; write {want} without a fraction"
                         f"{f', e.g. {int(value)}' if lo <= int(value) <= hi else ''}")
    if isinstance(value, bool) or not isinstance(value, int):
        hint = (f"; write it without quotes: {value.strip()}"
                if isinstance(value, str) and value.strip().isdigit() else "")
        raise where.fail(f"{value!r} is not {want}{hint}")
    if not lo <= value <= hi:
        raise where.fail(f"{value!r} is not {want}")
    return value


def _file(where: _Where, path: str, check: Callable[[str], str | None]) -> None:
    """The file ``path`` is there and loads as the gateway will load it."""
    if not os.path.exists(path):
        raise where.fail(f"{path!r} does not exist")
    problem = check(path)
    if problem is not None:
        raise where.fail(problem)


def _hostport(where: _Where, value: Any) -> tuple[str, int]:
    text = _str(where, value)
    assert text is not None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise where.fail(f"{text!r} is not host:port; use e.g. '127.0.0.1:8080'")
    return host.strip("[]") or "0.0.0.0", int(port)


def _rules(where: _Where, node: Any) -> tuple[Rule, ...]:
    if node is None:
        return ()
    if not isinstance(node, list):
        raise where.fail("expected a list of rules")
    rules: list[Rule] = []
    for i, item in enumerate(node):
        w = _child(where, node, i)
        try:
            rule = parse_rule(item)
        except InvalidField as e:
            # The line of the rule's key to blame (the rule's own line for the rule).
            key = e.path[0] if e.path else None
            line = _line(item, key) if isinstance(item, Mapping) and key in item else None
            line = line if line is not None else w.line
            raise ConfigError(f"{w.source}:{(line or 0) + 1}: {e.at(w.path)}") from None
        if any(r.id == rule.id for r in rules):
            raise _child(w, item, "id").fail(f"duplicate rule id {rule.id!r}")
        rules.append(rule)
    return tuple(rules)


_TOP = ("version", "listen", "home", "admin_token_file", "upstream", "audit", "identity",
        "workloads", "secrets", "approval_timeout_seconds", "proxy", "mcp", "control", "state",
        "replica_id")
STATE_BACKENDS = ("sqlite", "redis")
MAX_WORKERS = 64


def parse_config(doc: Any, source: str = "<config>") -> Config:
    """Validate a parsed YAML document into a :class:`Config`."""
    root = _Where(source, "", 0)
    top = _mapping(root, doc, _TOP)
    kw: dict[str, Any] = {"source": source}

    def sub(key: str) -> tuple[_Where, Any]:
        return _child(root, top, key), top.get(key)

    w, v = sub("version")
    if v is not None and (type(v) is not int or v != CONFIG_VERSION):
        raise w.fail(f"unsupported config version {v!r}; this gateway reads version 1")

    w, v = sub("listen")
    listen = _mapping(w, v, ("proxy", "control", "transparent"))
    if listen.get("transparent") is not None:
        kw["transparent_listen"] = _hostport(_child(w, listen, "transparent"),
                                             listen["transparent"])
    if "proxy" in listen:
        kw["proxy_listen"] = _hostport(_child(w, listen, "proxy"), listen["proxy"])
    if "control" in listen:
        kw["control_listen"] = _hostport(_child(w, listen, "control"), listen["control"])
    if "transparent_listen" in kw:
        defaults = Config()
        for other in ("proxy", "control"):
            key = f"{other}_listen"
            if kw["transparent_listen"] == kw.get(key, getattr(defaults, key)):
                raise _child(w, listen, "transparent").fail(
                    f"{listen['transparent']!r} is the {other} listener's address too; the "
                    "transparent listener needs one of its own (another port)")

    w, v = sub("home")
    home = _str(w, v) if v is not None else ".taskgate"
    assert home is not None
    kw["home"] = home
    w, v = sub("admin_token_file")
    kw["admin_token_file"] = _str(w, v) if v is not None else os.path.join(home, "admin-token")

    w, v = sub("upstream")
    up = _mapping(w, v, ("ca_file",))
    if up.get("ca_file") is not None:
        ca = _str(_child(w, up, "ca_file"), up["ca_file"])
        assert ca is not None
        _file(_child(w, up, "ca_file"), ca, config_files.check_ca_file)
        kw["upstream_ca_file"] = ca

    w, v = sub("audit")
    audit = _mapping(w, v, ("path", "hmac_key_file", "max_bytes"))
    kw["audit_path"] = (_str(_child(w, audit, "path"), audit["path"]) if "path" in audit
                        else os.path.join(home, "audit.jsonl"))
    if audit.get("hmac_key_file") is not None:
        hw = _child(w, audit, "hmac_key_file")
        hk = _str(hw, audit["hmac_key_file"])
        assert hk is not None
        _file(hw, hk, config_files.check_hmac_key_file)
        kw["audit_hmac_key_file"] = hk
    if "max_bytes" in audit:
        mb = audit["max_bytes"]
        if mb != 0 or type(mb) is not int:
            mb = _int(_child(w, audit, "max_bytes"), mb, 4096, 1 << 40)
        kw["audit_max_bytes"] = mb

    w, v = sub("identity")
    ident = _mapping(w, v, ("issuers", "leeway_seconds"))
    if "leeway_seconds" in ident:
        kw["leeway_seconds"] = _number(_child(w, ident, "leeway_seconds"),
                                       ident["leeway_seconds"], 0, 300)
    issuers = []
    iw = _child(w, ident, "issuers")
    raw_issuers = ident.get("issuers") or []
    if not isinstance(raw_issuers, list):
        raise iw.fail("expected a list of issuers")
    for i, item in enumerate(raw_issuers):
        ew = _child(iw, raw_issuers, i)
        m = _mapping(ew, item, ("issuer", "audience", "jwks_file", "jwks_url"))
        iss = _str(_child(ew, m, "issuer"), m.get("issuer"))
        aud = _str(_child(ew, m, "audience"), m.get("audience"))
        jf = _str(_child(ew, m, "jwks_file"), m.get("jwks_file"), optional=True)
        ju = _str(_child(ew, m, "jwks_url"), m.get("jwks_url"), optional=True)
        if (jf is None) == (ju is None):
            raise ew.fail("give exactly one of jwks_file or jwks_url")
        if ju is not None and not ju.startswith("https://"):
            raise _child(ew, m, "jwks_url").fail(f"{ju!r}: keys are fetched over https only")
        if jf is not None:
            _file(_child(ew, m, "jwks_file"), jf, config_files.check_jwks_file)
        issuers.append(IssuerConfig(iss, aud, jf, ju))  # type: ignore[arg-type]
    kw["issuers"] = tuple(issuers)

    w, v = sub("workloads")
    workloads: dict[str, WorkloadConfig] = {}
    if v is not None:
        if not isinstance(v, Mapping):
            raise w.fail("expected a mapping of workload id → settings")
        for name, item in v.items():
            ww = _child(w, v, str(name))
            m = _mapping(ww, item, ("owner", "ceiling", "standing", "sources", *_DEPLOY_KEYS))
            owner = _str(_child(ww, m, "owner"), m.get("owner"), optional=True)
            ceiling = _rules(_child(ww, m, "ceiling"), m.get("ceiling"))
            standing = _rules(_child(ww, m, "standing"), m.get("standing"))
            sources = _sources(_child(ww, m, "sources"), m.get("sources"))
            workloads[str(name)] = WorkloadConfig(owner, ceiling, standing, sources=sources,
                                                  **_deployment(ww, m))
        _no_shared_sources(w, v, workloads)
    kw["workloads"] = workloads

    w, v = sub("secrets")
    secrets: dict[str, SecretSpec] = {}
    if v is not None:
        if not isinstance(v, Mapping):
            raise w.fail("expected a mapping of secret name → provider settings")
        for name, item in v.items():
            sw = _child(w, v, str(name))
            if not isinstance(item, Mapping) or "provider" not in item:
                raise sw.fail("a secret needs a 'provider' (env, file, oauth2_client_credentials,"
                              " github_app, vault)")
            try:
                secrets[str(name)] = parse_secret(str(name), _plain(item), sw.path)
            except ValueError as e:
                raise _located(sw, item, str(e)) from None
            _secret_files(sw, item)
    kw["secrets"] = secrets
    for wl_name, wl in workloads.items():
        for kind in ("ceiling", "standing"):
            for r in getattr(wl, kind):
                if r.secret is not None and r.secret not in secrets:
                    raise _child(w, v or {}, wl_name).fail(
                        f"{kind} rule {r.id!r} names secret {r.secret!r}, "
                        f"which is not defined under 'secrets'")
                try:
                    check_token_scope(r, secrets)
                except InvalidField as e:
                    raise _child(w, v or {}, wl_name).fail(f"{kind} {e.reason}") from None

    w, v = sub("approval_timeout_seconds")
    if v is not None:
        kw["approval_timeout_seconds"] = _number(w, v, 1, 86400)

    w, v = sub("proxy")
    px = _mapping(w, v, ("shutdown_grace_seconds", "stream_threshold_bytes", "max_connections",
                         "max_connections_per_client", "idle_timeout_seconds",
                         "max_header_bytes", "header_timeout_seconds", "workers",
                         "websocket_max_message_bytes"))
    if "shutdown_grace_seconds" in px:
        kw["shutdown_grace_seconds"] = _number(_child(w, px, "shutdown_grace_seconds"),
                                               px["shutdown_grace_seconds"], 0, 600)
    if "stream_threshold_bytes" in px:
        kw["stream_threshold_bytes"] = _int(_child(w, px, "stream_threshold_bytes"),
                                            px["stream_threshold_bytes"], 0, 1 << 40)
    for key, lo, hi in (("max_connections", 1, 1 << 20),
                        ("max_connections_per_client", 1, 1 << 20),
                        ("idle_timeout_seconds", 1, 86400),
                        ("max_header_bytes", 1024, 1 << 20),
                        ("header_timeout_seconds", 1, 3600),
                        ("workers", 1, MAX_WORKERS),
                        ("websocket_max_message_bytes", 1024, 1 << 30)):
        if key in px:
            kw[key] = _int(_child(w, px, key), px[key], lo, hi)
    workers_at = _child(w, px, "workers")
    w, v = sub("control")
    cp = _mapping(w, v, ("max_connections", "header_timeout_seconds", "idle_timeout_seconds"))
    for key, lo, hi in (("max_connections", 1, 1 << 16),
                        ("header_timeout_seconds", 1, 3600),
                        ("idle_timeout_seconds", 1, 86400)):
        if key in cp:
            kw[f"control_{key}"] = _int(_child(w, cp, key), cp[key], lo, hi)
    w, v = sub("mcp")
    mc = _mapping(w, v, ("max_body_bytes",))
    if "max_body_bytes" in mc:
        kw["max_inspect_bytes"] = _int(_child(w, mc, "max_body_bytes"),
                                       mc["max_body_bytes"], 1024, 64 << 20)
    _state(sub("state"), kw)
    w, v = sub("replica_id")
    if v is not None:
        rid = _str(w, v)
        assert rid is not None
        if not _REPLICA_ID.fullmatch(rid):
            raise w.fail(f"{rid!r}: use letters, digits, '.', '_' and '-' (at most 64); it names "
                         "the replica's audit files")
        kw["replica_id"] = rid
    if kw.get("workers", 1) > 1 and kw.get("state_backend", "sqlite") != "redis":
        raise workers_at.fail(
            f"{kw['workers']} workers need shared state: set state.backend: redis (with "
            "state.redis_url), or proxy.workers: 1 for the embedded SQLite state")
    if kw.get("workers", 1) > 1 and kw.get("transparent_listen", (None, 1))[1] == 0:
        raise workers_at.fail("workers share listen.transparent's port: name one (port 0 "
                              "would give each worker its own)")
    return Config(**kw)


_REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _state(at: tuple[_Where, Any], kw: dict[str, Any]) -> None:
    """``state:``: the backend, and for Redis where it is and how to log in."""
    w, v = at
    st = _mapping(w, v, ("backend", "redis_url", "redis_password_file", "key_prefix"))
    backend = st.get("backend", "sqlite")
    if backend not in STATE_BACKENDS:
        raise _child(w, st, "backend").fail(
            f"{backend!r} is not a state backend; use one of {', '.join(STATE_BACKENDS)}")
    kw["state_backend"] = backend
    if "key_prefix" in st:
        prefix = _str(_child(w, st, "key_prefix"), st["key_prefix"])
        assert prefix is not None
        kw["redis_key_prefix"] = prefix
    if st.get("redis_password_file") is not None:
        pw = _child(w, st, "redis_password_file")
        path = _str(pw, st["redis_password_file"])
        assert path is not None
        _file(pw, path, config_files.check_secret_file)
        kw["redis_password_file"] = path
    url = st.get("redis_url")
    if url is None:
        if backend == "redis":
            raise w.fail("backend: redis needs redis_url, e.g. 'redis://127.0.0.1:6379/0'")
        return
    uw = _child(w, st, "redis_url")
    text = _str(uw, url)
    assert text is not None
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise uw.fail(f"{text!r} is not a Redis URL; use redis://host:port/db (rediss:// for TLS)")
    if parts.password:
        raise uw.fail("the URL carries a password: put it in state.redis_password_file or "
                      "TASKGATE_REDIS_PASSWORD, never in the config")
    kw["redis_url"] = text


def _sources(where: _Where, node: Any) -> tuple[Network, ...]:
    """The client networks that are a workload in transparent mode (CIDRs, IPv4/IPv6)."""
    if node is None:
        return ()
    if not isinstance(node, list):
        raise where.fail("expected a list of client networks, e.g. ['10.77.0.0/24']")
    nets: list[Network] = []
    for i, item in enumerate(node):
        w = _child(where, node, i)
        if not isinstance(item, str) or not item:
            raise w.fail(f"{item!r} is not a network; write a CIDR, e.g. '10.77.0.0/24'")
        try:
            net = ipaddress.ip_network(item.strip())
        except ValueError:
            try:
                loose = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise w.fail(f"{item!r} is not a network; write a CIDR, e.g. "
                             "'10.77.0.0/24' or 'fd77::/64'") from None
            raise w.fail(f"{item!r} has host bits set; use {str(loose)!r}") from None
        nets.append(net)
    return tuple(nets)


def _no_shared_sources(where: _Where, node: Mapping[str, Any],
                       workloads: Mapping[str, WorkloadConfig]) -> None:
    """A client address is one workload: a network of one workload that overlaps another
    workload's would leave the longest prefix to decide who an agent is, silently."""
    claimed: list[tuple[Network, str]] = []
    for name, wl in workloads.items():
        for i, net in enumerate(wl.sources):
            for other, owner in claimed:
                if owner != name and net.version == other.version and net.overlaps(other):
                    ww = _child(where, node, name)
                    item = node[name]
                    sw = _child(ww, item, "sources") if isinstance(item, Mapping) else ww
                    raw = item.get("sources") if isinstance(item, Mapping) else None
                    at = _child(sw, raw, i) if isinstance(raw, list) else sw
                    raise at.fail(f"{str(net)!r} overlaps {str(other)!r} of workload "
                                  f"{owner!r}; a client address must name one workload")
        claimed.extend((net, name) for net in wl.sources)
_DEPLOY_KEYS = ("mode", "report_allowed", "require_binding")
MODES = ("enforce", "report")


def _deployment(where: _Where, m: Mapping[str, Any]) -> dict[str, Any]:
    """A workload's rollout settings: its mode, and what its tasks may or must ask for."""
    kw: dict[str, Any] = {}
    if m.get("mode") is not None:
        mode = m["mode"]
        if mode not in MODES:
            raise _child(where, m, "mode").fail(f"{mode!r} is not a mode; use enforce "
                                                "(the default) or report")
        kw["mode"] = mode
    for key in ("report_allowed", "require_binding"):
        if m.get(key) is not None:
            if not isinstance(m[key], bool):
                raise _child(where, m, key).fail(f"{m[key]!r} is not true or false")
            kw[key] = m[key]
    return kw


def _secret_files(where: _Where, item: Mapping[str, Any]) -> None:
    """Each file a secret provider names loads (the secret itself is never shown)."""
    for key, check in config_files.FILE_CHECKS.get(str(item.get("provider")), {}).items():
        path = item.get(key)
        if isinstance(path, str) and path:
            _file(_child(where, item, key), path, check)


def _located(where: _Where, node: Any, msg: str) -> ConfigError:
    """A ``ValueError`` from a pure parser, with the line of the deepest key it names."""
    line = where.line
    rest = msg[len(where.path):] if msg.startswith(where.path) else ""
    for key in rest.split(":")[0].lstrip(".").split("."):
        if not key or not isinstance(node, Mapping) or key not in node:
            break
        found = _line(node, key)
        line = found if found is not None else line
        node = node[key]
    return ConfigError(f"{where.source}:{(line or 0) + 1}: {msg}")


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def load_config(path: str | None, *, exists: Callable[[str], bool] = os.path.isfile) -> Config:
    """Load ``path``; with ``None``, ``taskgate.yaml`` here if present, else the defaults."""
    if path is None:
        if not exists(DEFAULT_FILE):
            return Config()
        path = DEFAULT_FILE
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8") from None
    try:
        doc = YAML(typ="rt", pure=True).load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return dataclasses.replace(parse_config(doc, path), digest=digest)
