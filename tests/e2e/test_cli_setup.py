"""Setting an agent up: ``taskgate task create`` prints the proxy environment in both
spellings (and as JSON), ``taskgate ca`` every client's CA variable and a combined
bundle, ``check-config`` takes several files, ``run`` names where its admin token came
from, and every subcommand and option says what it is for."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.cli._main import build_parser, main
from proxy.cli._setup import CA_VARS, export_block, proxy_env
from tests.support import REPO, WORKLOAD, Gateway, Upstream, python_env
from tests.tasks_support import http_rule

PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")


def taskgate(*args: str, cwd: Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in python_env().items()
            if "proxy" not in k.lower() and not k.startswith("TASKGATE_")}
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


def exported(text: str) -> dict[str, str]:
    """What ``eval`` of the ``export`` lines in ``text`` would set."""
    out = {}
    for line in text.splitlines():
        if line.strip().startswith("export "):
            name, _, value = line.strip().removeprefix("export ").partition("=")
            out[name] = shlex.split(value, comments=True)[0] if value.strip() else ""
    return out


# -- the proxy environment ---------------------------------------------------------
def test_proxy_env_has_both_spellings_and_an_empty_no_proxy() -> None:
    env = proxy_env("http://t:tok@127.0.0.1:8080")
    assert set(env) == set(PROXY_VARS)
    assert {env[n] for n in PROXY_VARS[:4]} == {"http://t:tok@127.0.0.1:8080"}
    assert env["NO_PROXY"] == env["no_proxy"] == ""
    assert exported(export_block(env)) == env  # what a shell would set from the block


def test_task_create_prints_the_export_block_and_json(ceiling_gateway: Gateway,
                                                      upstream: Upstream,
                                                      tmp_path: Path) -> None:
    gw = ceiling_gateway
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump([http_rule(upstream)]))
    args = ("task", "create", "-c", str(gw.config_path), "--workload", WORKLOAD, "--rules",
            str(rules))
    out = taskgate(*args, cwd=gw.dir)
    assert out.returncode == 0, out.stderr
    env = exported(out.stdout)
    assert set(env) == set(PROXY_VARS), out.stdout
    assert env["http_proxy"].endswith(f"@127.0.0.1:{gw.proxy_port}")
    assert env["NO_PROXY"] == ""
    # curl reads only the lower-case http_proxy for http:// URLs: with the block it
    # goes through the gateway (a 200 from a rule), not around it.
    url = f"http://127.0.0.1:{upstream.http_port}/allowed/setup"
    curl = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-D", "-",
                           url], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=20)
    assert "x-taskgate-request-id" in curl.stdout.lower(), curl.stdout

    out = taskgate(*args, "--json", cwd=gw.dir)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["env"] == proxy_env(doc["proxy_url"]) and doc["task_id"]


# -- trust ---------------------------------------------------------------------------
def test_ca_lists_every_clients_variable_and_a_combined_bundle(tmp_path: Path) -> None:
    out = taskgate("ca", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ca = tmp_path / ".taskgate" / "ca" / "mitmproxy-ca-cert.pem"
    bundle = ca.parent / "taskgate-ca-bundle.pem"
    env = exported(out.stdout)
    assert set(env) == {name for name, _ in CA_VARS} >= {
        "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO",
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "PIP_CERT", "CURL_CA_BUNDLE", "AWS_CA_BUNDLE"}
    assert set(env.values()) == {str(ca)}
    assert "--bundle" in out.stdout and "NO_PROXY" in out.stdout
    # The bundle: the system's roots and taskgate's CA, both usable as a trust store.
    text = bundle.read_text()
    assert text.endswith(ca.read_text()) and text.count("BEGIN CERTIFICATE") > 10
    ssl.create_default_context(cafile=str(bundle))

    out = taskgate("ca", "--bundle", cwd=tmp_path)
    env = exported(out.stdout)
    assert env["SSL_CERT_FILE"] == env["GIT_SSL_CAINFO"] == str(bundle)
    assert env["NODE_EXTRA_CA_CERTS"] == str(ca)  # adds to Node's roots: the CA alone


# -- check-config -----------------------------------------------------------------
def _config(path: Path, host: str) -> Path:
    path.write_text(yaml.safe_dump({"workloads": {WORKLOAD: {"standing": [
        {"id": "r", "host": host, "methods": ["GET"]}]}}}))
    return path


def test_check_config_takes_several_files(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _config(tmp_path / "a.yaml", "api.example"), _config(tmp_path / "b.yaml", "x.test")
    assert main(["check-config", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"{a}: OK" in out and f"{b}: OK" in out


def test_check_config_reports_each_bad_file_and_fails(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    good, bad = _config(tmp_path / "a.yaml", "api.example"), _config(tmp_path / "b.yaml",
                                                                     "*foo.com")
    assert main(["check-config", str(bad), str(good)]) == 2
    got = capsys.readouterr()
    assert f"{good}: OK" in got.out and "b.yaml" in got.err and "'*.foo.com'" in got.err


def test_check_config_names_its_files_one_way(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:  # no -c: the files are the arguments
        main(["check-config", "-c", "x.yaml"])
    assert e.value.code == 2
    assert "usage: taskgate check-config" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no file named, none here
    assert main(["check-config"]) == 2
    assert "usage: taskgate check-config FILE" in capsys.readouterr().err
    _config(tmp_path / "taskgate.yaml", "api.example")
    assert main(["check-config"]) == 0
    assert "taskgate.yaml: OK" in capsys.readouterr().out


# -- run ------------------------------------------------------------------------------
def test_run_with_an_admin_token_in_the_environment_names_no_token_file(
        tmp_path: Path, shared_files: dict[str, Path], upstream: Upstream) -> None:
    env = {**python_env(), "TASKGATE_ADMIN_TOKEN": "a-token-from-the-environment"}
    gw = Gateway(tmp_path, {"home": ".taskgate"}, env=env).start()
    try:
        banner = gw.output()
    finally:
        gw.stop()
    assert "admin token:   from $TASKGATE_ADMIN_TOKEN" in banner, banner
    assert not (tmp_path / ".taskgate" / "admin.token").exists()
    assert not list((tmp_path / ".taskgate").glob("*token*"))


# -- help -------------------------------------------------------------------------------
def _parsers(parser: argparse.ArgumentParser, name: str = "taskgate"
             ) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:  # argparse keeps its actions private
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                found += _parsers(p, f"{name} {sub}")
    return found


def test_every_subcommand_and_option_has_help() -> None:
    undocumented = []
    for name, parser in _parsers(build_parser()):
        if not parser.description and name != "taskgate":
            undocumented.append(name)
        for action in parser._actions:
            if action.help is None and not isinstance(action, argparse._HelpAction):
                undocumented.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not undocumented, undocumented


def test_the_cli_help_runs(tmp_path: Path) -> None:
    out = taskgate("--help", cwd=tmp_path)
    assert out.returncode == 0 and "check-config" in out.stdout
    assert str(REPO)  # the subprocess ran this checkout (python_env)
