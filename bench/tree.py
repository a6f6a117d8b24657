"""Run a module with imports from this tree only: ``python -m bench.tree MODULE ARGS...``.

A venv where taskgate is installed in editable mode from another checkout
carries a meta-path finder that serves any ``proxy.*`` or ``addons.*`` module
this tree lacks from that checkout. taskgate imports its optional feature
modules by name (``proxy.control._tasks``, ``addons.mcp``, …), so a gateway
started from this tree would silently run a mix of two trees. Dropping that
finder before anything is imported keeps the benchmark on the code beside it.
"""

from __future__ import annotations

import runpy
import sys

__all__ = ["main"]


def _is_editable_finder(finder: object) -> bool:
    module = getattr(finder, "__module__", None) or type(finder).__module__
    return module.startswith("__editable__")


def main() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not _is_editable_finder(f)]
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
