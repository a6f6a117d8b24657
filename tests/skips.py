"""No silent skips: a skip whose reason is not on :data:`ALLOWED` fails the run.

A green run that skipped a module because a tool was missing hides exactly the gap
it was meant to catch (the mitmdump tests once skipped in CI for months). With
``TASKGATE_STRICT_SKIPS=1`` (``scripts/test`` sets it) every skip is checked against
the list below after the run; one not on it turns the exit status into a failure
and is named in the summary. Loaded from ``tests/conftest.py``.
"""

from __future__ import annotations

import os

import pytest

# Reason prefix → whether CI may skip for it. Each entry says why the reason cannot
# hide a missing install step on CI's fresh machine.
ALLOWED: dict[str, bool] = {
    # The embedded-defaults test binds the fixed default ports 8080/8081; a developer's
    # own gateway may hold them. CI's fresh machine has them free, so there it fails.
    "127.0.0.1:8080/8081 are in use on this machine": False,
    # The transparent-mode tests build network namespaces, veth pairs and nftables /
    # iptables-legacy rules: root on Linux and the tools of scripts/install-system-deps.
    # CI runs as root after that script, so there it fails rather than skips.
    "network namespaces are unavailable here": False,
}

_skipped: list[tuple[str, str]] = []
_unlisted: list[tuple[str, str]] = []


def allowed(reason: str, *, ci: bool) -> bool:
    """Is a skip for ``reason`` acceptable (on CI when ``ci``)?"""
    return any(reason.startswith(prefix) and (ok_on_ci or not ci)
               for prefix, ok_on_ci in ALLOWED.items())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _skipped.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("TASKGATE_STRICT_SKIPS") != "1":
        return
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    _unlisted[:] = [(node, why) for node, why in _skipped if not allowed(why, ci=ci)]
    if _unlisted and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _unlisted:
        return
    terminalreporter.section("skips not on the allow-list (tests/skips.py)", red=True)
    for node, why in _unlisted:
        terminalreporter.line(f"{node}: {why}")
    terminalreporter.line("A skipped test checks nothing: install what it needs, or add the "
                          "reason to tests/skips.py ALLOWED with why CI cannot hit it.")
