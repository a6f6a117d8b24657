"""Fixtures for the MCP end-to-end tests: SDK servers and a gateway with MCP rules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import base_config
from tests.mcp_server import McpUpstream
from tests.support import WORKLOAD, Gateway, Upstream

__all__ = ["TOOL_REFUSED", "mcp_gateway", "mcp_rules", "mcp_servers", "records", "via_proxy"]

TOOL_REFUSED = -32051
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
              "all_proxy", "NO_PROXY", "no_proxy")


def mcp_rules(up: McpUpstream) -> list[dict[str, Any]]:
    """Two rules on one endpoint: tools are judged against both."""
    where = {"host": up.host, "port": up.port, "paths": ["/mcp"], "allow_private": True}
    if up.scheme == "http":
        where["scheme"] = "http"
    return [
        {"id": f"mcp-basic-{up.port}", **where, "mcp": {"tools": ["add", "notify"]}},
        {"id": f"mcp-search-{up.port}", **where,
         # per-tool constraints (limit) beside constraints on every tool (query)
         "mcp": {"tools": {"search": {"args": {"limit": {"maximum": 50}}}},
                 "methods": ["resources/*"],
                 "args": {"query": {"maxLength": 40, "pattern": "[a-z ]+"}}}},
    ]


@pytest.fixture(scope="module")
def mcp_servers(test_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[dict[str, McpUpstream]]:
    d = tmp_path_factory.mktemp("mcp-tls")
    cert = test_ca.issue_cert("localhost")
    certfile, keyfile = d / "cert.pem", d / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    servers = {"sse": McpUpstream(json_response=False).start(),
               "json": McpUpstream(json_response=True).start(),
               "tls": McpUpstream(json_response=True, certfile=str(certfile),
                                  keyfile=str(keyfile)).start()}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def mcp_gateway(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
                upstream: Upstream, mcp_servers: dict[str, McpUpstream]) -> Iterator[Gateway]:
    cfg = base_config(shared_files, upstream, mcp={"max_body_bytes": 65536})
    standing = cfg["workloads"][WORKLOAD]["standing"]
    for up in mcp_servers.values():
        standing.extend(mcp_rules(up))
    # The echo upstream behind an MCP rule: shows what the gateway forwards, byte for byte.
    standing.append({"id": "echo-mcp", "host": "127.0.0.1", "port": upstream.http_port,
                     "scheme": "http", "paths": ["/mcp-echo"], "mcp": {"tools": ["add"]}})
    gw = Gateway(tmp_path_factory.mktemp("gw-mcp"), cfg).start()
    yield gw
    gw.stop()


@pytest.fixture
def via_proxy(monkeypatch: pytest.MonkeyPatch, mcp_gateway: Gateway, token: str) -> Gateway:
    """Point the SDK client at the gateway the way an agent is: only the environment."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    url = mcp_gateway.proxy_url_with(token)
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.setenv("HTTPS_PROXY", url)
    monkeypatch.setenv("SSL_CERT_FILE", str(mcp_gateway.ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return mcp_gateway


def records(gw: Gateway, **match: Any) -> list[dict[str, Any]]:
    return [r for r in gw.audit() if all(r.get(k) == v for k, v in match.items())]
