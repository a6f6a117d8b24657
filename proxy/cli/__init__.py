"""The ``taskgate`` command line (entry point ``proxy.cli:main``)."""

from proxy.cli._main import main

__all__ = ["main"]
