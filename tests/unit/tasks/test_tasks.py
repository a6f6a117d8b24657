"""proxy/tasks/_model.py: a task's rules survive the trip through their stored (canonical) form."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.errors import InvalidField
from proxy.policy import McpGrant, parse_rules
from proxy.policy._rules import RULE_KEYS
from proxy.tasks._model import MAX_BODY_BYTES, RuleSets, canonical_rules, parse_task_request

RULES: list[dict[str, Any]] = [
    {"id": "plain", "host": "api.test", "methods": ["GET"]},
    {"id": "private", "host": "db.internal.test", "methods": ["GET"], "allow_private": True},
    {"id": "socket", "host": "rt.api.test", "methods": ["GET"], "paths": ["/v1/realtime"],
     "websocket": True},
    {"id": "full", "host": "*.api.test", "port": 8443, "scheme": "https",
     "methods": ["GET", "POST"], "paths": ["/v1/**", "/v2/*/x"], "secret": "s",
     "approval": "required"},
    {"id": "gh", "host": "api.github.com", "methods": ["GET"], "paths": ["/repos/acme/**"],
     "secret": "github", "repositories": ["widgets", "gadgets"],
     "permissions": {"issues": "read", "contents": "write"}},
    {"id": "mcp", "host": "mcp.test", "paths": ["/mcp"], "secret": "k",
     "mcp": {"tools": ["search", "add"], "methods": ["resources/*"],
             "args": {"limit": {"maximum": 50}, "q": {"pattern": "[a-z]+", "maxLength": 9}}}},
    {"id": "mcp-per-tool", "host": "mcp.test", "paths": ["/mcp"],
     "mcp": {"tools": {"search": {"args": {"limit": {"maximum": 50}}}, "add": None}}},
]


@pytest.mark.parametrize("data", RULES, ids=[r["id"] for r in RULES])
def test_a_stored_rule_reads_back_as_granted(data: dict[str, Any]) -> None:
    granted = parse_rules([data])[0]
    _, ruleset = RuleSets().acquire(canonical_rules((granted,)))
    stored = ruleset.rules[0]
    assert stored.to_dict() == granted.to_dict()
    for name in ("id", "host", "port", "scheme", "methods", "mcp", "secret", "approval",
                 "repositories", "permissions", "allow_private", "websocket"):
        assert getattr(stored, name) == getattr(granted, name), name
    assert [p.text for p in stored.paths] == [p.text for p in granted.paths]
    assert stored.mcp is None or isinstance(stored.mcp, McpGrant)


def test_the_table_covers_every_rule_key() -> None:
    """A key rules gain must be added above, so its trip through storage is tested."""
    assert {k for r in RULES for k in r} == set(RULE_KEYS)


# -- request validation: each mistake names its field ------------------------------------
GOOD: dict[str, Any] = {"workload": "wl", "ttl_seconds": 60,
                        "rules": [{"id": "r", "host": "api.test", "methods": ["GET"]}]}


def _rule(**change: Any) -> dict[str, Any]:
    return {**GOOD, "rules": [GOOD["rules"][0], {"id": "r2", "host": "b.test",
                                                 "methods": ["GET"], **change}]}


@pytest.mark.parametrize(("body", "status", "error", "field", "reason"), [
    (b"{", 400, "invalid_json", None, "the body is not valid JSON"),
    (b"[]", 400, "invalid_json", None, "the body must be a JSON object"),
    (b"x" * (MAX_BODY_BYTES + 1), 413, "payload_too_large", None, "the body exceeds"),
    ({**GOOD, "colour": "blue"}, 422, "invalid_request", "colour", "unknown field 'colour'"),
    ({**GOOD, "ttl_seconds": 0}, 422, "invalid_request", "ttl_seconds", "between 1 and"),
    ({**GOOD, "rules": "r"}, 422, "invalid_request", "rules", "rules must be a list"),
    (_rule(paths=["nope"]), 422, "invalid_request", "rules[1].paths[0]", "must start with '/'"),
    (_rule(paths=["/a"] * 33), 422, "invalid_request", "rules[1].paths", "at most 32 globs"),
    (_rule(host="a" * 256), 422, "invalid_request", "rules[1].host", "at most 255"),
    (_rule(host="*foo.com"), 422, "invalid_request", "rules[1].host", "use '*.foo.com'"),
    (_rule(id="r"), 422, "invalid_request", "rules[1].id", "duplicate rule id 'r'"),
    (_rule(mcp={"tools": "t"}), 422, "invalid_request", "rules[1].mcp.tools",
     "tools must be a list of tool names"),
    (_rule(mcp={"args": {"q": {"pattern": "("}}}), 422, "invalid_request",
     "rules[1].mcp.args.q.pattern", "not a valid regular expression"),
    (_rule(permissions={"issues": "execute"}), 422, "invalid_request",
     "rules[1].permissions.issues", "use one of read, write, admin"),
    (_rule(websocket="true"), 422, "invalid_request", "rules[1].websocket", "use true"),
    (_rule(websocket=True, mcp={"tools": ["t"]}, approval="required"), 422,
     "invalid_request", "rules[1].websocket", "cannot be held for approval"),
    (_rule(mcp={"tools": {"search": {"args": {"limit": {"maximum": "x"}}}}}), 422,
     "invalid_request", "rules[1].mcp.tools.search.args.limit.maximum", "must be a number"),
    (_rule(mcp={"tools": {"search": {"args": {"q": {"pattern": "("}}}}}), 422,
     "invalid_request", "rules[1].mcp.tools.search.args.q.pattern",
     "not a valid regular expression"),
    (_rule(mcp={"tools": {"search": {"argz": {}}}}), 422, "invalid_request",
     "rules[1].mcp.tools.search.argz", "unknown key; a tool has args"),
], ids=["json", "object", "size", "unknown", "ttl", "rules", "glob", "globs", "host-long",
        "host", "duplicate", "mcp-shape", "mcp-pattern", "permission", "websocket",
        "websocket-approval", "tool-arg-number", "tool-arg-pattern", "tool-key"])
def test_request_errors_name_the_field(body: Any, status: int, error: str, field: str | None,
                                       reason: str) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(InvalidField) as e:
        parse_task_request(raw)
    assert (e.value.status, e.value.error, e.value.field) == (status, error, field)
    assert reason in e.value.reason and not e.value.reason.startswith(f"{field}:")


def test_a_good_request_parses() -> None:
    assert [r.id for r in parse_task_request(orjson.dumps(GOOD)).rules] == ["r"]
