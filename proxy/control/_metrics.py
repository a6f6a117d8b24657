"""``/metrics``: the gateway's Prometheus metrics (proxy/gateway/_metrics.py), open."""

from __future__ import annotations

from aiohttp import web

from proxy.control._keys import SERVICES
from proxy.gateway import METRICS_CONTENT_TYPE

__all__ = ["routes"]


async def metrics_endpoint(request: web.Request) -> web.Response:
    resp = web.Response(body=request.app[SERVICES].metrics.render())
    resp.headers["Content-Type"] = METRICS_CONTENT_TYPE
    return resp


def routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_endpoint)
