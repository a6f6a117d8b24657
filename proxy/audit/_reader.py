"""The one reader of audit lines: bytes → a record, or :class:`BadLine` saying why.

Every reader of the log goes through :func:`read_record` — ``taskgate logs``
and ``GET /v1/audit`` (proxy/audit/_query.py, which skip what is not a record),
``taskgate audit verify`` (proxy/audit/_verify.py, which reports it as damage)
and the writer continuing the chain after a restart (proxy/audit/_log.py, which
looks further back) — so what counts as a record is decided here once: a JSON
object whose ``seq`` is an integer and whose ``prev`` and ``hash`` are strings,
the fields the chain needs. Whether the chain holds is :mod:`._verify`'s
question; the other fields are what the writer wrote, shown as they are.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import orjson

__all__ = ["BadLine", "Flaw", "read_record"]


class Flaw(StrEnum):
    """Why a line is not a record."""

    NOT_JSON = "not JSON"  # cut off mid-write, not UTF-8, nested too deep, garbage
    NOT_OBJECT = "not a JSON object"
    SEQ = "seq is not an integer"
    PREV = "prev is not a string"
    HASH = "hash is not a string"


class BadLine(ValueError):
    """A line of the log that is not a whole audit record."""

    def __init__(self, flaw: Flaw) -> None:
        super().__init__(f"not an audit record: {flaw}")
        self.flaw = flaw


def read_record(line: bytes) -> dict[str, Any]:
    """The record ``line`` holds (a trailing newline is fine); :class:`BadLine` if none."""
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise BadLine(Flaw.NOT_JSON) from None
    if not isinstance(rec, dict):
        raise BadLine(Flaw.NOT_OBJECT)
    if type(rec.get("seq")) is not int:  # not a bool, not 1.0, not "1"
        raise BadLine(Flaw.SEQ)
    if not isinstance(rec.get("prev"), str):
        raise BadLine(Flaw.PREV)
    if not isinstance(rec.get("hash"), str):
        raise BadLine(Flaw.HASH)
    return rec
