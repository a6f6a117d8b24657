"""Tasks: the model, and strict validation of a ``POST /v1/tasks`` body.

A request is JSON with exactly these fields (anything else is refused, naming
the field):

``workload`` (str) or ``workload_token`` (a JWT from a trusted issuer; exactly
one of the two), ``ttl_seconds`` (int, 1–:data:`MAX_TTL_SECONDS`), ``rules``
(a non-empty list of rules, at most :data:`MAX_RULES`), and optionally
``owner`` (str; default: the workload's owner), ``purpose`` (str),
``max_calls`` (int ≥ 1; absent = no budget), ``mode`` (``enforce``, the default, or
``report``: only where the workload has ``report_allowed``), ``bind``
(``{"client_cidrs": [...]}``: the client addresses the task's token is good from).

Every mistake raises :class:`~proxy.errors.InvalidField`
carrying the status, an error code, the field (``rules[2].paths[0]``) and a
sentence; nothing a client sends turns into a 500. Bodies over :data:`MAX_BODY_BYTES` get 413.

In memory, a task's rules are interned (:class:`RuleSets`): tasks with the
same rules share one :class:`~proxy.policy._rules.RuleSet`, hosts are parsed once, and
path globs compile their regex on first use, so 100k mostly idle tasks stay
small and load fast.
"""

from __future__ import annotations

import functools
import ipaddress
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.audit import rfc3339
from proxy.errors import InvalidField
from proxy.policy import (
    HostPattern,
    McpGrant,
    PathGlob,
    Rule,
    RuleSet,
    check_mcp_shape,
    parse_rules,
)
from proxy.safe_text import bad_char
from proxy.store import TaskRow

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_TTL_SECONDS",
    "RuleSets",
    "Task",
    "TaskRequest",
    "parse_task_request",
]

MAX_BODY_BYTES = 64 * 1024
MAX_TTL_SECONDS = 86_400
MAX_CALLS = 1_000_000_000
MAX_RULES = 64
MAX_PATHS = 32
MAX_TEXT = 1024
FIELDS = ("workload", "workload_token", "owner", "purpose", "ttl_seconds", "max_calls", "rules",
          "mode", "bind")
MAX_BIND_CIDRS = 16
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """A validated task request; the workload is not yet resolved or checked."""

    workload: str | None
    workload_token: str | None
    owner: str | None
    purpose: str | None
    ttl_seconds: int
    max_calls: int | None
    rules: tuple[Rule, ...]
    mode: str = "enforce"
    bind: tuple[Network, ...] = ()  # empty: the token is good from anywhere


def _text(body: Mapping[str, Any], name: str, *, limit: int = MAX_TEXT) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidField(name, f"{name} must be a string, not {_type(value)}")
    if not value.strip() or len(value) > limit:
        raise InvalidField(name, f"{name} must be 1-{limit} characters")
    bad = bad_char(value)
    if bad is not None:  # it is printed on terminals and the review page
        raise InvalidField(name, f"{name} must not contain control, format or invisible "
                           f"characters (found U+{ord(bad):04X})")
    return value


def _int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise InvalidField(name, f"{name} must be a whole number, not {_type(value)}")
    if not lo <= value <= hi:
        raise InvalidField(name, f"{name} must be between {lo} and {hi}")
    return value


def _type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), "null")


def parse_task_request(raw: bytes) -> TaskRequest:
    """Validate a request body; raises :class:`~proxy.errors.InvalidField`."""
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidField(None, f"the body exceeds {MAX_BODY_BYTES} bytes", status=413,
                           error="payload_too_large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidField(None, "the body is not valid JSON", status=400,
                           error="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidField(None, "the body must be a JSON object", status=400,
                           error="invalid_json")
    for name in body:
        if name not in FIELDS:
            raise InvalidField(name, f"unknown field {name!r}; a task has "
                                     f"{', '.join(FIELDS)}")
    workload = _text(body, "workload", limit=512)
    token = _text(body, "workload_token", limit=16 * 1024)
    if (workload is None) == (token is None):
        raise InvalidField("workload", "give exactly one of workload or workload_token")
    ttl = _int(body, "ttl_seconds", 1, MAX_TTL_SECONDS)
    if ttl is None:
        raise InvalidField("ttl_seconds", "ttl_seconds is required (seconds until the task "
                                          "expires)")
    rules_in = body.get("rules")
    if rules_in is None:
        raise InvalidField("rules", "rules is required: the list of rules the task needs")
    if not isinstance(rules_in, list):
        raise InvalidField("rules", f"rules must be a list, not {_type(rules_in)}")
    if not 1 <= len(rules_in) <= MAX_RULES:
        raise InvalidField("rules", f"rules must hold 1-{MAX_RULES} rules")
    for i, r in enumerate(rules_in):
        if isinstance(r, dict):
            paths = r.get("paths")
            if isinstance(paths, list) and (len(paths) > MAX_PATHS or any(
                    isinstance(p, str) and len(p) > 512 for p in paths)):
                raise InvalidField(("rules", i, "paths"), f"at most {MAX_PATHS} globs of at "
                                                          "most 512 characters")
            if isinstance(r.get("host"), str) and len(r["host"]) > 255:
                raise InvalidField(("rules", i, "host"),
                                   "a host name has at most 255 characters")
            if "mcp" in r:
                try:
                    check_mcp_shape(r["mcp"])
                except InvalidField as e:
                    raise e.at("rules", i) from None
    try:
        rules = parse_rules(rules_in)
    except InvalidField as e:
        raise e.at("rules") from None
    return TaskRequest(
        workload=workload, workload_token=token, owner=_text(body, "owner", limit=256),
        purpose=_text(body, "purpose"), ttl_seconds=ttl,
        max_calls=_int(body, "max_calls", 1, MAX_CALLS), rules=rules,
        mode=_mode(body.get("mode")), bind=_bind(body.get("bind")))


