"""Ceilings: a task rule must lie within one rule of its workload's ceiling.

"Within" means every call the task rule allows, the ceiling rule allows too,
with no more attached to it. A task rule ``T`` is within a ceiling rule ``C``
when all of these hold:

* **host** — ``C`` exact: ``T`` names the same host. ``C`` ``*.s``: ``T`` is an
  exact host below ``s``, or ``*.t`` where ``t`` is ``s`` or below ``s``.
* **scheme and port** — the (scheme, port) pairs ``T`` admits are a subset of
  ``C``'s. A rule admits ``{(scheme, port or the scheme's default)}`` for its
  scheme, or both ``http`` and ``https`` when it names none (this is exactly how
  :meth:`proxy.policy._rules.Rule.why_not` matches).
* **methods** — ``T``'s methods are a subset of ``C``'s.
* **paths** — every path a ``T`` glob matches is matched by some ``C`` glob:
  language containment, decided exactly (:mod:`proxy.policy._glob`). No
  ``paths`` means every path (``/**``).
* **mcp** — ``C`` without ``mcp`` allows any traffic to the endpoint, so ``T``
  may add MCP limits freely. ``C`` with ``mcp``: ``T`` needs ``mcp`` too; its
  ``tools`` a subset of ``C``'s (no ``tools`` = no tool call at all, as the
  gateway enforces it); for every argument
  ``C`` constrains, ``T`` constrains it at least as strictly: ``const`` equal,
  ``enum`` a subset (or a ``const`` in it), ``maximum``/``minimum``/``maxLength``
  no looser (or ``const``/``enum`` values that satisfy them), and ``pattern``
  identical — two different regexes are never compared, so a pattern is only
  "as strict" when it is the ceiling's own; ``methods`` a subset of ``C``'s
  patterns, each written as ``C`` writes it. Any other ``mcp`` key ``C`` sets must
  be repeated verbatim.
* **secret** — ``T`` names no secret, or the one ``C`` names, and then the
  token scope (``repositories``, ``permissions``) within ``C``'s (:func:`scope_breach`).
  A secret sent in cleartext (``T`` says ``scheme: http`` and names a secret)
  needs ``C`` to say ``scheme: http`` too: a ceiling rule without a scheme injects
  over HTTPS only, so it never allows cleartext injection.
* **approval** — if ``C`` requires approval, so does ``T``.
* **allow_private** — ``T`` may opt in to private addresses only if ``C`` does
  (``allow_private: true``, or an IP address as its host; see :mod:`proxy.gateway._egress`).
* **websocket** — ``T`` may let its calls upgrade to a WebSocket only if ``C`` does.

The check asks for one ceiling rule containing the whole task rule; a task
rule that only a combination of ceiling rules would cover is refused (split
it into several task rules). When no ceiling rule fits, the error is about the
ceiling rule that came closest (failed latest in the order above).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import FieldPath, InvalidField, as_path
from proxy.policy._glob import Budget, counterexample
from proxy.policy._hosts import HostPattern, default_port
from proxy.policy._rules import Rule

__all__ = ["ARG_CONSTRAINTS", "Breach", "breach", "check_mcp_shape"]

ARG_CONSTRAINTS = ("const", "enum", "pattern", "maximum", "minimum", "maxLength")
_ORDER = ("host", "port", "methods", "paths", "mcp", "secret", "approval", "allow_private",
          "websocket")


@dataclass(frozen=True, slots=True)
class Breach:
    """Why a task rule is not within the ceiling: the rule, the key, a sentence."""

    rule: str
    key: str
    reason: str


def host_within(inner: HostPattern, outer: HostPattern) -> bool:
    if not outer.wildcard:
        return not inner.wildcard and inner.host == outer.host
    return inner.host.endswith("." + outer.host) or (inner.wildcard and inner.host == outer.host)


def endpoints(rule: Rule) -> frozenset[tuple[str, int]]:
    """The (scheme, port) pairs a rule admits."""
    schemes = (rule.scheme,) if rule.scheme else ("http", "https")
    return frozenset((s, rule.port if rule.port is not None else default_port(s)) for s in schemes)


def _fmt(pairs: frozenset[tuple[str, int]]) -> str:
    return ", ".join(f"{s}:{p}" for s, p in sorted(pairs))


def _same(a: Any, b: Any) -> bool:
    """JSON equality (``True`` is not ``1``)."""
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        b, option=orjson.OPT_SORT_KEYS)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _values(cons: Mapping[str, Any]) -> list[Any] | None:
    """The only values an argument may take under ``cons``, if it pins them."""
    if "const" in cons:
        return [cons["const"]]
    if isinstance(cons.get("enum"), list):
        return list(cons["enum"])
    return None


def _arg_breach(name: str, outer: Mapping[str, Any], inner: Mapping[str, Any]) -> str | None:
    vals = _values(inner)
    for key, limit in outer.items():
        if key == "const":
            ok = vals is not None and all(_same(v, limit) for v in vals)
        elif key == "enum":
            ok = vals is not None and isinstance(limit, list) and all(
                any(_same(v, w) for w in limit) for v in vals)
        elif key == "pattern":
            ok = inner.get("pattern") == limit
        elif key in ("maximum", "minimum"):
            def fits(v: Any, key: str = key, limit: Any = limit) -> bool:
                return _number(v) and _number(limit) and (
                    v <= limit if key == "maximum" else v >= limit)
            ok = fits(inner[key]) if key in inner else (
                vals is not None and all(fits(v) for v in vals))
        elif key == "maxLength":
            def short(v: Any, limit: Any = limit) -> bool:
                return isinstance(v, str) and _number(limit) and len(v) <= limit
            ok = (_number(inner.get("maxLength")) and _number(limit)
                  and inner["maxLength"] <= limit) if "maxLength" in inner else (
                vals is not None and all(short(v) for v in vals))
        else:
            ok = key in inner and _same(inner[key], limit)
        if not ok:
            return (f"argument {name!r} must be held to the ceiling's {key} "
                    f"{orjson.dumps(limit).decode()} or stricter")
    return None


def _own_args(mcp: Mapping[str, Any], tool: str) -> Mapping[str, Any]:
    """The constraints ``mcp`` puts on ``tool`` alone (the mapping form of ``tools``)."""
    tools = mcp.get("tools")
    spec = tools.get(tool) if isinstance(tools, Mapping) else None
    args = spec.get("args") if isinstance(spec, Mapping) else None
    return args if isinstance(args, Mapping) else {}


def _tool_arg_breach(tool: str, name: str, cons: Any, args_in: Mapping[str, Any],
                     own_in: Mapping[str, Any]) -> str | None:
    """Whether ``tool``'s calls under the rule hold argument ``name`` to ``cons``: by a
    constraint for every tool or one for this tool, either as strict as ``cons``."""
    if not isinstance(cons, Mapping):
        return f"the ceiling's constraint on argument {name!r} cannot be compared"
    held = [c for c in (args_in.get(name), own_in.get(name)) if isinstance(c, Mapping)]
    if not held:
        return (f"tool {tool!r}: argument {name!r} must keep the ceiling's constraint "
                f"{dict(cons)}")
    whys = [_arg_breach(name, cons, c) for c in held]
    if all(whys):
        return f"tool {tool!r}: {whys[0]}"
    return None


def mcp_breach(inner: Mapping[str, Any] | None, outer: Mapping[str, Any] | None) -> str | None:
    """Why ``inner``'s MCP limits are looser than ``outer``'s, or ``None``."""
    if outer is None:
        return None
    if inner is None:
        return "the ceiling limits MCP tools here; the rule needs an 'mcp' section"
    tools_out = outer.get("tools")
    tools_in = inner.get("tools") or ()
    if tools_out is not None:
        extra = sorted(set(tools_in) - set(tools_out))
        if extra:
            return f"tools {extra} are not among the ceiling's tools {sorted(tools_out)}"
    args_out = outer.get("args") or {}
    args_in = inner.get("args") or {}
    for name, cons in args_out.items():
        if not isinstance(cons, Mapping):
            return f"the ceiling's constraint on argument {name!r} cannot be compared"
        if name in args_in:
            why = _arg_breach(name, cons, args_in[name])
            if why:
                return why
            continue
        # Not held for every tool: then for each tool the rule grants, on its own.
        if not tools_in:
            return f"argument {name!r} must keep the ceiling's constraint {dict(cons)}"
        for tool in sorted(tools_in):
            why = _tool_arg_breach(tool, name, cons, args_in, _own_args(inner, tool))
            if why:
                return why
    for tool in sorted(tools_in):
        for name, cons in _own_args(outer, tool).items():
            why = _tool_arg_breach(tool, name, cons, args_in, _own_args(inner, tool))
            if why:
                return why
    methods_out = list(outer.get("methods") or ())  # absent: the ceiling grants none
    extra = [m for m in inner.get("methods") or () if m not in methods_out]
    if extra:
        return (f"methods {extra} are not among the ceiling's methods {methods_out} "
                "(each pattern must be one of the ceiling's, as written)")
    for key, value in outer.items():
        if key not in ("tools", "args", "methods") and not _same(inner.get(key), value):
            return f"mcp.{key} must be the ceiling's {orjson.dumps(value).decode()}"
    return None


def _against(rule: Rule, c: Rule, budget: Budget | None) -> tuple[str, str] | None:
    """(aspect, reason) of the first way ``rule`` exceeds ``c``, or ``None``."""
    if not host_within(rule.host, c.host):
        return "host", f"host {str(rule.host)!r} is not within {str(c.host)!r}"
    mine, theirs = endpoints(rule), endpoints(c)
    if not mine <= theirs:
        key = "scheme" if {s for s, _ in mine} - {s for s, _ in theirs} else "port"
        return key, (f"{key} not allowed: the rule reaches {_fmt(mine - theirs)}, "
                     f"the ceiling only {_fmt(theirs)}")
    if c.methods and (not rule.methods or not rule.methods <= c.methods):
        extra = sorted(rule.methods - c.methods) if rule.methods else ["any"]
        return "methods", (f"methods {extra} are not allowed by the ceiling "
                           f"({sorted(c.methods)})")
    if c.paths:
        inner = [p.text for p in rule.paths] or ["/**"]
        try:
            path = counterexample(inner, [p.text for p in c.paths], budget)
        except ValueError as e:
            return "paths", str(e)
        if path is not None:
            return "paths", (f"the rule's paths reach {path!r}, which the ceiling's paths "
                             f"{[p.text for p in c.paths]} do not")
    why = mcp_breach(rule.mcp.to_dict() if rule.mcp is not None else None,
                     c.mcp.to_dict() if c.mcp is not None else None)
    if why:
        return "mcp", why
    if rule.secret is not None and rule.secret != c.secret:
        return "secret", f"secret {rule.secret!r} is not one the ceiling names here"
    why = scope_breach(rule, c)
    if why:
        return "secret", why
    if rule.secret is not None and rule.scheme == "http" and c.scheme != "http":
        return "secret", (f"secret {rule.secret!r} goes out in cleartext over scheme: http, "
                          "but the ceiling injects it over https only; cleartext injection "
                          "needs scheme: http on the ceiling rule itself")
    if c.approval and not rule.approval:
        return "approval", "the ceiling requires approval here; keep approval: required"
    if rule.allow_private and not c.private_ok:
        return "allow_private", ("the rule opts in to private addresses (allow_private: "
                                 "true) but the ceiling rule does not; a task may reach "
                                 "private addresses only where its ceiling says "
                                 "allow_private: true")
    if rule.websocket and not c.websocket:
        return "websocket", ("the rule lets calls upgrade to a WebSocket (websocket: true) "
                             "but the ceiling rule does not; a task may open WebSockets "
                             "only where its ceiling says websocket: true")
    return None


_LEVELS = {"read": 1, "write": 2, "admin": 3}


def scope_breach(rule: Rule, c: Rule) -> str | None:
    """A minted token's scope (GitHub ``repositories``, ``permissions``) within the ceiling's.

    A ceiling that names repositories or permissions bounds the task's: the task
    must name a subset (none at all would mean the whole installation), at a
    level no higher (read < write < admin). A ceiling that names none leaves the
    task free to narrow its token. A task rule without the secret gets no token,
    so there is nothing to bound.
    """
    if rule.secret is None:
        return None
    if c.repositories:
        extra = sorted(set(rule.repositories or ("*",)) - set(c.repositories))
        if extra:
            return (f"repositories {extra} are beyond the ceiling's {sorted(c.repositories)}"
                    if rule.repositories else
                    f"the ceiling limits the token to repositories {sorted(c.repositories)}; "
                    "name them")
    if c.permissions is not None:
        if rule.permissions is None:
            return ("the ceiling limits the token's permissions; name them "
                    f"(at most {dict(c.permissions)})")
        for perm, level in rule.permissions.items():
            top = c.permissions.get(perm)
            if top is None or _LEVELS.get(level, 99) > _LEVELS.get(top, 0):
                return (f"permission {perm}: {level} is beyond the ceiling's "
                        f"{top or 'none'}")
    return None


def breach(rule: Rule, ceiling: Sequence[Rule], budget: Budget | None = None
           ) -> Breach | None:
    """``None`` if one ceiling rule contains ``rule``; else why not (closest ceiling rule).

    ``budget`` caps the path-glob work (see :mod:`proxy.policy._glob`)."""
    if not ceiling:
        return Breach(rule.id, "host", "the workload has no ceiling; a task may be granted "
                                       "nothing")
    best: tuple[int, str, str, str] | None = None
    for c in ceiling:
        miss = _against(rule, c, budget)
        if miss is None:
            return None
        aspect, reason = miss
        rank = _ORDER.index(aspect if aspect != "scheme" else "port")
        if best is None or rank > best[0]:
            best = (rank, aspect, reason, c.id)
    assert best is not None
    _, aspect, reason, cid = best
    if aspect == "host":
        hosts = sorted({str(c.host) for c in ceiling})
        return Breach(rule.id, "host", f"host {str(rule.host)!r} is not within the ceiling's "
                                       f"hosts {hosts}")
    return Breach(rule.id, aspect, f"{reason} (closest ceiling rule: {cid!r})")


def check_mcp_shape(mcp: Any, where: FieldPath | str = ("mcp",)) -> None:
    """Validate a task rule's ``mcp`` section; :class:`InvalidField` names the key."""
    where = as_path(where)
    if not isinstance(mcp, Mapping):
        raise InvalidField(where, "mcp must be a mapping")
    tools = mcp.get("tools")
    if isinstance(tools, Mapping):
        if len(tools) > 256:
            raise InvalidField((*where, "tools"), "at most 256 tools")
        for name, spec in tools.items():
            at = (*where, "tools", name if isinstance(name, str) else repr(name))
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                raise InvalidField(at, "not a tool name")
            if spec is None:
                continue
            if not isinstance(spec, Mapping):
                raise InvalidField(at, "a tool maps to its constraints, e.g. {args: "
                                   "{limit: {maximum: 50}}}, or to {} for none")
            _check_args_shape(spec.get("args"), (*at, "args"))
    elif tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, str) and 0 < len(t) <= 256 for t in tools) or len(tools) > 256):
        raise InvalidField((*where, "tools"), "tools must be a list of tool names, or map "
                           "each tool name to its constraints")
    _check_args_shape(mcp.get("args"), (*where, "args"))


