"""The no-silent-skips rule (tests/skips.py) in a real pytest run of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.skips import allowed
from tests.support import REPO, python_env

SKIPPING = """
import pytest

def test_runs():
    pass

def test_needs_a_tool():
    pytest.skip("{reason}")

@pytest.mark.xfail(strict=True)
def test_known_gap():
    assert False
"""


def run(tmp_path: Path, reason: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_it.py").write_text(SKIPPING.format(reason=reason))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.skips",
         "--rootdir", str(tmp_path), str(tmp_path / "test_it.py")],
        cwd=REPO, env=python_env(**env), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("reason", "ci", "ok"), [
    ("mitmdump is not installed", False, False),
    ("mitmdump is not installed", True, False),
    ("127.0.0.1:8080/8081 are in use on this machine", False, True),
    ("127.0.0.1:8080/8081 are in use on this machine", True, False),
    ("127.0.0.1:8080", False, False),  # a prefix of an entry is not the entry
])
def test_allow_list(reason: str, ci: bool, ok: bool) -> None:
    assert allowed(reason, ci=ci) is ok


def test_unlisted_skip_fails_the_run(tmp_path: Path) -> None:
    r = run(tmp_path, "mitmdump is not installed", TASKGATE_STRICT_SKIPS="1", CI="")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "skips not on the allow-list" in r.stdout
    assert "test_needs_a_tool: mitmdump is not installed" in r.stdout


def test_listed_skip_passes_off_ci(tmp_path: Path) -> None:
    r = run(tmp_path, "127.0.0.1:8080/8081 are in use on this machine",
            TASKGATE_STRICT_SKIPS="1", CI="")
    assert r.returncode == 0, r.stdout + r.stderr


def test_listed_skip_fails_on_ci_when_ci_can_run_it(tmp_path: Path) -> None:
    r = run(tmp_path, "127.0.0.1:8080/8081 are in use on this machine",
            TASKGATE_STRICT_SKIPS="1", CI="true")
    assert r.returncode == 1, r.stdout + r.stderr


def test_without_the_switch_skips_are_reported_only(tmp_path: Path) -> None:
    r = run(tmp_path, "mitmdump is not installed", TASKGATE_STRICT_SKIPS="")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout
