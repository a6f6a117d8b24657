"""Benchmark: plain mitmdump vs taskgate, HTTP and HTTPS keep-alive, on loopback.

    python bench/run.py [--requests N] [--concurrency C] [--rounds R] ...

One run starts a local aiohttp upstream (HTTP, and HTTPS with a trustme CA made
now), plain ``mitmdump``, ``taskgate run`` (a trusted issuer, a workload whose
standing rule admits the upstream: identity, rule and audit on every call) and
``mitm-min`` (taskgate's embedded mitmproxy without taskgate's addons). For each
scheme it measures, in rotating order for R rounds, the same client (C keep-alive
connections, N requests after a warm-up, capped in time) direct to the upstream
(the ceiling of client + upstream) and through each proxy, and prints the median
req/s, p50 and p99 of the rounds, the proxy's CPU per request, and the ratios
taskgate/mitmdump (the target) and taskgate/mitm-min (the cost of taskgate's own
addons). ``--compare CHECKOUT`` adds taskgate from another checkout (row ``other``)
to the same rounds, and the ratio taskgate/other: a change against its base, paired
round by round (the machine's drift between runs is larger than most changes).
Exit status 1 if any request failed or the audit log missed a call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `proxy` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench.fixtures import Files, machine_facts, make_files, taskgate_config, tree_line
from bench.load import LoadResult, Target, percentile, run_load
from bench.procs import REPO, Proc, cpu_seconds, free_port, start_upstream

PATH = "/bench/items/42"
PATH_GLOB = "/bench/**"
# The targets of issue 12: keep-alive taskgate/mitmdump and taskgate/mitm-min; and a
# new connection per call, taskgate/mitmdump.
TARGET_RATIO = 1.5
TARGET_MIN_RATIO = 0.8
TARGET_PER_CALL_RATIO = 1.0
PROXIES = ["mitmdump", "taskgate", "mitm-min"]
OTHER = "other"  # taskgate from another checkout (--compare), measured beside this one


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured run of one (scheme, target)."""

    rps: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_us: float | None  # CPU of the proxy process per request
    client_cpu: float  # fraction of one core the client used
    requests: int
    errors: int
    first_error: str | None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000,
                   help="measured requests per run (default 5000)")
    p.add_argument("--warmup", type=int, default=500,
                   help="requests before each measured run (default 500)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="keep-alive connections, one request in flight each (default 16)")
    p.add_argument("--duration", type=float, default=30.0,
                   help="time cap per measured run, seconds (default 30)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, proxies in alternating order; medians reported (default 3)")
    p.add_argument("--body-bytes", type=int, default=256,
                   help="size of the upstream's response body (default 256)")
    p.add_argument("--schemes", default="http,https", help="comma-separated (default both)")
    p.add_argument("--proxies", default=",".join(PROXIES),
                   help=f"comma-separated subset of {','.join(PROXIES)} (default all)")
    p.add_argument("--mitmdump", default=None,
                   help="mitmdump executable (default: next to this Python, else PATH)")
    p.add_argument("--connection-per-call", action="store_true",
                   help="every call on a new connection: for https its own CONNECT and "
                        "TLS handshakes (agents and CLIs that do not keep connections)")
    p.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT",
                   help="also run taskgate from another checkout (row 'other'), in the "
                        "same rounds: a change measured against its base, paired")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, audit)")
    args = p.parse_args(argv)
    args.schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not set(args.schemes) <= {"http", "https"} or not args.schemes:
        p.error("--schemes takes http, https or both")
    args.proxies = [s.strip() for s in args.proxies.split(",") if s.strip()]
    if not set(args.proxies) <= set(PROXIES) or not args.proxies:
        p.error(f"--proxies takes some of {', '.join(PROXIES)}")
    if args.compare is not None:
        args.compare = args.compare.resolve()
        if not (args.compare / "proxy" / "__main__.py").is_file() or \
                not (args.compare / "bench" / "tree.py").is_file():
            p.error(f"--compare {args.compare}: not a taskgate checkout")
        args.proxies.append(OTHER)
    if min(args.requests, args.concurrency, args.rounds) < 1 or args.duration <= 0:
        p.error("--requests, --concurrency, --rounds and --duration must be positive")
    return args


def find_mitmdump(explicit: str | None) -> str:
    beside = Path(sys.executable).with_name("mitmdump")
    found = explicit or (str(beside) if beside.exists() else shutil.which("mitmdump"))
    if not found:
        sys.exit("mitmdump not found; pass --mitmdump PATH")
    return found


