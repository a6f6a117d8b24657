"""The control plane: an aiohttp app (health, tasks, approvals, audit, review page, metrics).
"""

from __future__ import annotations

from proxy.control._app import ControlSite, make_app, make_worker_app
from proxy.control._keys import ControlState

__all__ = [
    "ControlSite",
    "ControlState",
    "make_app",
    "make_worker_app",
]
