"""Held calls across replicas: listed and answered on any, released where they wait.

A held call waits on the replica that holds the agent's connection; with shared state
(Redis) it is also written there (``P approval:<id>``, see proxy/store/_redis.py), so

- ``GET /v1/approvals`` (and the review page) on any replica lists every waiting call;
- an answer on any replica ends the hold in Redis with one script — exactly one answer
  wins, any later one is a :class:`~proxy.errors.Conflict` (409) — and is published;
  the replica holding the call releases it on the event;
- a timeout is decided in Redis the same way, so an approval and a timeout racing on
  two replicas end the call one way only; every other local end (task ended, client
  gone, shutdown) refuses the call at once and is then written, so a later answer is 409.

If a hold could not be written to Redis the call is still answered on its own replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any

import orjson

from proxy.approvals._held import Answer, Approvals, Held
from proxy.audit import rfc3339
from proxy.errors import Conflict, NotFound, Unavailable
from proxy.store import RedisState

__all__ = ["SharedApprovals"]

log = logging.getLogger(__name__)


class SharedApprovals(Approvals):
    """:class:`Approvals` whose held calls every replica sees and can answer."""

    def __init__(self, timeout: float, state: RedisState) -> None:
        super().__init__(timeout)
        self.state = state
        self._settled: set[str] = set()  # ended in Redis already: no write needed
        self._background: set[asyncio.Task[Any]] = set()
        state.listeners.append(self._event)

    # -- the data plane -------------------------------------------------------------
    def start(self, held: Held) -> None:
        super().start(held)
        if held.answer is None:
            self._spawn(self.state.hold(held.id, held.created, held.view(), self.timeout))

    def _run_out(self, held: Held) -> None:
        """The deadline passed: the timeout is one more answer, decided in Redis."""
        self._spawn(self._time_out(held))

    async def _time_out(self, held: Held) -> None:
        timeout = self._ran_out(held)
        try:
            won = await self.state.answer(held.id, _answer_doc(timeout))
        except Unavailable:
            won = 0
        if won == -1:  # answered elsewhere just before: that answer stands
            stored = await self._stored_answer(held.id)
            if stored is not None:
                self._settled.add(held.id)
                self._end(held, stored)
                return
        self._settled.add(held.id)
        self._end(held, timeout)

    def _end(self, held: Held, answer: Answer) -> None:
        first = held.answer is None
        super()._end(held, answer)
        if first and held.id not in self._settled:
            self._settled.add(held.id)
            self._spawn(self._write_end(held.id, answer))

    async def _write_end(self, hid: str, answer: Answer) -> None:
        try:
            await self.state.answer(hid, _answer_doc(answer))
        finally:
            self._settled.discard(hid)

    def _event(self, event: dict[str, Any]) -> None:
        if event.get("kind") != "answered":
            return
        held = self._waiting.get(str(event.get("id")))
        doc = event.get("answer")
        if held is not None and isinstance(doc, dict):
            self._settled.add(held.id)
            self._end(held, _from_doc(doc))
            self._settled.discard(held.id)

    # -- approvers ------------------------------------------------------------------
    async def listed(self) -> list[dict[str, Any]]:
        views = {v["id"]: v for v in (_view(h) for h in await self.state.waiting())}
        for held in self.waiting():
            views.setdefault(held.id, held.view())
        return sorted(views.values(), key=lambda v: v["held_at"])

    async def shown(self, hid: str) -> dict[str, Any]:
        try:
            return self.get(hid).view()
        except NotFound:
            pass
        found = await self.state.approval(hid)
        if not found:
            raise NotFound(f"no approval {hid!r}")
        return _view(found)

    async def answer(self, hid: str, verb: str, by: str, comment: str | None
                     ) -> dict[str, Any]:
        if verb == "approve":
            answer = Answer("approved", f"approved by {by}", by, comment)
        else:
            answer = Answer("denied", f"denied by {by}" + (f": {comment}" if comment else ""),
                            by, comment)
        won = await self.state.answer(hid, _answer_doc(answer))
        if won == 0:  # not in Redis (its hold could not be written): this replica's alone
            return await super().answer(hid, verb, by, comment)
        if won == -1:
            stored = await self._stored_answer(hid)
            how = "ended"
            if stored is not None:
                how = (f"{stored.outcome} by {stored.by}" if stored.by
                       else stored.outcome.replace("_", " "))
            raise Conflict(f"approval {hid!r} has already ended ({how})")
        held = self._waiting.get(hid)
        if held is not None:  # held here: release it now, not on the echo of the event
            self._settled.add(hid)
            self._end(held, answer)
            self._settled.discard(hid)
            return held.view()
        return _view(await self.state.approval(hid))

    async def _stored_answer(self, hid: str) -> Answer | None:
        found = await self.state.approval(hid)
        doc = found.get(b"answer") if found else None
        return _from_doc(orjson.loads(doc)) if doc else None

    # -- background writes ------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[Any]) -> None:
        self._background.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.warning("approvals: a shared-state write failed: %s", t.exception())


def _answer_doc(answer: Answer) -> dict[str, Any]:
    return asdict(answer)


def _from_doc(doc: dict[str, Any]) -> Answer:
    return Answer(str(doc.get("outcome", "cancelled")), str(doc.get("reason", "")),
                  doc.get("by"), doc.get("comment"), float(doc.get("at") or time.time()))


def _view(found: dict[bytes, bytes]) -> dict[str, Any]:
    """A stored hold as ``GET /v1/approvals`` shows it (age and state as of now)."""
    view: dict[str, Any] = orjson.loads(found[b"view"])
    held_at = view.get("held_at")
    created = float(found.get(b"created", b"0") or 0)
    if created:
        view["age_seconds"] = round(max(0.0, time.time() - created), 3)
    doc = found.get(b"answer")
    if found.get(b"state") != b"waiting" and doc:
        a = _from_doc(orjson.loads(doc))
        view["state"] = a.outcome
        view["answer"] = {"id": view.get("id"), "outcome": a.outcome, "by": a.by,
                          "at": rfc3339(a.at), "comment": a.comment}
    view["held_at"] = held_at
    return view
