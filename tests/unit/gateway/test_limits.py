"""proxy/gateway/_limits.py in-process: per-client keys, connection slots, throttles,
407 summaries."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.audit import new_record
from proxy.gateway import ConnectionLimits, FailureThrottle, client_key
from proxy.gateway._limits import AuthFailures


@pytest.mark.parametrize(("address", "key"), [
    ("127.0.0.1", "127.0.0.1"),
    ("::ffff:10.0.0.7", "10.0.0.7"),                    # IPv4-mapped: the IPv4 address
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),      # IPv6: one host's usual /64
    ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    (None, "unknown"),
    ("", "unknown"),
    ("not-an-ip", "not-an-ip"),
])
def test_client_key(address: str | None, key: str) -> None:
    assert client_key(address) == key


def test_connection_limits_per_client_and_in_all() -> None:
    limits = ConnectionLimits(total=3, per_client=2)
    assert limits.admit("a") is None and limits.admit("a") is None
    assert "max_connections_per_client" in (limits.admit("a") or "")
    assert limits.admit("b") is None
    assert "proxy.max_connections" in (limits.admit("c") or "")
    limits.release("a")
    assert limits.admit("c") is None and limits.open == 3
    for client in ("a", "b", "c"):
        limits.release(client)
    assert limits.open == 0 and limits.admit("a") is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_throttle_is_per_client_and_forgets() -> None:
    clock = Clock()
    throttle = FailureThrottle(3, 60, max_clients=2, clock=clock)
    for _ in range(3):
        assert not throttle.blocked("a")
        throttle.failed("a")
    assert throttle.blocked("a") and not throttle.blocked("b")
    clock.now += 61
    assert not throttle.blocked("a")  # a minute later
    throttle.failed("b")
    throttle.failed("c")  # a third client: the quietest one is forgotten, memory stays bounded
    assert len(throttle._failures) == 2


def record(client: str, status: int = 407, decision: str = "deny") -> dict[str, Any]:
    return new_record(client=client, status=status, decision=decision, reason="no credential")


async def test_auth_failures_summarize_past_the_limit() -> None:
    written: list[dict[str, Any]] = []

    async def write(rec: dict[str, Any]) -> None:
        written.append(rec)

    floods = AuthFailures(write, limit=3, window=0.2)
    assert [floods.absorb(record("10.0.0.1")) for _ in range(5)] == [False] * 3 + [True] * 2
    assert not floods.absorb(record("10.0.0.2"))  # another client counts on its own
    assert not floods.absorb(record("10.0.0.1", status=403))  # only 407s
    await asyncio.sleep(0.3)  # the minute (here 0.2 s) ends: one summary
    (summary,) = written
    assert summary["client"] == "10.0.0.1" and summary["status"] == 407
    assert summary["reason"].startswith("2 more calls refused") and summary["request_id"]
    assert not floods.absorb(record("10.0.0.1"))  # a new window: written one by one again


async def test_auth_failures_flush_and_bounded_memory() -> None:
    written: list[dict[str, Any]] = []

    async def write(rec: dict[str, Any]) -> None:
        written.append(rec)

    floods = AuthFailures(write, limit=1, window=60, max_clients=2)
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        floods.absorb(record(client))
        floods.absorb(record(client))
    assert len(floods._windows) <= 3  # two clients and the shared "other"
    await floods.flush()  # the gateway stops: nothing counted is lost
    assert sorted(r["client"] for r in written) == ["10.0.0.1", "10.0.0.2", "other"]
    assert [r for r in written if r["client"] == "other"][0]["reason"].startswith("3 more")


@pytest.mark.parametrize(("decisions", "summary"), [
    (["challenge"] * 4, "challenge"),  # only probes without a credential: no denial
    (["challenge", "challenge", "deny", "challenge"], "deny"),
])
async def test_auth_failure_summary_is_a_denial_only_if_one_was(decisions: list[str],
                                                                summary: str) -> None:
    written: list[dict[str, Any]] = []

    async def write(rec: dict[str, Any]) -> None:
        written.append(rec)

    floods = AuthFailures(write, limit=1, window=60)
    floods.absorb(record("10.0.0.1", decision="deny"))  # written one by one
    for decision in decisions:
        assert floods.absorb(record("10.0.0.1", decision=decision))
    await floods.flush()
    (rec,) = written
    assert rec["decision"] == summary and rec["reason"].startswith("4 more")
