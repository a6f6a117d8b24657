"""The task registry in-process: budgets, refunds, expiry hooks, purge, restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import Config, WorkloadConfig
from proxy.errors import InvalidCredential, InvalidField, Refused
from proxy.gateway import build
from proxy.identity import Caller, Identity, TaskKeys
from proxy.policy import Call, parse_rules
from proxy.store import TaskStore
from proxy.tasks import TaskPolicy, TaskRegistry, parse_task_request
from tests.support import FakeClock

WL = "spiffe://acme.test/agent/unit"
CEILING = [{"id": "api", "host": "api.test", "methods": ["GET", "POST"], "paths": ["/v1/**"]}]
STANDING = [{"id": "always", "host": "status.test", "methods": ["GET"]}]


def make_config(home: Path) -> Config:
    return Config(home=str(home), workloads={
        WL: WorkloadConfig(owner="team@acme.test", ceiling=parse_rules(CEILING),
                           standing=parse_rules(STANDING))})


async def open_registry(home: Path, hooks: tuple[Any, ...] = (),
                        retention: float = 3600,
                        clock: Callable[[], float] = time.time) -> TaskRegistry:
    keys = TaskKeys.load_or_create(str(home / "task-keys.json"))
    reg = TaskRegistry(make_config(home), Identity([]), TaskStore(str(home / "tasks.db")), keys,
                       retention=retention, clock=clock)
    reg.on_end.extend(hooks)
    await reg.load()
    return reg


def request(**kw: Any) -> bytes:
    body: dict[str, Any] = {"workload": WL, "ttl_seconds": 600,
                            "rules": [{"id": "r", "host": "api.test", "methods": ["GET"],
                                       "paths": ["/v1/x/**"]}]}
    body.update(kw)
    return orjson.dumps(body)


def caller_of(task: Any) -> Caller:
    return Caller(workload=task.workload, issuer="t", expires_at=task.expires_at, task=task.id,
                  owner=task.owner)


CALL = Call("GET", "https", "api.test", 443, "/v1/x/1")


async def test_budget_is_atomic_under_concurrency(tmp_path: Path) -> None:
    reg = await open_registry(tmp_path)
    task, _ = await reg.create(parse_task_request(request(max_calls=10)))
    caller = caller_of(task)
    decision = task.ruleset.decide(CALL)
    assert decision.allowed
    results = await asyncio.gather(*(reg.admit(caller, decision, f"req{i}") for i in range(50)))
    assert sum(d.allowed for d in results) == 10
    refused = [d for d in results if not d.allowed]
    assert all(d.reason == "task budget spent: all 10 calls used" for d in refused)
    assert all(d.rule_id == "r" for d in refused)
    with pytest.raises(Refused, match="budget spent"):
        reg.check(caller)
    await reg.close()
    again = await open_registry(tmp_path)
    assert again.tasks[task.id].used == 10
    await again.close()


async def test_refusals_later_in_the_chain_give_the_call_back(tmp_path: Path) -> None:
    reg = await open_registry(tmp_path)
    task, _ = await reg.create(parse_task_request(request(max_calls=2)))
    caller = caller_of(task)
    decision = task.ruleset.decide(CALL)
    await reg.admit(caller, decision, "a")
    await reg.admit(caller, decision, "b")
    assert task.used == 2
    reg.on_record({"request_id": "a", "decision": "deny"})      # e.g. an MCP tool refused
    reg.on_record({"request_id": "b", "decision": "allow"})
    reg.on_record({"request_id": "b", "decision": "deny"})      # only once per request
    assert task.used == 1
    await reg.close()  # waits for the refund to be written
    again = await open_registry(tmp_path)
    assert again.tasks[task.id].used == 1
    await again.close()


async def test_active_count_walks_the_tasks_at_most_once_a_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics is open: scraping it in a loop must not walk every task each time."""
    import proxy.tasks._registry
    from proxy.tasks._model import Task

    reg = await open_registry(tmp_path)
    tasks = [(await reg.create(parse_task_request(request())))[0] for _ in range(3)]
    walked = 0
    state = Task.state

    def counted(self: Task, now: float) -> str:
        nonlocal walked
        walked += 1
        return state(self, now)

    monkeypatch.setattr(Task, "state", counted)
    assert [reg.active_count() for _ in range(200)] == [3.0] * 200
    assert walked == 3
    await reg.revoke(tasks[0].id)  # a change the registry makes is seen at once
    assert reg.active_count() == 2.0 and walked == 6
    monkeypatch.setattr(proxy.tasks._registry, "ACTIVE_COUNT_SECONDS", 0.05)
    tasks[1].expires_at = time.time()  # time-based changes: within the interval
    assert reg.active_count() == 2.0
    await asyncio.sleep(0.06)
    assert reg.active_count() == 1.0
    await reg.close()


