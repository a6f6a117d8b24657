"""Task tokens bound to client addresses, in-process: request validation naming the
field, require_binding, the 407 from another address, the lookup transparent mode uses,
and the binding surviving a restart (the store's terms column)."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import Config, WorkloadConfig
from proxy.errors import InvalidCredential, InvalidField
from proxy.identity import Caller, Identity, TaskKeys
from proxy.policy import parse_rules
from proxy.store import TaskStore
from proxy.tasks import TaskRegistry, parse_task_request
from tests.support import FakeClock
from tests.unit.tasks.test_grants import CEILING, WL, caller_of, request

STRICT = "spiffe://acme.test/agent/strict"
ELSEWHERE = "spiffe://acme.test/agent/elsewhere"  # claims 10.88.0.0/24 in transparent mode


async def _registry(home: Path, clock: FakeClock | None = None) -> TaskRegistry:
    config = Config(home=str(home), workloads={
        WL: WorkloadConfig(ceiling=parse_rules(CEILING)),
        STRICT: WorkloadConfig(ceiling=parse_rules(CEILING), require_binding=True),
        ELSEWHERE: WorkloadConfig(sources=(ipaddress.ip_network("10.88.0.0/24"),
                                           ipaddress.ip_network("fd88::/64")))})
    keys = TaskKeys.load_or_create(str(home / "task-keys.json"))
    reg = TaskRegistry(config, Identity([]), TaskStore(str(home / "tasks.db")), keys,
                       clock=clock or time.time)
    await reg.load()
    return reg


@pytest.mark.parametrize(("bind", "field", "why"), [
    ("10.0.0.1/32", "bind", "bind must be an object"),
    ({"cidrs": ["10.0.0.1/32"]}, "bind.cidrs", "unknown field 'cidrs'"),
    ({}, "bind.client_cidrs", "client_cidrs must be a list of 1-16"),
    ({"client_cidrs": []}, "bind.client_cidrs", "client_cidrs must be a list of 1-16"),
    ({"client_cidrs": "10.0.0.1/32"}, "bind.client_cidrs", "must be a list"),
    ({"client_cidrs": ["10.0.0.1/32"] * 17}, "bind.client_cidrs", "1-16"),
    ({"client_cidrs": ["10.0.0.1"]}, "bind.client_cidrs[0]", "with its prefix length"),
    ({"client_cidrs": [5]}, "bind.client_cidrs[0]", "with its prefix length"),
    ({"client_cidrs": ["10.0.0.1/32", "10.0.0.0/33"]}, "bind.client_cidrs[1]",
     "is not a network"),
    ({"client_cidrs": ["10.0.0.1/24"]}, "bind.client_cidrs[0]", "has host bits set"),
    ({"client_cidrs": ["not-an-ip/8"]}, "bind.client_cidrs[0]", "is not a network"),
])
def test_bind_errors_name_the_field(bind: Any, field: str, why: str) -> None:
    with pytest.raises(InvalidField) as e:
        parse_task_request(request(bind=bind))
    assert (e.value.status, e.value.field) == (422, field)
    assert why in e.value.reason


async def test_bound_task_refuses_other_addresses(tmp_path: Path) -> None:
    reg = await _registry(tmp_path)
    task, _ = await reg.create(parse_task_request(request(
        bind={"client_cidrs": ["10.77.0.5/32", "fd77::/64"]})))
    caller = caller_of(task)
    for ok in ("10.77.0.5", "::ffff:10.77.0.5", "fd77::1"):
        reg.check_client(caller, ok)
    for bad in ("10.77.0.6", "127.0.0.1", "fd78::1", None, "garbage"):
        with pytest.raises(InvalidCredential, match="the task token is bound elsewhere"):
            reg.check_client(caller, bad)
    unbound, _ = await reg.create(parse_task_request(request()))
    reg.check_client(caller_of(unbound), "203.0.113.9")  # unbound: from anywhere
    plain = Caller(workload=WL, issuer="i", expires_at=time.time() + 60)
    reg.check_client(plain, "203.0.113.9")  # a workload token is never bound
    await reg.close()


async def test_require_binding(tmp_path: Path) -> None:
    reg = await _registry(tmp_path)
    with pytest.raises(InvalidField) as e:
        await reg.create(parse_task_request(request(workload=STRICT)))
    assert (e.value.status, e.value.field) == (422, "bind")
    assert "requires its tasks to be bound" in e.value.reason
    task, _ = await reg.create(parse_task_request(request(
        workload=STRICT, bind={"client_cidrs": ["10.77.0.0/24"]})))
    assert task.view()["bind"] == {"client_cidrs": ["10.77.0.0/24"]}
    await reg.close()


async def test_bound_to_lookup_and_restart(tmp_path: Path) -> None:
    reg = await _registry(tmp_path)
    here, _ = await reg.create(parse_task_request(request(
        bind={"client_cidrs": ["10.77.0.5/32"]}, mode="enforce")))
    wide, _ = await reg.create(parse_task_request(request(
        bind={"client_cidrs": ["10.77.0.0/24"]})))
    gone, _ = await reg.create(parse_task_request(request(
        bind={"client_cidrs": ["10.77.0.5/32"]})))
    other, _ = await reg.create(parse_task_request(request(
        workload=STRICT, bind={"client_cidrs": ["10.77.0.5/32"]})))
    await reg.create(parse_task_request(request()))  # unbound: never in the lookup
    await reg.revoke(gone.id)
    assert {t.id for t in reg.bound_to("10.77.0.5", WL)} == {here.id, wide.id}
    assert {t.id for t in reg.bound_to("10.77.0.9", WL)} == {wide.id}
    assert [t.id for t in reg.bound_to("10.77.0.5", STRICT)] == [other.id]
    assert reg.bound_to("10.78.0.1", WL) == []
    await reg.close()
    again = await _registry(tmp_path)  # the binding is stored with the task
    assert {t.id for t in again.bound_to("10.77.0.5", WL)} == {here.id, wide.id}
    assert again.tasks[here.id].bind == here.bind
    await again.close()


async def test_bound_to_leaves_out_expired_tasks(tmp_path: Path) -> None:
    clock = FakeClock()
    reg = await _registry(tmp_path, clock)
    task, _ = await reg.create(parse_task_request(request(
        bind={"client_cidrs": ["10.77.0.5/32"]})))
    assert [t.id for t in reg.bound_to("10.77.0.5", WL)] == [task.id]
    clock.advance(task.expires_at - clock.now)  # expired, not yet swept
    assert reg.bound_to("10.77.0.5", WL) == []
    clock.advance(reg.retention + 1)
    await reg.sweep()  # purged: out of the bound index too
    assert task.id not in reg.tasks and not any(reg._bound.values())
    await reg.close()


@pytest.mark.parametrize(("cidrs", "field"), [
    (["10.77.0.5/32", "10.88.0.7/32"], "bind.client_cidrs[1]"),
    (["10.0.0.0/8"], "bind.client_cidrs[0]"),       # wider than another's sources
    (["fd88::1/128"], "bind.client_cidrs[0]"),
])
async def test_bind_on_another_workloads_sources_is_refused(
        tmp_path: Path, cidrs: list[str], field: str) -> None:
    reg = await _registry(tmp_path)
    with pytest.raises(InvalidField) as e:
        await reg.create(parse_task_request(request(bind={"client_cidrs": cidrs})))
    assert (e.value.status, e.value.field) == (422, field)
    assert f"source address of workload {ELSEWHERE!r}" in e.value.reason
    # Addresses no other workload claims are fine.
    await reg.create(parse_task_request(request(
        bind={"client_cidrs": ["10.77.0.5/32", "127.0.0.2/32", "10.89.0.0/16"]})))
    await reg.close()


def test_stored_terms_read_back() -> None:
    task = parse_task_request(orjson.dumps({
        "workload": WL, "ttl_seconds": 5, "mode": "report",
        "rules": [{"id": "r", "host": "api.test", "methods": ["GET"]}],
        "bind": {"client_cidrs": ["::1/128"]}}))
    assert task.mode == "report" and [str(n) for n in task.bind] == ["::1/128"]
