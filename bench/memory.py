"""Memory benchmark: taskgate's RSS with many idle agent connections, and through
streamed transfers much larger than memory should hold.

    python bench/memory.py [--connections N] [--transfer-bytes B] [--idle-scheme S] ...

One run starts the bench upstream (closing connections idle for a second, as
servers do) and ``taskgate run`` (the bench workload, GET and POST allowed), on
loopback only, then:

1. **Idle connections**: opens N agent connections (default 10,000), each making
   one call — for ``https`` (the default) its CONNECT, both TLS handshakes and a
   request inside the tunnel; for ``http`` one absolute-form request — and keeps
   them all open, idle. Once the upstream has closed its side, it reads the
   proxy's RSS and open descriptors, checks that a sample of the connections still
   answers, and closes them. Target: at most ``--limit-mb`` (1024) MB RSS.
2. **Streamed upload and download**: one ``POST`` of B bytes (default 1 GiB) that the
   upstream reads and drops, then one ``GET`` of B bytes, over plain HTTP, while the
   proxy's RSS is sampled every 50 ms. Target: the peak stays within ``--flat-mb``
   (64) MB of the RSS before the transfer.

The proxy must hold two descriptors per connection while a call is in flight; the
benchmark raises its own soft open-file limit to the hard one (the children
inherit it) and stops at once if N connections cannot fit. Exit status 1 if any
call failed, the audit log missed a call, or a target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `proxy` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench.fixtures import machine_facts, make_files, taskgate_config
from bench.load import Client, Target
from bench.procs import REPO, Proc, free_port, start_upstream
from proxy.server import TRIM_SECONDS

PATH = "/bench/items/42"
CHUNK = 256 * 1024
MB = 1 << 20
UPSTREAM_KEEPALIVE = 1.0  # seconds the upstream keeps an idle connection
# The held connections are measured once the upstream closed its side and the
# gateway's heap trim (proxy.server.trim_heap) has run: their steady state.
SETTLE_SECONDS = max(UPSTREAM_KEEPALIVE + 1.0, TRIM_SECONDS + 1.0)


@dataclass(slots=True)
class Rss:
    """RSS samples of one process, in bytes."""

    pid: int
    samples: list[int] = field(default_factory=list)

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.pid}")

    async def sample(self, every: float = 0.05) -> None:
        while True:
            self.samples.append(self.now())
            await asyncio.sleep(every)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10000,
                   help="idle agent connections to hold open (default 10000)")
    p.add_argument("--idle-scheme", choices=("https", "http"), default="https",
                   help="https: CONNECT + TLS + a call each (default); http: a call each")
    p.add_argument("--parallel", type=int, default=64,
                   help="connections opened at once (default 64)")
    p.add_argument("--transfer-bytes", type=int, default=1 << 30,
                   help="size of the streamed upload and download (default 1 GiB)")
    p.add_argument("--limit-mb", type=float, default=1024,
                   help="RSS target with the idle connections open, MB (default 1024)")
    p.add_argument("--flat-mb", type=float, default=64,
                   help="how far RSS may rise during a transfer, MB (default 64)")
    p.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                   help="seconds between opening the connections and measuring them "
                        f"(default {SETTLE_SECONDS:g}: the upstream closed its side, the "
                        "gateway trimmed its heap)")
    p.add_argument("--proxy", choices=("taskgate", "mitm-min"), default="taskgate",
                   help="measure taskgate (default) or its mitmproxy without its addons")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, audit)")
    args = p.parse_args(argv)
    if min(args.connections, args.parallel, args.transfer_bytes) < 1:
        p.error("--connections, --parallel and --transfer-bytes must be positive")
    return args


def raise_file_limit(connections: int) -> int:
    """Soft open-file limit to the hard one; the proxy holds an agent and an upstream
    descriptor per connection while a call is in flight, the client one each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and connections + 512 > soft:
        sys.exit(f"{connections} connections need more than the open-file limit {soft} "
                 "allows (ulimit -Hn); pass fewer --connections")
    return soft


