"""The state-backend benchmark runs end to end in seconds and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_support import redis_available
from tests.support import python_env

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not redis_available(), reason="redis-server not installed")
def test_bench_state_smoke() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_state.py"),
                           "--sizes", "10", "--calls", "200"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=python_env(PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for backend in ("sqlite", "redis"):
        row = re.search(rf"^{backend}\s+10\s+\d+\.\d+\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)$",
                        proc.stdout, re.M)
        assert row is not None and float(row.group(1)) > 0 and int(row.group(3)) > 0, \
            proc.stdout
    assert re.search(r"^redis - sqlite p50 at\s+10 tasks: [+-]\d+\.\d+ ms$", proc.stdout,
                     re.M), proc.stdout