async def test_expiry_and_revocation_run_task_end_hooks_once(tmp_path: Path) -> None:
    ended: list[str] = []

    async def hook(task_id: str) -> None:
        ended.append(task_id)

    clock = FakeClock()
    reg = await open_registry(tmp_path, (hook,), clock=clock)
    short, _ = await reg.create(parse_task_request(request(ttl_seconds=1)))
    other, _ = await reg.create(parse_task_request(request()))
    await reg.sweep()
    assert ended == []
    await reg.sweep(clock() + 2)
    assert ended == [short.id]
    clock.advance(1.01)  # just past its expiry: no sleeping for it
    with pytest.raises(InvalidCredential, match="task expired"):
        reg.check(caller_of(short))
    await reg.revoke(other.id)
    await reg.revoke(other.id)
    await reg.sweep(clock() + 700)
    assert ended == [short.id, other.id]
    with pytest.raises(InvalidCredential, match="task revoked"):
        reg.check(caller_of(other))
    await reg.close()


async def test_tasks_ending_together_run_their_hooks_together(tmp_path: Path) -> None:
    """A slow task-end hook (a provider revoking a token) does not hold up the next
    task's: revocations of tasks that end in one sweep overlap."""
    running: list[int] = []
    overlap = 0

    async def slow_revoke(task_id: str) -> None:
        nonlocal overlap
        running.append(1)
        overlap = max(overlap, len(running))
        await asyncio.sleep(0.3)
        running.pop()

    reg = await open_registry(tmp_path, (slow_revoke,))
    for _ in range(5):
        await reg.create(parse_task_request(request(ttl_seconds=1)))
    started = time.monotonic()
    await reg.sweep(time.time() + 5)
    assert overlap == 5 and time.monotonic() - started < 1.0
    await reg.close()


async def test_tasks_ended_while_down_are_ended_after_start(tmp_path: Path) -> None:
    reg = await open_registry(tmp_path)
    task, _ = await reg.create(parse_task_request(request(ttl_seconds=1)))
    await reg.close()
    ended: list[str] = []

    async def hook(task_id: str) -> None:
        ended.append(task_id)

    reg = await open_registry(tmp_path, (hook,))
    await reg.sweep(time.time() + 5)
    assert ended == [task.id]
    await reg.close()
    reg = await open_registry(tmp_path, (hook,))
    await reg.sweep(time.time() + 5)
    assert ended == [task.id]  # persisted as ended: not again
    await reg.close()


async def test_purge_after_retention(tmp_path: Path) -> None:
    reg = await open_registry(tmp_path, retention=10)
    task, _ = await reg.create(parse_task_request(request(ttl_seconds=1)))
    kept, _ = await reg.create(parse_task_request(request()))
    assert len(reg.rulesets) == 1  # equal rules share one RuleSet
    now = time.time()
    await reg.sweep(now + 5)
    assert task.id in reg.tasks
    await reg.sweep(now + 12)
    assert task.id not in reg.tasks and kept.id in reg.tasks
    await reg.close()
    again = await open_registry(tmp_path)
    assert set(again.tasks) == {kept.id}
    await again.close()


