"""Rules, calls and decisions: what a caller may do, what it asks, what we say.

A :class:`Decision` is a value, deny by default: every early return of the
matcher is a refusal with a fixed reason. Rules are parsed from plain data
(the YAML or the JSON of a task request) into validated objects once; the
matcher then only compares canonical values.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import FieldPath, InvalidField
from proxy.policy._hosts import HostPattern, default_port
from proxy.policy._mcp_grant import McpGrant
from proxy.policy._paths import PathGlob

__all__ = ["Call", "Decision", "Rule", "RuleSet", "parse_rule", "parse_rules"]

METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
RULE_KEYS = (
    "id", "host", "port", "scheme", "methods", "paths", "mcp", "secret", "approval",
    "repositories", "permissions", "allow_private", "websocket",
)
# A GitHub App token's down-scoping: repository names, permission → level.
_REPO = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_PERMISSION = re.compile(r"^[a-z][a-z_]{0,63}$")
PERMISSION_LEVELS = ("read", "write", "admin")


@dataclass(frozen=True, slots=True)
class Call:
    """One outbound HTTP request, as the gateway saw it (canonical host, decoded path)."""

    method: str
    scheme: str
    host: str
    port: int
    path: str


@dataclass(frozen=True, slots=True)
class Rule:
    """One grant: a host (and port, scheme), methods, path globs, and what comes with it."""

    id: str
    host: HostPattern
    port: int | None = None
    scheme: str | None = None
    methods: frozenset[str] = frozenset()
    paths: tuple[PathGlob, ...] = ()
    mcp: McpGrant | None = None
    secret: str | None = None
    approval: bool = False
    # With a github_app secret: the token minted for this rule is limited to these.
    repositories: tuple[str, ...] = ()
    permissions: Mapping[str, str] | None = None
    # Names may resolve to loopback/private/link-local addresses (proxy/gateway/_egress.py).
    allow_private: bool = False
    # A WebSocket upgrade may be asked for on this rule's calls (addons/websocket.py).
    websocket: bool = False

    @property
    def private_ok(self) -> bool:
        """May this rule's calls reach a private address? Only by explicit opt-in:
        ``allow_private: true``, or an IP address written as the rule's host."""
        return self.allow_private or (not self.host.wildcard and is_ip(self.host.host))

    def port_for(self, scheme: str) -> int:
        """The port this rule admits for ``scheme``: its own, or the scheme's default."""
        return self.port if self.port is not None else default_port(scheme)

    def admits_endpoint(self, host: str, port: int) -> bool:
        """Whether a tunnel to ``host:port`` could carry a call this rule allows."""
        if not self.host.matches(host):
            return False
        if self.port is not None:
            return port == self.port
        if self.scheme is not None:
            return port == default_port(self.scheme)
        return port in (80, 443)

    def why_not(self, call: Call) -> str | None:
        """``None`` if this rule allows ``call``, else the first reason it does not."""
        if not self.host.matches(call.host):
            return "host"
        if self.scheme is not None and call.scheme != self.scheme:
            return "scheme"
        if call.port != self.port_for(call.scheme):
            return "port"
        # Path before method, as in _MISS_ORDER: "wrong method" is only said of a
        # rule whose host and path did match.
        if self.paths:
            for glob in self.paths:
                if glob.matches(call.path):
                    break
            else:
                return "path"
        if self.methods and call.method not in self.methods:
            return "method"
        return None

    def to_dict(self) -> dict[str, Any]:
        """The rule as plain data, as a task request would spell it."""
        out: dict[str, Any] = {"id": self.id, "host": str(self.host)}
        if self.port is not None:
            out["port"] = self.port
        if self.scheme is not None:
            out["scheme"] = self.scheme
        if self.methods:
            out["methods"] = sorted(self.methods)
        if self.paths:
            out["paths"] = [str(p) for p in self.paths]
        if self.mcp is not None:
            out["mcp"] = self.mcp.to_dict()
        if self.secret is not None:
            out["secret"] = self.secret
        if self.approval:
            out["approval"] = "required"
        if self.repositories:
            out["repositories"] = list(self.repositories)
        if self.permissions is not None:
            out["permissions"] = dict(self.permissions)
        if self.allow_private:
            out["allow_private"] = True
        if self.websocket:
            out["websocket"] = True
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one call. The zero value denies."""

    allowed: bool = False
    reason: str = "no rule allows this call"
    rule: Rule | None = None

    @property
    def rule_id(self) -> str | None:
        return self.rule.id if self.rule else None


DENY = Decision()

# When no rule allows a call, say which part kept the closest rule out; an
# agent (or the LLM behind it) can then tell a wrong method from a wrong host.
_MISS_REASONS = {
    "host": "no rule allows this host",
    "scheme": "no rule for this host allows this scheme",
    "port": "no rule for this host allows this port",
    "method": "no rule for this host and path allows this method",
    "path": "no rule for this host allows this path",
}
_MISS_ORDER = ("host", "scheme", "port", "path", "method")


@dataclass(slots=True)
class RuleSet:
    """Rules indexed by host, so a decision never scans rules for other hosts."""

    rules: tuple[Rule, ...] = ()
    _exact: dict[str, list[Rule]] = field(default_factory=dict, repr=False)
    _wild: list[Rule] = field(default_factory=list, repr=False)
    # Whether any rule judges MCP calls: most sets have none, and their calls then
    # need no second match for the MCP step (addons/mcp.py).
    has_mcp: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.has_mcp = any(r.mcp is not None for r in self.rules)
        for r in self.rules:
            if r.host.wildcard:
                self._wild.append(r)
            else:
                self._exact.setdefault(r.host.host, []).append(r)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def candidates(self, host: str) -> Iterable[Rule]:
        yield from self._exact.get(host, ())
        for r in self._wild:
            if r.host.matches(host):
                yield r

    def matching(self, call: Call) -> list[Rule]:
        """Every rule that allows ``call`` (MCP judges tools against all of them)."""
        return [r for r in self.candidates(call.host) if r.why_not(call) is None]

    def names_endpoint(self, host: str, port: int) -> bool:
        return any(r.admits_endpoint(host, port) for r in self.candidates(host))

    def decide(self, call: Call) -> Decision:
        closest = "host"
        for rule in self.candidates(call.host):
            miss = rule.why_not(call)
            if miss is None:
                return Decision(True, "allowed by rule", rule)
            if _MISS_ORDER.index(miss) > _MISS_ORDER.index(closest):
                closest = miss
        return Decision(False, _MISS_REASONS[closest])


@functools.lru_cache(maxsize=4096)
def is_ip(host: str) -> bool:
    """Is ``host`` an IP address literal? Cached: asked of a rule's host on every
    call it allows (``Rule.private_ok``), and rules are few."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _want(cond: bool, path: FieldPath, msg: str) -> None:
    if not cond:
        raise InvalidField(path, msg)


