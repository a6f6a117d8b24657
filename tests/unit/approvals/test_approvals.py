"""The approvals registry (core, no proxy): each held call ends exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.approvals import Approvals, Held, target_url
from proxy.config import Config
from proxy.control._approvals import parse_answer
from proxy.errors import Conflict, InvalidField, NotFound, status_for
from tests.core import services


def held_call(approvals: Approvals, **kw: Any) -> Held:
    args: dict[str, Any] = {
        "request_id": "r1", "workload": "spiffe://acme.test/agent", "task": None,
        "owner": "ops@acme.test", "purpose": None, "method": "POST",
        "url": "https://api.example/pulls?token=REDACTED",
    }
    args.update(kw)
    held = approvals.new(**args)
    approvals.start(held)
    return held


async def test_approve_ends_the_hold_with_who_and_why() -> None:
    ap = Approvals(60)
    held = held_call(ap)
    assert [h.id for h in ap.waiting()] == [held.id]
    assert held.view()["state"] == "waiting"
    waiter = asyncio.create_task(ap.wait(held))
    await asyncio.sleep(0.01)
    ap.approve(held.id, "alice", "looks right")
    answer = await asyncio.wait_for(waiter, 1)
    assert answer.approved and answer.by == "alice" and answer.comment == "looks right"
    assert ap.waiting() == []
    value = held.audit_value()
    assert value["outcome"] == "approved" and value["by"] == "alice"
    assert value["comment"] == "looks right" and value["waited_ms"] >= 10
    assert value["at"].endswith("Z")


async def test_deny_reason_names_the_approver_and_comment() -> None:
    ap = Approvals(60)
    held = held_call(ap)
    ap.deny(held.id, "bob", "use a draft PR")
    answer = await ap.wait(held)
    assert not answer.approved and answer.outcome == "denied"
    assert answer.reason == "denied by bob: use a draft PR"


async def test_answering_twice_is_a_conflict() -> None:
    ap = Approvals(60)
    held = held_call(ap)
    ap.approve(held.id, "alice")
    with pytest.raises(Conflict, match="already ended .approved by alice"):
        ap.approve(held.id, "alice")
    with pytest.raises(Conflict):
        ap.deny(held.id, "bob")
    assert status_for(Conflict("x"))[0] == 409
    assert (await ap.wait(held)).by == "alice"  # the first answer stands


async def test_unknown_id_is_not_found() -> None:
    ap = Approvals(60)
    with pytest.raises(NotFound):
        ap.approve("nope", "alice")
    with pytest.raises(NotFound):
        ap.get("nope")
    assert status_for(NotFound("x"))[0] == 404


# The two tests below wait for real: a hold runs out on an asyncio timer
# (loop.call_later, the loop's monotonic time), which a fake wall clock cannot fire,
# and they assert the wait it measured. So the deadlines are 50 ms.
async def test_timeout_refuses_and_then_answers_conflict() -> None:
    ap = Approvals(0.05)
    held = held_call(ap)
    answer = await asyncio.wait_for(ap.wait(held), 2)
    assert answer.outcome == "timeout" and "0.05 seconds" in answer.reason
    # The answer is made when the clock runs out, not when the hold began.
    assert answer.at >= held.created + 0.05
    value = held.audit_value()
    assert 50 <= value["waited_ms"] < 1000, value
    with pytest.raises(Conflict, match="timeout"):
        ap.approve(held.id, "alice")


async def test_credential_expiring_first_ends_the_hold_early() -> None:
    ap = Approvals(60)
    held = held_call(ap, expires_at=time.time() + 0.05)
    answer = await asyncio.wait_for(ap.wait(held), 2)
    assert answer.outcome == "expired"
    assert 40 <= held.audit_value()["waited_ms"] < 1000


async def test_task_end_refuses_only_that_tasks_calls(tmp_path: Path) -> None:
    async with services(tmp_path) as built:
        ap = built.approvals
        a1, a2 = held_call(ap, task="task-a"), held_call(ap, task="task-a", request_id="r2")
        b = held_call(ap, task="task-b", request_id="r3")
        await built.tasks.notify_ended("task-a")  # what the registry runs when a task ends
        for h in (a1, a2):
            answer = await asyncio.wait_for(ap.wait(h), 1)
            assert answer.outcome == "task_ended"
            assert answer.reason == "the task ended while the call was held for approval"
        assert [h.id for h in ap.waiting()] == [b.id]
        with pytest.raises(Conflict, match="task ended"):
            ap.approve(a1.id, "alice")


async def test_client_gone_cancels_that_connections_calls() -> None:
    ap = Approvals(60)
    mine = held_call(ap, client_id="conn-1")
    other = held_call(ap, client_id="conn-2")
    assert ap.client_gone("conn-1") == [mine]
    assert (await ap.wait(mine)).outcome == "client_disconnected"
    assert ap.waiting() == [other]


async def test_close_refuses_everything_held_and_to_come() -> None:
    ap = Approvals(60)
    held = [held_call(ap, request_id=f"r{i}") for i in range(3)]
    assert ap.close() == 3
    for h in held:
        assert (await ap.wait(h)).outcome == "shutdown"
    late = held_call(ap)
    assert (await ap.wait(late)).outcome == "shutdown"
    assert ap.waiting() == []


async def test_a_cancelled_waiter_ends_its_hold() -> None:
    ap = Approvals(60)
    held = held_call(ap)
    waiter = asyncio.create_task(ap.wait(held))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert ap.waiting() == [] and held.answer is not None
    assert held.answer.outcome == "cancelled"
    with pytest.raises(Conflict):
        ap.approve(held.id, "alice")


async def test_ended_calls_are_remembered_within_a_bound() -> None:
    ap = Approvals(60, remember=2)
    first = held_call(ap)
    ap.deny(first.id, "bob")
    for _ in range(2):
        ap.deny(held_call(ap).id, "bob")
    with pytest.raises(NotFound):
        ap.approve(first.id, "alice")


async def test_each_hold_gets_its_own_id() -> None:
    ap = Approvals(60)
    ids = {held_call(ap).id for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize(("parts", "url"), [
    (("https", "api.example", 443, "/a?q=REDACTED"), "https://api.example/a?q=REDACTED"),
    (("http", "127.0.0.1", 8080, "/b"), "http://127.0.0.1:8080/b"),
    (("https", "::1", 8443, "/c"), "https://[::1]:8443/c"),
    (("http", "h.example", 80, None), "http://h.example"),
])
def test_target_url(parts: tuple[Any, ...], url: str) -> None:
    assert target_url(*parts) == url


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"", 400, None),
    (b"not json", 400, None),
    (b'["alice"]', 400, None),
    (b'"alice"', 400, None),
    (b"{}", 422, "by"),
    (b'{"by": ""}', 422, "by"),
    (b'{"by": "   "}', 422, "by"),
    (b'{"by": 42}', 422, "by"),
    (b'{"by": null}', 422, "by"),
    (b'{"by": "al\\nice"}', 422, "by"),
    (b'{"by": "' + b"a" * 201 + b'"}', 422, "by"),
    (b'{"by": "alice", "comment": 5}', 422, "comment"),
    (b'{"by": "alice", "comment": ["x"]}', 422, "comment"),
    (b'{"by": "alice", "comment": "' + b"c" * 2001 + b'"}', 422, "comment"),
    (b'{"by": "alice", "comment": "bell\\u0007"}', 422, "comment"),
    (b'{"by": "alice", "approved": true}', 422, "approved"),
])
def test_parse_answer_rejects(body: bytes, status: int, field: str | None) -> None:
    with pytest.raises(InvalidField) as info:
        parse_answer(body)
    assert (info.value.status, info.value.field) == (status, field)


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"by": "alice"}', ("alice", None)),
    (b'{"by": " alice ", "comment": null}', ("alice", None)),
    (b'{"by": "alice", "comment": ""}', ("alice", None)),
    (b'{"by": "alice", "comment": "line one\\nline two\\tok"}',
     ("alice", "line one\nline two\tok")),
])
def test_parse_answer_accepts(body: bytes, expected: tuple[str, str | None]) -> None:
    assert parse_answer(body) == expected


def test_config_default_timeout_is_300() -> None:
    assert Config().approval_timeout_seconds == 300