class Bench:
    """The processes and targets of one benchmark, and the runs over them."""

    def __init__(self, args: argparse.Namespace, files: Files) -> None:
        self.args = args
        self.files = files
        self.procs: list[Proc] = []
        self.upstream_proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.proxy_ca: dict[str, Path] = {}
        self.calls: dict[str, int] = {}  # successful calls made through each target
        self.audit_path: Path | None = None

    def start(self) -> None:
        """Start the upstream and the proxies asked for; return once all listen."""
        f, root = self.files, self.files.root
        self.upstream_proc, http_port, https_port = start_upstream(
            f.upstream_cert, f.upstream_key, self.args.body_bytes, root)
        self.ports.update(http=http_port, https=https_port)
        for name in self.args.proxies:
            self.ports[name] = free_port()
        # taskgate's config also tells mitm-min its options and upstream trust.
        config = taskgate_config(f, self.ports.get("taskgate", 0) or free_port(), free_port(),
                                 http_port, https_port, PATH_GLOB)
        config_path = root / "taskgate.yaml"  # JSON is YAML
        config_path.write_text(json.dumps(config, indent=2))
        self.audit_path = Path(config["audit"]["path"])
        mitm_conf, min_home = root / "mitmdump-conf", root / "mitm-min-home"
        other_home, other_path = root / "other-home", root / "other.yaml"
        if OTHER in self.args.proxies:  # the same config; its own ports, home, audit log
            other = {**taskgate_config(f, self.ports[OTHER], free_port(), http_port,
                                       https_port, PATH_GLOB),
                     "home": str(other_home), "audit": {"path": str(other_home / "audit.jsonl")}}
            other_path.write_text(json.dumps(other, indent=2))
        self.proxy_ca = {
            "mitmdump": mitm_conf / "mitmproxy-ca-cert.pem",
            "taskgate": Path(config["home"]) / "ca" / "mitmproxy-ca-cert.pem",
            "mitm-min": min_home / "ca" / "mitmproxy-ca-cert.pem",
            OTHER: other_home / "ca" / "mitmproxy-ca-cert.pem",
        }
        argv = {
            "mitmdump": [
                find_mitmdump(self.args.mitmdump), "-q", "--mode", "regular",
                "--listen-host", "127.0.0.1", "-p", str(self.ports.get("mitmdump")),
                "--set", f"confdir={mitm_conf}", "--set", "connection_strategy=lazy",
                "--set", f"ssl_verify_upstream_trusted_ca={f.upstream_ca}"],
            "taskgate": [sys.executable, "-m", "bench.tree", "proxy", "run",
                         "-c", str(config_path)],
            "mitm-min": [sys.executable, "-m", "bench.tree", "bench.mitm_min", str(config_path),
                         str(self.ports.get("mitm-min")), str(min_home)],
            OTHER: [sys.executable, "-m", "bench.tree", "proxy", "run", "-c", str(other_path)],
        }
        for name in self.args.proxies:
            tree = self.args.compare if name == OTHER else REPO
            self.procs.append(Proc(name, argv[name], root / f"{name}.log", cwd=root, tree=tree))
        for proc in self.procs:
            proc.wait_listening(self.ports[proc.name])

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        if self.upstream_proc is not None and self.upstream_proc.poll() is None:
            self.upstream_proc.terminate()
            self.upstream_proc.wait(15)

    def audit_check(self) -> str:
        """Did every call through taskgate leave exactly one 'allow' record?"""
        if "taskgate" not in self.args.proxies or self.audit_path is None:
            return "audit:     taskgate not measured"
        records = decisions = 0
        if self.audit_path.exists():
            with open(self.audit_path, "rb") as f:
                for line in f:
                    records += 1
                    decisions += b'"decision":"allow"' in line
        calls = self.calls.get("taskgate", 0)
        ok = records == calls == decisions
        return (f"audit:     {records} records, {decisions} 'allow', for {calls} calls "
                f"through taskgate: {'OK' if ok else 'MISMATCH'}")

    def target(self, scheme: str, via: str) -> Target:
        host = "127.0.0.1" if scheme == "http" else "localhost"
        per_call = self.args.connection_per_call
        if via == "direct":
            tls = ssl.create_default_context(cafile=str(self.files.upstream_ca))
            return Target(scheme, host, self.ports[scheme], PATH, tls=tls, per_call=per_call)
        tls = ssl.create_default_context(cafile=str(self.proxy_ca[via]))
        return Target(scheme, host, self.ports[scheme], PATH,
                      proxy=("127.0.0.1", self.ports[via]),
                      proxy_authorization=self.files.proxy_authorization, tls=tls,
                      per_call=per_call)

    def measure(self, runner: asyncio.Runner, scheme: str, via: str) -> Sample:
        proc = next((p for p in self.procs if p.name == via), None)
        cpu0 = cpu_seconds(proc.pid) if proc else 0.0
        a = self.args
        res: LoadResult = runner.run(run_load(
            self.target(scheme, via), total=a.requests, warmup=a.warmup,
            concurrency=a.concurrency, cap=a.duration))
        # The proxy's CPU includes the warm-up; count its requests too.
        cpu = cpu_seconds(proc.pid) - cpu0 if proc else None
        done = res.requests + res.warmup_requests
        self.calls[via] = self.calls.get(via, 0) + done
        return Sample(
            rps=res.rps, p50_ms=percentile(res.latencies, 50) * 1000,
            p99_ms=percentile(res.latencies, 99) * 1000,
            proxy_cpu_us=cpu / done * 1e6 if cpu is not None and res.requests else None,
            client_cpu=res.client_cpu / res.elapsed if res.elapsed else 0.0,
            requests=res.requests, errors=res.errors, first_error=res.first_error)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ratio_line(scheme: str, tg: list[Sample], base: str, other: list[Sample],
                goal: float | None) -> str:
    """taskgate's median req/s over ``base``'s, the per-round ratios, and latency ratios."""
    ratio = median([s.rps for s in tg]) / (median([s.rps for s in other]) or float("nan"))
    per_round = " ".join(f"{t.rps / o.rps:.2f}" if o.rps else "nan"
                         for t, o in zip(tg, other, strict=True))
    p50 = median([s.p50_ms for s in tg]) / median([s.p50_ms for s in other])
    p99 = median([s.p99_ms for s in tg]) / median([s.p99_ms for s in other])
    verdict = ("" if goal is None else
               f"; target >= {goal}x {'met' if ratio >= goal else 'MISSED'}")
    return (f"ratio taskgate/{base:<8} {scheme:<5}: {ratio:.2f}x req/s "
            f"(rounds {per_round}; latency p50 {p50:.2f}x, p99 {p99:.2f}x){verdict}")


