"""Control plane for MCP tool pins: the tool changes waiting for an admin, and accepting one.

    GET  /v1/tools/changes               pending changes, oldest first
    POST /v1/tools/changes/{id}/accept   {"by": "...", "comment": "..."}

A change is a pinned tool whose server now defines it otherwise (proxy/mcp/_pins.py);
until it is accepted the tool is dropped from tools/list answers and calls to it
are refused. Accepting makes the new definition the pin. An unknown id is 404; a
tool a rule pins (``mcp.pin``) is 409: only a change of the rule moves it. The
admin token guards all of it.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.control._approvals import parse_answer
from proxy.control._keys import SERVICES

__all__ = ["routes"]


async def list_changes(request: web.Request) -> web.Response:
    pins = request.app[SERVICES].pins
    return web.json_response({"changes": [c.view() for c in pins.pending()]}, dumps=_dumps)


async def accept_change(request: web.Request) -> web.Response:
    by, comment = parse_answer(await request.read())
    change = await request.app[SERVICES].pins.accept(request.match_info["id"], by)
    return web.json_response({**change.view(), "accepted_by": by, "comment": comment},
                             dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/tools/changes", list_changes)
    app.router.add_post("/v1/tools/changes/{id}/accept", accept_change)
