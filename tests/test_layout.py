"""The core in proxy/ imports no mitmproxy; only proxy/server.py wires it."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import proxy
from tests.support import REPO

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
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_server_is_the_module_that_wires_mitmproxy() -> None:
    """The check above can fail: the wiring module does pull mitmproxy in."""
    script = "import sys, proxy.server; print('mitmproxy' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"
