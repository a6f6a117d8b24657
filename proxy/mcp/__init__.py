"""MCP on the wire: strict JSON-RPC reading, tool-call inspection, ``tools/list`` filtering.
"""

from __future__ import annotations

from proxy.mcp._filter import JsonFilter, ReplaceFilter, SseFilter, error_message, filter_message
from proxy.mcp._inspect import (
    SESSION_HEADER,
    McpDecision,
    inspect,
    refused_after,
    rpc_refusal,
    transport_refusal,
)

__all__ = [
    "JsonFilter",
    "McpDecision",
    "ReplaceFilter",
    "SESSION_HEADER",
    "SseFilter",
    "error_message",
    "filter_message",
    "inspect",
    "refused_after",
    "rpc_refusal",
    "transport_refusal",
]
