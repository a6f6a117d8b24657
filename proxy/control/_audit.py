"""``GET /v1/audit``: the ``taskgate logs`` query on the control plane, paged.

Query parameters: the filters of :class:`~proxy.audit._query.AuditFilter`
(``task``, ``workload``, ``decision``, ``host``, ``tool``, ``since``,
``until``), ``limit`` (1–1000, default 100), one cursor: ``before=…`` (newest
first, the default) or ``after=…`` (oldest first: a live tail polls with the
``tail`` it was given), and ``replica=LABEL`` (that replica's log only). The answer::

    {"records": [...], "next": "/v1/audit?...&before=123" | null, "last_seq": 456,
     "tail": "456", "replicas": ["gw-a"]}

Every process writes its own log (proxy/audit/_replicas.py); this answers from the
logs of this host — its own, and its workers' with ``proxy.workers`` > 1 — and
``replicas`` names the ones that had records (their ``replica`` field). With one
log a cursor is a ``seq``, as ever. With several, records are merged by time and a
cursor holds a position in each log (``audit-w1.jsonl:12,audit-w2.jsonl:40``; a
plain number stands for every log, so ``after=0`` reads all from the start). A
replica on another host answers for its own logs.

The files are read in a worker thread, a few at a time, never on the loop.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

from aiohttp import web

from proxy.audit import (
    FILTER_KEYS,
    AuditFilter,
    Cursor,
    host_logs,
    log_tail,
    query,
    query_logs,
)
from proxy.control._keys import SERVICES
from proxy.errors import InvalidField

__all__ = ["MAX_LIMIT", "answer", "audit_endpoint"]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_PAGING = ("limit", "after", "before", "replica")
MAX_CURSOR = 4096  # characters: 64 logs' names and positions fit
READERS = web.AppKey("audit_readers", asyncio.Semaphore)


def _bad(reason: str) -> InvalidField:
    """A bad query (400 ``bad_request``); the reason names the parameter."""
    return InvalidField(None, reason, status=400, error="bad_request")


def _int(name: str, text: str, lo: int, hi: int) -> int:
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise _bad(f"{name}: {text[:40]!r} is not a whole number from {lo} to {hi}")
    return int(text)


def _cursor(name: str, text: str, lo: int, default: int | None) -> Cursor:
    if text.isdigit():
        return Cursor({}, _int(name, text, lo, 1 << 62))
    if len(text) > MAX_CURSOR:
        raise _bad(f"{name}: longer than {MAX_CURSOR} characters")
    try:
        cursor = Cursor.parse(text, default)
    except ValueError as e:
        raise _bad(f"{name}: {e}") from None
    if any(not lo <= seq <= 1 << 62 for seq in cursor.at.values()):
        raise _bad(f"{name}: a position is not a whole number from {lo} to {1 << 62}")
    return cursor


async def audit_endpoint(request: web.Request) -> web.Response:
    params = request.rel_url.query
    for key in params:
        if key not in FILTER_KEYS and key not in _PAGING:
            raise _bad(f"unknown parameter {key[:40]!r}; expected "
                       f"{', '.join(FILTER_KEYS + _PAGING)}")
        if len(params.getall(key)) > 1:
            raise _bad(f"{key}: given more than once")
    try:
        flt = AuditFilter.parse({k: params.get(k) for k in FILTER_KEYS})
    except ValueError as e:  # its text names the parameter
        raise _bad(str(e)) from None
    limit = _int("limit", params["limit"], 1, MAX_LIMIT) if "limit" in params \
        else DEFAULT_LIMIT
    after = _cursor("after", params["after"], 0, 0) if "after" in params else None
    before = _cursor("before", params["before"], 1, None) if "before" in params else None
    if after is not None and before is not None:
        raise _bad("give after or before, not both")
    services = request.app[SERVICES]
    async with request.app[READERS]:
        found = await asyncio.to_thread(answer, services.audit.path,
                                        services.config.audit_path, flt, limit, after,
                                        before, params.get("replica"))
    records, cursor, tail, replicas = found
    nxt = None
    if cursor is not None:
        keep = {k: v for k, v in params.items() if k not in ("after", "before")}
        nxt = f"/v1/audit?{urlencode({**keep, **cursor})}"
    return web.json_response({"records": records, "next": nxt,
                              "last_seq": services.audit.seq, "tail": tail,
                              "replicas": replicas})


Found = tuple[list[dict[str, object]], dict[str, str] | None, str, list[str]]


def answer(own: str, audit_path: str, flt: AuditFilter, limit: int, after: Cursor | None,
           before: Cursor | None, replica: str | None) -> Found:
    """(records, the next page's cursor parameter, the tail cursor, replicas read)."""
    logs = list(dict.fromkeys([own, *host_logs(audit_path)]))
    if replica is not None:
        labels = {log: log_tail(log)[0] for log in logs}
        chosen = [log for log, label in labels.items() if label == replica]
        if not chosen:
            known = ", ".join(sorted(label for label in labels.values() if label)) or "none"
            raise _bad(f"replica: {replica[:64]!r} has no log on this host (these do: {known})")
        logs = chosen[:1]
    if len(logs) == 1:  # one log: seq cursors, as ever
        log = logs[0]
        page = query(log, flt, limit=limit, after=after.of(log) if after else None,
                     before=before.of(log) if before else None)
        cursor = ({"after": str(page.next_after)} if page.next_after is not None else
                  {"before": str(page.next_before)} if page.next_before is not None else None)
        label, end = log_tail(log)
        if after is not None:
            end = max([after.of(log) or 0, *(r["seq"] for r in page.records)])
        return page.records, cursor, str(end), [label] if label else []
    merged = query_logs(logs, flt, limit=limit, after=after, before=before)
    cursor = None if merged.next is None else {
        "after" if after is not None else "before": str(merged.next)}
    replicas = sorted({r["replica"] for r in merged.records
                       if isinstance(r.get("replica"), str)})
    return merged.records, cursor, str(merged.tail), replicas


def routes(app: web.Application) -> None:
    app[READERS] = asyncio.Semaphore(4)
    app.router.add_get("/v1/audit", audit_endpoint)
