"""MCP on the wire: strict JSON-RPC reading, tool-call inspection, ``tools/list`` filtering.
"""

from __future__ import annotations

from proxy.mcp._filter import (
    JsonFilter,
    ReplaceFilter,
    Review,
    SseFilter,
    error_message,
    filter_message,
)
from proxy.mcp._inspect import (
    SESSION_HEADER,
    McpDecision,
    inspect,
    refused_after,
    rpc_refusal,
    transport_refusal,
)
from proxy.mcp._pins import Change, PinBook, PinEvent, ToolDef, tool_digest

__all__ = [
    "Change",
    "JsonFilter",
    "McpDecision",
    "PinBook",
    "PinEvent",
    "ReplaceFilter",
    "Review",
    "SESSION_HEADER",
    "SseFilter",
    "ToolDef",
    "error_message",
    "filter_message",
    "inspect",
    "refused_after",
    "rpc_refusal",
    "tool_digest",
    "transport_refusal",
]
