"""proxy/config/_model.py: every key has a default; every error names file, line, key and fix."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from proxy.config import Config, load_config
from proxy.config._model import parse_config
from proxy.errors import ConfigError
from tests.support import PYTHON, python_env


def write(tmp_path: Path, text: str, name: str = "taskgate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    return str(err.value)


# -- defaults -------------------------------------------------------------------
def test_defaults() -> None:
    c = Config()
    assert c.proxy_listen == ("127.0.0.1", 8080)
    assert c.control_listen == ("127.0.0.1", 8081)
    assert c.home == ".taskgate"
    assert c.admin_token_file == ".taskgate/admin-token"
    assert c.audit_path == ".taskgate/audit.jsonl"
    assert c.upstream_ca_file is None
    assert c.issuers == () and dict(c.workloads) == {} and dict(c.secrets) == {}
    assert c.approval_timeout_seconds == 300
    assert (c.max_connections, c.max_connections_per_client) == (10000, 256)
    assert c.idle_timeout_seconds == 600
    assert c.ca_cert_file == os.path.join(".taskgate", "ca", "mitmproxy-ca-cert.pem")


@pytest.mark.parametrize("doc", [None, {}])
def test_empty_file_is_the_defaults(doc: object) -> None:
    assert parse_config(doc, "f.yaml") == Config(source="f.yaml")


def test_no_config_file_means_embedded_defaults(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == Config()


def test_taskgate_yaml_here_is_the_default_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "home: elsewhere\n")
    monkeypatch.chdir(tmp_path)
    c = load_config(None)
    assert c.source == "taskgate.yaml" and c.home == "elsewhere"
    # paths under home follow it unless set
    assert c.audit_path == os.path.join("elsewhere", "audit.jsonl")
    assert c.admin_token_file == os.path.join("elsewhere", "admin-token")


def test_full_config(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    path = write(tmp_path, f"""
        version: 1
        listen: {{proxy: "0.0.0.0:9080", control: "[::1]:9081"}}
        home: h
        identity:
          leeway_seconds: 0
          issuers:
            - {{issuer: "https://i.example", audience: tg, jwks_file: "{jwks}"}}
            - {{issuer: "https://j.example", audience: tg, jwks_url: "https://j.example/k"}}
        workloads:
          "spiffe://acme.dev/agent/triage":
            owner: platform@acme.dev
            standing:
              - {{id: r1, host: "*.Example.com", methods: [GET], secret: gh}}
        secrets:
          gh: {{provider: env, var: GH, inject: {{header: Authorization, value: "x {{token}}"}}}}
        approval_timeout_seconds: 60
        proxy: {{shutdown_grace_seconds: 2, stream_threshold_bytes: 10, max_connections: 50,
                 max_connections_per_client: 5, idle_timeout_seconds: 30}}
        mcp: {{max_body_bytes: 2048}}
        """)
    c = load_config(str(path))
    assert c.proxy_listen == ("0.0.0.0", 9080) and c.control_listen == ("::1", 9081)
    assert c.leeway_seconds == 0 and len(c.issuers) == 2
    assert c.issuers[1].jwks_url == "https://j.example/k"
    wl = c.workloads["spiffe://acme.dev/agent/triage"]
    assert wl.owner == "platform@acme.dev" and str(wl.standing[0].host) == "*.example.com"
    assert c.secrets["gh"].inject.template == "x {token}"
    assert c.approval_timeout_seconds == 60 and c.shutdown_grace_seconds == 2
    assert c.stream_threshold_bytes == 10 and c.max_inspect_bytes == 2048
    assert (c.max_connections, c.max_connections_per_client) == (50, 5)
    assert c.idle_timeout_seconds == 30


# -- unknown keys: named, with their line -------------------------------------------
@pytest.mark.parametrize(("text", "where"), [
    ("listen: {}\nbogus: 1\n", "taskgate.yaml:2: bogus: unknown key 'bogus'"),
    ("listen:\n  proxy: '127.0.0.1:1'\n  bogus: 1\n",
     "taskgate.yaml:3: listen.bogus: unknown key 'bogus'; expected one of proxy, control"),
    ("audit:\n  path: a\n  rotate: daily\n", "taskgate.yaml:3: audit.rotate: unknown key"),
    ("identity:\n  issuer: x\n", "taskgate.yaml:2: identity.issuer: unknown key 'issuer'"),
    ("workloads:\n  w:\n    owner: a\n    standin: []\n",
     'taskgate.yaml:4: workloads["w"].standin: unknown key'),
    ("workloads:\n  w:\n    standing:\n      - id: r\n        host: a.com\n"
     "        methods: [GET]\n        colour: blue\n",
     'taskgate.yaml:7: workloads["w"].standing[0].colour: unknown key'),
    ("proxy:\n  grace: 1\n", "taskgate.yaml:2: proxy.grace: unknown key"),
])
def test_unknown_key_names_key_and_line(tmp_path: Path, text: str, where: str) -> None:
    msg = load_error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / where.split(':', 1)[0]}:{where.split(':', 1)[1]}"), msg


# -- bad values: each named, with the fix --------------------------------------------
BAD_VALUES = [
    ("version: 2", "version: unsupported config version 2"),
    ("listen: [1]", "listen: expected a mapping"),
    ("listen: {proxy: '8080'}", "listen.proxy: '8080' is not host:port; use e.g. '127.0.0.1:8080'"),
    ("listen: {proxy: 'localhost:port'}", "listen.proxy: 'localhost:port' is not host:port"),
    ("listen: {control: '127.0.0.1:70000'}", "listen.control: '127.0.0.1:70000' is not host:port"),
    ("listen: {proxy: 8080}", "listen.proxy: 8080 is not a non-empty string"),
    ("home: ''", "home: '' is not a non-empty string"),
    ("home: 3", "home: 3 is not a non-empty string"),
    ("admin_token_file: []", "admin_token_file: [] is not a non-empty string"),
    ("upstream: {ca_file: /no/such/ca.pem}", "upstream.ca_file: '/no/such/ca.pem' does not exist"),
    ("audit: {path: 5}", "audit.path: 5 is not a non-empty string"),
    ("identity: {leeway_seconds: -1}", "identity.leeway_seconds: -1 is not a number between 0"),
    ("identity: {leeway_seconds: 301}", "identity.leeway_seconds: 301 is not a number"),
    ("identity: {leeway_seconds: 'x'}", "identity.leeway_seconds: 'x' is not a number"),
    ("identity: {leeway_seconds: true}", "identity.leeway_seconds: True is not a number"),
    ("identity: {issuers: {a: 1}}", "identity.issuers: expected a list of issuers"),
    ("identity: {issuers: [{audience: a, jwks_url: 'https://k'}]}",
     "identity.issuers[0].issuer: None is not a non-empty string"),
    ("identity: {issuers: [{issuer: i, jwks_url: 'https://k'}]}",
     "identity.issuers[0].audience: None is not a non-empty string"),
    ("identity: {issuers: [{issuer: i, audience: a}]}",
     "identity.issuers[0]: give exactly one of jwks_file or jwks_url"),
    ("identity: {issuers: [{issuer: i, audience: a, jwks_url: 'https://k', jwks_file: f}]}",
     "identity.issuers[0]: give exactly one of jwks_file or jwks_url"),
    ("identity: {issuers: [{issuer: i, audience: a, jwks_url: 'http://k'}]}",
     "identity.issuers[0].jwks_url: 'http://k': keys are fetched over https only"),
    ("identity: {issuers: [{issuer: i, audience: a, jwks_file: /no/jwks.json}]}",
     "identity.issuers[0].jwks_file: '/no/jwks.json' does not exist"),
    ("identity: {issuers: [{issuer: i, audience: a, jwks_url: 'https://k', kid: x}]}",
     "identity.issuers[0].kid: unknown key 'kid'"),
    ("workloads: [a]", "workloads: expected a mapping of workload id"),
    ("workloads: {w: {owner: 3}}", 'workloads["w"].owner: 3 is not a non-empty string'),
    ("workloads: {w: {standing: {id: r}}}", 'workloads["w"].standing: expected a list of rules'),
    ("workloads: {w: {standing: [{id: r, host: '*foo.com', methods: [GET]}]}}",
     "workloads[\"w\"].standing[0].host: '*foo.com' is not a valid pattern; use '*.foo.com'"),
    ("workloads: {w: {ceiling: [{id: r, host: a.com}]}}",
     'workloads["w"].ceiling[0].methods: a rule without \'mcp\' must list its methods'),
    ("workloads: {w: {standing: [{id: r, host: a.com, methods: [GET], port: 0}]}}",
     'workloads["w"].standing[0].port: 0 is not a port'),
    ("workloads: {w: {standing: [{id: r, host: a.com, methods: [GET], websocket: yes}]}}",
     'workloads["w"].standing[0].websocket: \'yes\': use true'),
    ("workloads: {w: {ceiling: [{id: r, host: a.com, methods: [GET], websocket: 1}]}}",
     'workloads["w"].ceiling[0].websocket: 1: use true'),
    ("proxy: {websocket_max_message_bytes: 10}",
     "proxy.websocket_max_message_bytes: 10 is not a number between 1024"),
    ("workloads: {w: {standing: [{id: r, host: a.com, methods: [GET], secret: gh}]}}",
     "rule 'r' names secret 'gh', which is not defined under 'secrets'"),
    ("secrets: [a]", "secrets: expected a mapping of secret name"),
    ("secrets: {gh: {var: X}}", "secrets.gh: a secret needs a 'provider'"),
    ("approval_timeout_seconds: 0", "approval_timeout_seconds: 0 is not a number between 1"),
    ("proxy: {shutdown_grace_seconds: 601}", "proxy.shutdown_grace_seconds: 601 is not a number"),
    ("proxy: {stream_threshold_bytes: -1}", "proxy.stream_threshold_bytes: -1 is not a number"),
    ("proxy: {max_connections: 0}", "proxy.max_connections: 0 is not a number between 1"),
    ("proxy: {max_connections_per_client: many}",
     "proxy.max_connections_per_client: 'many' is not a number"),
    ("proxy: {idle_timeout_seconds: 0}", "proxy.idle_timeout_seconds: 0 is not a number"),
    ("mcp: {max_body_bytes: 10}", "mcp.max_body_bytes: 10 is not a number between 1024"),
    ("state: {backend: postgres}", "state.backend: 'postgres' is not a state backend; use one of"),
    ("state: {backend: redis}", "state: backend: redis needs redis_url, e.g. 'redis://"),
    ("state: {backend: redis, redis_url: 'http://r:6379'}",
     "state.redis_url: 'http://r:6379' is not a Redis URL; use redis://host:port/db"),
    ("state: {backend: redis, redis_url: 'redis://:hunter2@r:6379/0'}",
     "state.redis_url: the URL carries a password: put it in state.redis_password_file"),
    ("state: {backend: redis, redis_url: 'redis://r', redis_password_file: /no/pw}",
     "state.redis_password_file: '/no/pw' does not exist"),
    ("state: {backend: redis, redis_url: 'redis://r', db: 2}", "state.db: unknown key 'db'"),
    ("proxy: {workers: 0}", "proxy.workers: 0 is not a number between 1 and 64"),
    ("proxy: {workers: 2}",
     "proxy.workers: 2 workers need shared state: set state.backend: redis (with "
     "state.redis_url), or proxy.workers: 1"),
    ("replica_id: 'a/b'", "replica_id: 'a/b': use letters, digits"),
    ("- a", "expected a mapping with keys version, listen"),
    ("just text", "expected a mapping with keys"),
]


@pytest.mark.parametrize(("text", "message"), BAD_VALUES)
def test_bad_value(tmp_path: Path, text: str, message: str) -> None:
    msg = load_error(tmp_path, text + "\n")
    assert msg.startswith(f"{tmp_path / 'taskgate.yaml'}:1: "), msg
    assert message in msg, msg


def test_shared_state_and_workers() -> None:
    """Workers and a replica id with the Redis backend; the password never in the URL."""
    cfg = parse_config({"state": {"backend": "redis", "redis_url": "rediss://r.internal:6380/1",
                                  "key_prefix": "gw1:"},
                        "proxy": {"workers": 2}, "replica_id": "gw-a"})
    assert (cfg.state_backend, cfg.redis_url, cfg.redis_key_prefix) == (
        "redis", "rediss://r.internal:6380/1", "gw1:")
    assert (cfg.workers, cfg.replica_id) == (2, "gw-a")
    default = Config()
    assert (default.state_backend, default.workers, default.replica_id) == ("sqlite", 1, None)


def test_error_line_points_at_the_rule_key(tmp_path: Path) -> None:
    msg = load_error(tmp_path, """
        workloads:
          "spiffe://acme.dev/agent/triage":
            owner: x
            ceiling:
              - id: ok
                host: a.com
                methods: [GET]
              - id: bad
                host: "*foo.com"
                methods: [GET]
        """)
    assert msg == (f"{tmp_path / 'taskgate.yaml'}:9: "
                   'workloads["spiffe://acme.dev/agent/triage"].ceiling[1].host: '
                   "'*foo.com' is not a valid pattern; use '*.foo.com'")


def test_duplicate_rule_id(tmp_path: Path) -> None:
    msg = load_error(tmp_path, """
        workloads:
          w:
            standing:
              - {id: r1, host: a.com, methods: [GET]}
              - {id: r1, host: b.com, methods: [GET]}
        """)
    assert msg == f"{tmp_path / 'taskgate.yaml'}:5: workloads[\"w\"].standing[1].id: " \
                  "duplicate rule id 'r1'"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    msg = load_error(tmp_path, "listen:\n  proxy: [\n")
    assert msg.startswith(f"{tmp_path / 'taskgate.yaml'}:3: invalid YAML"), msg


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "taskgate.yaml"
    path.write_bytes(b"home: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_config(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file: No such file"):
        load_config(str(tmp_path / "nope.yaml"))


# -- taskgate check-config ---------------------------------------------------------
def check_config(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = python_env()
    return subprocess.run([*PYTHON, "-m", "proxy", "check-config", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


def test_check_config_cli(tmp_path: Path) -> None:
    """One process per outcome is slow; the three outcomes share one test."""
    write(tmp_path, """
        workloads:
          w:
            owner: o
            standing:
              - {id: r1, host: a.com, methods: [GET]}
              - {id: r2, host: "*.b.com", methods: [GET, POST], paths: ["/x/**"]}
        """, "good.yaml")
    write(tmp_path, "listen:\n  proxy: '127.0.0.1:1'\n  bogus: 1\n", "bad.yaml")

    ok = check_config("good.yaml", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "good.yaml: OK (1 workloads, 2 rules, 0 issuers, 0 secrets)"

    bad = check_config("bad.yaml", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("taskgate: bad.yaml:3: listen.bogus: unknown key 'bogus'; "
                                  "expected one of proxy, control, transparent")
    assert "Traceback" not in bad.stderr

    missing = check_config("missing.yaml", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("taskgate: missing.yaml: cannot read the config file: "
                                      "No such file or directory")


def test_check_config_needs_a_file(tmp_path: Path) -> None:
    r = check_config(cwd=tmp_path)
    # No file named and no ./taskgate.yaml: the subcommand's usage, exit 2.
    assert r.returncode == 2 and "usage: taskgate check-config FILE" in r.stderr