def _mode(value: Any) -> str:
    if value is None:
        return "enforce"
    if value not in ("enforce", "report"):
        raise InvalidField("mode", "mode must be 'enforce' (the default) or 'report'")
    return str(value)


def _bind(value: Any) -> tuple[Network, ...]:
    """``{"client_cidrs": ["10.77.0.5/32", ...]}`` → the networks, checked strictly."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidField("bind", f"bind must be an object with client_cidrs, not "
                                   f"{_type(value)}")
    for key in value:
        if key != "client_cidrs":
            raise InvalidField(("bind", key), f"unknown field {key!r}; bind has client_cidrs")
    cidrs = value.get("client_cidrs")
    if not isinstance(cidrs, list) or not 1 <= len(cidrs) <= MAX_BIND_CIDRS:
        raise InvalidField(("bind", "client_cidrs"), f"client_cidrs must be a list of 1-"
                                                      f"{MAX_BIND_CIDRS} CIDRs, e.g. "
                                                      "['10.77.0.5/32']")
    nets: list[Network] = []
    for i, text in enumerate(cidrs):
        where = ("bind", "client_cidrs", i)
        if not isinstance(text, str) or "/" not in text or len(text) > 64:
            raise InvalidField(where, "a CIDR with its prefix length, e.g. '10.77.0.5/32'")
        try:
            nets.append(ipaddress.ip_network(text, strict=True))
        except ValueError as e:
            raise InvalidField(where, f"{text[:64]!r} is not a network: {e}") from None
    return tuple(nets)


def terms(mode: str, bind: tuple[Network, ...]) -> bytes | None:
    """The task's mode and binding as stored; None for an enforced, unbound task."""
    if mode == "enforce" and not bind:
        return None
    return _json({"mode": mode, "bind": [str(n) for n in bind]})


def read_terms(raw: bytes | None) -> tuple[str, tuple[Network, ...]]:
    if not raw:
        return "enforce", ()
    d = orjson.loads(raw)
    return d.get("mode", "enforce"), tuple(ipaddress.ip_network(n) for n in d.get("bind", ()))


# -- the in-memory task ---------------------------------------------------------
@dataclass(slots=True)
class Task:
    """A task as the gateway holds it. ``used`` counts admitted calls."""

    id: str
    workload: str
    owner: str | None
    purpose: str | None
    created_at: float
    expires_at: float
    max_calls: int | None
    rules_json: bytes
    ruleset: RuleSet
    kid: str
    used: int = 0
    revoked_at: float | None = None
    ended: bool = False
    mode: str = "enforce"  # "report": refusals recorded as would_deny, not enforced
    bind: tuple[Network, ...] = ()  # the client addresses its token is good from

    def bound_to(self, address: str | None) -> bool:
        """May the task's token be used from ``address``? Any address when unbound."""
        if not self.bind:
            return True
        ip = client_ip(address)
        return ip is not None and any(ip in net for net in self.bind)

    def state(self, now: float) -> str:
        """``revoked``, ``expired``, ``spent`` (budget used up) or ``active``."""
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.max_calls is not None and self.used >= self.max_calls:
            return "spent"
        return "active"

    def ended_at(self) -> float:
        return min(self.expires_at, self.revoked_at or self.expires_at)

    def view(self, now: float | None = None) -> dict[str, Any]:
        """The task as the control plane shows it (never the token)."""
        now = time.time() if now is None else now
        return {
            "task_id": self.id, "workload": self.workload, "owner": self.owner,
            "purpose": self.purpose, "status": self.state(now),
            "created_at": rfc3339(self.created_at), "expires_at": rfc3339(self.expires_at),
            "expires_in_seconds": max(0, round(self.expires_at - now, 3)),
            "revoked_at": rfc3339(self.revoked_at) if self.revoked_at else None,
            "max_calls": self.max_calls, "calls_used": self.used,
            "calls_left": (max(0, self.max_calls - self.used)
                           if self.max_calls is not None else None),
            "rules": orjson.loads(self.rules_json),
            "mode": self.mode,
            "bind": {"client_cidrs": [str(n) for n in self.bind]} if self.bind else None,
        }

    def row(self) -> TaskRow:
        return TaskRow(self.id, self.workload, self.owner, self.purpose, self.created_at,
                       self.expires_at, self.max_calls, self.rules_json, self.kid, self.used,
                       self.revoked_at, self.ended, terms(self.mode, self.bind))


