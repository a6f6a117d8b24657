from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import AUDIENCE, ISSUER, WORKLOAD, Gateway, Keys, Upstream

pytest_plugins = ["tests.skips"]  # no silent skips (see its docstring)


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def upstream(test_ca: trustme.CA) -> Iterator[Upstream]:
    cert = test_ca.issue_cert("localhost", "127.0.0.1", "::1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    up = Upstream(ctx).start()
    yield up
    up.stop()


@pytest.fixture(scope="session")
def shared_files(tmp_path_factory: pytest.TempPathFactory, keys: Keys,
                 test_ca: trustme.CA) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("shared")
    jwks = d / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    ca = d / "upstream-ca.pem"
    test_ca.cert_pem.write_to_path(str(ca))
    return {"jwks": jwks, "upstream_ca": ca}


def base_config(shared_files: dict[str, Path], upstream: Upstream,
                **extra: Any) -> dict[str, Any]:
    """A config with one trusted issuer and standing rules for the test upstreams."""
    cfg: dict[str, Any] = {
        "upstream": {"ca_file": str(shared_files["upstream_ca"])},
        "identity": {"issuers": [{"issuer": ISSUER, "audience": AUDIENCE,
                                  "jwks_file": str(shared_files["jwks"])}]},
        "workloads": {
            WORKLOAD: {
                "owner": "platform@acme.test",
                "standing": [
                    {"id": "plain-read", "host": "127.0.0.1", "port": upstream.http_port,
                     "scheme": "http", "methods": ["GET"],
                     "paths": ["/allowed/**", "/sse", "/slow"]},
                    {"id": "tls-read", "host": "localhost", "allow_private": True,
                     "port": upstream.https_port,
                     "methods": ["GET", "POST"], "paths": ["/allowed/**", "/sse", "/slow"]},
                ],
            },
        },
        "proxy": {"shutdown_grace_seconds": 10},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
            upstream: Upstream) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("gw"), base_config(shared_files, upstream)).start()
    yield gw
    gw.stop()


@pytest.fixture
def token(keys: Keys) -> str:
    return keys.token()


OTHER_WORKLOAD = "spiffe://acme.test/agent/other"


def ceiling_config(shared_files: dict[str, Path], upstream: Upstream,
                   **extra: Any) -> dict[str, Any]:
    """base_config plus a ceiling for WORKLOAD (HTTP, HTTPS, MCP, approval, secret rules)
    and a second workload with no ceiling at all."""
    cfg = base_config(shared_files, upstream, **extra)
    cfg["workloads"][WORKLOAD]["ceiling"] = [
        {"id": "up-http", "host": "127.0.0.1", "port": upstream.http_port, "scheme": "http",
         "methods": ["GET", "POST"], "paths": ["/allowed/**", "/slow", "/sse"]},
        {"id": "up-https", "host": "localhost", "allow_private": True, "port": upstream.https_port,
         "methods": ["GET", "POST"], "paths": ["/allowed/**", "/slow"]},
        {"id": "up-mcp", "host": "localhost", "allow_private": True,
         "port": upstream.https_port, "paths": ["/mcp"],
         "mcp": {"tools": ["search_docs", "read_file"],
                 "args": {"limit": {"maximum": 50}}}},
        {"id": "up-approve", "host": "localhost", "allow_private": True,
         "port": upstream.https_port,
         "methods": ["POST"], "paths": ["/approve/**"], "approval": "required"},
        {"id": "up-secret", "host": "localhost", "allow_private": True, "port": upstream.https_port,
         "methods": ["GET"], "paths": ["/secret/**"], "secret": "demo-key"},
    ]
    cfg.setdefault("secrets", {})["demo-key"] = {
        "provider": "env", "var": "TASKGATE_TEST_SECRET",
        "inject": {"header": "Authorization", "value": "Bearer {token}"}}
    cfg["workloads"][OTHER_WORKLOAD] = {"owner": "other@acme.test"}
    return cfg


@pytest.fixture(scope="module")
def ceiling_gateway(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
                    upstream: Upstream) -> Iterator[Gateway]:
    """A running gateway whose workload has a ceiling; tasks are created on it."""
    gw = Gateway(tmp_path_factory.mktemp("gw-ceiling"),
                 ceiling_config(shared_files, upstream)).start()
    yield gw
    gw.stop()