async def hold_idle(target: Target, args: argparse.Namespace, proxy: Rss
                    ) -> tuple[list[Client], int, str | None]:
    """Open the connections, one call each; return them, the calls made, the first error."""
    clients: list[Client] = []
    calls = 0
    error: str | None = None
    gate = asyncio.Semaphore(args.parallel)

    async def one() -> None:
        nonlocal calls, error
        client = Client(target)
        async with gate:
            try:
                await client.connect()
                await client.call()
            except Exception as e:  # noqa: BLE001 - counted and reported, never fatal
                error = error or f"{type(e).__name__}: {e}"
                await client.close()
                return
        calls += 1
        clients.append(client)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.connections)))
    took = time.perf_counter() - started
    print(f"  opened {len(clients)} connections in {took:.1f}s "
          f"({len(clients) / took:.0f}/s), proxy RSS {proxy.now() / MB:.0f} MB", flush=True)
    return clients, calls, error


async def transfer(kind: str, proxy_port: int, upstream_port: int, auth: str, size: int
                   ) -> tuple[float, str | None]:
    """Stream ``size`` bytes up (``upload``) or down (``download``) through the proxy;
    return the seconds it took and an error, if any."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    origin = f"127.0.0.1:{upstream_port}"
    started = time.perf_counter()
    try:
        if kind == "upload":
            writer.write((f"POST http://{origin}/bench/upload HTTP/1.1\r\nHost: {origin}\r\n"
                          f"Proxy-Authorization: {auth}\r\n"
                          "Content-Type: application/octet-stream\r\n"
                          f"Content-Length: {size}\r\n\r\n").encode())
            block = memoryview(b"\0" * CHUNK)
            left = size
            while left:
                n = min(left, CHUNK)
                writer.write(block[:n])
                left -= n
                await writer.drain()
        else:
            writer.write((f"GET http://{origin}/bench/download/{size} HTTP/1.1\r\n"
                          f"Host: {origin}\r\nProxy-Authorization: {auth}\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = head[9:12]
        lower = head.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i < 0:
            return time.perf_counter() - started, f"{kind}: no Content-Length in {head[:80]!r}"
        length = int(head[i + 17:lower.index(b"\r\n", i + 17)])
        if kind == "upload":
            body = await reader.readexactly(length)
            got = json.loads(body).get("bytes") if status == b"200" else None
            if got != size:
                return time.perf_counter() - started, f"upload: {status!r} {body[:120]!r}"
        else:
            if status != b"200" or length != size:
                return time.perf_counter() - started, f"download: {head[:120]!r}"
            left = length
            while left:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    return time.perf_counter() - started, "download: cut short"
                left -= len(chunk)
        return time.perf_counter() - started, None
    finally:
        writer.close()


async def measure_transfer(kind: str, proxy: Rss, proxy_port: int, upstream_port: int,
                           auth: str, size: int, flat_mb: float) -> tuple[bool, str | None]:
    """One transfer with the proxy's RSS sampled throughout; print and judge it."""
    proxy.samples.clear()
    before = proxy.now()
    sampler = asyncio.create_task(proxy.sample())
    try:
        took, error = await transfer(kind, proxy_port, upstream_port, auth, size)
    finally:
        sampler.cancel()
    after = proxy.now()
    peak = max([*proxy.samples, before, after])
    rise = (peak - before) / MB
    ok = error is None and rise <= flat_mb
    print(f"{kind:<9}  {size / MB:8.0f} MB in {took:5.1f}s ({size / MB / took:6.0f} MB/s); "
          f"proxy RSS before {before / MB:.0f} MB, peak {peak / MB:.0f} MB (+{rise:.1f} MB), "
          f"after {after / MB:.0f} MB: target +<= {flat_mb:g} MB "
          f"{'met' if ok else 'MISSED'}" + (f"; error: {error}" if error else ""), flush=True)
    return ok, error


