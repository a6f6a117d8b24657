"""Benchmark MCP per-tool-call authorization.

1. Decision cost: ``proxy.mcp._inspect.inspect`` on a tools/call with a ~100 KB
   body (strict parse, duplicate/folding checks, constraints, arguments digest),
   for three body shapes, in-process.
2. Throughput: MCP tools/call requests per second from concurrent keep-alive
   clients, straight to a loopback JSON-RPC upstream, through plain
   ``mitmdump`` (no addons), and through taskgate with an MCP rule (identity,
   authorization, body inspection, audit log), and through the same gateway without
   the compiled scanner (the Python readers alone).

Run: ``PYTHONPATH=. /tmp/venv/bin/python bench/bench_mcp.py [--seconds 3] [--runs 3]``.
On a shared machine figures vary between runs; each target is run several times,
interleaved with the others, and the best run is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.mcp import inspect  # noqa: E402
from proxy.policy import parse_rule  # noqa: E402

RULES = [
    parse_rule({"id": "docs", "host": "127.0.0.1", "paths": ["/mcp"],
                "mcp": {"tools": ["search_docs", "summarize"],
                        "args": {"limit": {"maximum": 50},
                                 "query": {"maxLength": 200, "pattern": "[A-Za-z0-9 ]+"}}}}),
    parse_rule({"id": "other", "host": "127.0.0.1", "paths": ["/mcp"],
                "mcp": {"tools": ["add"]}}),
]


def body_100k(shape: str) -> bytes:
    """A tools/call of ~100 KB: one big string, many small objects, or deep-ish nesting."""
    args: dict[str, Any] = {"query": "taskgate docs", "limit": 10}
    if shape == "one 100 KB string":
        args["text"] = "lorem ipsum " * 8533
    elif shape == "1,250 small objects":
        args["items"] = [{"id": i, "title": f"item {i}", "tags": ["a", "b"], "score": i / 7}
                         for i in range(1250)]
    else:
        args["rows"] = [[i, str(i), {"k": [i, i + 1]}] for i in range(2800)]
    msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": "search_docs", "arguments": args}}
    return json.dumps(msg).encode()


def bench_decision(rounds: int) -> None:
    print("== decision cost: inspect() on one tools/call (median / p99 per call) ==")
    for shape in ("one 100 KB string", "1,250 small objects", "2,800 small arrays"):
        body = body_100k(shape)
        for coding, data in ((None, body), ("gzip", gzip.compress(body))):
            d = inspect(RULES, "POST", data, coding, 1 << 20)
            assert d.allowed, d.reason
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                inspect(RULES, "POST", data, coding, 1 << 20)
                times.append(time.perf_counter() - t0)
            times.sort()
            label = f"{shape}, {len(body) / 1024:.0f} KB" + (f" (gzip {len(data) // 1024} KB)"
                                                             if coding else "")
            print(f"  {label:<44} median {statistics.median(times) * 1e3:7.3f} ms"
                  f"   p99 {times[int(len(times) * 0.99)] * 1e3:7.3f} ms")
    small = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "search_docs", "arguments": {"query": "taskgate", "limit": 5}}}).encode()
    t0 = time.perf_counter()
    for _ in range(rounds * 20):
        inspect(RULES, "POST", small, None, 1 << 20)
    per = (time.perf_counter() - t0) / (rounds * 20)
    print(f"  {'small tools/call, ' + str(len(small)) + ' B':<44} mean   {per * 1e6:7.1f} µs")


# -- throughput ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int) -> None:
    """A minimal MCP server in JSON response mode: answers tools/call with a fixed result."""
    import orjson
    from aiohttp import web

    async def mcp(request: web.Request) -> web.Response:
        msg = orjson.loads(await request.read())
        return web.Response(body=orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {
            "content": [{"type": "text", "text": "3 results"}], "isError": False}}),
            content_type="application/json")

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    app.router.add_post("/plain", mcp)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, proxy: str | None, seconds: float, clients: int,
               body: bytes) -> tuple[float, float, int]:
    """(calls per second, median latency ms, calls) with ``clients`` keep-alive
    connections."""
    import aiohttp

    latencies: list[float] = []
    stop = time.monotonic() + seconds
    conn = aiohttp.TCPConnector(limit=clients)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers, proxy=proxy) as r:
                data = await r.read()
                if r.status != 200 or b'"result"' not in data:
                    raise RuntimeError(f"bad answer {r.status}: {data[:200]!r}")
            latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=conn) as session:
        for _ in range(clients):  # warm up the connections
            await worker_once(session, url, proxy, body, headers)
        t0 = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        elapsed = time.monotonic() - t0
    return len(latencies) / elapsed, statistics.median(latencies) * 1e3, len(latencies)


async def worker_once(session: Any, url: str, proxy: str | None, body: bytes,
                      headers: dict[str, str]) -> None:
    async with session.post(url, data=body, headers=headers, proxy=proxy) as r:
        await r.read()


def bench_throughput(seconds: float, clients: int, rounds: int) -> None:
    from tests.support import WORKLOAD, Gateway, Keys

    class NoScanner(Gateway):
        """The gateway with ``proxy.mcp._scan`` made unimportable before it starts."""

        def command(self) -> list[str]:
            code = ("import runpy, sys; sys.modules['proxy.mcp._scan'] = None; "
                    "import proxy.mcp._jsonrpc as j; assert j._scan is None; "
                    f"sys.argv = ['taskgate', 'run', '-c', {str(self.config_path)!r}]; "
                    "runpy.run_module('proxy', run_name='__main__', alter_sys=True)")
            return [sys.executable, "-S", "-c", code]

    print(f"\n== throughput: MCP tools/call, {clients} keep-alive clients, "
          f"{seconds:g} s per run ==")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-mcp-"))
    gw = gw2 = None
    try:
        up_port = free_port()
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve", str(up_port)]))
        wait_port(up_port)
        mitm_port = free_port()
        mitmdump = (shutil.which("mitmdump", path=os.path.dirname(sys.executable))
                    or shutil.which("mitmdump", path="/tmp/venv/bin") or "mitmdump")
        procs.append(subprocess.Popen(
            [mitmdump, "-q", "--listen-host", "127.0.0.1", "-p", str(mitm_port),
             "--set", f"confdir={tmp / 'mitm'}"], stdout=subprocess.DEVNULL))
        wait_port(mitm_port)

        keys = Keys()
        (tmp / "jwks.json").write_text(json.dumps(keys.jwks()))
        (tmp / "gw").mkdir()
        cfg = {"identity": {"issuers": [{"issuer": "https://issuer.test", "audience": "taskgate",
                                         "jwks_file": str(tmp / "jwks.json")}]},
               "workloads": {WORKLOAD: {"standing": [
                   {"id": "bench-mcp", "host": "127.0.0.1", "port": up_port, "scheme": "http",
                    "paths": ["/mcp"], "mcp": {"tools": ["search_docs"],
                                               "args": {"limit": {"maximum": 50}}}},
                   {"id": "bench-plain", "host": "127.0.0.1", "port": up_port, "scheme": "http",
                    "methods": ["POST"], "paths": ["/plain"]}]}}}
        gw = Gateway(tmp / "gw", cfg).start()
        # The same gateway with the compiled scanner kept out (proxy/mcp/_scan.c): every
        # body takes the Python readers, as on a build without a C compiler.
        (tmp / "gw2").mkdir()
        gw2 = NoScanner(tmp / "gw2", cfg).start()
        token = keys.token(ttl=3600)

        url = f"http://127.0.0.1:{up_port}/mcp"
        small = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "search_docs", "arguments": {"query": "taskgate", "limit": 5}}}).encode()
        big = body_100k("1,250 small objects")
        targets = (("direct (no proxy)", None, "/mcp", None),
                   ("plain mitmdump", f"http://127.0.0.1:{mitm_port}", "/mcp", procs[1].pid),
                   ("taskgate, plain rule", gw.proxy_url_with(token), "/plain", gw.proc.pid),
                   ("taskgate, MCP rule", gw.proxy_url_with(token), "/mcp", gw.proc.pid),
                   ("MCP rule, no scanner", gw2.proxy_url_with(token), "/mcp", gw2.proc.pid))
        for label, body in (("small tools/call", small), ("100 KB tools/call", big)):
            print(f"  {label} ({len(body):,} B), best of {rounds} interleaved runs; proxy CPU "
                  "per call (all threads, median of the runs):")
            runs: dict[str, list[tuple[float, float]]] = {t[0]: [] for t in targets}
            cpu: dict[str, list[float]] = {t[0]: [] for t in targets}
            for _ in range(rounds):  # interleaved, so a busy moment hits every target
                for name, proxy, path, pid in targets:
                    cpu0 = cpu_seconds(pid) if pid else 0.0
                    rps, p50, calls = asyncio.run(load(url.replace("/mcp", path), proxy,
                                                       seconds, clients, body))
                    runs[name].append((rps, p50))
                    if pid:  # the warm-up calls count too: one per client
                        cpu[name].append((cpu_seconds(pid) - cpu0) / (calls + clients))
            base = max(runs["plain mitmdump"])[0]
            base_cpu = statistics.median(cpu["plain mitmdump"])
            for name, proxy, _, pid in targets:
                rps, p50 = max(runs[name])
                rel = f"  ({rps / base * 100:5.1f}% of mitmdump)" if proxy else ""
                per = statistics.median(cpu[name]) if pid else 0.0
                cpu_txt = (f"   CPU {per * 1e6:5.0f} µs/call ({base_cpu / per:4.2f}× "
                           "mitmdump's calls per CPU-second)") if pid else ""
                print(f"    {name:<22} {rps:8.0f} calls/s   median {p50:6.2f} ms{rel}{cpu_txt}")
        records = sum(1 for _ in gw.audit_path.open())
        print(f"  taskgate wrote {records:,} audit records")
    finally:
        for g in (gw, gw2):
            if g is not None:
                g.stop()
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per target")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    bench_decision(args.rounds)
    bench_throughput(args.seconds, args.clients, args.runs)


if __name__ == "__main__":
    main()
