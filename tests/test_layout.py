"""The core in proxy/ imports no mitmproxy; only proxy/server.py wires it."""

from __future__ import annotations

import json
import pkgutil
import subprocess

import proxy
from tests.support import PYTHON, REPO, python_env

CORE = sorted(f"proxy.{m.name}" for m in pkgutil.iter_modules(proxy.__path__)
              if m.name not in ("server", "__main__"))


def test_core_modules_found() -> None:
    for name in ("proxy.gateway", "proxy.identity", "proxy.rules", "proxy.audit",
                 "proxy.config", "proxy.control", "proxy.cli"):
        assert name in CORE


def test_core_imports_no_mitmproxy() -> None:
    """A fresh interpreter, so no other test's import of mitmproxy can hide one here."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        "import proxy\n"
        "print(json.dumps([proxy.__file__,\n"
        "                  sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy')]))\n"
    )
    env = python_env()
    out = subprocess.run([*PYTHON, "-c", script], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    origin, mitm = json.loads(out.stdout)
    assert origin == str(REPO / "proxy" / "__init__.py")  # this checkout, not another
    assert mitm == []


def test_server_is_the_module_that_wires_mitmproxy() -> None:
    """The check above can fail: the wiring module does pull mitmproxy in."""
    script = "import sys, proxy.server; print('mitmproxy' in sys.modules)"
    env = python_env()
    out = subprocess.run([*PYTHON, "-c", script], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"
