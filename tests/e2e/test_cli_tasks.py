"""``taskgate task …`` end to end: the CLI against the real gateway's control plane."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.cli._tasks import parse_ttl
from tests.support import REPO, WORKLOAD, Gateway, Upstream
from tests.tasks_support import admin_token, http_rule, show


def cli(gw: Gateway, *args: str, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if "proxy" not in k.lower() and not k.startswith("TASKGATE_")}
    base["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "proxy", "task", *args],
                          cwd=cwd or gw.dir, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=30)


def curl(proxy_line: str, url: str) -> str:
    proxy = proxy_line.split("=", 1)[1]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["HTTP_PROXY"] = env["http_proxy"] = proxy
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
                          "%{http_code}", url], env=env, capture_output=True, text=True,
                         timeout=20)
    return out.stdout


@pytest.mark.parametrize(("text", "seconds"), [("900", 900), ("90s", 90), ("15m", 900),
                                               ("1h", 3600), ("1h30m", 5400),
                                               ("2h0m5s", 7205)])
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "15x", "m", "1.5h", "-5", "15m1h"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ttl(text)


def test_create_list_show_revoke(ceiling_gateway: Gateway, upstream: Upstream,
                                 tmp_path: Path) -> None:
    gw = ceiling_gateway
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump([http_rule(upstream)]))
    out = cli(gw, "create", "-c", str(gw.config_path), "--workload", WORKLOAD, "--ttl", "15m",
              "--max-calls", "3", "--rules", str(rules), "--purpose", "cli test")
    assert out.returncode == 0, out.stderr
    task_id = re.search(r"^task\s+([0-9a-f]{32})$", out.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert re.search(r"^expires\s+\S+Z \(in 1[45]m\d*s?\)$", out.stdout, re.M), out.stdout
    proxy_line = next(line for line in out.stdout.splitlines()
                      if line.startswith("export HTTP_PROXY="))
    assert proxy_line.startswith(f"export HTTP_PROXY=http://{task_id}:ey")
    assert proxy_line.endswith(f"@127.0.0.1:{gw.proxy_port}")

    url = f"http://127.0.0.1:{upstream.http_port}/allowed/cli"
    assert curl(proxy_line, url) == "200"

    out = cli(gw, "list", "-c", str(gw.config_path))
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith(task_id))
    assert "active" in line and "1/3" in line and WORKLOAD in line

    out = cli(gw, "show", task_id, "-c", str(gw.config_path))
    assert out.returncode == 0, out.stderr
    assert re.search(r"^calls\s+1 used, 2 left$", out.stdout, re.M), out.stdout
    assert "cli test" in out.stdout and '"id":"plain"' in out.stdout

    out = cli(gw, "revoke", task_id, "-c", str(gw.config_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"revoked {task_id} at ")
    assert curl(proxy_line, url) == "407"
    assert show(gw, task_id)["status"] == "revoked"


def test_env_gives_address_and_token(ceiling_gateway: Gateway, tmp_path: Path) -> None:
    """From a folder with no config: TASKGATE_CONTROL_URL and TASKGATE_ADMIN_TOKEN."""
    gw = ceiling_gateway
    env = {"TASKGATE_CONTROL_URL": gw.control_url, "TASKGATE_ADMIN_TOKEN": admin_token(gw)}
    out = cli(gw, "list", "--json", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert '"tasks"' in out.stdout
    out = cli(gw, "list", cwd=tmp_path, env={**env, "TASKGATE_ADMIN_TOKEN": "wrong"})
    assert out.returncode == 1 and "401" in out.stderr


def test_create_beyond_ceiling_names_rule_and_field(ceiling_gateway: Gateway,
                                                    upstream: Upstream, tmp_path: Path) -> None:
    gw = ceiling_gateway
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [http_rule(upstream, methods=["DELETE"])]}))
    out = cli(gw, "create", "-c", str(gw.config_path), "--workload", WORKLOAD,
              "--rules", str(rules))
    assert out.returncode == 1
    assert "422" in out.stderr and "'plain'" in out.stderr and "[rules[0].methods]" in out.stderr


def test_cli_errors_are_short_and_clear(ceiling_gateway: Gateway, tmp_path: Path) -> None:
    gw = ceiling_gateway
    out = cli(gw, "show", "0" * 32, "-c", str(gw.config_path))
    assert out.returncode == 1 and "404: no such task" in out.stderr
    assert "Traceback" not in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [unclosed")
    out = cli(gw, "create", "-c", str(gw.config_path), "--workload", WORKLOAD,
              "--rules", str(bad))
    assert out.returncode == 1 and "invalid YAML" in out.stderr
    out = cli(gw, "create", "-c", str(gw.config_path), "--rules", str(bad))
    assert out.returncode == 2 and "--workload" in out.stderr
    out = cli(gw, "list", cwd=tmp_path, env={"TASKGATE_CONTROL_URL": "http://127.0.0.1:9",
                                             "TASKGATE_ADMIN_TOKEN": "x"})
    assert out.returncode == 1 and "cannot reach the control plane" in out.stderr
    out = cli(gw, "list", cwd=tmp_path)  # no config here, no token file, no env
    assert out.returncode == 1 and "no admin token" in out.stderr
