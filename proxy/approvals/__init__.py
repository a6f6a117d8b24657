"""Calls held until a person answers: the registry of held calls and what an approver sees.
"""

from __future__ import annotations

from proxy.approvals._held import Approvals, Held, HeldRequest, target_url
from proxy.approvals._shared import SharedApprovals

__all__ = [
    "Approvals",
    "Held",
    "HeldRequest",
    "SharedApprovals",
    "target_url",
]
