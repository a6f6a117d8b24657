"""The Redis state store against a real (private) redis-server: atomic budgets, events,
freshness, a lost database, credential leases and approvals answered once."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from proxy.errors import Unavailable
from proxy.store import (
    EXPIRED,
    REVOKED,
    SPENT,
    UNKNOWN,
    CredentialRow,
    PinRow,
    RedisState,
    TaskRow,
    redis_password,
)
from tests.redis_support import RedisServer, redis_available, redis_server

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server not installed")


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer(persist=True)
    s.start()
    yield s
    s.close()


async def until(condition: Callable[[], bool], within: float) -> float:
    """Poll ``condition`` every 10 ms; the seconds it took (fails after ``timeout``)."""
    started = time.monotonic()
    for _ in range(int(within / 0.01)):
        if condition():
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {within} s")


def row(task_id: str, **kw: object) -> TaskRow:
    base: dict[str, object] = dict(id=task_id, workload="wl", owner="o", purpose=None,
                                   created_at=time.time(), expires_at=time.time() + 300,
                                   max_calls=10, rules=b'[{"id":"r"}]', kid="k1")
    base.update(kw)
    return TaskRow(**base)  # type: ignore[arg-type]


async def _state(server: RedisServer, replica: str, prefix: str) -> RedisState:
    state = RedisState(server.url, password=None, prefix=prefix, replica=replica)
    await state.start()
    assert state.healthy
    return state


@pytest.fixture
async def pair(server: RedisServer, request: pytest.FixtureRequest
               ) -> AsyncIterator[tuple[RedisState, RedisState]]:
    prefix = f"t-{request.node.name[:40]}:"
    a = await _state(server, "a", prefix)
    b = await _state(server, "b", prefix)
    yield a, b
    await a.close()
    await b.close()


async def test_tasks_round_trip_and_page(pair: tuple[RedisState, RedisState]) -> None:
    a, b = pair
    await a.insert_many([row(f"t{i}", purpose="p" if i % 2 else None) for i in range(12)])
    rows = [r async for page in b.pages(size=5) for r in page]
    assert [r.id for r in rows] == [f"t{i}" for i in range(12)]
    got = await b.get("t1")
    assert got is not None and got.purpose == "p" and got.max_calls == 10 and got.used == 0
    assert (await b.get("t0")).purpose is None  # type: ignore[union-attr]
    assert await b.get("nope") is None
    terms = b'{"bind":["10.0.0.0/8"],"mode":"report"}'
    await a.insert(row("termed", terms=terms))
    assert (await b.get("termed")).terms == terms  # type: ignore[union-attr]
    assert (await b.get("t1")).terms is None  # type: ignore[union-attr]
    await a.delete(["termed"])
    await a.delete(["t0", "t1"])
    assert await b.get("t0") is None and len(await b.load()) == 10


async def test_budget_is_exact_across_clients(pair: tuple[RedisState, RedisState]) -> None:
    a, b = pair
    await a.insert(row("budget", max_calls=10))
    now = time.time()
    results = await asyncio.gather(*((a if i % 2 else b).consume("budget", now)
                                     for i in range(50)))
    assert sorted(r for r in results if r > 0) == list(range(1, 11))
    assert results.count(SPENT) == 40
    await a.refund("budget")
    assert await b.consume("budget", now) == 10
    assert await b.consume("budget", now) == SPENT


async def test_refund_never_below_zero_nor_recreates(pair: tuple[RedisState, RedisState]
                                                     ) -> None:
    a, _ = pair
    await a.insert(row("r", max_calls=None))
    await a.refund("r")
    assert (await a.get("r")).used == 0  # type: ignore[union-attr]
    await a.delete(["r"])
    await a.refund("r")
    await a.mark_ended(["r"])
    assert await a.get("r") is None


async def test_consume_refuses_unknown_revoked_expired(pair: tuple[RedisState, RedisState]
                                                       ) -> None:
    a, b = pair
    now = time.time()
    assert await a.consume("ghost", now) == UNKNOWN
    await a.insert(row("old", expires_at=now - 1))
    assert await a.consume("old", now) == EXPIRED
    await a.insert(row("rev", max_calls=None))
    assert await a.consume("rev", now) == 1
    await b.revoke("rev", now)
    assert await a.consume("rev", now) == REVOKED
    with pytest.raises(LookupError):
        await a.revoke("ghost", now)


async def test_revocation_is_published_to_every_replica(pair: tuple[RedisState, RedisState]
                                                        ) -> None:
    a, b = pair
    seen: list[dict[str, Any]] = []
    b.listeners.append(seen.append)
    await a.insert(row("pub"))
    await a.revoke("pub", 42.0)
    await a.revoke("pub", 43.0)  # once only
    await until(lambda: any(e["kind"] == "revoked" for e in seen), 1.0)
    await asyncio.sleep(0.1)
    [event] = [e for e in seen if e["kind"] == "revoked"]
    assert (event["task"], event["at"]) == ("pub", 42)
    assert (await b.get("pub")).revoked_at == 42.0  # type: ignore[union-attr]
    # ... and numbered in the revocation log, for a replica that missed the event
    assert await b.revoked_since(event["seq"] - 1) == [("pub", event["seq"])]
    assert await b.revoked_since(event["seq"]) == []
    assert await b.revocation_seq() == event["seq"]
    await a.delete(["pub"])
    assert await b.revoked_since(0) == []


async def test_credentials_taken_over_once_and_revoked_once(
        server: RedisServer, pair: tuple[RedisState, RedisState]) -> None:
    a, b = pair
    cred = CredentialRow("c1", "gh", "github_installation_token", "t", "wl", time.time(),
                         None, "live", 0, None, b"sealed")
    await a.add_credential(cred)
    assert await b.load_credentials() == []  # a is alive: a revokes its own
    sync_redis.Redis.from_url(server.url).delete(a.key("replica", a.owner))  # a "died"
    taken = await b.load_credentials()
    assert [(c.id, c.handle) for c in taken] == [("c1", b"sealed")]
    assert await a.revoke_lease("c1", 30_000) in (0, 1)
    assert await b.revoke_lease("c1", 30_000) == 0  # one turn at a time
    await b.delete_credentials(["c1"])
    assert await a.revoke_lease("c1", 30_000) == -1  # revoked elsewhere: its tombstone
    # Lost from Redis (flushed) but held in memory: still revoked, once.
    assert await a.revoke_lease("never-stored", 30_000) == 1
    assert await b.revoke_lease("never-stored", 30_000) == 0


async def test_an_answer_wins_once(pair: tuple[RedisState, RedisState]) -> None:
    a, b = pair
    await a.hold("h1", time.time(), {"id": "h1", "held_at": "x"}, 30)
    assert [h[b"replica"] for h in await b.waiting()] == [a.owner.encode()]
    assert await b.answer("h1", {"outcome": "approved", "by": "carol"}) == 1
    assert await a.answer("h1", {"outcome": "timeout"}) == -1
    assert await a.answer("nope", {"outcome": "approved"}) == 0
    assert await b.waiting() == []


async def test_fresh_only_while_redis_answers_and_reset_when_emptied(server: RedisServer
                                                                     ) -> None:
    state = await _state(server, "solo", "t-fresh:")
    resets: list[bool] = []

    async def reset() -> None:
        resets.append(True)

    state.on_reset = reset
    try:
        await state.insert(row("keep"))
        server.stop()
        assert await until(lambda: not state.healthy, 5.0) <= state.bound + 0.3
        with pytest.raises(Unavailable):
            state.fresh()
        with pytest.raises(Unavailable):
            await state.get("keep")
        server.start()  # AOF: the data is back, no reset
        await until(lambda: state.healthy, 10.0)
        assert await state.get("keep") is not None and resets == []
        sync_redis.Redis.from_url(server.url).flushall()
        await until(lambda: bool(resets), 5.0)
        assert state.healthy and await state.get("keep") is None
    finally:
        await state.close()


async def test_password_from_file_or_env_and_a_wrong_one_is_never_healthy(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-" + os.urandom(6).hex()
    pw_file = tmp_path / "redis-password"
    pw_file.write_text(secret + "\n")
    assert redis_password(str(pw_file), {"TASKGATE_REDIS_PASSWORD": "other"}) == secret
    assert redis_password(None, {"TASKGATE_REDIS_PASSWORD": secret}) == secret
    assert redis_password(None, {}) is None
    with redis_server(password=secret) as guarded:
        good = RedisState(guarded.url, password=secret, prefix="pw:", replica="r")
        await good.start()
        assert good.healthy
        await good.close()
        bad = RedisState(guarded.url, password="wrong", prefix="pw:", replica="r")
        await bad.start()
        try:
            assert not bad.healthy
            with pytest.raises(Unavailable) as e:
                await bad.get("t")
            assert "wrong" not in str(e.value)
        finally:
            await bad.close()
    assert secret not in caplog.text and "wrong" not in caplog.text


async def test_tool_pins_are_kept_per_subject_and_server(
        pair: tuple[RedisState, RedisState]) -> None:
    """MCP tool pins saved by one replica load on another; deleting a subject's pins
    leaves every other subject's (even one whose name starts the same)."""
    a, b = pair
    pins, changes = b'{"search":"sha256:ab"}', b'[]'
    await a.save_pins(PinRow("task:t1", "https://mcp.test/mcp", pins, changes, 1.5))
    await a.save_pins(PinRow("task:t1", "https://other.test/mcp", pins, changes, 2.0))
    await a.save_pins(PinRow("task:t10", "https://mcp.test/mcp", pins, b'[{"tool":"x"}]', 3.0))
    got = {(r.subject, r.server): r for r in await b.load_pins()}
    assert set(got) == {("task:t1", "https://mcp.test/mcp"), ("task:t1", "https://other.test/mcp"),
                        ("task:t10", "https://mcp.test/mcp")}
    assert got[("task:t10", "https://mcp.test/mcp")].changes == b'[{"tool":"x"}]'
    assert got[("task:t1", "https://mcp.test/mcp")].updated_at == 1.5
    await b.delete_pins("task:t1")
    assert [(r.subject, r.server) for r in await a.load_pins()] == [
        ("task:t10", "https://mcp.test/mcp")]
