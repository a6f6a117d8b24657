"""Cap the connections agents hold open, per client address and in all.

Runs before any credential is seen: a connection past a cap is closed as it
opens (mitmproxy closes a client whose ``error`` is set in ``client_connected``),
so idle or trickling connections from one address cannot use up the
gateway's file descriptors for everyone else.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import connection

from addons._base import GatewayAddon
from proxy.gateway import Gateway
from proxy.limits import ConnectionLimits, client_key

log = logging.getLogger("taskgate")

LOG_EVERY_SECONDS = 10.0  # a flood of refused connections is one log line per interval


class Limits(GatewayAddon):
    """client_connected: take a slot or close; client_disconnected: give it back."""

    def __init__(self, gateway: Gateway | None = None) -> None:
        super().__init__(gateway)
        self._limits: ConnectionLimits | None = None
        self._holding: dict[str, str] = {}  # client connection id → its client key
        self._refused = 0
        self._logged = 0.0

    def client_connected(self, client: connection.Client) -> None:
        if not self.started:
            return
        if self._limits is None:
            config = self.gateway.config
            self._limits = ConnectionLimits(config.max_connections,
                                            config.max_connections_per_client)
        key = client_key(client.peername[0] if client.peername else None)
        why = self._limits.admit(key)
        if why is None:
            self._holding[client.id] = key
            return
        client.error = f"connection refused: {why}"
        self._refused += 1
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_SECONDS:
            log.warning("taskgate: %d connections refused; the last: %s", self._refused, why)
            self._logged, self._refused = now, 0

    def client_disconnected(self, client: connection.Client) -> None:
        key = self._holding.pop(client.id, None)
        if key is not None and self._limits is not None:
            self._limits.release(key)


addons = [Limits()]
