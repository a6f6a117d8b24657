"""Calls held until a person says yes: the registry of waiting approvals.

A call allowed by a rule with ``approval: required`` is *held*: the data plane
registers it here and awaits its :class:`Answer`; nothing goes upstream until
then. Exactly one answer ends a held call, whichever comes first:

- an approver approves or denies it on the control plane (``approved``, ``denied``);
- ``approval_timeout_seconds`` pass (``timeout``), or the caller's credential
  (a task's: the task) runs out first (``expired``);
- its task ends — revoked or expired — (``task_ended``, a task-end hook of the task registry;
  the reason says which);
- the agent's connection goes away (``client_disconnected``);
- the gateway shuts down (``shutdown``).

Answering an ended call is a :class:`~proxy.errors.Conflict` (409 at the edge),
answering an unknown one :class:`~proxy.errors.NotFound` (404). An approval
covers exactly the one held request it was given for: nothing is remembered
for the next call but the fact that this one ended (for the 409).

What the approver sees is the request as it will be forwarded
(:class:`HeldRequest`): method, the full URL with its query values, the
headers the agent sent that go upstream, the body (shown up to
:data:`VIEW_BODY_BYTES`, with the size and SHA-256 of all of it) and a
:func:`request_digest` over all four. The gateway adds only the rule's secret
after the approval (it is never shown); the data plane re-computes the digest
right before forwarding and refuses the call if anything else changed, and the
audit record's ``approval`` carries the digest.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.audit import rfc3339
from proxy.errors import Conflict, NotFound
from proxy.policy import default_port

__all__ = ["Answer", "Approvals", "Held", "HeldRequest", "body_view",
           "request_digest", "target_url"]

log = logging.getLogger(__name__)

# Outcomes, and what the agent is told when its call is refused for each.
REASONS = {
    "timeout": "no approver answered within {timeout:g} seconds; the call was refused",
    "expired": "the caller's credential expired while the call was held for approval",
    "task_ended": "the task ended while the call was held for approval",
    "task_revoked": "the task was revoked while the call was held for approval",
    "task_expired": "the task expired while the call was held for approval",
    "client_disconnected": "the client disconnected while the call was held for approval",
    "shutdown": "the gateway shut down while the call was held for approval",
    "cancelled": "the held call was cancelled by the gateway",
}


VIEW_BODY_BYTES = 64 * 1024  # the most of a body an approver is shown (the digest is of all)
# Framing follows from the body (which the digest covers) and may be re-written when
# a call changes protocol (HTTP/2 in, HTTP/1.1 out): shown, but not part of the digest.
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
DIGEST_DOMAIN = b"taskgate held request v1\n"

Fields = tuple[tuple[bytes, bytes], ...]


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def request_digest(method: bytes, url: bytes, headers: Fields, body: bytes) -> str:
    """SHA-256 (hex) over a length-prefixed encoding of the request as forwarded:
    ``DIGEST_DOMAIN``, method, URL (``scheme://host[:port]`` and the raw target, query
    included), the header count, each header's name and value in order (framing
    headers left out), and the body."""
    fields = [(n, v) for n, v in headers if n.lower() not in FRAMING_HEADERS]
    h = hashlib.sha256(DIGEST_DOMAIN)
    h.update(_lp(method))
    h.update(_lp(url))
    h.update(len(fields).to_bytes(8, "big"))
    for name, value in fields:
        h.update(_lp(name))
        h.update(_lp(value))
    h.update(_lp(body))
    return h.hexdigest()


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def body_view(body: bytes, limit: int = VIEW_BODY_BYTES) -> dict[str, Any]:
    """A body as an approver is shown it: UTF-8 text, or base64 when it is not text
    (not UTF-8, or with a NUL);
    at most ``limit`` bytes of it, with the size and SHA-256 of the whole body."""
    part = body[:limit]
    encoding = "utf-8"
    try:
        if b"\0" in part:
            raise UnicodeDecodeError("utf-8", part, 0, 0, "NUL: binary")
        shown = part.decode("utf-8")
    except UnicodeDecodeError as e:
        if (len(part) < len(body) and e.reason == "unexpected end of data"
                and _utf8(part[:e.start])):
            part = part[:e.start]  # the bound cut through a character: still text
            shown = part.decode("utf-8")
        else:
            encoding, shown = "base64", base64.b64encode(part).decode("ascii")
    return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
            "encoding": encoding, "shown": shown, "shown_bytes": len(part),
            "truncated": len(part) < len(body)}


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class HeldRequest:
    """A held call exactly as it will be forwarded, but for the gateway's secret:
    ``headers`` are the agent's, less those the gateway drops or replaces (the proxy
    credential; on a rule with a secret, the agent's own credentials and
    ``Accept-Encoding``), ``url`` likewise less the query parameters it replaces."""

    method: bytes
    url: bytes
    headers: Fields
    body: bytes
    secret: str | None = None  # the secret the gateway adds after the approval
    digest: str = ""

    @classmethod
    def of(cls, method: bytes, url: bytes, headers: Fields, body: bytes,
           secret: str | None = None) -> HeldRequest:
        return cls(method, url, headers, body, secret,
                   request_digest(method, url, headers, body))

    def view(self) -> dict[str, Any]:
        return {"method": _text(self.method), "url": _text(self.url),
                "headers": [[_text(n), _text(v)] for n, v in self.headers],
                "body": body_view(self.body), "secret": self.secret, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class Answer:
    """How a held call ended: who said what (for ``approved``/``denied``), and when."""

    outcome: str
    reason: str
    by: str | None = None
    comment: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def approved(self) -> bool:
        return self.outcome == "approved"


@dataclass(slots=True, eq=False)
class Held:
    """One waiting call: what the approver is shown, and the future its hook awaits."""

    id: str
    request_id: str
    workload: str | None
    task: str | None
    owner: str | None
    purpose: str | None
    method: str | None
    url: str
    tool: Any = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    client_id: str | None = None
    expires_at: float | None = None
    request: HeldRequest | None = None
    log_url: str = ""  # the URL with query values redacted, for the gateway's own log
    created: float = field(default_factory=time.time)
    deadline: float | None = None
    runs_out: str = "timeout"  # what ends it at the deadline: the timeout, or "expired"
    answer: Answer | None = None
    future: asyncio.Future[Answer] | None = field(default=None, repr=False)
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def waited_ms(self) -> float:
        end = self.answer.at if self.answer else time.time()
        return round(max(0.0, end - self.created) * 1000, 3)

    def view(self) -> dict[str, Any]:
        """What ``GET /v1/approvals`` shows for this call."""
        out: dict[str, Any] = {
            "id": self.id, "request_id": self.request_id, "task": self.task,
            "workload": self.workload, "owner": self.owner, "purpose": self.purpose,
            "method": self.method, "url": self.url, "tool": self.tool, "calls": self.calls,
            "held_at": rfc3339(self.created),
            "age_seconds": round(max(0.0, time.time() - self.created), 3),
            "expires_at": rfc3339(self.deadline) if self.deadline else None,
            "state": "waiting" if self.answer is None else self.answer.outcome,
            "request": self.request.view() if self.request is not None else None,
        }
        if self.answer is not None:
            out["answer"] = self.audit_value()
        return out

    def audit_value(self) -> dict[str, Any]:
        """The record's ``approval`` field: waiting (the hold record) or how it ended."""
        out: dict[str, Any]
        if self.answer is None:
            out = {"id": self.id, "outcome": "waiting",
                   "expires_at": rfc3339(self.deadline) if self.deadline else None}
        else:
            a = self.answer
            out = {"id": self.id, "outcome": a.outcome, "by": a.by, "at": rfc3339(a.at),
                   "comment": a.comment, "waited_ms": self.waited_ms()}
        if self.request is not None:  # what was shown, so the record proves what was approved
            out.update(digest=self.request.digest, body_bytes=len(self.request.body),
                       body_sha256=hashlib.sha256(self.request.body).hexdigest())
        return out


