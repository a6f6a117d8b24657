"""Control-plane routes for task grants (behind the admin token of proxy/control/_app.py).

``POST /v1/tasks`` → 201 with the task, its ``token`` and ``proxy_url``
(``http://<task_id>:<token>@<proxy host:port>``, usable as-is in
``HTTP_PROXY``/``HTTPS_PROXY``); ``GET /v1/tasks`` (``?workload=``, ``?status=``,
``?limit=``; newest first); ``GET /v1/tasks/{id}``; ``DELETE /v1/tasks/{id}``
(revoke now; idempotent). The last two list the task's ``credentials``: what the
secret broker minted for it that is still live or pending revocation (secret,
kind, state, expiry, attempts, last error; never a value). ``GET /v1/task-keys``
publishes the public keys (JWKS); ``POST /v1/task-keys/rotate`` starts signing
with a new key.

Handlers raise :class:`~proxy.errors.InvalidField` (``field`` names what is to
blame) or another :class:`~proxy.errors.TaskgateError`; the control plane's one
error middleware (proxy/control/_errors.py) answers JSON with the request id,
for unknown routes and methods too, and a fixed 500 body for a bug.
"""

from __future__ import annotations

import re
import time
from typing import Any

from aiohttp import web

from proxy.control._keys import SERVICES, STATE
from proxy.errors import InvalidField
from proxy.tasks import MAX_BODY_BYTES, TaskRegistry, parse_task_request

__all__ = ["routes"]

_TASK_ID = re.compile(r"^[0-9a-f]{32}$")
_STATES = ("active", "spent", "expired", "revoked")
_LIST_PARAMS = ("workload", "status", "limit")
MAX_LIST = 1000


def _registry(request: web.Request) -> TaskRegistry:
    return request.app[SERVICES].tasks


async def _read_body(request: web.Request) -> bytes:
    """The body, refusing (413) beyond :data:`MAX_BODY_BYTES` without reading it all."""
    too_big = InvalidField(None, f"the body exceeds {MAX_BODY_BYTES} bytes", status=413,
                           error="payload_too_large")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    while chunk := await request.content.read(16 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def proxy_url(request: web.Request, task_id: str, token: str) -> str:
    """Where agents point HTTP(S)_PROXY: the proxy's address, credentials in the userinfo.

    A wildcard listen address (0.0.0.0, ::) is replaced by the host name the caller
    used to reach the control plane, which is the best guess of how it reaches us."""
    state = request.app[STATE]
    address = state.proxy_address
    if not address:
        listen_host, listen_port = request.app[SERVICES].config.proxy_listen
        address = f"{listen_host}:{listen_port}"
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = request.url.host or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{task_id}:{token}@{host}:{port}"


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    if not _TASK_ID.match(task_id):
        raise InvalidField("task_id", "no such task", status=404, error="not_found")
    return task_id


async def create_task(request: web.Request) -> web.Response:
    registry = _registry(request)
    req = parse_task_request(await _read_body(request))
    task, token = await registry.create(req)
    body = {**task.view(), "token": token, "proxy_url": proxy_url(request, task.id, token)}
    return web.json_response(body, status=201, headers={
        "Location": f"/v1/tasks/{task.id}", "Cache-Control": "no-store"})


async def list_tasks(request: web.Request) -> web.Response:
    registry = _registry(request)
    for name in request.query:
        if name not in _LIST_PARAMS:
            raise InvalidField(name, f"unknown query parameter; use {', '.join(_LIST_PARAMS)}",
                               status=400)
    workload = request.query.get("workload")
    status = request.query.get("status")
    if status is not None and status not in _STATES:
        raise InvalidField("status", f"status must be one of {', '.join(_STATES)}", status=400)
    raw_limit = request.query.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST:
        raise InvalidField("limit", f"limit must be a number from 1 to {MAX_LIST}", status=400)
    limit = int(raw_limit)
    now = time.time()
    out: list[dict[str, Any]] = []
    total = 0
    for task in reversed(registry.tasks.values()):
        if workload is not None and task.workload != workload:
            continue
        if status is not None and task.state(now) != status:
            continue
        total += 1
        if len(out) < limit:
            out.append(task.view(now))
    return web.json_response({"tasks": out, "total": total})


def _with_credentials(request: web.Request, view: dict[str, Any]) -> dict[str, Any]:
    creds = request.app[SERVICES].secrets.credentials(view["task_id"])
    return {**view, "credentials": creds}


async def show_task(request: web.Request) -> web.Response:
    task = await _registry(request).current(_task_id(request))
    if task is None:
        raise InvalidField("task_id", "no such task", status=404, error="not_found")
    return web.json_response(_with_credentials(request, task.view()))


async def revoke_task(request: web.Request) -> web.Response:
    task = await _registry(request).revoke(_task_id(request))
    if task is None:
        raise InvalidField("task_id", "no such task", status=404, error="not_found")
    return web.json_response(_with_credentials(request, task.view()))


async def task_keys(request: web.Request) -> web.Response:
    return web.json_response(_registry(request).keys.jwks())


async def rotate_task_keys(request: web.Request) -> web.Response:
    registry = _registry(request)
    kid = await registry.rotate_keys()
    return web.json_response({"current": kid, **registry.keys.jwks()})


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/tasks", create_task)
    app.router.add_get("/v1/tasks", list_tasks)
    app.router.add_get("/v1/tasks/{task_id}", show_task)
    app.router.add_delete("/v1/tasks/{task_id}", revoke_task)
    app.router.add_get("/v1/task-keys", task_keys)
    app.router.add_post("/v1/task-keys/rotate", rotate_task_keys)
