"""proxy/tasks/_shared.py against a real (private) redis-server: two registries in one
process, as two replicas. A revocation missed while a replica's subscription was down is
read from the revocation log when it reconnects; a budget is exact across both."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis as sync_redis

from proxy.config import Config, WorkloadConfig
from proxy.errors import InvalidCredential, Unavailable
from proxy.identity import Caller, Identity, TaskKeys
from proxy.policy import Decision, parse_rules
from proxy.store import RedisState
from proxy.tasks import SharedTaskRegistry, parse_task_request
from tests.redis_support import RedisServer, redis_available

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")

WL = "spiffe://acme.test/agent"
RULE = {"id": "r", "host": "api.test", "methods": ["GET"]}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer()
    s.start()
    yield s
    s.close()


async def until(condition: Callable[[], bool], within: float) -> None:
    for _ in range(int(within / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {within} s")


async def _registry(server: RedisServer, home: Path, replica: str, prefix: str
                    ) -> SharedTaskRegistry:
    await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True)
    config = Config(home=str(home), workloads={WL: WorkloadConfig(
        owner="o@acme.test", ceiling=parse_rules([RULE]))})
    keys = TaskKeys.load_or_create(str(home / "task-keys.json"))
    reg = SharedTaskRegistry(config, Identity([]), RedisState(
        server.url, password=None, prefix=prefix, replica=replica), keys)
    await reg.load()
    await until(lambda: reg.store.healthy, 5)
    return reg


@pytest.fixture
async def pair(server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest
               ) -> AsyncIterator[tuple[SharedTaskRegistry, SharedTaskRegistry]]:
    prefix = f"reg-{request.node.name[:30]}:"
    a = await _registry(server, tmp_path / "a", "a", prefix)
    b = await _registry(server, tmp_path / "b", "b", prefix)
    yield a, b
    await a.close()
    await b.close()


def _caller(task_id: str) -> Caller:
    return Caller(workload=WL, issuer="urn:taskgate:tasks", expires_at=time.time() + 60,
                  task=task_id)


async def _create(reg: SharedTaskRegistry, **extra: object) -> str:
    req = parse_task_request(orjson.dumps({"workload": WL, "ttl_seconds": 60, "rules": [RULE],
                                           **extra}))
    task, _ = await reg.create(req)
    return task.id


async def test_one_key_set_for_both(pair: tuple[SharedTaskRegistry, SharedTaskRegistry]
                                    ) -> None:
    a, b = pair
    assert a.keys.current == b.keys.current  # the first replica's keys were offered to all


async def test_budget_exact_across_two_registries(
        pair: tuple[SharedTaskRegistry, SharedTaskRegistry]) -> None:
    a, b = pair
    tid = await _create(a, max_calls=5)
    await until(lambda: b.get(tid) is not None, 2)
    allow = Decision(True, "ok", None)
    results = await asyncio.gather(*((a if i % 2 else b).admit(_caller(tid), allow, f"r{i}")
                                     for i in range(20)))
    assert sum(d.allowed for d in results) == 5
    assert all(d.reason.startswith("task budget spent") for d in results if not d.allowed)


async def test_revocation_missed_while_disconnected_is_caught_up(
        server: RedisServer, pair: tuple[SharedTaskRegistry, SharedTaskRegistry]) -> None:
    a, b = pair
    tid = await _create(a)
    await until(lambda: b.get(tid) is not None, 2)
    b.check(_caller(tid))
    # Cut B's subscription, then revoke on A before B can subscribe again: B never
    # gets the event, and must learn it from the revocation log when it is back.
    admin = sync_redis.Redis.from_url(server.url)
    admin.client_kill_filter(_type="pubsub")
    await a.revoke(tid)
    await until(lambda: b.get(tid) is not None and b.get(tid).revoked_at is not None, 3)  # type: ignore[union-attr]
    with pytest.raises(InvalidCredential, match="task revoked"):
        b.check(_caller(tid))
    admin.close()


async def test_stale_copy_refuses_503(server: RedisServer,
                                      pair: tuple[SharedTaskRegistry, SharedTaskRegistry]
                                      ) -> None:
    a, _ = pair
    tid = await _create(a)
    a.store._last_ok -= 2 * a.store.bound  # as if no PONG came for two bounds
    with pytest.raises(Unavailable):
        a.check(_caller(tid))
    await until(lambda: a.store.healthy, 2)  # the next PONG
    a.check(_caller(tid))
