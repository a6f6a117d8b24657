"""``GET /v1/audit``: the ``taskgate logs`` query on the control plane, paged.

Query parameters: the filters of :class:`~proxy.audit._query.AuditFilter`
(``task``, ``workload``, ``decision``, ``host``, ``tool``, ``since``,
``until``), ``limit`` (1–1000, default 100), and one cursor: ``before=SEQ``
(newest first, the default) or ``after=SEQ`` (oldest first: a live tail polls
with the last ``seq`` it has). The answer::

    {"records": [...], "next": "/v1/audit?...&before=123" | null, "last_seq": 456,
     "replicas": ["gw-a/w1", "gw-a/w2"]}

Every process writes its own log (proxy/audit/_replicas.py); this answers from the
logs of this host — its own and its workers' — and ``replicas`` names the ones that
had records (their ``replica`` field). With records in several logs, the newest
``limit`` of all, merged by time, come back without a cursor (``seq`` counts within
one log): ``replica=LABEL`` picks one log, and the cursors page through it. A
replica on another host answers for its own logs.

The files are read in a worker thread, a few at a time, never on the loop.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

from aiohttp import web

from proxy.audit import FILTER_KEYS, AuditFilter, Page, host_logs, log_replica, merged, query
from proxy.control._keys import SERVICES
from proxy.errors import InvalidField

__all__ = ["MAX_LIMIT", "audit_endpoint"]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_PAGING = ("limit", "after", "before", "replica")
READERS = web.AppKey("audit_readers", asyncio.Semaphore)


def _bad(reason: str) -> InvalidField:
    """A bad query (400 ``bad_request``); the reason names the parameter."""
    return InvalidField(None, reason, status=400, error="bad_request")


def _int(name: str, text: str, lo: int, hi: int) -> int:
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise _bad(f"{name}: {text[:40]!r} is not a whole number from {lo} to {hi}")
    return int(text)


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
    after = _int("after", params["after"], 0, 1 << 62) if "after" in params else None
    before = _int("before", params["before"], 1, 1 << 62) if "before" in params else None
    if after is not None and before is not None:
        raise _bad("give after or before, not both")
    services = request.app[SERVICES]
    async with request.app[READERS]:
        page, replicas = await asyncio.to_thread(
            _answer, services.audit.path, services.config.audit_path, flt, limit, after,
            before, params.get("replica"))
    nxt = None
    cursor = ({"after": page.next_after} if page.next_after is not None
              else {"before": page.next_before} if page.next_before is not None else None)
    if cursor is not None:
        keep = {k: v for k, v in params.items() if k not in ("after", "before")}
        nxt = f"/v1/audit?{urlencode({**keep, **cursor})}"
    return web.json_response({"records": page.records, "next": nxt,
                              "last_seq": services.audit.seq, "replicas": replicas})


def _answer(own: str, audit_path: str, flt: AuditFilter, limit: int, after: int | None,
            before: int | None, replica: str | None) -> tuple[Page, list[str]]:
    """The page, from the one log that has records (or ``replica``'s), or merged."""
    logs = {log: log_replica(log) for log in dict.fromkeys([own, *host_logs(audit_path)])}
    if replica is not None:
        chosen = [log for log, label in logs.items() if label == replica]
        if not chosen:
            known = ", ".join(sorted(label for label in logs.values() if label)) or "none"
            raise _bad(f"replica: {replica[:64]!r} has no log on this host (these do: {known})")
        return query(chosen[0], flt, limit=limit, after=after, before=before), [replica]
    written: dict[str, str | None] = {
        log: label for log, label in logs.items() if label is not None} or {own: None}
    if len(written) == 1:
        log, label = next(iter(written.items()))
        page = query(log, flt, limit=limit, after=after, before=before)
        return page, [label] if label else []
    if after is not None or before is not None:
        raise _bad(f"after and before page one log; add replica=LABEL (one of "
                   f"{', '.join(sorted(label for label in written.values() if label))})")
    pages = [query(log, flt, limit=limit).records for log in written]
    recs = list(merged((iter(p) for p in pages), newest_first=True))[:limit]
    return Page(recs), sorted({r["replica"] for r in recs if isinstance(r.get("replica"), str)})


def routes(app: web.Application) -> None:
    app[READERS] = asyncio.Semaphore(4)
    app.router.add_get("/v1/audit", audit_endpoint)
