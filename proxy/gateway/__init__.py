"""The data plane core: the gateway and its exchanges, egress (SSRF) and framing decisions,
connection limits, metrics, upstream trust, signals, and the builder of every service.
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
from proxy.gateway._egress import EgressGuard, OwnAddresses, local_addresses
from proxy.gateway._exchange import ApprovedAs, Exchange, Tunnel
from proxy.gateway._framing import h1_request_framing, trailer_fields
from proxy.gateway._limits import ConnectionLimits, FailureThrottle, client_key
from proxy.gateway._metrics import METRICS_CONTENT_TYPE
from proxy.gateway._signals import stop_signals
from proxy.gateway._upstream import trust_bundle

__all__ = [
    "ApprovedAs",
    "ConnectionLimits",
    "EgressGuard",
    "Exchange",
    "FailureThrottle",
    "GRPC_STATUS",
    "Gateway",
    "METRICS_CONTENT_TYPE",
    "OwnAddresses",
    "REQUEST_ID_HEADER",
    "Services",
    "Tunnel",
    "build",
    "client_key",
    "grpc_refusal",
    "h1_request_framing",
    "is_grpc",
    "local_addresses",
    "new_request_id",
    "refusal_body",
    "refusal_message",
    "stop_signals",
    "trailer_fields",
    "trust_bundle",
]
