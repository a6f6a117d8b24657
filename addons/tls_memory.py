"""TLS memory: an idle TLS connection holds no read or write buffers.

OpenSSL keeps a read and a write buffer (~17 KB each) per TLS connection for as
long as it is open; an agent that keeps its tunnel open between calls holds them
idle. ``SSL_MODE_RELEASE_BUFFERS`` returns them once a record is done (bench/
memory.py measures the difference). mitmproxy makes its TLS contexts once and
caches them (``mitmproxy.net.tls``), so the mode set here on the context of each
new connection holds for every later connection made from that context.
"""

from __future__ import annotations

from mitmproxy import tls
from OpenSSL import SSL

from addons._base import GatewayAddon

__all__ = ["TlsMemory"]


class TlsMemory(GatewayAddon):
    """tls_start_client/tls_start_server (after mitmproxy's tlsconfig made the
    connection): release idle buffers on its context."""

    def tls_start_client(self, data: tls.TlsData) -> None:
        _release_buffers(data)

    def tls_start_server(self, data: tls.TlsData) -> None:
        _release_buffers(data)


def _release_buffers(data: tls.TlsData) -> None:
    conn = data.ssl_conn
    if isinstance(conn, SSL.Connection):  # set_mode adds to the mode: idempotent
        conn.get_context().set_mode(SSL.MODE_RELEASE_BUFFERS)


addons = [TlsMemory()]
