"""taskgate core: identity, grants, rule matching, audit, config and control plane.

Nothing in this package imports mitmproxy except :mod:`proxy.server`, the one
module that wires the running gateway (enforced by ruff's banned-api rule and
by ``tests/test_layout.py``).
"""

__version__ = "0.1.0"
