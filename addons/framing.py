"""Framing: mitmproxy's HTTP/1 framing made unambiguous (addons/_h1_framing.py), and
request trailers filtered of framing, hop-by-hop and credential fields on every protocol."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from addons._base import GatewayAddon
from addons._h1_framing import install
from proxy.gateway import trailer_fields

__all__ = ["Framing", "install"]


class Framing(GatewayAddon):
    """load: install the framing patch. request: filter request trailers (sent after
    this hook, to HTTP/1 and HTTP/2 upstreams alike)."""

    def load(self, loader: Any) -> None:
        super().load(loader)
        install()

    def request(self, flow: http.HTTPFlow) -> None:
        trailers = flow.request.trailers
        if trailers:
            kept = trailer_fields(trailers.fields)
            flow.request.trailers = http.Headers(kept) if kept else None


addons = [Framing()]
