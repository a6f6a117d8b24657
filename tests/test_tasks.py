"""A task's rules as the gateway holds them: interned from canonical JSON, same meaning.

Every task's rules pass through ``canonical_rules`` → ``RuleSets.acquire`` (on
creation and on load from the store); what comes out must judge calls exactly as
the parsed rules do — an MCP grant stays an ``McpGrant`` (the inspector ignores
anything else: every tool call was refused as "no MCP rule matches"), a GitHub
token's scope stays.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.mcp import McpGrant
from proxy.rules import parse_rules
from proxy.tasks import RuleSets, canonical_rules

RULES: list[dict[str, Any]] = [
    {"id": "docs", "host": "mcp.acme.dev", "paths": ["/mcp"],
     "mcp": {"tools": ["search_docs"], "args": {"limit": {"maximum": 20}},
             "methods": ["resources/*"]}},
    {"id": "pr", "host": "api.github.com", "methods": ["POST"],
     "paths": ["/repos/acme/widgets/pulls"], "secret": "gh", "approval": "required",
     "repositories": ["widgets"], "permissions": {"pull_requests": "write"}},
    {"id": "plain", "host": "*.acme.dev", "port": 8080, "scheme": "http",
     "methods": ["GET"], "paths": ["/a/**"]},
]


@pytest.mark.parametrize("index", range(len(RULES)))
def test_interned_rule_keeps_every_field(index: int) -> None:
    parsed = parse_rules([RULES[index]])
    _, rule_set = RuleSets().acquire(canonical_rules(parsed))
    (held,) = rule_set.rules
    assert held.to_dict() == parsed[0].to_dict()
    assert held.repositories == parsed[0].repositories
    assert held.permissions == parsed[0].permissions


def test_interned_mcp_grant_judges_tools() -> None:
    _, rule_set = RuleSets().acquire(canonical_rules(parse_rules(RULES[:1])))
    grant = rule_set.rules[0].mcp
    assert isinstance(grant, McpGrant)
    assert grant.why_not_tool("search_docs", {"limit": 5}) is None
    assert grant.why_not_tool("search_docs", {"limit": 500}) == \
        "argument 'limit' is above the maximum 20"
    assert grant.why_not_tool("delete_repo", {}) == "tool 'delete_repo' is not granted"
    assert grant.allows_method("resources/read")
