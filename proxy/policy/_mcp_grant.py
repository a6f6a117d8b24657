"""MCP grants: which tools (and with which arguments) and which methods a rule allows.

A rule's ``mcp`` mapping is parsed once into a :class:`McpGrant`::

    mcp:
      tools: [search_docs, get_page]          # tools/call names this rule allows
      args:                                   # constraints on every call of those tools
        limit: {maximum: 50}
        query: {maxLength: 200, pattern: "[^<>]*"}
      methods: ["resources/*", "prompts/get"] # other JSON-RPC methods it allows

or, with constraints per tool (a tool mapped to nothing, or ``{}``, has none;
``args`` beside ``tools`` still bind every tool)::

    mcp:
      tools:
        search_docs: {args: {limit: {maximum: 50}}}
        read_file: {args: {path: {pattern: "/srv/docs/[^.]*"}}}
        get_page: {}

A constrained argument must be present: a call without it is refused, whatever
the constraint (a server's default for a missing argument is not the gateway's
to guess).

``pin`` maps a granted tool to the digest its definition must have
(``sha256:`` + 64 hex, see :func:`proxy.mcp._pins.tool_digest`): a tools/list
answer that defines it otherwise drops it, and calls to it are refused.

Constraints are JSON-Schema-like and strict: ``pattern`` is a full match;
``minimum``/``maximum`` need a number, ``pattern``/``maxLength`` a string; a
constrained argument that is missing or of the wrong type fails. ``const`` and
``enum`` compare JSON values with JSON types (``true`` is not ``1``).

Numbers are compared exactly as written (``decimal.Decimal`` of the number's
text, see :class:`ExactFloat`), never after rounding to a float:
``50.0000000000000001`` is above ``maximum: 50``. Patterns run on RE2 (linear
time, no backreferences or lookaround; a pattern RE2 cannot compile is a
config / task-request error), against strings of at most
:data:`MAX_MATCH_CHARS` characters.

``initialize``, ``server/discover`` (its 2026-07-28 successor), ``ping``,
``tools/list`` and ``notifications/*`` pass on any granted MCP endpoint (the
lifecycle a client needs before it can call anything), and so do the client's
answers to the server's own requests (sampling, elicitation, roots);
``tools/call`` is governed by ``tools``; anything else (``resources/*``,
``prompts/*``, ``completion/complete``, plain JSON-RPC methods) only when
``methods`` lists it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import re2

from proxy.errors import FieldPath, InvalidField, as_path

__all__ = [
    "ALWAYS_ALLOWED",
    "ArgConstraint",
    "ExactFloat",
    "McpGrant",
    "TOOL_NAME",
    "fold",
    "exact",
    "json_equal",
    "mcp_method",
]

TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_METHOD_NAME = re.compile(r"[A-Za-z0-9_.$-]+(?:/[A-Za-z0-9_.$-]+)*")
GRANT_KEYS = ("tools", "args", "methods", "pin")
PIN = re.compile(r"sha256:[0-9a-f]{64}")
TOOL_KEYS = ("args",)
CONSTRAINT_KEYS = ("const", "enum", "pattern", "minimum", "maximum", "maxLength")
MAX_PATTERN_CHARS = 1024
# A pattern is matched against at most this many characters; a longer string fails.
MAX_MATCH_CHARS = 64 * 1024

# Pass on a granted endpoint: what a client sends before and around calling tools.
ALWAYS_ALLOWED = frozenset({"initialize", "server/discover", "ping", "tools/list"})
# Method families the MCP specification defines (for the audit record's protocol).
_MCP_PREFIXES = ("tools/", "resources/", "prompts/", "notifications/", "completion/",
                 "logging/", "sampling/", "roots/", "elicitation/", "tasks/", "server/",
                 "subscriptions/")


def fold(key: str) -> str:
    """The form under which two keys would be "the same" to a lenient parser.

    Covers case (``Name``), compatibility forms (fullwidth ``ｎａｍｅ``) and the
    characters that upper-casing maps into ASCII (``ſ`` → ``S``, ``ı`` → ``I``).
    """
    if key.isascii():
        return key.lower()
    k = unicodedata.normalize("NFKC", key)
    return unicodedata.normalize("NFKC", k.upper().lower().casefold())


def mcp_method(method: str) -> bool:
    """Whether ``method`` belongs to MCP (else it is a plain JSON-RPC method)."""
    return method in ALWAYS_ALLOWED or method.startswith(_MCP_PREFIXES)


class ExactFloat(float):
    """A JSON number with a fraction or exponent, as the strict reader parsed it: a
    float (for everything that wants one) that keeps the text it was written as, so
    that constraints compare the number the upstream will read, not its rounding."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> ExactFloat:
        self = super().__new__(cls, text)
        self.text = text
        return self


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def exact(v: int | float) -> Decimal:
    """A number as written: an :class:`ExactFloat`'s text, an int exactly, a plain float
    (from YAML or a task request) by its shortest round-tripping spelling."""
    if isinstance(v, ExactFloat):
        return Decimal(v.text)
    if isinstance(v, float):
        return Decimal(repr(v))
    return Decimal(v)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values with JSON types: ``true`` ≠ ``1``, ``1`` = ``1.0``;
    numbers compared exactly as written."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if _is_number(a) or _is_number(b):
        return _is_number(a) and _is_number(b) and exact(a) == exact(b)
    if isinstance(a, str) or a is None:
        return type(a) is type(b) and a == b
    if isinstance(a, list):
        return (isinstance(b, list) and len(a) == len(b)
                and all(json_equal(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(json_equal(v, b[k]) for k, v in a.items()))
    return False


def _plain_json(v: Any, where: FieldPath) -> Any:
    """A config value as a plain JSON value (YAML may hand us its own mapping types)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int) or (isinstance(v, float) and math.isfinite(v)):
        return v
    if isinstance(v, Mapping):
        return {str(k): _plain_json(x, where) for k, x in v.items()}
    if isinstance(v, Sequence):
        return [_plain_json(x, where) for x in v]
    raise InvalidField(where, f"{v!r} is not a JSON value")


_UNSET: Any = object()


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is the caller's error, not a log line
    return options


_RE2_OPTIONS = _re2_options()


def compile_pattern(text: str) -> Any:
    """``text`` compiled by RE2 (linear-time matching); ``ValueError`` says why not."""
    try:
        return re2.compile(text, _RE2_OPTIONS)
    except re2.error as e:
        why = e.args[0].decode("utf-8", "replace") if e.args and isinstance(
            e.args[0], bytes) else str(e)
        raise ValueError(f"{why} (patterns use RE2 syntax: no backreferences, "
                         "lookaround or possessive quantifiers)") from None
    except (UnicodeError, TypeError):
        raise ValueError("a pattern must be valid Unicode text") from None


@dataclass(frozen=True, slots=True)
class ArgConstraint:
    """What one argument must satisfy; parsed from e.g. ``{maximum: 50}``."""

    const: Any = _UNSET
    enum: tuple[Any, ...] | None = None
    pattern: str | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    max_length: int | None = None
    # Derived once at parse time: the compiled RE2 pattern and the exact bounds.
    _regex: Any = field(default=None, repr=False, compare=False)
    _min: Decimal | None = field(default=None, repr=False, compare=False)
    _max: Decimal | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, data: Any, where: FieldPath | str = ()) -> ArgConstraint:
        """Validate one argument's constraints; :class:`InvalidField` under ``where``."""
        where = as_path(where)
        if not isinstance(data, Mapping) or not data:
            raise InvalidField(where, "a constraint is a mapping with one or more of "
                               f"{', '.join(CONSTRAINT_KEYS)}, e.g. {{maximum: 50}}")
        kw: dict[str, Any] = {}
        for key, v in data.items():
            w = (*where, key)
            if key not in CONSTRAINT_KEYS:
                raise InvalidField(w, f"unknown constraint; use {', '.join(CONSTRAINT_KEYS)}")
            if key == "const":
                kw["const"] = _plain_json(v, w)
            elif key == "enum":
                if isinstance(v, (str, Mapping)) or not isinstance(v, Sequence) or not v:
                    raise InvalidField(w, "enum must be a non-empty list of values")
                kw["enum"] = tuple(_plain_json(x, w) for x in v)
            elif key == "pattern":
                if not isinstance(v, str) or not 0 < len(v) <= MAX_PATTERN_CHARS:
                    raise InvalidField(w, "pattern must be a regular expression of "
                                       f"1-{MAX_PATTERN_CHARS} characters")
                try:
                    kw["_regex"] = compile_pattern(v)
                except ValueError as e:
                    raise InvalidField(w, f"{v[:64]!r} is not a valid regular expression: "
                                       f"{e}") from None
                kw["pattern"] = v
            elif key in ("minimum", "maximum"):
                if not _is_number(v) or not math.isfinite(v):
                    raise InvalidField(w, f"{v!r} is not a number")
                kw[key] = v
                kw["_min" if key == "minimum" else "_max"] = exact(v)
            else:
                if type(v) is not int or v < 0:
                    raise InvalidField(w, "maxLength must be a whole number ≥ 0")
                kw["max_length"] = v
        c = cls(**kw)
        if c._min is not None and c._max is not None and c._min > c._max:
            raise InvalidField(where, f"minimum {c.minimum} is above maximum {c.maximum}")
        if (c.minimum is not None or c.maximum is not None) and (
                c.pattern is not None or c.max_length is not None):
            raise InvalidField(where, "minimum/maximum want a number but pattern/maxLength "
                               "want a string; no value can satisfy both")
        return c

    def why_not(self, value: Any) -> str | None:
        """``None`` if ``value`` satisfies every constraint, else why not (no value echoed)."""
        if self.const is not _UNSET and not json_equal(value, self.const):
            return "is not the allowed value"
        if self.enum is not None and not any(json_equal(value, e) for e in self.enum):
            return "is not one of the allowed values"
        if self.minimum is not None or self.maximum is not None:
            if not _is_number(value):
                return "must be a number"
            number = exact(value)
            if self._min is not None and number < self._min:
                return f"is below the minimum {self.minimum}"
            if self._max is not None and number > self._max:
                return f"is above the maximum {self.maximum}"
        if self.pattern is not None or self.max_length is not None:
            if not isinstance(value, str):
                return "must be a string"
            if self.max_length is not None and len(value) > self.max_length:
                return f"is longer than {self.max_length} characters"
            if self._regex is not None:
                if len(value) > MAX_MATCH_CHARS:
                    return (f"is longer than the {MAX_MATCH_CHARS} characters a pattern is "
                            "matched against")
                try:
                    if self._regex.fullmatch(value) is None:
                        return "does not match the allowed pattern"
                except UnicodeError:
                    return "is not valid Unicode"
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.const is not _UNSET:
            out["const"] = self.const
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.pattern is not None:
            out["pattern"] = self.pattern
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.max_length is not None:
            out["maxLength"] = self.max_length
        return out


def _check_tool_name(t: Any, where: FieldPath) -> None:
    if not isinstance(t, str) or TOOL_NAME.fullmatch(t) is None:
        raise InvalidField(where, f"{t!r} is not a tool name (1-128 of A-Z a-z 0-9 _ . -)")


def _parse_pins(pins_in: Any, tools: frozenset[str], where: FieldPath) -> dict[str, str]:
    """``mcp.pin``: granted tool → the digest its definition must have."""
    if not isinstance(pins_in, Mapping):
        raise InvalidField(where, 'pin must map tool names to digests, e.g. {search_docs: '
                           '"sha256:…"}')
    pins = {}
    for tool, digest in pins_in.items():
        w = (*where, tool if isinstance(tool, str) else repr(tool))
        if tool not in tools:
            raise InvalidField(w, f"{tool!r} is not among the rule's tools; pin a granted tool")
        if not isinstance(digest, str) or PIN.fullmatch(digest) is None:
            raise InvalidField(w, "a pin is 'sha256:' and 64 lower-case hex digits (the "
                               "digest taskgate shows for the tool's definition)")
        pins[tool] = digest
    return pins


def _parse_args(args_in: Any, where: FieldPath) -> dict[str, ArgConstraint]:
    """An ``args`` mapping: argument name → :class:`ArgConstraint`, no two names alike."""
    if not isinstance(args_in, Mapping):
        raise InvalidField(where, "args must map argument names to constraints")
    args = {}
    for name, c in args_in.items():
        if not isinstance(name, str) or not name:
            raise InvalidField(where, f"{name!r} is not an argument name")
        args[name] = ArgConstraint.parse(c, (*where, name))
    if len({fold(n) for n in args}) != len(args):
        raise InvalidField(where, "two argument names differ only by case or "
                           "Unicode folding; name each argument once")
    return args


@dataclass(frozen=True, slots=True)
class McpGrant:
    """The MCP part of a rule: allowed tools, argument constraints, extra methods."""

    tools: frozenset[str] = frozenset()
    args: Mapping[str, ArgConstraint] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    # Constraints of one tool only (the mapping form of ``tools``), on top of ``args``.
    tool_args: Mapping[str, Mapping[str, ArgConstraint]] = field(default_factory=dict)
    pins: Mapping[str, str] = field(default_factory=dict)  # tool → "sha256:…" (mcp.pin)
    _folded_args: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    _tool_folded: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False,
                                                          compare=False)

    @classmethod
    def parse(cls, data: Any, where: FieldPath | str = ("mcp",)) -> McpGrant:
        """Validate a rule's ``mcp`` mapping; :class:`InvalidField` names the key (under
        ``where``) and the fix."""
        where = as_path(where)
        if not isinstance(data, Mapping):
            raise InvalidField(where, f"mcp must be a mapping with keys {', '.join(GRANT_KEYS)}")
        for key in data:
            if key not in GRANT_KEYS:
                raise InvalidField((*where, key), f"unknown key; mcp has {', '.join(GRANT_KEYS)}")
        tools_in = data.get("tools", [])
        args = _parse_args(data.get("args", {}), (*where, "args"))
        folded = {fold(n): n for n in args}
        tool_args: dict[str, Mapping[str, ArgConstraint]] = {}
        tool_folded: dict[str, Mapping[str, str]] = {}
        if isinstance(tools_in, Mapping):
            for t, spec in tools_in.items():
                w = (*where, "tools", t if isinstance(t, str) else repr(t))
                _check_tool_name(t, w)
                if spec is None:
                    continue
                if not isinstance(spec, Mapping):
                    raise InvalidField(w, "a tool maps to its constraints, e.g. {args: "
                                       "{limit: {maximum: 50}}}, or to {} for none")
                for key in spec:
                    if key not in TOOL_KEYS:
                        raise InvalidField((*w, key), "unknown key; a tool has args")
                own = _parse_args(spec.get("args", {}), (*w, "args"))
                if own:
                    both = {**folded}
                    for n in own:
                        if both.setdefault(fold(n), n) != n:
                            raise InvalidField((*w, "args"), f"argument {n!r} differs only "
                                               f"by case or Unicode folding from "
                                               f"{both[fold(n)]!r}; name each argument once")
                    tool_args[t] = own
                    tool_folded[t] = both
        elif isinstance(tools_in, str) or not isinstance(tools_in, Sequence):
            raise InvalidField((*where, "tools"), "tools must be a list of tool names, or "
                               "map each tool name to its constraints")
        else:
            for i, t in enumerate(tools_in):
                _check_tool_name(t, (*where, "tools", i))
        methods_in = data.get("methods", [])
        if isinstance(methods_in, (str, Mapping)) or not isinstance(methods_in, Sequence):
            raise InvalidField((*where, "methods"), "methods must be a list such as "
                               "['resources/read', 'prompts/*']")
        for i, m in enumerate(methods_in):
            w = (*where, "methods", i)
            base = m[:-2] if isinstance(m, str) and m.endswith("/*") else m
            if not isinstance(base, str) or _METHOD_NAME.fullmatch(base) is None:
                raise InvalidField(w, f"{m!r} is not a JSON-RPC method name or 'family/*'")
            if fold(base) in ("tools", "tools/call"):
                raise InvalidField(w, "grant tool calls with mcp.tools, not mcp.methods")
        pins = _parse_pins(data.get("pin", {}), frozenset(tools_in), (*where, "pin"))
        return cls(frozenset(tools_in), args, tuple(methods_in), tool_args, pins, folded,
                   tool_folded)

    def allows_method(self, method: str) -> bool:
        """Whether a JSON-RPC method other than ``tools/call`` passes under this grant."""
        if method in ALWAYS_ALLOWED or method.startswith("notifications/"):
            return True
        return any(method == m or (m.endswith("/*") and method.startswith(m[:-1])
                                   and _METHOD_NAME.fullmatch(method) is not None)
                   for m in self.methods)

    def why_not_tool(self, name: str, arguments: Mapping[str, Any]) -> str | None:
        """``None`` if this grant allows calling ``name`` with ``arguments``, else why."""
        if name not in self.tools:
            return f"tool {name!r} is not granted"
        own = self.tool_args.get(name)
        folded = self._tool_folded[name] if own else self._folded_args
        if folded:
            for key in arguments:
                target = folded.get(fold(key))
                if target is not None and target != key:
                    return (f"argument {key!r} differs only by case or Unicode folding from "
                            f"the constrained argument {target!r}")
        for constraints in (self.args, own or {}):
            for arg, c in constraints.items():
                if arg not in arguments:
                    return f"argument {arg!r} is required by the grant and missing"
                why = c.why_not(arguments[arg])
                if why is not None:
                    return f"argument {arg!r} {why}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as a task request or the config would spell it."""
        out: dict[str, Any] = {"tools": sorted(self.tools)}
        if self.tool_args:
            out["tools"] = {t: ({"args": {k: c.to_dict() for k, c in self.tool_args[t].items()}}
                                if t in self.tool_args else {}) for t in sorted(self.tools)}
        if self.args:
            out["args"] = {k: c.to_dict() for k, c in self.args.items()}
        if self.methods:
            out["methods"] = list(self.methods)
        if self.pins:
            out["pin"] = dict(sorted(self.pins.items()))
        return out