class Approvals:
    """The held calls of one gateway process, each ended exactly once."""

    def __init__(self, timeout: float, *, remember: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self._clock = clock  # wall-clock time: deadlines (tests pass their own)
        self._waiting: dict[str, Held] = {}
        self._ended: OrderedDict[str, Held] = OrderedDict()
        self._remember = remember
        self._closed = False

    # -- the data plane ---------------------------------------------------------
    def new(self, *, request_id: str, workload: str | None, task: str | None,
            owner: str | None, purpose: str | None, method: str | None, url: str,
            tool: Any = None, calls: list[dict[str, Any]] | None = None,
            client_id: str | None = None, expires_at: float | None = None,
            request: HeldRequest | None = None, log_url: str = "") -> Held:
        """A held call with a fresh id, not yet visible (its hold record comes first)."""
        hid = secrets.token_hex(8)
        while hid in self._waiting or hid in self._ended:  # pragma: no cover - 2**-64
            hid = secrets.token_hex(8)
        held = Held(id=hid, request_id=request_id, workload=workload, task=task, owner=owner,
                    purpose=purpose, method=method, url=url, tool=tool, calls=calls or [],
                    client_id=client_id, expires_at=expires_at, request=request,
                    log_url=log_url or url, created=self._clock())
        held.deadline = held.created + self.timeout
        if expires_at is not None and expires_at < held.deadline:
            held.deadline, held.runs_out = max(held.created, expires_at), "expired"
        return held

    def start(self, held: Held) -> None:
        """List ``held`` for approvers and start its clock (timeout or credential expiry)."""
        loop = asyncio.get_running_loop()
        held.future = loop.create_future()
        if self._closed:
            self._end(held, Answer("shutdown", REASONS["shutdown"]))
            return
        assert held.deadline is not None
        self._waiting[held.id] = held
        log.info("request %s held for approval %s: %s %s", held.request_id, held.id,
                 held.method, held.log_url)
        held.timer = loop.call_later(max(0.0, held.deadline - self._clock()), self._run_out,
                                     held)

    async def wait(self, held: Held) -> Answer:
        """The answer for ``held``; if the waiter itself is cancelled, the hold ends too."""
        assert held.future is not None, "start() the held call first"
        try:
            return await asyncio.shield(held.future)
        finally:
            if held.answer is None:
                self._end(held, Answer("cancelled", REASONS["cancelled"]))

    # -- approvers ----------------------------------------------------------------
    def approve(self, hid: str, by: str, comment: str | None = None) -> Held:
        return self._answer(hid, Answer("approved", f"approved by {by}", by, comment))

    def deny(self, hid: str, by: str, comment: str | None = None) -> Held:
        reason = f"denied by {by}" + (f": {comment}" if comment else "")
        return self._answer(hid, Answer("denied", reason, by, comment))

    async def listed(self) -> list[dict[str, Any]]:
        """``GET /v1/approvals``: every waiting call as shown (shared: of every replica)."""
        return [h.view() for h in self.waiting()]

    async def shown(self, hid: str) -> dict[str, Any]:
        """``GET /v1/approvals/{id}``: one call, waiting or recently ended."""
        return self.get(hid).view()

    async def answer(self, hid: str, verb: str, by: str, comment: str | None
                     ) -> dict[str, Any]:
        """Approve (``verb`` "approve") or deny; the call as shown after the answer."""
        held = (self.approve if verb == "approve" else self.deny)(hid, by, comment)
        return held.view()

    def waiting(self) -> list[Held]:
        """Calls waiting now, oldest first."""
        return sorted(self._waiting.values(), key=lambda h: h.created)

    def get(self, hid: str) -> Held:
        """A waiting call, or one that ended recently; :class:`NotFound` otherwise."""
        held = self._waiting.get(hid) or self._ended.get(hid)
        if held is None:
            raise NotFound(f"no approval {hid!r}")
        return held

    # -- everything else that ends a hold -------------------------------------------
    def client_gone(self, client_id: str) -> list[Held]:
        """The agent's connection closed: its held calls can never be answered to it."""
        gone = [h for h in self._waiting.values() if h.client_id == client_id]
        for held in gone:
            log.warning("approval %s for request %s cancelled: the client disconnected",
                        held.id, held.request_id)
            self._end(held, Answer("client_disconnected", REASONS["client_disconnected"]))
        return gone

    async def task_ended(self, task_id: str, how: str | None = None) -> None:
        """``Gateway.on_task_end`` hook: refuse every call of the task still waiting.

        ``how`` (``revoked``, ``expired``) makes the reason say how the task ended."""
        reason = REASONS.get(f"task_{how}", REASONS["task_ended"])
        for held in [h for h in self._waiting.values() if h.task == task_id]:
            log.info("approval %s refused: task %s ended", held.id, task_id)
            self._end(held, Answer("task_ended", reason))

    def close(self) -> int:
        """Gateway shutdown: refuse every held call, and any held from now on."""
        self._closed = True
        held = list(self._waiting.values())
        for h in held:
            self._end(h, Answer("shutdown", REASONS["shutdown"]))
        return len(held)

    # -- internals ----------------------------------------------------------------
    def _reason(self, outcome: str) -> str:
        return REASONS[outcome].format(timeout=self.timeout)

    def _run_out(self, held: Held) -> None:
        """The deadline passed: the answer is made now, so its ``at`` (and the record's
        ``waited_ms``) say when the hold ended, not when it began."""
        self._end(held, self._ran_out(held))

    def _ran_out(self, held: Held) -> Answer:
        reason = self._reason(held.runs_out)
        if held.runs_out == "expired" and held.task is not None:
            reason = REASONS["task_expired"]
        return Answer(held.runs_out, reason)

    def _answer(self, hid: str, answer: Answer) -> Held:
        held = self._waiting.get(hid)
        if held is None:
            ended = self._ended.get(hid)
            if ended is None or ended.answer is None:
                raise NotFound(f"no approval {hid!r}")
            a = ended.answer
            how = f"{a.outcome} by {a.by}" if a.by else a.outcome.replace("_", " ")
            raise Conflict(f"approval {hid!r} has already ended ({how})")
        self._end(held, answer)
        return held

    def _end(self, held: Held, answer: Answer) -> None:
        if held.answer is not None:
            return
        held.answer = answer
        log.info("approval %s for request %s ended: %s%s", held.id, held.request_id,
                 answer.outcome, f" by {answer.by}" if answer.by else "")
        if held.timer is not None:
            held.timer.cancel()
        self._waiting.pop(held.id, None)
        self._ended[held.id] = held
        while len(self._ended) > self._remember:
            self._ended.popitem(last=False)
        if held.future is not None and not held.future.done():
            held.future.set_result(answer)


def target_url(scheme: str | None, host: str | None, port: int | None, path: str | None
               ) -> str:
    """The URL an approver is shown (``path`` already has its query values redacted)."""
    scheme = scheme or "http"
    netloc = f"[{host}]" if host and ":" in host else (host or "")
    if port is not None and port != default_port(scheme):
        netloc += f":{port}"
    return f"{scheme}://{netloc}{path or ''}"


