"""``taskgate demo``: the tour, its local API and MCP upstreams, its TLS material.
"""

from __future__ import annotations

from proxy.demo._run import run

__all__ = [
    "run",
]