def client_ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address as an IP (an IPv4-mapped IPv6 address as the IPv4 one)."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _json(value: Any) -> bytes:
    """Canonical JSON, copied: orjson's own result keeps a 4 KiB buffer alive, which
    adds up to hundreds of MB over 100k stored tasks."""
    return bytes(memoryview(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)))


def canonical_rules(rules: tuple[Rule, ...]) -> bytes:
    return _json([r.to_dict() for r in rules])


@dataclass(frozen=True, slots=True)
class LazyGlob(PathGlob):
    """A :class:`PathGlob` that compiles its regex on first match (``regex`` starts None).

    Only built from globs that already passed :meth:`PathGlob.parse`."""

    def matches(self, path: str) -> bool:
        regex = self.regex
        if regex is None:
            regex = PathGlob.parse(self.text).regex
            object.__setattr__(self, "regex", regex)
        return regex.match(path) is not None


@functools.lru_cache(maxsize=4096)
def _host(text: str) -> HostPattern:
    return HostPattern.parse(text)


_METHODS: dict[tuple[str, ...], frozenset[str]] = {}


def _rule(d: Mapping[str, Any]) -> Rule:
    """A rule from its canonical form (``Rule.to_dict`` of a validated rule): every
    field comes back — the MCP grant as a :class:`McpGrant` the inspector can judge
    with, the token scope (``repositories``, ``permissions``) a minted secret is
    limited to."""
    methods = tuple(d.get("methods", ()))
    mcp = d.get("mcp")
    permissions = d.get("permissions")
    return Rule(
        id=sys.intern(d["id"]), host=_host(d["host"]), port=d.get("port"),
        scheme=d.get("scheme"), methods=_METHODS.setdefault(methods, frozenset(methods)),
        paths=tuple(LazyGlob(p, None) for p in d.get("paths", ())),  # type: ignore[arg-type]
        mcp=McpGrant.parse(mcp) if mcp is not None else None, secret=d.get("secret"),
        approval=d.get("approval") == "required",
        repositories=tuple(d.get("repositories", ())),
        permissions=dict(permissions) if permissions is not None else None,
        allow_private=d.get("allow_private") is True, websocket=d.get("websocket") is True)


class RuleSets:
    """Interned rules and rule sets, keyed by canonical JSON and counted.

    Tasks with equal rules share one :class:`RuleSet`; tasks whose rule sets differ
    still share every rule they have in common (a common MCP rule is one object)."""

    def __init__(self) -> None:
        self._sets: dict[bytes, _Entry] = {}
        self._rules: dict[bytes, list[Any]] = {}  # rule JSON → [Rule, references, key]

    def acquire(self, rules_json: bytes) -> tuple[bytes, RuleSet]:
        """The shared (key, RuleSet) for ``rules_json``; call :meth:`release` when done."""
        hit = self._sets.get(rules_json)
        if hit is None:
            keys, rules = [], []
            for d in orjson.loads(rules_json):
                key = _json(d)
                entry = self._rules.get(key)
                if entry is None:
                    entry = self._rules[key] = [_rule(d), 0, key]
                entry[1] += 1
                rules.append(entry[0])
                keys.append(entry[2])  # the one copy of this rule's key
            hit = self._sets[rules_json] = _Entry(rules_json, RuleSet(tuple(rules)),
                                                  tuple(keys))
        hit.refs += 1
        return hit.key, hit.ruleset

    def release(self, rules_json: bytes) -> None:
        hit = self._sets.get(rules_json)
        if hit is None:
            return
        hit.refs -= 1
        if hit.refs > 0:
            return
        del self._sets[rules_json]
        for key in hit.rule_keys:
            entry = self._rules[key]
            entry[1] -= 1
            if entry[1] <= 0:
                del self._rules[key]

    def __len__(self) -> int:
        return len(self._sets)


class _Entry:
    __slots__ = ("key", "refs", "rule_keys", "ruleset")

    def __init__(self, key: bytes, ruleset: RuleSet, rule_keys: tuple[bytes, ...]) -> None:
        self.key, self.ruleset, self.rule_keys, self.refs = key, ruleset, rule_keys, 0