def report(args: argparse.Namespace, results: dict[tuple[str, str], list[Sample]]) -> list[str]:
    lines = [f"{'scheme':<7}{'target':<10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'proxy CPU/req':>15}{'client CPU':>12}{'errors':>8}"]
    for (scheme, via), samples in results.items():
        cpu = [s.proxy_cpu_us for s in samples if s.proxy_cpu_us is not None]
        lines.append(
            f"{scheme:<7}{via:<10}{median([s.rps for s in samples]):>9.0f}"
            f"{median([s.p50_ms for s in samples]):>9.2f}"
            f"{median([s.p99_ms for s in samples]):>9.2f}"
            f"{(f'{median(cpu):.0f} us' if cpu else '-'):>15}"
            f"{median([s.client_cpu for s in samples]) * 100:>11.0f}%"
            f"{sum(s.errors for s in samples):>8}")
    lines.append("")
    for scheme in args.schemes:
        tg = results.get((scheme, "taskgate"))
        goals = (((("mitmdump", TARGET_PER_CALL_RATIO), ("mitm-min", None)))
                 if args.connection_per_call else
                 (("mitmdump", TARGET_RATIO), ("mitm-min", TARGET_MIN_RATIO)))
        for base, goal in (*goals, (OTHER, None)):
            if tg is None or (scheme, base) not in results:
                continue
            lines.append(_ratio_line(scheme, tg, base, results[(scheme, base)], goal))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="taskgate-bench-"))
    print("\n".join(machine_facts(REPO)))
    if args.compare is not None:
        print(f"other:     {tree_line(args.compare)}")
    conns = ("connections, a new one per call (CONNECT + TLS for https)"
             if args.connection_per_call else "keep-alive connections")
    print(f"load:      {args.concurrency} {conns}, {args.requests} requests "
          f"per run after {args.warmup} warm-up, cap {args.duration:g}s per run, "
          f"{args.rounds} round(s), medians; {args.body_bytes}-byte responses", flush=True)
    results: dict[tuple[str, str], list[Sample]] = {}
    bench: Bench | None = None
    try:
        bench = Bench(args, make_files(root))
        bench.start()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            for rnd in range(args.rounds):
                shift = rnd % len(args.proxies)
                proxies = args.proxies[shift:] + args.proxies[:shift]
                for scheme in args.schemes:
                    for via in ["direct", *proxies]:
                        s = bench.measure(runner, scheme, via)
                        results.setdefault((scheme, via), []).append(s)
                        print(f"  round {rnd + 1} {scheme:<5} {via:<9} {s.rps:8.0f} req/s "
                              f"p50 {s.p50_ms:.2f} ms p99 {s.p99_ms:.2f} ms"
                              + (f"  errors {s.errors}: {s.first_error}" if s.errors else ""),
                              flush=True)
        audit = bench.audit_check()
    finally:
        if bench is not None:
            bench.stop()
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    order = [(sch, via) for sch in args.schemes for via in ("direct", *PROXIES, OTHER)
             if (sch, via) in results]
    print()
    print("\n".join(report(args, {k: results[k] for k in order})))
    print(audit)
    print("load avg at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    failed = sum(s.errors for samples in results.values() for s in samples)
    if failed:
        print(f"{failed} requests failed; see the first error of each run above", file=sys.stderr)
    return 1 if failed or audit.endswith("MISMATCH") else 0


if __name__ == "__main__":
    sys.exit(main())
