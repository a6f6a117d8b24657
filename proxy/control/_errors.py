"""The control plane's one error convention: every refusal is JSON with a reason and
a request id.

Handlers raise; :func:`json_errors` (installed once, outermost, by ``make_app``)
turns what they raise into ``{"error", "reason", ...extra, "request_id"}`` with
the ``X-Taskgate-Request-Id`` header, as the data plane answers:

- :class:`~proxy.errors.InvalidField` → its status (422 unless it says otherwise),
  ``field`` and its extra keys (e.g. ``rule``);
- any other :class:`~proxy.errors.TaskgateError` → its status and code
  (:func:`~proxy.errors.status_for`: 404 ``not_found``, 409 ``conflict``, …);
- aiohttp's HTTP errors (an unknown route, a wrong method, a body over
  ``client_max_size``) → their status, ``http_error``; redirects pass through;
- anything else is a bug: logged with the request id, answered 500 with a fixed
  reason (its text may carry what must not leave the process).

Refusals a handler or middleware returns rather than raises (the admin token's
401, the session's 403) are built by :func:`json_error`, so they carry the same
keys.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.errors import InvalidField, TaskgateError, status_for
from proxy.gateway import REQUEST_ID_HEADER, new_request_id

__all__ = ["INTERNAL_REASON", "json_error", "json_errors"]

log = logging.getLogger("taskgate")

INTERNAL_REASON = "the request failed; see the gateway log"
# Headers of aiohttp's HTTP errors worth keeping on the JSON answer.
_KEPT_HEADERS = ("Allow",)


def json_error(status: int, error: str, reason: str, **extra: Any) -> web.Response:
    """A JSON refusal: ``error``, ``reason``, ``extra``, and a ``request_id`` (also in
    the ``X-Taskgate-Request-Id`` header)."""
    return _refusal(status, {"error": error, "reason": reason, **extra})


def _refusal(status: int, body: dict[str, Any], request_id: str | None = None,
             headers: dict[str, str] | None = None) -> web.Response:
    request_id = request_id or new_request_id()
    return web.json_response({**body, "request_id": request_id}, status=status,
                             headers={**(headers or {}), REQUEST_ID_HEADER: request_id})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error a handler raises, as JSON (see the module docstring)."""
    try:
        return await handler(request)
    except InvalidField as e:
        return _refusal(e.status, e.body())
    except TaskgateError as e:
        status, error, reason = status_for(e)
        return json_error(status, error, reason)
    except web.HTTPException as e:
        if e.status < 400:
            raise  # a redirect (the review page's sign-in), not an error
        kept = {k: e.headers[k] for k in _KEPT_HEADERS if k in e.headers}
        return _refusal(e.status, {"error": "http_error", "reason": e.reason}, headers=kept)
    except Exception:  # noqa: BLE001 - a bug must not answer with its traceback
        request_id = new_request_id()
        log.exception("taskgate: control plane: %s %s failed (request %s)", request.method,
                      request.path, request_id)
        return _refusal(500, {"error": "internal_error", "reason": INTERNAL_REASON},
                        request_id)
