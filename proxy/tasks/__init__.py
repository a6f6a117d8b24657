"""Tasks: the model and request validation, the registry that enforces grants and budgets,
and the policy that says which rules hold for a caller.
"""

from __future__ import annotations

from proxy.tasks._model import MAX_BODY_BYTES, parse_task_request
from proxy.tasks._policy import Policy, TaskPolicy
from proxy.tasks._registry import TaskRegistry, open_registry, token_issuer
from proxy.tasks._shared import (
    SharedTaskRegistry,
    open_shared_registry,
    replica_name,
    shared_issuer,
)

__all__ = [
    "MAX_BODY_BYTES",
    "Policy",
    "TaskPolicy",
    "SharedTaskRegistry",
    "TaskRegistry",
    "open_registry",
    "open_shared_registry",
    "parse_task_request",
    "replica_name",
    "shared_issuer",
    "token_issuer",
]
