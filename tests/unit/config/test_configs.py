"""Every example configuration in configs/ is accepted by `taskgate check-config`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO, python_env

EXAMPLES = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"taskgate.example.yaml", "docker.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_checks(path: Path) -> None:
    out = subprocess.run([*PYTHON, "-m", "proxy", "check-config", str(path)], cwd=REPO,
                         env=python_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(")") and ": OK (" in out.stdout
