"""Who is calling: workload JWTs (JWKS), task tokens and their keys, the admin token.
"""

from __future__ import annotations

from proxy.identity._admin import ENV_VAR, admin_token
from proxy.identity._jwt import Caller, Identity, JwksKeys, TokenIssuer, WorkloadIssuer
from proxy.identity._task_tokens import TASK_ISSUER, TaskKeys, TaskTokenIssuer

__all__ = [
    "Caller",
    "ENV_VAR",
    "Identity",
    "JwksKeys",
    "TASK_ISSUER",
    "TaskKeys",
    "TaskTokenIssuer",
    "TokenIssuer",
    "WorkloadIssuer",
    "admin_token",
]
