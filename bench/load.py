"""The load generator: lean HTTP/1.1 keep-alive clients on asyncio streams (uvloop).

A general-purpose client (aiohttp, httpx) spends more CPU per request than a proxy worth
measuring, and on a 2-core machine every cycle it burns is taken from the proxy. This
one does only what the benchmark needs: N persistent connections — direct, absolute-form
through a proxy, or CONNECT + TLS through a proxy — each sending one request at a time
and reading a ``Content-Length`` or chunked response; or, with ``Target.per_call``, a
new connection (and CONNECT, and TLS handshake) for every call, as agents and CLIs that
do not keep connections do. Every non-200 answer or broken connection is counted as an
error, so a misconfigured run can never pass as a fast one.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field

__all__ = ["Client", "LoadResult", "Target", "percentile", "run_load"]


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: the upstream origin, and the proxy in between (if any)."""

    scheme: str  # "http" or "https"
    host: str
    port: int
    path: str
    proxy: tuple[str, int] | None = None
    proxy_authorization: str | None = None
    tls: ssl.SSLContext | None = None  # trust for the origin's (or the proxy's minted) cert
    per_call: bool = False  # a new connection (CONNECT, TLS handshake) for every call

    def request_bytes(self) -> bytes:
        """The request as written on an established connection, reused for every call."""
        authority = f"{self.host}:{self.port}"
        absolute = self.proxy is not None and self.scheme == "http"
        target = f"http://{authority}{self.path}" if absolute else self.path
        lines = [f"GET {target} HTTP/1.1", f"Host: {authority}", "Accept: */*",
                 "User-Agent: taskgate-bench"]
        if self.per_call:
            lines.append("Connection: close")
        if absolute and self.proxy_authorization:
            lines.append(f"Proxy-Authorization: {self.proxy_authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ClientError(Exception):
    """A connection or response the benchmark cannot count as a success."""


class Client:
    """One keep-alive connection and the requests sent over it, one at a time."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.request = target.request_bytes()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        t = self.target
        if t.proxy is None:
            tls = t.tls if t.scheme == "https" else None
            self.reader, self.writer = await asyncio.open_connection(
                t.host, t.port, ssl=tls, server_hostname=t.host if tls else None)
            return
        self.reader, self.writer = await asyncio.open_connection(*t.proxy)
        if t.scheme == "https":
            authority = f"{t.host}:{t.port}"
            auth = (f"Proxy-Authorization: {t.proxy_authorization}\r\n"
                    if t.proxy_authorization else "")
            self.writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                              f"{auth}\r\n".encode())
            head = await self.reader.readuntil(b"\r\n\r\n")
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                status_line = head.split(b"\r\n", 1)[0]
                raise ClientError(f"CONNECT refused: {status_line!r}")
            assert t.tls is not None
            await self.writer.start_tls(t.tls, server_hostname=t.host)

    async def call(self) -> None:
        """Send one request and read its whole response (per call: on a new connection,
        closed after it)."""
        if not self.target.per_call:
            await self._call()
            return
        try:
            await self.connect()
            await self._call()
        finally:
            await self.close()

    async def _call(self) -> None:
        reader, writer = self.reader, self.writer
        assert reader is not None and writer is not None
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head[9:12]
        lower = head.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            end = lower.index(b"\r\n", i + 17)
            await reader.readexactly(int(head[i + 17:end]))
        elif b"\r\ntransfer-encoding: chunked" in lower:
            await _read_chunked(reader)
        else:
            raise ClientError("response without a length (connection would not be reused)")
        if status != b"200":
            raise ClientError(f"status {status.decode(errors='replace')}")

    async def close(self) -> None:
        if self.writer is not None:
            writer, self.reader, self.writer = self.writer, None, None
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (OSError, TimeoutError, ssl.SSLError):
                pass


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from our upstream
            return
        await reader.readexactly(size + 2)


@dataclass(slots=True)
class LoadResult:
    """What one measured run did: counts, wall time, latencies, the client's own CPU."""

    requests: int = 0
    warmup_requests: int = 0
    errors: int = 0
    elapsed: float = 0.0
    client_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds
    first_error: str | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (sorted here), q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def _drive(clients: list[Client], total: int, cap: float, result: LoadResult) -> None:
    """Share ``total`` requests among the clients until done or ``cap`` seconds pass."""
    remaining = total
    deadline = time.perf_counter() + cap
    clock = time.perf_counter

    async def worker(client: Client) -> None:
        nonlocal remaining
        while remaining > 0 and clock() < deadline:
            remaining -= 1
            t0 = clock()
            try:
                await client.call()
            except (ClientError, OSError, asyncio.IncompleteReadError, ValueError,
                    asyncio.LimitOverrunError, ssl.SSLError) as e:
                result.errors += 1
                result.first_error = result.first_error or f"{type(e).__name__}: {e}"
                return  # a broken connection is not reused
            result.latencies.append(clock() - t0)
            result.requests += 1

    await asyncio.gather(*(worker(c) for c in clients))


async def run_load(target: Target, *, total: int, warmup: int, concurrency: int,
                   cap: float) -> LoadResult:
    """Open ``concurrency`` connections, warm up, then measure ``total`` requests."""
    clients = [Client(target) for _ in range(concurrency)]
    result = LoadResult()
    try:
        try:
            if not target.per_call:  # per call: each call connects (and counts the time)
                await asyncio.wait_for(asyncio.gather(*(c.connect() for c in clients)), 20)
        except (ClientError, OSError, TimeoutError, ssl.SSLError,
                asyncio.IncompleteReadError) as e:
            result.errors = concurrency
            result.first_error = f"connect: {type(e).__name__}: {e}"
            return result
        warm = LoadResult()
        await _drive(clients, max(warmup, concurrency), cap, warm)
        result.warmup_requests = warm.requests
        if warm.errors:
            result.errors, result.first_error = warm.errors, f"warm-up: {warm.first_error}"
            return result
        cpu0, t0 = time.process_time(), time.perf_counter()
        await _drive(clients, total, cap, result)
        result.elapsed = time.perf_counter() - t0
        result.client_cpu = time.process_time() - cpu0
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return result
