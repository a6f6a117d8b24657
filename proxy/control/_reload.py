"""``POST /v1/reload`` (admin): read the config file again and apply it
(proxy/gateway/_reload.py).

200 with what changed (digests, settings that need a restart, tasks revoked, secrets to
fetch anew); 422 ``invalid_config`` with the file's error (file, line, key) when the
file was refused — the running config stays. ``taskgate reload`` calls it.
"""

from __future__ import annotations

from aiohttp import web

from proxy.control._keys import SERVICES, STATE
from proxy.errors import InvalidField
from proxy.gateway import reload

__all__ = ["routes"]

CLI_HEADER = "X-Taskgate-Client"  # ``taskgate reload`` says it is the one asking


async def reload_config(request: web.Request) -> web.Response:
    if request.can_read_body and await request.content.read(1):
        raise InvalidField(None, "POST /v1/reload takes no body: the gateway reads the file "
                                 "it was started with", status=400, error="bad_request")
    via = "taskgate reload" if request.headers.get(CLI_HEADER) == "reload" else "POST /v1/reload"
    result = await reload(request.app[SERVICES], who=f"{via} from {request.remote}")
    if not result.applied:
        raise InvalidField(None, result.error or "the config was refused", status=422,
                           error="invalid_config", old_digest=result.old_digest)
    reloaded = request.app[STATE].reloaded
    if reloaded is not None:
        reloaded()  # the workers read the same file (proxy/supervisor.py)
    return web.json_response(result.view())


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/reload", reload_config)
