"""Tool pins kept: the pin book on the data path, its state in the store, every change
in the audit log.

The tools/list filter calls :meth:`ToolPins.review` synchronously (it runs on the
proxy's data path); what changed is then written behind it: the subject's pins to
the state store (behind :class:`PinStore`, the small interface any store backend
implements) and, for each change, an audit record. A task's pins go when it ends.
An admin accepts a change through :meth:`ToolPins.accept` (control API, CLI, review
page).

Audit records (every field of the log, ``tool.method`` ``tools/list``):

* a change seen: ``decision`` ``deny``, ``reason`` ``tool pin: tool 'x' of <server>:
  description changed since it was pinned; an admin must accept the change (<id>)``;
* the server listing the pinned definition again: ``allow``, ``tool pin: … restored``;
* an admin's accept: ``allow``, ``tool pin: change <id> accepted by <who>``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from proxy.audit import new_record, rfc3339
from proxy.errors import Conflict, NotFound
from proxy.mcp import Change, PinBook, PinEvent, Review, ToolDef
from proxy.store import PinRow

__all__ = ["PinStore", "ToolPins", "pin_subject"]

log = logging.getLogger(__name__)

Audit = Callable[[dict[str, Any]], Awaitable[None]]


class PinStore(Protocol):
    """Where pins live between runs (the task store, or another backend)."""

    async def save_pins(self, row: PinRow) -> None: ...

    async def delete_pins(self, subject: str) -> None: ...

    async def load_pins(self) -> list[PinRow]: ...


def pin_subject(workload: str, task: str | None) -> str:
    """Whose pins: a task's own, or a workload's on its standing rules."""
    return f"task:{task}" if task is not None else f"workload:{workload}"


class ToolPins:
    """Tool pins for the whole gateway."""

    def __init__(self, store: PinStore | None = None, audit: Audit | None = None) -> None:
        self.book = PinBook()
        self._store = store
        self._audit = audit
        self._writes: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        """Take over the pins and pending changes an earlier run stored."""
        if self._store is None:
            return
        for row in await self._store.load_pins():
            pins = {name: ToolDef.from_dict(d) for name, d in orjson.loads(row.pins).items()}
            changes = [_change(d) for d in orjson.loads(row.changes)]
            self.book.restore(row.subject, row.server, pins, changes)

    async def close(self) -> None:
        """Wait for what is being written."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    # -- the data path -------------------------------------------------------------
    def review(self, who: Mapping[str, Any], server: str, rule_pins: Mapping[str, str],
               rule: str | None, request_id: str) -> Review:
        """The filter hook for one tools/list answer of ``who`` (workload, task, owner)."""
        subject = pin_subject(who["workload"], who.get("task"))

        def review(tools: list[Any]) -> list[Any]:
            kept, events = self.book.review(subject, server, tools, rule_pins, rule)
            if events:
                self._behind(self._persist(subject, server, events, who, request_id))
            return kept

        return review

    def refusal(self, workload: str, task: str | None, server: str, tool: str) -> str | None:
        """Why a call to ``tool`` is refused (its definition changed), or ``None``."""
        return self.book.refusal(pin_subject(workload, task), server, tool)

    async def task_ended(self, task_id: str) -> None:
        """A task's pins go with it (a task-end hook of the registry)."""
        subject = pin_subject("", task_id)
        if self.book.forget(subject) and self._store is not None:
            try:
                await self._store.delete_pins(subject)
            except Exception as e:  # noqa: BLE001 - a row left behind is only space
                log.error("tool pins of %s could not be deleted: %s", subject,
                          type(e).__name__)

    # -- the admin -------------------------------------------------------------------
    def pending(self) -> list[Change]:
        return self.book.pending()

    async def accept(self, change_id: str, by: str) -> Change:
        """Accept a change: :class:`NotFound` if none is pending under ``change_id``,
        :class:`Conflict` if a rule pins the tool."""
        try:
            event = self.book.accept(change_id, by)
        except KeyError:
            raise NotFound(f"no tool change {change_id[:64]!r} is pending") from None
        except ValueError as e:
            raise Conflict(str(e)) from None
        assert event.change is not None
        subject = event.subject
        kind, _, name = subject.partition(":")
        who = {"workload": name if kind == "workload" else None,
               "task": name if kind == "task" else None, "owner": None}
        await self._persist(subject, event.server, [event], who, uuid.uuid4().hex)
        return event.change

    # -- behind the data path ----------------------------------------------------------
    def _behind(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _persist(self, subject: str, server: str, events: list[PinEvent],
                       who: Mapping[str, Any], request_id: str) -> None:
        if self._store is not None:
            pins = {n: d.to_dict() for n, d in self.book.pins(subject, server).items()}
            changes = [c.view() for c in self.book.changes(subject, server)]
            try:
                await self._store.save_pins(PinRow(subject, server, orjson.dumps(pins),
                                                   orjson.dumps(changes), time.time()))
            except Exception as e:  # noqa: BLE001 - the pins in memory still hold
                log.error("tool pins of %s on %s could not be stored: %s", subject, server,
                          type(e).__name__)
        if self._audit is None:
            return
        for event in events:
            record = _record(event, server, who, request_id)
            if record is None:
                continue
            try:
                await self._audit(record)
            except Exception as e:  # noqa: BLE001 - the change itself stands
                log.error("audit: the record of a tool change could not be written: %s",
                          type(e).__name__)


def _reason(event: PinEvent) -> str | None:
    change = event.change
    if change is None:
        return None  # a first pin is not a change
    if event.kind == "changed":
        return f"tool pin: {change.reason}"
    if event.kind == "restored":
        return (f"tool pin: tool {change.tool!r} of {change.server}: the server lists the "
                "pinned definition again; calls to it pass")
    return f"tool pin: change {change.id} of tool {change.tool!r} accepted by {event.by}"


def _record(event: PinEvent, server: str, who: Mapping[str, Any],
            request_id: str) -> dict[str, Any] | None:
    reason = _reason(event)
    if reason is None:
        return None
    url = urlsplit(server)
    return new_record(
        ts=rfc3339(time.time()), request_id=request_id, workload=who.get("workload"),
        task=who.get("task"), owner=who.get("owner"), method="POST", scheme=url.scheme,
        host=url.hostname, port=url.port, path=url.path or "/",
        tool={"protocol": "mcp", "method": "tools/list", "name": event.tool,
              "arguments_sha256": None},
        decision="deny" if event.kind == "changed" else "allow", reason=reason,
        rule=event.change.rule if event.change is not None else None,
        bytes_in=0, bytes_out=0, duration_ms=0.0)


def _change(d: Mapping[str, Any]) -> Change:
    return Change(d["id"], d["subject"], d["server"], d["tool"], ToolDef.from_dict(d["seen"]),
                  ToolDef.from_dict(d["pinned"]) if d.get("pinned") else None,
                  d.get("rule_pin"), d.get("rule"), d["at"])
