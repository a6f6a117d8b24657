"""proxy/tasks/_model.py: a task's rules survive the trip through their stored (canonical) form."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.policy import McpGrant, parse_rules
from proxy.policy._rules import RULE_KEYS
from proxy.tasks._model import RuleSets, canonical_rules

RULES: list[dict[str, Any]] = [
    {"id": "plain", "host": "api.test", "methods": ["GET"]},
    {"id": "private", "host": "db.internal.test", "methods": ["GET"], "allow_private": True},
    {"id": "full", "host": "*.api.test", "port": 8443, "scheme": "https",
     "methods": ["GET", "POST"], "paths": ["/v1/**", "/v2/*/x"], "secret": "s",
     "approval": "required"},
    {"id": "gh", "host": "api.github.com", "methods": ["GET"], "paths": ["/repos/acme/**"],
     "secret": "github", "repositories": ["widgets", "gadgets"],
     "permissions": {"issues": "read", "contents": "write"}},
    {"id": "mcp", "host": "mcp.test", "paths": ["/mcp"], "secret": "k",
     "mcp": {"tools": ["search", "add"], "methods": ["resources/*"],
             "args": {"limit": {"maximum": 50}, "q": {"pattern": "[a-z]+", "maxLength": 9}}}},
]


@pytest.mark.parametrize("data", RULES, ids=[r["id"] for r in RULES])
def test_a_stored_rule_reads_back_as_granted(data: dict[str, Any]) -> None:
    granted = parse_rules([data])[0]
    _, ruleset = RuleSets().acquire(canonical_rules((granted,)))
    stored = ruleset.rules[0]
    assert stored.to_dict() == granted.to_dict()
    for name in ("id", "host", "port", "scheme", "methods", "mcp", "secret", "approval",
                 "repositories", "permissions", "allow_private"):
        assert getattr(stored, name) == getattr(granted, name), name
    assert [p.text for p in stored.paths] == [p.text for p in granted.paths]
    assert stored.mcp is None or isinstance(stored.mcp, McpGrant)


def test_the_table_covers_every_rule_key() -> None:
    """A key rules gain must be added above, so its trip through storage is tested."""
    assert {k for r in RULES for k in r} == set(RULE_KEYS)
