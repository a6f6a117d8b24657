"""Benchmark task grants: decision cost with 10, 10k and 100k active tasks, and the
gateway's memory (RSS) holding 100k tasks.

    PYTHONPATH=. python bench/bench_tasks.py [--sizes 10,10000,100000] [--calls 200000]
                                             [--no-gateway]

Part 1 (in-process, the core only): a registry loaded from a store holding N
tasks, each with its own rules (a task-specific path glob, so nothing is
shared between tasks: the worst case for interning). For random calls over
all N tasks it times

* ``decide``: ``Policy.check`` + ``Policy.rules_for`` + ``RuleSet.decide`` — the
  per-request authorization work on the event loop;
* ``identify+decide``: the same plus ``Identity.identify`` of a cached token;
* the first decision on a task (its globs compile on first use);
* ``admit``: the budget step, including the group-committed SQLite write,
  with 100 concurrent callers.

Part 2 (the real gateway): RSS of ``taskgate run`` with 0 and with 100k stored
tasks, its start-up time, and the median latency of calls through the proxy
with a task token, to show the end-to-end cost does not move either.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.audit import AuditLog  # noqa: E402
from proxy.config import Config, WorkloadConfig  # noqa: E402
from proxy.gateway import Gateway  # noqa: E402
from proxy.identity import Caller, Identity, TaskKeys, TaskTokenIssuer  # noqa: E402
from proxy.policy import Call, parse_rules  # noqa: E402
from proxy.store import TaskRow, TaskStore  # noqa: E402
from proxy.tasks import TaskPolicy, TaskRegistry  # noqa: E402

WL = "spiffe://acme.dev/agent/triage"
CEILING = [
    {"id": "gh", "host": "api.github.com", "methods": ["GET", "POST"], "paths": ["/repos/**"]},
    {"id": "docs", "host": "mcp.acme.dev", "paths": ["/mcp"],
     "mcp": {"tools": ["search_docs"], "args": {"limit": {"maximum": 50}}}},
]


def rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def task_rules(i: int) -> bytes:
    rules = [
        {"id": "read-issues", "host": "api.github.com", "methods": ["GET"],
         "paths": [f"/repos/acme/repo{i}/issues/**"]},
        {"id": "docs-search", "host": "mcp.acme.dev", "methods": ["DELETE", "GET", "POST"],
         "paths": ["/mcp"], "mcp": {"tools": ["search_docs"], "args": {"limit": {"maximum": 50}}}},
    ]
    return orjson.dumps(rules, option=orjson.OPT_SORT_KEYS)


def make_rows(n: int, kid: str, *, extra: list[TaskRow] | None = None) -> list[TaskRow]:
    now = time.time()
    rows = [TaskRow(uuid.uuid4().hex, WL, "alice@acme.dev", "bench", now, now + 86_000,
                    1_000_000, task_rules(i), kid) for i in range(n)]
    return rows + (extra or [])


def prepare_home(home: Path) -> TaskKeys:
    home.mkdir(parents=True, exist_ok=True)
    return TaskKeys.load_or_create(str(home / "task-keys.json"))


async def fill_store(home: Path, n: int, keys: TaskKeys,
                     extra: list[TaskRow] | None = None) -> TaskKeys:
    store = TaskStore(str(home / "tasks.db"))
    await store.start()
    rows = make_rows(n, keys.current, extra=extra)
    for i in range(0, len(rows), 20_000):
        await store.insert_many(rows[i:i + 20_000])
    await store.close()
    return keys


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:7.2f} µs"


# -- part 1: in-process ----------------------------------------------------------
async def decision_cost(n: int, calls: int, tmp: Path) -> dict[str, Any]:
    home = tmp / f"inproc-{n}"
    keys = await fill_store(home, n, await asyncio.to_thread(prepare_home, home))
    config = Config(home=str(home), workloads={
        WL: WorkloadConfig(owner="platform@acme.dev", ceiling=parse_rules(CEILING))})
    identity = Identity([])
    gc.collect()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    reg = TaskRegistry(config, identity, TaskStore(str(home / "tasks.db")), keys)
    await reg.load()
    load_s = time.perf_counter() - t0
    gc.collect()
    gc.freeze()  # as open_registry does after loading (proxy/tasks/_registry.py)
    rss_loaded = rss_mb() - rss0
    policy = TaskPolicy(config, reg)
    gw = Gateway(config, identity, policy, AuditLog(str(home / "audit.jsonl")))
    gw.identity.add_issuer(TaskTokenIssuer(keys, reg.get))

    tasks = list(reg.tasks.values())
    index = {t.id: i for i, t in enumerate(tasks)}
    # Tokens for a sample that fits the identity cache (10k entries): the cached path.
    now = time.time()
    headers = ["Bearer " + keys.sign(task_id=t.id, workload=t.workload,
                                     expires_at=t.expires_at, now=now)
               for t in tasks[: min(n, 5000)]]
    t0 = time.perf_counter()
    callers = [await gw.identity.identify(h) for h in headers]  # verified, now cached
    verify_s = (time.perf_counter() - t0) / len(headers)

    def call_for(task_index: int) -> Call:
        return Call("GET", "https", "api.github.com", 443,
                    f"/repos/acme/repo{task_index}/issues/{task_index % 97}")

    # First decision on each task: its path globs compile now.
    all_callers = [Caller(workload=t.workload, issuer="urn:taskgate:tasks",
                          expires_at=t.expires_at, task=t.id, owner=t.owner) for t in tasks]
    t0 = time.perf_counter()
    for i, c in enumerate(all_callers):
        policy.check(c)
        assert policy.rules_for(c).decide(call_for(i)).allowed
    first_s = (time.perf_counter() - t0) / n
    gc.collect()
    rss_warm = rss_mb() - rss0

    rnd = random.Random(1)
    work = [(all_callers[i], call_for(i)) for i in (rnd.randrange(n) for _ in range(calls))]
    hot = [(all_callers[i], call_for(i))
           for i in (rnd.randrange(min(n, 1000)) for _ in range(calls))]
    sample = [rnd.randrange(len(headers)) for _ in range(calls)]
    work2 = [(headers[i], call_for(index[callers[i].task or ""])) for i in sample]

    def decide_loop(work: list[tuple[Caller, Call]]) -> float:
        t0 = time.perf_counter()
        for c, call in work:
            policy.check(c)
            d = policy.rules_for(c).decide(call)
        assert d.allowed
        return (time.perf_counter() - t0) / calls

    async def ident_loop() -> float:
        t0 = time.perf_counter()
        for h, call in work2:
            c = await gw.identity.identify(h)
            policy.check(c)
            d = policy.rules_for(c).decide(call)
        assert d.allowed
        return (time.perf_counter() - t0) / calls

    decide_s = hot_s = ident_s = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        gc.collect()
        decide_s = min(decide_s, decide_loop(work))
        gc.collect()
        hot_s = min(hot_s, decide_loop(hot))
        gc.collect()
        ident_s = min(ident_s, await ident_loop())

    # admit: the budget step with its store write, 100 callers at once.
    lat: list[float] = []

    async def one(i: int) -> None:
        c = all_callers[i]
        decision = policy.rules_for(c).decide(call_for(i))
        t = time.perf_counter()
        out = await reg.admit(c, decision, uuid.uuid4().hex)
        lat.append(time.perf_counter() - t)
        assert out.allowed

    admits = 5000
    t0 = time.perf_counter()
    for _ in range(admits // 100):
        await asyncio.gather(*(one(rnd.randrange(n)) for _j in range(100)))
    admit_rate = admits / (time.perf_counter() - t0)
    lat.sort()
    await reg.close()
    gc.unfreeze()
    return {"n": n, "load_s": load_s, "rss_loaded": rss_loaded, "rss_warm": rss_warm,
            "first": first_s, "decide": decide_s, "identify_decide": ident_s,
            "verify": verify_s, "hot": hot_s,
            "admit_rate": admit_rate, "admit_p50": lat[len(lat) // 2],
            "admit_p99": lat[int(len(lat) * 0.99)], "store_commits": reg.store.commits}


# -- part 2: the real gateway --------------------------------------------------------
def run_gateway(home_dir: Path, upstream_port: int, n_tasks: int) -> dict[str, Any]:
    from tests.support import free_port

    proxy_port, control_port = free_port(), free_port()
    cfg = {"listen": {"proxy": f"127.0.0.1:{proxy_port}",
                      "control": f"127.0.0.1:{control_port}"},
           "workloads": {WL: {"owner": "platform@acme.dev", "ceiling": CEILING + [
               {"id": "bench-up", "host": "127.0.0.1", "port": upstream_port,
                "scheme": "http", "methods": ["GET"], "paths": ["/**"]}]}}}
    (home_dir / "taskgate.yaml").write_text(yaml.safe_dump(cfg))
    now = time.time()
    probe = TaskRow(uuid.uuid4().hex, WL, "alice@acme.dev", "probe", now, now + 86_000, None,
                    orjson.dumps([{"host": "127.0.0.1", "id": "up", "methods": ["GET"],
                                   "paths": ["/**"], "port": upstream_port,
                                   "scheme": "http"}]), "")
    keys = prepare_home(home_dir / ".taskgate")
    probe.kid = keys.current
    asyncio.run(fill_store(home_dir / ".taskgate", n_tasks, keys, extra=[probe]))
    token = keys.sign(task_id=probe.id, workload=WL, expires_at=probe.expires_at, now=now)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO)
    log = open(home_dir / "gateway.log", "wb")  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", "taskgate.yaml"],
                            cwd=home_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError((home_dir / "gateway.log").read_text())
            try:
                if httpx.get(f"http://127.0.0.1:{control_port}/readyz", timeout=1
                             ).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        ready_s = time.perf_counter() - t0
        rss_idle = rss_mb(proc.pid)
        lat = []
        proxy = f"http://{probe.id}:{token}@127.0.0.1:{proxy_port}"
        with httpx.Client(proxy=proxy, trust_env=False, timeout=10) as c:
            for i in range(300):
                t = time.perf_counter()
                r = c.get(f"http://127.0.0.1:{upstream_port}/allowed/{i}")
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
        lat = lat[50:]
        return {"n": n_tasks, "ready_s": ready_s, "rss_idle": rss_idle,
                "rss_after": rss_mb(proc.pid), "p50": statistics.median(lat),
                "p90": sorted(lat)[int(len(lat) * 0.9)]}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,10000,100000")
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--gateway-tasks", type=int, default=100_000)
    ap.add_argument("--no-gateway", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"{args.calls} random calls per size\n")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("Part 1 - authorization decision cost in the core (per call)")
        print(f"{'tasks':>8} {'decide':>11} {'decide hot':>11} {'identify+decide':>16} "
              f"{'verify':>11} "
              f"{'first call':>11} "
              f"{'admit p50':>11} {'admit p99':>11} {'admits/s':>9} {'load':>7} "
              f"{'RSS':>9} {'RSS warm':>9}")
        for n in sizes:
            r = asyncio.run(decision_cost(n, args.calls, tmp))
            print(f"{n:>8} {fmt_us(r['decide']):>11} {fmt_us(r['hot']):>11} "
                  f"{fmt_us(r['identify_decide']):>16} "
                  f"{fmt_us(r['verify']):>11} "
                  f"{fmt_us(r['first']):>11} {fmt_us(r['admit_p50']):>11} "
                  f"{fmt_us(r['admit_p99']):>11} {r['admit_rate']:>9.0f} "
                  f"{r['load_s']:>6.2f}s {r['rss_loaded']:>7.1f}MB {r['rss_warm']:>7.1f}MB",
                  flush=True)
        print("  decide = check + rules_for + RuleSet.decide, random calls over all tasks;"
              "\n  decide hot = the same over 1000 of them (the growth of 'decide' with N is "
              "memory\n  locality, not lookups); identify adds the cached-token "
              "lookup (best of 3 runs);\n  verify = a task token's first verification (EdDSA);"
              "\n  first call = first decision on a task (compiles its globs); admit = "
              "budget step incl.\n  the SQLite group commit, 100 concurrent; RSS = growth of "
              "this process after loading\n  the tasks (warm: after every task was used once)\n")
        if args.no_gateway:
            return
        from tests.support import Upstream

        up = Upstream().start()
        try:
            print("Part 2 - the real gateway (taskgate run), calls through the proxy")
            print(f"{'tasks':>8} {'ready in':>9} {'RSS idle':>9} {'RSS after':>10} "
                  f"{'call p50':>10} {'call p90':>10}")
            for n in (0, args.gateway_tasks):
                home = tmp / f"gw-{n}"
                home.mkdir()
                r = run_gateway(home, up.http_port, n)
                print(f"{n:>8} {r['ready_s']:>8.2f}s {r['rss_idle']:>7.1f}MB "
                      f"{r['rss_after']:>8.1f}MB {r['p50'] * 1000:>8.2f}ms "
                      f"{r['p90'] * 1000:>8.2f}ms", flush=True)
        finally:
            up.stop()


if __name__ == "__main__":
    main()