def audit_records(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(b'"decision":"allow"' in line for line in f)


async def run(args: argparse.Namespace, root: Path, limit: int) -> int:
    files = make_files(root)
    upstream, http_port, https_port = start_upstream(
        files.upstream_cert, files.upstream_key, 256, root, keepalive=UPSTREAM_KEEPALIVE)
    proc: Proc | None = None
    failed = False
    try:
        port = free_port()
        config = taskgate_config(files, port, free_port(), http_port, https_port,
                                 "/bench/**", methods=("GET", "POST"))
        room = args.connections + 1024
        config["proxy"] = {"max_connections": room, "max_connections_per_client": room}
        config_path = root / "taskgate.yaml"
        config_path.write_text(json.dumps(config, indent=2))
        audit_path = Path(config["audit"]["path"])
        home = Path(config["home"])
        if args.proxy == "taskgate":
            argv = ["proxy", "run", "-c", str(config_path)]
        else:  # the same embedded mitmproxy, without taskgate's addons (bench/mitm_min.py)
            port, home = free_port(), root / "mitm-min-home"
            argv = ["bench.mitm_min", str(config_path), str(port), str(home)]
        proc = Proc(args.proxy, [sys.executable, "-m", "bench.tree", *argv],
                    root / f"{args.proxy}.log", cwd=root)
        proc.wait_listening(port)
        proxy = Rss(proc.pid)
        scheme = args.idle_scheme
        host = "localhost" if scheme == "https" else "127.0.0.1"
        ca = home / "ca" / "mitmproxy-ca-cert.pem"
        target = Target(scheme, host, https_port if scheme == "https" else http_port, PATH,
                        proxy=("127.0.0.1", port),
                        proxy_authorization=files.proxy_authorization,
                        tls=ssl.create_default_context(cafile=str(ca)))
        # Warm up (first calls load the issuer key, the CA, the forged certificate).
        warm, calls, error = await hold_idle(target, argparse.Namespace(
            connections=min(32, args.connections), parallel=8), proxy)
        await asyncio.gather(*(c.close() for c in warm))
        await asyncio.sleep(UPSTREAM_KEEPALIVE + 0.5)
        base = proxy.now()
        print(f"idle:      {args.proxy}: {args.connections} {scheme} agent connections, "
              f"{args.parallel} opened at once; open-file limit {limit}; proxy RSS at rest "
              f"{base / MB:.0f} MB", flush=True)
        clients, made, first = await hold_idle(target, args, proxy)
        calls += made
        error = error or first
        await asyncio.sleep(args.settle)
        held, fds = proxy.now(), open_fds(proc.pid)
        sample = clients[:: max(1, len(clients) // 100)]
        alive = await asyncio.gather(*(c.call() for c in sample), return_exceptions=True)
        dead = sum(isinstance(a, BaseException) for a in alive)
        calls += len(sample) - dead
        await asyncio.gather(*(c.close() for c in clients))
        per = (held - base) / max(1, len(clients)) / 1024
        ok = len(clients) == args.connections and dead == 0 and held <= args.limit_mb * MB
        print(f"idle       {len(clients)} held: proxy RSS {held / MB:.0f} MB "
              f"(+{(held - base) / MB:.0f} MB, {per:.1f} KB per connection), "
              f"{fds} open descriptors; {len(sample) - dead}/{len(sample)} sampled still "
              f"answer: target <= {args.limit_mb:g} MB {'met' if ok else 'MISSED'}"
              + (f"; first error: {error}" if error else ""), flush=True)
        failed |= not ok or error is not None
        await asyncio.sleep(0.5)
        for kind in ("upload", "download"):
            ok, error = await measure_transfer(kind, proxy, port, http_port,
                                               files.proxy_authorization, args.transfer_bytes,
                                               args.flat_mb)
            calls += error is None
            failed |= not ok
        await asyncio.sleep(0.3)
        if args.proxy == "taskgate":
            records = audit_records(audit_path)
            print(f"audit:     {records} 'allow' records for {calls} calls through "
                  f"taskgate: {'OK' if records == calls else 'MISMATCH'}")
            failed |= records != calls
    finally:
        if proc is not None:
            proc.stop()
        if upstream.poll() is None:
            upstream.terminate()
            upstream.wait(15)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_file_limit(args.connections)
    root = Path(tempfile.mkdtemp(prefix="taskgate-membench-"))
    print("\n".join(machine_facts(REPO)), flush=True)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run(args, root, limit))
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        print("load avg at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    sys.exit(main())
