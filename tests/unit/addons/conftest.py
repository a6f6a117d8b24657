"""The addon unit tests' world: real :class:`Services` from the builder, mitmproxy test flows.

Each test drives an addon's hooks the way mitmproxy's own addon tests do
(``taddons.context`` for the addon manager and options, ``tflow`` for flows), against
the services ``taskgate run`` builds, on a config with one workload and a rule per
concern (plain read, MCP, approval, secret).
"""

from __future__ import annotations

import base64
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

with warnings.catch_warnings():
    # mitmproxy.master imports ldap3 (for proxyauth), which uses names pyasn1 deprecated;
    # imported once here, before the test modules that use taddons are collected.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy.test import taddons  # noqa: F401

from addons._base import exchange
from proxy.config._model import parse_config
from proxy.gateway import REQUEST_ID_HEADER, Services
from tests.core import services
from tests.support import AUDIENCE, ISSUER, WORKLOAD, Keys

SECRET_VAR = "TG_UNIT_ADDONS_KEY"
SECRET = "sk-unit-" + uuid.uuid4().hex
OTHER_WORKLOAD = "spiffe://acme.test/agent/unruled"

RULES: list[dict[str, Any]] = [
    {"id": "read", "host": "api.example", "methods": ["GET"], "paths": ["/allowed/**"]},
    {"id": "mcp", "host": "mcp.example", "paths": ["/mcp"], "mcp": {"tools": ["search"]}},
    {"id": "mcp-approve", "host": "mcp.example", "paths": ["/pay"],
     "mcp": {"tools": ["pay"]}, "approval": "required"},
    {"id": "approve", "host": "api.example", "methods": ["POST"], "paths": ["/approve/**"],
     "approval": "required"},
    {"id": "secret", "host": "api.example", "methods": ["GET"], "paths": ["/secret/**"],
     "secret": "key"},
    {"id": "secret-approve", "host": "api.example", "methods": ["POST"],
     "paths": ["/pay/**"], "secret": "key", "approval": "required"},
    {"id": "socket", "host": "rt.example", "methods": ["GET"], "paths": ["/ws"],
     "websocket": True},
    {"id": "socket-mcp", "host": "rt.example", "paths": ["/mcp"], "websocket": True,
     "mcp": {"tools": ["search"]}},
    {"id": "no-socket", "host": "rt.example", "methods": ["GET"], "paths": ["/plain"]},
]


def config_doc(jwks: Path, **top: Any) -> dict[str, Any]:
    return {
        "identity": {"issuers": [{"issuer": ISSUER, "audience": AUDIENCE,
                                  "jwks_file": str(jwks)}]},
        "workloads": {WORKLOAD: {"owner": "platform@acme.test", "standing": RULES},
                      OTHER_WORKLOAD: {"owner": "other@acme.test"}},
        "secrets": {"key": {"provider": "env", "var": SECRET_VAR,
                            "inject": {"header": "Authorization",
                                       "value": "Bearer {token}"}}},
        **top,
    }


@pytest.fixture
async def svc(tmp_path: Path, shared_files: dict[str, Path],
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Services]:
    """The services of a gateway with :data:`RULES`, built as ``taskgate run`` builds them."""
    monkeypatch.setenv(SECRET_VAR, SECRET)
    cfg = parse_config(config_doc(shared_files["jwks"]))
    async with services(tmp_path, issuers=cfg.issuers, workloads=cfg.workloads,
                        secrets=cfg.secrets, approval_timeout_seconds=30) as built:
        yield built


@pytest.fixture
def agent_token(keys: Keys) -> str:
    return keys.token()


def credential(token: str) -> str:
    """The Proxy-Authorization value an agent sends (the token as the proxy password)."""
    return "Basic " + base64.b64encode(f"agent:{token}".encode()).decode()


def request(method: str = "GET", url: str = "http://api.example/allowed/x",
            token: str | None = None, content: bytes | None = None,
            **headers: str) -> http.HTTPFlow:
    """A flow whose request is ``method url``, as mitmproxy hands it to requestheaders."""
    f = tflow.tflow()
    f.request.method = method
    f.request.url = url
    f.request.headers["Host"] = f.request.host_header or f.request.host
    if content is not None:
        f.request.content = content
    else:
        f.request.content = b""
        del f.request.headers["content-length"]
    if token is not None:
        f.request.headers["Proxy-Authorization"] = credential(token)
    for name, value in headers.items():
        f.request.headers[name.replace("_", "-")] = value
    return f


def connect(host: str, port: int = 443, token: str | None = None) -> http.HTTPFlow:
    """A CONNECT flow for ``host:port``."""
    req = tutils.treq(method=b"CONNECT", scheme=b"", host=host, port=port, path=b"",
                      authority=f"{host}:{port}".encode(), content=b"")
    req.headers.clear()
    if token is not None:
        req.headers["Proxy-Authorization"] = credential(token)
    return tflow.tflow(req=req)


def respond(f: http.HTTPFlow, status: int = 200, content: bytes = b"{}",
            **headers: str) -> http.Response:
    """Give ``f`` an upstream answer, ``content`` as it came on the wire (buffered: with
    its length)."""
    f.response = http.Response.make(status, b"", {
        "Content-Type": "application/json",
        **{name.replace("_", "-"): value for name, value in headers.items()}})
    f.response.raw_content = content
    f.response.headers["content-length"] = str(len(content))
    return f.response


def refusal(f: http.HTTPFlow, status: int, error: str | None = None) -> dict[str, Any]:
    """``f``'s JSON refusal, checked: its status, its request id (body, header and
    exchange agree), a reason; and the exchange marked refused."""
    assert f.response is not None, "the call was not refused"
    assert f.response.status_code == status, f.response.content
    assert f.response.headers["Content-Type"] == "application/json"
    doc = orjson.loads(f.response.content or b"")
    ex = exchange(f)
    assert doc["request_id"] == ex.request_id == f.response.headers[REQUEST_ID_HEADER]
    assert doc["reason"] and doc["reason"] == ex.reason
    assert ex.status == status and ex.decision in ("deny", "error", "rejected", "challenge")
    if error is not None:
        assert doc["error"]["code"] == error
    return doc