def _check_args_shape(args: Any, where: FieldPath) -> None:
    if args is None:
        return
    if not isinstance(args, Mapping) or len(args) > 256:
        raise InvalidField(where, "args must map argument names to constraints")
    for name, cons in args.items():
        at = (*where, name)
        if not isinstance(cons, Mapping):
            raise InvalidField(at, "a constraint must be a mapping such as {'maximum': 50}")
        for key, value in cons.items():
            if key not in ARG_CONSTRAINTS:
                raise InvalidField((*at, key), "unknown constraint; use one of "
                                   f"{', '.join(ARG_CONSTRAINTS)}")
            if key == "enum" and not (isinstance(value, list) and value):
                raise InvalidField((*at, "enum"), "enum must be a non-empty list")
            if key == "pattern":
                if not isinstance(value, str) or len(value) > 1024:
                    raise InvalidField((*at, "pattern"),
                                       "pattern must be a string (at most 1024)")
                try:
                    re.compile(value)
                except re.error as e:
                    raise InvalidField((*at, "pattern"),
                                       f"not a valid regular expression: {e}") from None
            if key in ("maximum", "minimum") and not _number(value):
                raise InvalidField((*at, key), f"{key} must be a number")
            if key == "maxLength" and not (type(value) is int and value >= 0):
                raise InvalidField((*at, "maxLength"), "maxLength must be a whole number >= 0")
