"""Tool pinning, the rug-pull defence: a tool's definition may not change under a task.

The first ``tools/list`` answer a subject (a task, or a workload on its standing
rules) sees from a server pins each granted tool's definition: its name, the
SHA-256 of its description and of its input schema, and the digest of the three
(:attr:`ToolDef.digest`, ``sha256:`` + hex of the canonical JSON of
``{"name", "description", "inputSchema"}``). A later answer whose definition of
a pinned tool differs is a :class:`Change`: the tool is dropped from that answer
and every call to it is refused, until an admin accepts the change (the new
definition becomes the pin) — or until the server lists the pinned definition
again. A rule can pin explicitly (``mcp: {pin: {search_docs: "sha256:…"}}``): the
tool must then have exactly that digest, and only a change of the rule can move it.

:class:`PinBook` holds pins and changes in memory and does no I/O: every method
is synchronous (the tools/list filter runs on the proxy's data path) and returns
what changed, for the caller to persist and put in the audit log.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.mcp._jsonrpc import canonical

__all__ = ["Change", "PinBook", "PinEvent", "ToolDef", "tool_digest"]

def _sha256(value: Any) -> str:
    data = canonical(value)
    return hashlib.sha256(data if data is not None else repr(value).encode()).hexdigest()


def tool_digest(tool: Mapping[str, Any]) -> str:
    """``sha256:`` + hex of the canonical JSON of the tool's name, description and
    input schema — what ``mcp.pin`` names."""
    return "sha256:" + _sha256({"name": tool.get("name"), "description": tool.get("description"),
                                "inputSchema": tool.get("inputSchema")})


@dataclass(frozen=True, slots=True)
class ToolDef:
    """What is pinned of one tool."""

    name: str
    digest: str
    description_sha256: str
    schema_sha256: str

    @classmethod
    def of(cls, tool: Mapping[str, Any]) -> ToolDef:
        name = tool.get("name")
        assert isinstance(name, str)
        return cls(name, tool_digest(tool), _sha256(tool.get("description")),
                   _sha256(tool.get("inputSchema")))

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "digest": self.digest,
                "description_sha256": self.description_sha256,
                "schema_sha256": self.schema_sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ToolDef:
        return cls(d["name"], d["digest"], d["description_sha256"], d["schema_sha256"])

    def differences(self, other: ToolDef) -> list[str]:
        """What differs between two definitions of one tool, in words."""
        what = []
        if self.description_sha256 != other.description_sha256:
            what.append("description")
        if self.schema_sha256 != other.schema_sha256:
            what.append("input schema")
        return what or ["definition"]


@dataclass(slots=True)
class Change:
    """A pinned tool whose server now defines it otherwise; calls refused meanwhile."""

    id: str
    subject: str
    server: str
    tool: str
    seen: ToolDef
    pinned: ToolDef | None  # None: the rule pins it (``rule_pin``)
    rule_pin: str | None = None
    rule: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def what(self) -> str:
        if self.pinned is None:
            return (f"its definition is {self.seen.digest}, not the {self.rule_pin} rule "
                    f"{self.rule!r} pins")
        return " and ".join(self.pinned.differences(self.seen)) + " changed since it was pinned"

    @property
    def reason(self) -> str:
        fix = ("change the rule's mcp.pin" if self.pinned is None
               else f"an admin must accept the change ({self.id})")
        return f"tool {self.tool!r} of {self.server}: {self.what}; {fix}"

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "server": self.server,
                "tool": self.tool, "what": self.what, "at": self.at,
                "pinned": self.pinned.to_dict() if self.pinned else None,
                "seen": self.seen.to_dict(), "rule_pin": self.rule_pin, "rule": self.rule,
                "acceptable": self.pinned is not None}


@dataclass(frozen=True, slots=True)
class PinEvent:
    """Something the caller persists (``pins`` of one subject and server) and records."""

    kind: str  # "pinned", "changed", "restored", "accepted"
    subject: str
    server: str
    tool: str
    change: Change | None = None
    by: str | None = None


Scope = tuple[str, str]  # (subject, server)


class PinBook:
    """Pins and pending changes, per subject and server; synchronous, no I/O."""

    def __init__(self) -> None:
        self._pins: dict[Scope, dict[str, ToolDef]] = {}
        self._changes: dict[str, Change] = {}
        self._blocked: dict[tuple[str, str, str], Change] = {}

    # -- what the store holds ------------------------------------------------------
    def pins(self, subject: str, server: str) -> dict[str, ToolDef]:
        return dict(self._pins.get((subject, server), {}))

    def changes(self, subject: str, server: str) -> list[Change]:
        return [c for c in self._changes.values()
                if (c.subject, c.server) == (subject, server)]

    def restore(self, subject: str, server: str, pins: Mapping[str, ToolDef],
                changes: Sequence[Change]) -> None:
        """Load what an earlier run stored."""
        self._pins[(subject, server)] = dict(pins)
        for c in changes:
            self._changes[c.id] = c
            self._blocked[(c.subject, c.server, c.tool)] = c

    # -- the data path -------------------------------------------------------------
    def review(self, subject: str, server: str, tools: Sequence[Mapping[str, Any]],
               rule_pins: Mapping[str, str], rule: str | None = None,
               ) -> tuple[list[Mapping[str, Any]], list[PinEvent]]:
        """The tools of a tools/list answer that may be shown, and what changed."""
        scope = (subject, server)
        pinned = self._pins.setdefault(scope, {})
        kept: list[Mapping[str, Any]] = []
        events: list[PinEvent] = []
        for tool in tools:
            seen = ToolDef.of(tool)
            name = seen.name
            key = (subject, server, name)
            blocked = self._blocked.get(key)
            want = rule_pins.get(name)
            if want is not None:
                if seen.digest == want:
                    if blocked is not None and blocked.pinned is None:
                        events.append(self._lift(blocked, "restored"))
                    kept.append(tool)
                elif blocked is None or blocked.seen != seen:
                    events.append(self._block(Change(uuid.uuid4().hex[:16], subject, server,
                                                     name, seen, None, want, rule)))
                continue
            old = pinned.get(name)
            if old is None:
                pinned[name] = seen
                events.append(PinEvent("pinned", subject, server, name))
                kept.append(tool)
            elif old == seen:
                if blocked is not None:
                    events.append(self._lift(blocked, "restored"))
                kept.append(tool)
            elif blocked is None or blocked.seen != seen:
                events.append(self._block(Change(uuid.uuid4().hex[:16], subject, server,
                                                 name, seen, old)))
        return kept, events

    def refusal(self, subject: str, server: str, tool: str) -> str | None:
        """Why a call to ``tool`` is refused (a pending change), or ``None``."""
        change = self._blocked.get((subject, server, tool))
        return change.reason if change is not None else None

    def forget(self, subject: str) -> list[str]:
        """Drop a subject's pins and changes (its task ended); the servers it had."""
        servers = [server for (s, server) in self._pins if s == subject]
        for server in servers:
            del self._pins[(subject, server)]
        for change in [c for c in self._changes.values() if c.subject == subject]:
            self._lift(change, "forgotten")
        return servers

    # -- the admin -----------------------------------------------------------------
    def pending(self) -> list[Change]:
        return sorted(self._changes.values(), key=lambda c: c.at)

    def get(self, change_id: str) -> Change | None:
        return self._changes.get(change_id)

    def accept(self, change_id: str, by: str) -> PinEvent:
        """Make the changed definition the pin. ``KeyError``: no such change pending;
        ``ValueError``: the rule pins it, only a change of the rule moves it."""
        change = self._changes[change_id]
        if change.pinned is None:
            raise ValueError(f"tool {change.tool!r} is pinned by rule {change.rule!r} "
                             f"({change.rule_pin}); change the rule's mcp.pin instead")
        self._pins.setdefault((change.subject, change.server), {})[change.tool] = change.seen
        event = self._lift(change, "accepted")
        return PinEvent(event.kind, event.subject, event.server, event.tool, change, by)

    # -- inside ----------------------------------------------------------------------
    def _block(self, change: Change) -> PinEvent:
        old = self._blocked.get((change.subject, change.server, change.tool))
        if old is not None:  # a newer definition replaces the pending one
            self._changes.pop(old.id, None)
        self._changes[change.id] = change
        self._blocked[(change.subject, change.server, change.tool)] = change
        return PinEvent("changed", change.subject, change.server, change.tool, change)

    def _lift(self, change: Change, kind: str) -> PinEvent:
        self._changes.pop(change.id, None)
        self._blocked.pop((change.subject, change.server, change.tool), None)
        return PinEvent(kind, change.subject, change.server, change.tool, change)

