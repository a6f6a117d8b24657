"""The data plane core: the gateway and its exchanges, egress (SSRF) and framing decisions,
connection limits, metrics, upstream trust, signals, the builder of every service, and
the hot reload of its config.
"""

from __future__ import annotations

from proxy.gateway._build import Services, build
from proxy.gateway._core import (
    GRPC_STATUS,
    REQUEST_ID_HEADER,
    Gateway,
    grpc_refusal,
    is_grpc,
    new_request_id,
    refusal_body,
    refusal_message,
)
from proxy.gateway._egress import EgressGuard, OwnAddresses, Resolver, Verdict, local_addresses
from proxy.gateway._exchange import ApprovedAs, Exchange, Seen, SocketTotals, Tunnel
from proxy.gateway._framing import h1_request_framing, trailer_fields
from proxy.gateway._limits import ConnectionLimits, FailureThrottle, client_key
from proxy.gateway._metrics import METRICS_CONTENT_TYPE, merge_metrics
from proxy.gateway._pins import PinStore, ToolPins, pin_subject
from proxy.gateway._reload import RESTART_KEYS, ReloadResult, reload
from proxy.gateway._signals import RELOAD_SIGNAL, stop_signals
from proxy.gateway._transparent import (
    TRANSPARENT_ISSUER,
    SourceIdentity,
    TaskBinds,
    destination_name,
    looks_like_http,
    original_destination_reason,
)
from proxy.gateway._upstream import trust_bundle
from proxy.gateway._websocket import (
    POLICY_VIOLATION,
    FrameVerdict,
    OpenSockets,
    answer_frame,
    close_reason,
    frame_exchange,
    granted_tools,
    judge_frame,
    turned_down,
    upgrade_decision,
    websocket_upgrade,
)

__all__ = [
    "ApprovedAs",
    "ConnectionLimits",
    "EgressGuard",
    "Exchange",
    "FailureThrottle",
    "FrameVerdict",
    "GRPC_STATUS",
    "Gateway",
    "METRICS_CONTENT_TYPE",
    "OpenSockets",
    "OwnAddresses",
    "POLICY_VIOLATION",
    "PinStore",
    "RELOAD_SIGNAL",
    "REQUEST_ID_HEADER",
    "RESTART_KEYS",
    "ReloadResult",
    "Resolver",
    "Seen",
    "Services",
    "SocketTotals",
    "SourceIdentity",
    "TRANSPARENT_ISSUER",
    "TaskBinds",
    "ToolPins",
    "Tunnel",
    "Verdict",
    "answer_frame",
    "build",
    "client_key",
    "close_reason",
    "destination_name",
    "frame_exchange",
    "granted_tools",
    "grpc_refusal",
    "h1_request_framing",
    "is_grpc",
    "judge_frame",
    "local_addresses",
    "looks_like_http",
    "merge_metrics",
    "new_request_id",
    "original_destination_reason",
    "pin_subject",
    "refusal_body",
    "refusal_message",
    "reload",
    "stop_signals",
    "trailer_fields",
    "trust_bundle",
    "turned_down",
    "upgrade_decision",
    "websocket_upgrade",
]