def parse_rule(data: Any) -> Rule:
    """Validate plain data into a :class:`Rule`; errors name the key and the fix.

    Raises :class:`~proxy.errors.InvalidField` with a path relative to the rule
    (``("paths", 0)``); the caller prefixes where the rule sits (``rules[2]``,
    ``workloads["…"].ceiling[0]``)."""
    _want(isinstance(data, Mapping), (), "a rule must be a mapping")
    for key in data:
        _want(key in RULE_KEYS, (key,), f"unknown key; a rule has {', '.join(RULE_KEYS)}")
    rid = data.get("id")
    _want(isinstance(rid, str) and 0 < len(rid) <= 128, ("id",),
          "every rule needs an id (a string of 1-128 characters)")
    try:
        host = HostPattern.parse(data.get("host", ""))
    except ValueError as e:
        raise InvalidField(("host",), str(e)) from None
    port = data.get("port")
    _want(port is None or (type(port) is int and 0 < port < 65536), ("port",),
          f"{port!r} is not a port (1-65535)")
    scheme = data.get("scheme")
    _want(scheme in (None, "http", "https"), ("scheme",),
          f"{scheme!r} is not a scheme; use 'https' or 'http'")
    methods_in = data.get("methods")
    mcp = data.get("mcp")
    _want(methods_in is None or (isinstance(methods_in, Sequence)
                                 and not isinstance(methods_in, str)),
          ("methods",), "methods must be a list such as ['GET']")
    methods = frozenset(str(m).upper() for m in (methods_in or ()))
    for m in methods:
        _want(m in METHODS, ("methods",), f"{m!r} is not an HTTP method")
    _want(bool(methods) or mcp is not None, ("methods",),
          "a rule without 'mcp' must list its methods, e.g. ['GET']")
    paths_in = data.get("paths")
    _want(paths_in is None or (isinstance(paths_in, Sequence)
                               and not isinstance(paths_in, str) and bool(paths_in)),
          ("paths",), "paths must be a non-empty list of globs such as ['/v1/**']")
    paths = []
    for i, p in enumerate(paths_in or ()):
        try:
            paths.append(PathGlob.parse(p))
        except ValueError as e:
            raise InvalidField(("paths", i), str(e)) from None
    _want(mcp is None or isinstance(mcp, Mapping), ("mcp",), "mcp must be a mapping")
    grant = McpGrant.parse(mcp, ("mcp",)) if mcp is not None else None
    if mcp is not None and not methods:
        methods = frozenset({"POST", "GET", "DELETE"})  # streamable HTTP uses these
    secret = data.get("secret")
    _want(secret is None or (isinstance(secret, str) and bool(secret)), ("secret",),
          "secret must name an entry under 'secrets'")
    approval = data.get("approval")
    _want(approval in (None, "required", "none"), ("approval",),
          f"{approval!r}: use 'required' or leave it out")
    allow_private = data.get("allow_private", False)
    _want(type(allow_private) is bool, ("allow_private",),
          f"{allow_private!r}: use true (the rule may reach private addresses) or false")
    websocket = data.get("websocket", False)
    _want(type(websocket) is bool, ("websocket",),
          f"{websocket!r}: use true (the rule's calls may upgrade to a WebSocket) or false")
    _want(not (websocket and grant is not None and approval == "required"), ("websocket",),
          "the MCP messages of a WebSocket cannot be held for approval: an MCP rule with "
          "approval: required cannot say websocket: true")
    repositories, permissions = _token_scope(data)
    _want(secret is not None or not (repositories or permissions is not None),
          ("repositories",) if repositories else ("permissions",),
          "repositories and permissions limit a secret's token; name the secret too")
    return Rule(
        id=rid, host=host, port=port, scheme=scheme, methods=methods, paths=tuple(paths),
        mcp=grant, secret=secret,
        approval=approval == "required", repositories=repositories, permissions=permissions,
        allow_private=allow_private, websocket=websocket,
    )


