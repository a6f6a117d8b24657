"""The Approve addon's hook on mitmproxy test flows: every way a hold can end.

The end-to-end tests (test_approve.py) drive the real gateway; these reach the
endings that need a task store (revocation while held) or a clock (credential
expiry) without waiting for one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from addons._base import exchange
from addons.approve import Approve
from proxy.approvals import Approvals
from proxy.config import Config
from proxy.errors import Refused
from proxy.gateway import Services
from proxy.identity import Caller
from proxy.mcp import McpDecision
from proxy.policy import parse_rule
from proxy.tasks._policy import StandingPolicy
from tests.core import services


class RevocablePolicy(StandingPolicy):
    """Standing rules, plus tasks that can be revoked behind the gateway's back."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.revoked: set[str] = set()

    def check(self, caller: Caller) -> None:
        if caller.task in self.revoked:
            raise Refused("the task was revoked")


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Services]:
    async with services(tmp_path, approval_timeout_seconds=30, leeway_seconds=0) as built:
        built.gateway.policy = RevocablePolicy(built.config)
        yield built


def approvals(gw: Services) -> Approvals:
    return gw.approvals


def held_flow(task: str | None = "task-1", expires_in: float = 600, body: bytes = b"{}",
              mcp: bool = False) -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.method = "POST"
    f.request.url = "https://api.example/repos/acme/pulls?sig=abc"
    f.request.content = body
    ex = exchange(f)
    ex.caller = Caller(workload="spiffe://acme.test/agent", issuer="https://issuer.test",
                       expires_at=time.time() + expires_in, task=task, owner="ops@acme.test")
    ex.decision, ex.rule = "allow", "open-pr"
    rule: dict[str, Any] = {"id": "open-pr", "host": "api.example", "approval": "required",
                            "paths": ["/repos/**"]}
    rule.update({"mcp": {"tools": ["pay"]}} if mcp else {"methods": ["POST"]})
    ex.allowed_by = parse_rule(rule)
    return f


async def hold(gw: Services, f: http.HTTPFlow) -> asyncio.Task[None]:
    task = asyncio.create_task(Approve(gw).request(f))
    async with asyncio.timeout(5):
        while True:
            if exchange(f).request_id in {h.request_id for h in approvals(gw).waiting()}:
                return task
            await asyncio.sleep(0.005)


def refusal(f: http.HTTPFlow) -> dict[str, Any]:
    assert f.response is not None and f.response.status_code == 403
    return orjson.loads(f.response.content or b"")


async def test_approved_call_goes_on(gw: Services) -> None:
    f = held_flow()
    task = await hold(gw, f)
    [h] = approvals(gw).waiting()
    assert h.task == "task-1" and h.purpose is None
    assert h.url == "https://api.example/repos/acme/pulls?sig=abc"  # query values shown
    approvals(gw).approve(h.id, "alice")
    await task
    ex = exchange(f)
    assert f.response is None and f.live
    assert ex.decision == "approved" and ex.approval is not None
    assert ex.approval["by"] == "alice"


async def test_task_ended_while_held_refuses(gw: Services) -> None:
    f, other = held_flow(), held_flow(task="task-2")
    task = await hold(gw, f)
    other_task = await hold(gw, other)
    await gw.tasks.notify_ended("task-1")
    await asyncio.wait_for(task, 1)
    assert refusal(f)["reason"] == "the task ended while the call was held for approval"
    assert exchange(f).decision == "rejected"
    assert exchange(f).approval["outcome"] == "task_ended"  # type: ignore[index]
    assert not other_task.done()
    approvals(gw).deny(approvals(gw).waiting()[0].id, "bob")
    await other_task


async def test_task_revoked_unnoticed_is_refused_after_approval(gw: Services) -> None:
    f = held_flow()
    task = await hold(gw, f)
    gw.gateway.policy.revoked.add("task-1")  # type: ignore[attr-defined]
    approvals(gw).approve(approvals(gw).waiting()[0].id, "alice")
    await task
    assert refusal(f)["reason"] == "approved by alice, but the task was revoked"
    assert exchange(f).decision == "rejected"


async def test_credential_expiring_while_held_refuses(gw: Services) -> None:
    f = held_flow(task=None, expires_in=0.3)  # a workload token
    task = await hold(gw, f)
    await asyncio.wait_for(task, 3)
    assert refusal(f)["reason"] == ("the caller's credential expired while the call was "
                                    "held for approval")


async def test_task_expiring_while_held_refuses_naming_the_task(gw: Services) -> None:
    f = held_flow(expires_in=0.3)  # a task token ends with its task, no leeway
    task = await hold(gw, f)
    await asyncio.wait_for(task, 3)
    assert refusal(f)["reason"] == "the task expired while the call was held for approval"
    assert exchange(f).approval["outcome"] == "expired"  # type: ignore[index]


async def test_client_gone_kills_the_flow(gw: Services) -> None:
    f = held_flow()
    task = await hold(gw, f)
    Approve(gw).client_disconnected(f.client_conn)
    await asyncio.wait_for(task, 1)
    assert f.response is None and f.error is not None and not f.live
    assert exchange(f).decision == "rejected"


async def test_mcp_call_without_a_tool_call_is_not_held(gw: Services) -> None:
    f = held_flow(mcp=True, body=b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}')
    exchange(f).mcp_decision = McpDecision(True, "tools/list", calls=())
    await asyncio.wait_for(Approve(gw).request(f), 1)
    assert f.response is None and exchange(f).decision == "allow"
    assert approvals(gw).waiting() == []


async def test_mcp_call_is_held_as_the_mcp_addon_read_it(gw: Services) -> None:
    # The approver sees the strictly parsed call, not a second reading of the body.
    f = held_flow(mcp=True, body=b"\x1f\x8b not json the approve addon could read")
    exchange(f).mcp_decision = McpDecision(True, "ok", calls=(("search", b'{"q":"x"}'),))
    task = await hold(gw, f)
    [held] = approvals(gw).waiting()
    assert held.calls == [{"name": "search", "arguments": {"q": "x"}}]
    approvals(gw).deny(held.id, "bob")
    await task


async def test_mcp_rule_without_an_inspected_body_is_refused(gw: Services) -> None:
    f = held_flow(mcp=True, body=b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}')
    await asyncio.wait_for(Approve(gw).request(f), 1)
    assert f.response is not None and f.response.status_code == 403
    assert approvals(gw).waiting() == []


async def test_hold_record_written_before_it_is_listed(gw: Services) -> None:
    f = held_flow()
    task = await hold(gw, f)
    lines = (await asyncio.to_thread(Path(gw.audit.path).read_bytes)).splitlines()
    assert [orjson.loads(x)["decision"] for x in lines] == ["held"]
    approvals(gw).deny(approvals(gw).waiting()[0].id, "bob")
    await task


async def test_audit_failure_refuses_instead_of_holding(tmp_path: Path) -> None:
    async with services(tmp_path) as gateway:
        await gateway.audit.close()  # every write now fails
        f = held_flow()
        await Approve(gateway).request(f)
        assert f.response is not None and f.response.status_code == 503
        assert approvals(gateway).waiting() == []
