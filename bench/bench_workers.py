"""Benchmark ``proxy.workers``: throughput of ``workers: 1`` vs ``workers: 2`` on this machine.

    python bench/bench_workers.py [--requests N] [--concurrency C] [--rounds R]

Starts the bench upstream, a private ``redis-server`` (``state.backend: redis``, which
workers need; both gateways use it, so they differ only in ``proxy.workers``), and
two gateways — one with 1 worker, one with 2 — each with a workload whose standing
rule admits the upstream (identity, rule and audit on every call). For each scheme
and round, in alternating order, the same client (C keep-alive connections, spread
over the workers by the kernel's ``SO_REUSEPORT`` hash) sends N requests through
each. Prints the median req/s, p50 and p99, the gateway's CPU per request (the
supervisor and its workers), the ratio 2 workers / 1 worker (target ≥ 1.6× on 2
cores), and ``uptime`` before and after: on a shared machine the load average says
how much of the two cores the gateways had.

The client runs in this process and needs CPU too: on 2 cores the ceiling for two
workers is below 2×, however well they scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `proxy` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench.fixtures import machine_facts, make_files, taskgate_config
from bench.load import Target, percentile, run_load
from bench.procs import REPO, Proc, cpu_seconds, free_port, start_upstream
from proxy.audit import host_logs, log_files

PATH = "/bench/items/42"
TARGET = 1.6


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the supervisor and its workers)."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            total += cpu_seconds(int(child))
        except OSError:
            continue
    return total


def audit_counts(audit_path: Path) -> dict[str, int]:
    """'allow' records per process log (``replica`` label) of one gateway."""
    counts: dict[str, int] = {}
    for log in host_logs(str(audit_path)):
        for file in log_files(log):
            with open(file, "rb") as f:
                for line in f:
                    if b'"decision":"allow"' in line:
                        label = json.loads(line).get("replica") or "?"
                        counts[label] = counts.get(label, 0) + 1
    return counts


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def start_redis(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(root), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--warmup", type=int, default=600)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--schemes", default="http,https")
    args = p.parse_args(argv)
    schemes = [s for s in args.schemes.split(",") if s]
    before = uptime()
    root = Path(tempfile.mkdtemp(prefix="taskgate-bench-workers-"))
    files = make_files(root)
    upstream, http_port, https_port = start_upstream(files.upstream_cert, files.upstream_key,
                                                     256, root)
    redis, redis_port = start_redis(root)
    gateways: dict[int, tuple[Proc, int, Path]] = {}
    calls = {1: 0, 2: 0}
    audits: dict[int, dict[str, int]] = {}
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    errors = 0
    try:
        for workers in (1, 2):
            home = root / f"w{workers}"
            home.mkdir()
            port = free_port()
            config = taskgate_config(files, port, free_port(), http_port, https_port,
                                     "/bench/**")
            config["home"] = str(home / "home")
            config["audit"] = {"path": str(home / "home" / "audit.jsonl")}
            config["proxy"] = {"workers": workers}
            config["state"] = {"backend": "redis",
                               "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                               "key_prefix": f"bench-w{workers}:"}
            path = home / "taskgate.yaml"
            path.write_text(json.dumps(config))
            proc = Proc(f"taskgate-w{workers}", [sys.executable, "-m", "bench.tree", "proxy",
                                                  "run", "-c", str(path)],
                        home / "taskgate.log", cwd=home)
            gateways[workers] = (proc, port, home / "home" / "ca" / "mitmproxy-ca-cert.pem")
        for proc, port, _ in gateways.values():
            proc.wait_listening(port)
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        with runner:
            for r in range(args.rounds):
                for scheme in schemes:
                    for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                        proc, port, ca = gateways[workers]
                        host = "127.0.0.1" if scheme == "http" else "localhost"
                        target = Target(scheme, host, http_port if scheme == "http"
                                        else https_port, PATH, proxy=("127.0.0.1", port),
                                        proxy_authorization=files.proxy_authorization,
                                        tls=ssl.create_default_context(cafile=str(ca)))
                        cpu0 = tree_cpu(proc.pid)
                        res = runner.run(run_load(target, total=args.requests,
                                                  warmup=args.warmup,
                                                  concurrency=args.concurrency,
                                                  cap=args.duration))
                        cpu = tree_cpu(proc.pid) - cpu0
                        done = res.requests + res.warmup_requests
                        calls[workers] += done
                        errors += res.errors
                        if res.errors:
                            print(f"{scheme} workers={workers}: {res.errors} errors, "
                                  f"first: {res.first_error}", file=sys.stderr)
                        results.setdefault((scheme, workers), []).append(
                            (res.rps, percentile(res.latencies, 50) * 1000,
                             percentile(res.latencies, 99) * 1000,
                             cpu / done * 1e6 if done else float("nan")))
    finally:
        for proc, _, _ in gateways.values():
            proc.stop()
        for workers in gateways:
            audits[workers] = audit_counts(root / f"w{workers}" / "home" / "audit.jsonl")
        for child in (upstream, redis):
            child.terminate()
            child.wait(15)
        shutil.rmtree(root, ignore_errors=True)
    after = uptime()
    print("\n".join(machine_facts(REPO)))
    print(f"uptime before: {before}\nuptime after:  {after}")
    print(f"runs: {args.rounds} rounds x {args.requests} requests, "
          f"{args.concurrency} connections\n")
    print(f"{'scheme':<7}{'workers':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'CPU/req':>10}")
    for (scheme, workers), runs in sorted(results.items()):
        rps, p50, p99, cpu = (statistics.median(x[i] for x in runs) for i in range(4))
        print(f"{scheme:<7}{workers:>8}{rps:>9.0f}{p50:>9.2f}{p99:>9.2f}{cpu:>7.0f} us")
    for scheme in schemes:
        one = statistics.median(x[0] for x in results[(scheme, 1)])
        two = statistics.median(x[0] for x in results[(scheme, 2)])
        ratio = two / one if one else 0.0
        print(f"ratio 2 workers/1 worker {scheme:<5}: {ratio:.2f}x req/s "
              f"(target >= {TARGET}x)")
    ok = True
    for workers, counts in audits.items():
        total = sum(counts.values())
        ok = ok and total == calls[workers]
        shares = ", ".join(f"{label}: {n}" for label, n in sorted(counts.items()))
        print(f"audit workers={workers}: {total} 'allow' records for {calls[workers]} calls "
              f"({shares}): {'OK' if total == calls[workers] else 'MISMATCH'}")
    print(f"errors: {errors}")
    return 1 if errors or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
