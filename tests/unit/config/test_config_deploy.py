"""proxy/config/_model.py: a workload's rollout settings (mode, report_allowed,
require_binding): defaults, and each bad value named with file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config
from tests.unit.config.test_config import load_error, write

WL = '"spiffe://acme.test/agent/a"'


def test_defaults_enforce_unbound(tmp_path: Path) -> None:
    wl = load_config(str(write(tmp_path, f"workloads:\n  {WL}:\n    owner: a@b\n"))
                     ).workloads["spiffe://acme.test/agent/a"]
    assert (wl.mode, wl.report_allowed, wl.require_binding) == ("enforce", False, False)


def test_set(tmp_path: Path) -> None:
    text = (f"workloads:\n  {WL}:\n    mode: report\n    report_allowed: true\n"
            "    require_binding: true\n")
    wl = load_config(str(write(tmp_path, text))).workloads["spiffe://acme.test/agent/a"]
    assert (wl.mode, wl.report_allowed, wl.require_binding) == ("report", True, True)


@pytest.mark.parametrize(("line", "why"), [
    ("mode: shadow", "mode: 'shadow' is not a mode; use enforce (the default) or report"),
    ("mode: 1", "mode: 1 is not a mode"),
    ("report_allowed: yes please", "report_allowed: 'yes please' is not true or false"),
    ("require_binding: 1", "require_binding: 1 is not true or false"),
])
def test_bad_values_name_file_line_key(tmp_path: Path, line: str, why: str) -> None:
    msg = load_error(tmp_path, f"workloads:\n  {WL}:\n    owner: a@b\n    {line}\n")
    assert msg.startswith(f"{tmp_path / 'taskgate.yaml'}:4: ")
    assert f'workloads["spiffe://acme.test/agent/a"].{why}' in msg
