"""``/metrics``: the gateway's Prometheus metrics (proxy/gateway/_metrics.py), open; with
workers, this process's and every worker's, merged (:func:`merge_metrics`)."""

from __future__ import annotations

from aiohttp import web

from proxy.control._keys import SERVICES, STATE
from proxy.gateway import METRICS_CONTENT_TYPE, merge_metrics

__all__ = ["routes"]


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[SERVICES].metrics.render()
    peers = request.app[STATE].peer_metrics
    if peers is not None:
        body = merge_metrics([body, *await peers()])
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = METRICS_CONTENT_TYPE
    return resp


def routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_endpoint)
