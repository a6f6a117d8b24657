"""What a call is and which rules allow it: hosts, paths, rules and decisions, the MCP grant
model, ceilings and glob containment, ``host:port`` splitting. Pure functions and values.
"""

from __future__ import annotations

from proxy.policy._ceiling import Breach, breach, check_mcp_shape
from proxy.policy._glob import Budget
from proxy.policy._hostport import split_hostport
from proxy.policy._hosts import HostPattern, canonical_host, default_port
from proxy.policy._mcp_grant import (
    ALWAYS_ALLOWED,
    TOOL_NAME,
    ExactFloat,
    McpGrant,
    fold,
    mcp_method,
)
from proxy.policy._paths import PathGlob, ambiguity, decode, split_target
from proxy.policy._rules import Call, Decision, Rule, RuleSet, parse_rule, parse_rules

__all__ = [
    "ALWAYS_ALLOWED",
    "Breach",
    "Budget",
    "Call",
    "Decision",
    "ExactFloat",
    "HostPattern",
    "McpGrant",
    "PathGlob",
    "Rule",
    "RuleSet",
    "TOOL_NAME",
    "ambiguity",
    "breach",
    "canonical_host",
    "check_mcp_shape",
    "decode",
    "default_port",
    "fold",
    "mcp_method",
    "parse_rule",
    "parse_rules",
    "split_hostport",
    "split_target",
]
