"""``GET /v1/audit``: the ``taskgate logs`` query on the control plane, paged.

Query parameters: the filters of :class:`~proxy.audit._query.AuditFilter`
(``task``, ``workload``, ``decision``, ``host``, ``tool``, ``since``,
``until``), ``limit`` (1–1000, default 100), and one cursor: ``before=SEQ``
(newest first, the default) or ``after=SEQ`` (oldest first: a live tail polls
with the last ``seq`` it has). The answer::

    {"records": [...], "next": "/v1/audit?...&before=123" | null, "last_seq": 456}

The files are read in a worker thread, a few at a time, never on the loop.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

from aiohttp import web

from proxy.audit import FILTER_KEYS, AuditFilter, query
from proxy.control._keys import SERVICES
from proxy.errors import InvalidField

__all__ = ["MAX_LIMIT", "audit_endpoint"]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_PAGING = ("limit", "after", "before")
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
    gateway = request.app[SERVICES].gateway
    async with request.app[READERS]:
        page = await asyncio.to_thread(query, gateway.config.audit_path, flt, limit=limit,
                                       after=after, before=before)
    nxt = None
    cursor = ({"after": page.next_after} if page.next_after is not None
              else {"before": page.next_before} if page.next_before is not None else None)
    if cursor is not None:
        keep = {k: v for k, v in params.items() if k not in ("after", "before")}
        nxt = f"/v1/audit?{urlencode({**keep, **cursor})}"
    return web.json_response({"records": page.records, "next": nxt,
                              "last_seq": gateway.audit.seq})


def routes(app: web.Application) -> None:
    app[READERS] = asyncio.Semaphore(4)
    app.router.add_get("/v1/audit", audit_endpoint)
