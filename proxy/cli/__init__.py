"""The ``taskgate`` command line.
"""

from __future__ import annotations

from proxy.cli._main import main

__all__ = [
    "main",
]
