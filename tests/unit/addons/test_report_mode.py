"""Report mode in the addons, on mitmproxy's test flows: a refusal by the rules becomes a
``would_deny`` exchange that goes on (authorize, mcp, CONNECT) with no rule answering
for it, so no secret is added (inject); identity still refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from addons._base import exchange
from addons.authorize import Authorize
from addons.identify import Identify
from addons.inject import Inject
from proxy.config._model import parse_config
from proxy.gateway import Services
from tests.core import services
from tests.support import WORKLOAD, Keys
from tests.unit.addons.conftest import SECRET, SECRET_VAR, config_doc, connect, refusal, request
from tests.unit.addons.test_mcp import mcp_call, rpc, through


@pytest.fixture
async def report_svc(tmp_path: Path, shared_files: dict[str, Path],
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Services]:
    """The addon tests' gateway, its workload in report mode."""
    monkeypatch.setenv(SECRET_VAR, SECRET)
    cfg = parse_config(config_doc(shared_files["jwks"]))
    workloads = {**cfg.workloads,
                 WORKLOAD: dataclasses.replace(cfg.workloads[WORKLOAD], mode="report")}
    async with services(tmp_path, issuers=cfg.issuers, workloads=workloads,
                        secrets=cfg.secrets) as built:
        yield built


async def _judged(svc: Services, method: str, url: str, token: str) -> http.HTTPFlow:
    f = request(method, url, token=token)
    authorize = Authorize(svc)
    with taddons.context(Identify(svc), authorize):
        await Identify(svc).requestheaders(f)
        await authorize.requestheaders(f)
    return f


async def test_a_path_no_rule_allows_goes_on_as_would_deny(report_svc: Services,
                                                          agent_token: str) -> None:
    f = await _judged(report_svc, "GET", "http://API.example/private/x", agent_token)
    ex = exchange(f)
    assert f.response is None
    assert ex.decision == "would_deny" and "path" in (ex.reason or "")
    assert ex.allowed_by is None and ex.rule is None
    assert ex.call is not None and ex.call.host == "api.example"
    assert f.request.host == "api.example"  # forwarded in its canonical spelling


async def test_a_tunnel_no_rule_names_opens(report_svc: Services, agent_token: str) -> None:
    f = connect("elsewhere.example", token=agent_token)
    authorize = Authorize(report_svc)
    with taddons.context(Identify(report_svc), authorize):
        await Identify(report_svc).http_connect(f)
        await authorize.http_connect(f)
    assert f.response is None
    assert authorize.tunnel(f.client_conn) is not None


async def test_identity_still_refuses(report_svc: Services, keys: Keys) -> None:
    f = await _judged(report_svc, "GET", "http://api.example/private/x",
                      keys.token(key=keys.other))
    refusal(f, 407)


async def test_an_ungranted_tool_goes_on_as_would_deny(report_svc: Services,
                                                      agent_token: str) -> None:
    f = mcp_call(agent_token, rpc("tools/call", rid=3, name="delete_repo", arguments={"r": 1}))
    await through(report_svc, f)
    ex = exchange(f)
    assert f.response is None
    assert ex.decision == "would_deny" and "delete_repo" in (ex.reason or "")
    assert ex.tool is not None and ex.tool["name"] == "delete_repo"
    assert ex.tool["arguments_sha256"]
    assert ex.allowed_by is None and not ex.secret_deferred


async def test_no_secret_on_a_would_deny_call(report_svc: Services, agent_token: str) -> None:
    f = request("POST", "http://api.example/secret/x", token=agent_token,
                Authorization="Bearer agent-own")
    inject = Inject(report_svc)
    with taddons.context(Identify(report_svc), Authorize(report_svc), inject):
        await Identify(report_svc).requestheaders(f)
        await Authorize(report_svc).requestheaders(f)
        await inject.requestheaders(f)
        await inject.request(f)
    assert f.response is None and exchange(f).decision == "would_deny"
    assert f.request.headers["Authorization"] == "Bearer agent-own"
    assert SECRET not in str(f.request.headers) and exchange(f).secret is None
