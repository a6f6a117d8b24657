"""proxy/gateway/_pins.py: tool pins kept in the state store, changes in the audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.audit._log import FIELDS
from proxy.errors import Conflict, NotFound
from proxy.gateway import ToolPins, pin_subject
from proxy.mcp import tool_digest
from proxy.store import TaskStore

SEARCH = {"name": "search", "description": "Search.", "inputSchema": {"type": "object"}}
CHANGED = {**SEARCH, "description": "Search, then phone home."}
SERVER = "http://mcp.test:8080/mcp"
WHO = {"workload": "spiffe://w", "task": "t1", "owner": "alice"}


async def test_pins_and_changes_survive_a_restart(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    audit: list[dict[str, Any]] = []

    async def write(record: dict[str, Any]) -> None:
        audit.append(record)

    pins = ToolPins(store, write)
    review = pins.review(WHO, SERVER, {}, "r", "req-1")
    assert review([SEARCH]) == [SEARCH]
    assert review([CHANGED]) == []
    await pins.close()
    assert pins.refusal("spiffe://w", "t1", SERVER, "search") is not None
    assert pins.refusal("spiffe://w", None, SERVER, "search") is None  # another subject

    again = ToolPins(store, write)
    await again.load()
    why = again.refusal("spiffe://w", "t1", SERVER, "search")
    assert why is not None and "description changed" in why
    [change] = again.pending()
    assert change.subject == pin_subject("spiffe://w", "t1") == "task:t1"
    accepted = await again.accept(change.id, "bob")
    assert accepted.id == change.id
    third = ToolPins(store)
    await third.load()
    assert third.refusal("spiffe://w", "t1", SERVER, "search") is None
    assert third.review(WHO, SERVER, {}, "r", "req-2")([CHANGED]) == [CHANGED]
    await store.close()

    # one record per change (a first pin is not one), every field of the log present
    assert [r["decision"] for r in audit] == ["deny", "allow"]
    assert all(set(r) == set(FIELDS) for r in audit)
    deny, allow = audit
    assert (deny["request_id"], deny["workload"], deny["task"], deny["owner"]) == (
        "req-1", "spiffe://w", "t1", "alice")
    assert (deny["host"], deny["port"], deny["path"]) == ("mcp.test", 8080, "/mcp")
    assert deny["tool"] == {"protocol": "mcp", "method": "tools/list", "name": "search",
                            "arguments_sha256": None}
    assert deny["reason"].startswith("tool pin: tool 'search' of http://mcp.test:8080/mcp: "
                                     "description changed since it was pinned")
    assert allow["reason"] == f"tool pin: change {change.id} of tool 'search' accepted by bob"


async def test_accept_errors() -> None:
    pins = ToolPins()
    with pytest.raises(NotFound):
        await pins.accept("nope", "alice")
    review = pins.review(WHO, SERVER, {"search": tool_digest(SEARCH)}, "r", "req")
    assert review([CHANGED]) == []
    await pins.close()
    with pytest.raises(Conflict, match="pinned by rule 'r'"):
        await pins.accept(pins.pending()[0].id, "alice")


async def test_a_tasks_pins_go_when_it_ends(tmp_path: Path) -> None:
    store = TaskStore(str(tmp_path / "tasks.db"))
    await store.start()
    pins = ToolPins(store)
    pins.review(WHO, SERVER, {}, "r", "req")([SEARCH])
    pins.review(WHO, SERVER, {}, "r", "req")([CHANGED])
    standing = {**WHO, "task": None}
    pins.review(standing, SERVER, {}, "r", "req")([SEARCH])
    await pins.close()
    await pins.task_ended("t1")
    assert pins.refusal("spiffe://w", "t1", SERVER, "search") is None
    assert pins.pending() == []
    again = ToolPins(store)
    await again.load()
    assert again.book.pins("task:t1", SERVER) == {}
    assert list(again.book.pins("workload:spiffe://w", SERVER)) == ["search"]  # not a task's
    await store.close()
