"""What a client that has not proven who it is can make the gateway spend.

Anyone who reaches the proxy port can open connections and collect 407s, and
anyone who reaches the control plane can try sign-ins, before any credential
is checked. Each limit here is per client (:func:`client_key`) and has a
memory bound of its own, so a flood costs the gateway a fixed amount:

- :class:`ConnectionLimits`: connections open at once, per client and in all
  (``proxy.max_connections_per_client``, ``proxy.max_connections``);
- :class:`FailureThrottle`: failed review-page sign-ins per client per minute;
- :class:`AuthFailures`: the audit log's 407 records. Every refusal is still
  answered and counted, but past :data:`AUTH_FAILURES_LOGGED` a minute from
  one client they are written as one summary record with the count, not one
  line each, so a 407 flood cannot fill the disk.

What these do not cover: a client that trickles a request head in, a byte at
a time. mitmproxy has no timeout for reading a request head; its only clock
is ``tcp_timeout`` (``proxy.idle_timeout_seconds``), the inactivity of the
whole connection, which a slow sender keeps resetting. The per-client cap is
what bounds how many such connections one address can hold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.audit import new_record, rfc3339

__all__ = ["AUTH_FAILURES_LOGGED", "AuthFailures", "ConnectionLimits", "FailureThrottle",
           "client_key"]

log = logging.getLogger(__name__)

AUTH_FAILURES_LOGGED = 100  # 407 records per client per minute written one by one
MAX_CLIENTS = 4096  # clients a throttle or the 407 log remembers at once


def client_key(address: str | None) -> str:
    """Who a limit counts: the IPv4 address, or the IPv6 /64 (one host's usual share)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionLimits:
    """Connections open at once: at most ``total``, and ``per_client`` from one client."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_client: dict[str, int] = {}

    def admit(self, client: str) -> str | None:
        """Take a slot for a new connection; the reason it is refused when there is none."""
        if self.open >= self.total:
            return f"the gateway has {self.total} connections open (proxy.max_connections)"
        held = self._by_client.get(client, 0)
        if held >= self.per_client:
            return (f"client {client} has {self.per_client} connections open "
                    "(proxy.max_connections_per_client)")
        self.open += 1
        self._by_client[client] = held + 1
        return None

    def release(self, client: str) -> None:
        """Give back a slot :meth:`admit` took."""
        held = self._by_client.get(client, 0)
        if held <= 1:
            self._by_client.pop(client, None)
        else:
            self._by_client[client] = held - 1
        self.open = max(0, self.open - 1)


class FailureThrottle:
    """At most ``limit`` failures per ``window`` seconds from one client."""

    def __init__(self, limit: int, window: float = 60.0, *, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.max_clients, self.clock = limit, window, max_clients, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, client: str) -> bool:
        seen = self._failures.get(client)
        return (seen is not None and len(seen) >= self.limit
                and self.clock() - seen[0] < self.window)

    def failed(self, client: str) -> None:
        seen = self._failures.pop(client, None)
        if seen is None:
            seen = deque(maxlen=self.limit)
            while len(self._failures) >= self.max_clients:  # forget the longest quiet
                self._failures.popitem(last=False)
        seen.append(self.clock())
        self._failures[client] = seen  # most recent last


@dataclass(slots=True)
class _Window:
    start: float  # monotonic
    count: int = 0
    unlogged: int = 0
    unlogged_denies: int = 0  # of those, refusals of a credential (not challenges)
    first_unlogged: float = 0.0  # wall clock
    timer: asyncio.TimerHandle | None = None


class AuthFailures:
    """The 407 records of one gateway: the first ``limit`` a minute per client are
    written one by one; the rest are counted, and written as one summary record
    when that client's minute ends (or the gateway stops)."""

    def __init__(self, write: Callable[[dict[str, Any]], Awaitable[None]], *,
                 limit: int = AUTH_FAILURES_LOGGED, window: float = 60.0,
                 max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self.limit, self.window, self.max_clients, self.clock = limit, window, max_clients, clock
        self._windows: dict[str, _Window] = {}
        self._background: set[asyncio.Task[None]] = set()

    def absorb(self, record: dict[str, Any]) -> bool:
        """True when ``record`` (a 407) is counted into a summary instead of written."""
        if record.get("status") != 407:
            return False
        now = self.clock()
        client = self._slot(client_key(record.get("client")), now)
        win = self._windows.get(client)
        if win is not None and now - win.start >= self.window:
            self._summarize(client)  # its timer is due: the minute is over
            win = None
        if win is None:
            win = self._windows[client] = _Window(now)
        win.count += 1
        if win.count <= self.limit:
            return False
        if not win.unlogged:
            win.first_unlogged = time.time()
            win.timer = asyncio.get_running_loop().call_later(
                max(0.0, win.start + self.window - now), self._summarize, client)
        win.unlogged += 1
        win.unlogged_denies += record.get("decision") != "challenge"
        return True

    async def flush(self) -> None:
        """Write every summary still pending (the gateway is stopping)."""
        for client in list(self._windows):
            self._summarize(client)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _slot(self, client: str, now: float) -> str:
        """The client's own count; a shared one while too many clients are counted."""
        if client in self._windows or len(self._windows) < self.max_clients:
            return client
        self._sweep(now)
        return client if len(self._windows) < self.max_clients else "other"

    def _sweep(self, now: float) -> None:
        for client, win in list(self._windows.items()):
            if now - win.start >= self.window:
                self._summarize(client)

    def _summarize(self, client: str) -> None:
        win = self._windows.pop(client, None)
        if win is None:
            return
        if win.timer is not None:
            win.timer.cancel()
        if not win.unlogged:
            return
        record = new_record(
            ts=rfc3339(time.time()), request_id=uuid.uuid4().hex, client=client,
            # Only challenges (no credential shown): not a denial (docs/spec.md).
            decision="deny" if win.unlogged_denies else "challenge", status=407,
            reason=(f"{win.unlogged} more calls refused for a missing or invalid proxy "
                    f"credential from this client since {rfc3339(win.first_unlogged)}; "
                    f"past {self.limit} a minute they are counted here, not written "
                    "one by one"))
        task = asyncio.get_running_loop().create_task(self._write_summary(record))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_summary(self, record: dict[str, Any]) -> None:
        try:
            await self._write(record)
        except Exception as e:  # noqa: BLE001 - nobody awaits it; say so and go on
            log.error("audit: the summary of %s refusals could not be written: %s",
                      record["client"], e)
