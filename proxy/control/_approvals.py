"""Control plane for held calls: list them, approve or deny each one.

    GET  /v1/approvals                 the calls waiting now, oldest first
    GET  /v1/approvals/{id}            one call, waiting or recently ended
    POST /v1/approvals/{id}/approve    {"by": "...", "comment": "..."}
    POST /v1/approvals/{id}/deny       {"by": "...", "comment": "..."}

Answering a call that has ended (answered, timed out, its task ended, its
client gone) is 409; an id the gateway does not know is 404. The admin token
guards all of it (``control.admin_auth``); handlers raise, and the control plane's
error middleware (proxy/control/_errors.py) answers.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.approvals import Approvals
from proxy.control._keys import SERVICES
from proxy.errors import InvalidField
from proxy.safe_text import bad_char

__all__ = ["parse_answer", "routes"]

MAX_BY = 200
MAX_COMMENT = 2000
ANSWER_KEYS = ("by", "comment")


def _has_control(text: str, allowed: str = "") -> bool:
    """C0/C1 controls, DEL, bidi and zero-width characters (:func:`bad_char`)."""
    return bad_char(text, allowed) is not None


def parse_answer(body: bytes) -> tuple[str, str | None]:
    """``(by, comment)`` from a JSON body, or :class:`~proxy.errors.InvalidField` naming
    what is wrong (400 for a body that is not a JSON object, else 422)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidField(None, 'the body must be JSON: {"by": "...", "comment": "..."}',
                           status=400) from None
    if not isinstance(doc, dict):
        raise InvalidField(None, 'the body must be a JSON object: {"by": "...", '
                           '"comment": "..."}', status=400)
    for key in doc:
        if key not in ANSWER_KEYS:
            raise InvalidField(key, f"unknown field {key!r}; expected 'by' and 'comment'")
    by = doc.get("by")
    if not isinstance(by, str) or not by.strip():
        raise InvalidField("by", "'by' must name who answers (a non-empty string)")
    if len(by) > MAX_BY or _has_control(by):
        raise InvalidField("by", f"'by' must be at most {MAX_BY} characters "
                           "without control or invisible characters")
    comment = doc.get("comment")
    if comment is not None:
        if not isinstance(comment, str):
            raise InvalidField("comment", "'comment' must be a string (or left out)")
        if len(comment) > MAX_COMMENT or _has_control(comment, "\n\t"):
            raise InvalidField("comment", f"'comment' must be at most {MAX_COMMENT} "
                               "characters without control or invisible characters other "
                               "than newline and tab")
        comment = comment or None
    return by.strip(), comment


def _approvals(request: web.Request) -> Approvals:
    return request.app[SERVICES].approvals


async def list_approvals(request: web.Request) -> web.Response:
    return web.json_response({"approvals": await _approvals(request).listed()}, dumps=_dumps)


async def show_approval(request: web.Request) -> web.Response:
    view = await _approvals(request).shown(request.match_info["id"])
    return web.json_response(view, dumps=_dumps)


async def _answer(request: web.Request, verb: str) -> web.Response:
    by, comment = parse_answer(await request.read())
    view = await _approvals(request).answer(request.match_info["id"], verb, by, comment)
    return web.json_response(view, dumps=_dumps)


async def approve(request: web.Request) -> web.Response:
    return await _answer(request, "approve")


async def deny(request: web.Request) -> web.Response:
    return await _answer(request, "deny")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/approvals", list_approvals)
    app.router.add_get("/v1/approvals/{id}", show_approval)
    app.router.add_post("/v1/approvals/{id}/approve", approve)
    app.router.add_post("/v1/approvals/{id}/deny", deny)