async def test_ceiling_and_unknown_workload(tmp_path: Path) -> None:
    reg = await open_registry(tmp_path)
    with pytest.raises(InvalidField) as e:
        await reg.create(parse_task_request(request(rules=[
            {"id": "wide", "host": "api.test", "methods": ["GET"], "paths": ["/**"]}])))
    assert e.value.status == 422 and e.value.field == "rules[0].paths"
    assert e.value.extra == {"rule": "wide"}
    with pytest.raises(InvalidField) as e:
        await reg.create(parse_task_request(request(workload="spiffe://nobody")))
    assert e.value.field == "workload"
    assert reg.tasks == {}
    await reg.close()


async def test_policy_task_callers_get_only_task_rules(tmp_path: Path) -> None:
    async with build(make_config(tmp_path)) as services:
        gw, reg = services.gateway, services.tasks
        assert isinstance(gw.policy, TaskPolicy)
        task, _ = await reg.create(parse_task_request(request()))
        status = Call("GET", "https", "status.test", 443, "/")
        plain = Caller(workload=WL, issuer="i", expires_at=time.time() + 60)
        assert gw.authorize(plain, status).allowed            # standing rule
        assert not gw.authorize(plain, CALL).allowed          # task rules need the task
        assert gw.authorize(caller_of(task), CALL).allowed
        assert not gw.authorize(caller_of(task), status).allowed  # standing does not apply
        ghost = Caller(workload=WL, issuer="t", expires_at=time.time() + 60, task="nope")
        assert not gw.authorize(ghost, CALL).allowed
        with pytest.raises(InvalidCredential, match="task unknown"):
            gw.policy.check(ghost)


async def test_admit_refuses_a_task_revoked_meanwhile(tmp_path: Path) -> None:
    reg = await open_registry(tmp_path)
    task, _ = await reg.create(parse_task_request(request(max_calls=5)))
    decision = task.ruleset.decide(CALL)
    admit = asyncio.ensure_future(reg.admit(caller_of(task), decision, "x"))
    await asyncio.sleep(0)  # the count is being written
    await reg.revoke(task.id)
    with pytest.raises(InvalidCredential, match="task revoked"):
        await admit
    assert task.used == 0
    await reg.close()


@pytest.mark.parametrize("rule", [
    {"id": "plain", "host": "api.test", "port": 8443, "scheme": "https", "methods": ["GET"],
     "paths": ["/v1/**"], "approval": "required"},
    {"id": "tools", "host": "mcp.test", "paths": ["/mcp"], "approval": "required",
     "mcp": {"tools": ["search"], "args": {"limit": {"maximum": 5}},
             "methods": ["resources/*"]}},
    {"id": "gh", "host": "api.github.com", "methods": ["POST"], "paths": ["/repos/**"],
     "secret": "gh", "repositories": ["widgets"], "permissions": {"pull_requests": "write"}},
])
def test_a_stored_rule_comes_back_whole(rule: dict[str, Any]) -> None:
    """What the registry enforces is what the task asked for: the MCP grant (judged by
    the MCP inspector) and a secret's token scope survive the store's canonical form."""
    from proxy.policy import McpGrant
    from proxy.tasks._model import RuleSets, canonical_rules

    (asked,) = parse_rules([rule])
    _, ruleset = RuleSets().acquire(canonical_rules((asked,)))
    (loaded,) = ruleset.rules
    assert loaded.to_dict() == asked.to_dict()
    assert (loaded.mcp, loaded.repositories, loaded.permissions, loaded.approval) == (
        asked.mcp, asked.repositories, asked.permissions, asked.approval)
    assert loaded.mcp is None or isinstance(loaded.mcp, McpGrant)