def _token_scope(data: Mapping[str, Any]) -> tuple[tuple[str, ...], dict[str, str] | None]:
    """``repositories`` (names in the app's installation) and ``permissions`` (name → level)."""
    repos = data.get("repositories")
    _want(repos is None or (isinstance(repos, Sequence) and not isinstance(repos, str)
                            and 0 < len(repos) <= 500),
          ("repositories",), "repositories must be a list of 1-500 repository names")
    for i, name in enumerate(repos or ()):
        _want(isinstance(name, str) and bool(_REPO.match(name)), ("repositories", i),
              f"{name!r} is not a repository name (without the owner, e.g. 'widgets')")
    perms = data.get("permissions")
    _want(perms is None or (isinstance(perms, Mapping) and bool(perms)), ("permissions",),
          "permissions must map a permission to a level, e.g. {issues: read}")
    for name, level in (perms or {}).items():
        _want(isinstance(name, str) and bool(_PERMISSION.match(name)),
              ("permissions",), f"{name!r} is not a permission name such as 'contents'")
        _want(level in PERMISSION_LEVELS, ("permissions", name),
              f"{level!r}: use one of {', '.join(PERMISSION_LEVELS)}")
    return (tuple(sorted(set(repos))) if repos else (),
            dict(perms) if perms is not None else None)


def parse_rules(data: Any) -> tuple[Rule, ...]:
    """A list of rules with distinct ids; error paths start at the index (``(2, "id")``)."""
    _want(isinstance(data, Sequence) and not isinstance(data, str), (),
          "rules must be a list")
    rules = []
    for i, item in enumerate(data):
        try:
            rules.append(parse_rule(item))
        except InvalidField as e:
            raise e.at(i) from None
    seen: set[str] = set()
    for i, r in enumerate(rules):
        _want(r.id not in seen, (i, "id"), f"duplicate rule id {r.id!r}")
        seen.add(r.id)
    return tuple(rules)
