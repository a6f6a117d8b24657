"""The core in proxy/ imports no mitmproxy; only proxy/server.py wires it."""

from __future__ import annotations

import json
import pkgutil
import subprocess

import pytest

import proxy
from tests.support import PYTHON, REPO, python_env

CORE = sorted(f"proxy.{m.name}" for m in pkgutil.iter_modules(proxy.__path__)
              if m.name not in ("server", "__main__"))


def test_core_modules_found() -> None:
    for name in ("proxy.gateway._core", "proxy.identity._jwt", "proxy.policy._rules", "proxy.audit._log",
                 "proxy.config._model", "proxy.control._app", "proxy.cli._main"):
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


# Every module the gateway is made of, and what start-up does with it. One that fails to
# import must stop the start with its name, never leave a policy step (or an endpoint,
# or a command) silently out.
STARTUP = {
    "addons": ("import proxy.server\nproxy.server.gateway_addons(None)",
               ["addons.limits", "addons.identify", "addons.authorize", "addons.egress",
                "addons.mcp", "addons.approve", "addons.inject", "addons.audit",
                "addons.framing"]),
    "control": ("from proxy.control._app import load_plugins\nload_plugins()",
                ["proxy.control._tasks", "proxy.control._audit", "proxy.control._approvals",
                 "proxy.control._review", "proxy.gateway._metrics"]),
    "cli": ("from proxy.cli._main import build_parser\nbuild_parser()",
            ["proxy.cli._tasks", "proxy.cli._audit", "proxy.cli._approvals", "proxy.cli._demo"]),
}


@pytest.mark.parametrize(("step", "module"), [
    (step, module) for step, (_, modules) in STARTUP.items() for module in modules])
def test_a_module_that_fails_to_import_stops_the_start(step: str, module: str) -> None:
    script = f"import sys\nsys.modules[{module!r}] = None  # its import fails\n"
    script += STARTUP[step][0]
    out = subprocess.run([*PYTHON, "-c", script], env=python_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout
    assert module in out.stderr.strip().splitlines()[-1], out.stderr


def test_the_whole_chain_loads() -> None:
    script = ("import proxy.server\n"
              "print([type(a).__name__ for a in proxy.server.gateway_addons(None)])")
    out = subprocess.run([*PYTHON, "-c", script], env=python_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == str(["Limits", "Identify", "Authorize", "Egress", "Mcp",
                                      "Approve", "Inject", "ApprovedAsShown", "Audit",
                                      "Framing"])
