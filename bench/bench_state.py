"""Benchmark the state backends: per-call cost of Redis vs SQLite at 10, 10k, 100k tasks.

    PYTHONPATH=. python bench/bench_state.py [--sizes 10,10000,100000] [--calls 5000]

For each backend and size, in process (the core only, no proxy): a task registry
loaded with N tasks (SQLite: ``tasks.db`` under a temp home; Redis: a private
``redis-server`` on loopback, started here, AOF off), then for random tasks one call
at a time, the state step of a budgeted call as the gateway runs it:

    Policy.check(caller)  (exists, live; Redis: the copy is fresh)
    Registry.admit(...)   (the budget: SQLite group-committed write / Redis Lua script)

and the same with 32 callers at once (throughput). Prints p50/p99 per call and the
Redis − SQLite difference of the p50s (the issue's target: ≤ 0.3 ms, flat in N).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_tasks import CEILING, WL, make_rows  # noqa: E402
from proxy.config import Config, WorkloadConfig  # noqa: E402
from proxy.identity import Caller, Identity, TaskKeys  # noqa: E402
from proxy.policy import Call, parse_rules  # noqa: E402
from proxy.store import RedisState, TaskStore  # noqa: E402
from proxy.tasks import SharedTaskRegistry, TaskPolicy, TaskRegistry  # noqa: E402
from tests.redis_support import RedisServer  # noqa: E402


def _call(i: int) -> Call:
    return Call("GET", "https", "api.github.com", 443, f"/repos/acme/repo{i}/issues/{i % 97}")


async def _registry(backend: str, n: int, home: Path, redis_url: str
                    ) -> tuple[TaskRegistry, list[str]]:
    """The loaded registry, and the task ids in the order of their rules' index."""
    await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True)
    keys = TaskKeys.load_or_create(str(home / "task-keys.json"))
    config = Config(home=str(home), workloads={
        WL: WorkloadConfig(owner="platform@acme.dev", ceiling=parse_rules(CEILING))})
    rows = make_rows(n, keys.current)
    reg: TaskRegistry
    if backend == "sqlite":
        store = TaskStore(str(home / "tasks.db"))
        await store.start()
        for i in range(0, n, 20_000):
            await store.insert_many(rows[i:i + 20_000])
        await store.close()
        reg = TaskRegistry(config, Identity([]), TaskStore(str(home / "tasks.db")), keys)
    else:
        prefix = f"bench-{n}:"
        filler = RedisState(redis_url, password=None, prefix=prefix, replica="filler")
        for i in range(0, n, 5_000):
            await filler.insert_many(rows[i:i + 5_000])
        await filler.close()
        reg = SharedTaskRegistry(config, Identity([]),
                                 RedisState(redis_url, password=None, prefix=prefix,
                                            replica="bench"), keys)
    await reg.load()
    gc.collect()
    gc.freeze()  # as the gateway does once loaded
    for _ in range(1200):  # Redis: loading may go on after start(), and a loop stalled
        if reg.store.healthy:  # by the collection waits for its next PONG (not ready)
            break
        await asyncio.sleep(0.05)
    assert len(reg.tasks) == n, (backend, len(reg.tasks))
    return reg, [r.id for r in rows]


async def measure(backend: str, n: int, calls: int, tmp: Path, redis_url: str
                  ) -> dict[str, Any]:
    t0 = time.perf_counter()
    reg, ids = await _registry(backend, n, tmp / f"{backend}-{n}", redis_url)
    load_s = time.perf_counter() - t0
    policy = TaskPolicy(reg.config, reg)
    tasks = [reg.tasks[tid] for tid in ids]
    callers = [Caller(workload=t.workload, issuer="urn:taskgate:tasks",
                      expires_at=t.expires_at, task=t.id, owner=t.owner) for t in tasks]
    rnd = random.Random(7)

    async def one(i: int) -> float:
        c = callers[i]
        t = time.perf_counter()
        policy.check(c)
        decision = policy.rules_for(c).decide(_call(i))
        out = await policy.admit(c, decision, uuid.uuid4().hex)
        took = time.perf_counter() - t
        assert out.allowed, out.reason
        return took

    for _ in range(200):  # warm: globs compiled, connections open, scripts loaded
        await one(rnd.randrange(n))
    gc.collect()
    serial = sorted([await one(rnd.randrange(n)) for _ in range(calls)])
    t0 = time.perf_counter()
    for _ in range(calls // 32):
        await asyncio.gather(*(one(rnd.randrange(n)) for _ in range(32)))
    rate = (calls // 32) * 32 / (time.perf_counter() - t0)
    await reg.close()
    return {"backend": backend, "n": n, "load_s": load_s,
            "p50": statistics.median(serial), "p99": serial[int(len(serial) * 0.99)],
            "rate": rate}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,10000,100000")
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    server = RedisServer()
    server.start()
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="taskgate-bench-state-") as d:
            for n in sizes:
                for backend in ("sqlite", "redis"):
                    results.append(await measure(backend, n, args.calls, Path(d),
                                                 server.url))
    finally:
        server.close()
    print(f"{'backend':8} {'tasks':>7} {'load s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'calls/s @32':>11}")
    for r in results:
        print(f"{r['backend']:8} {r['n']:>7} {r['load_s']:>7.2f} {r['p50'] * 1e3:>7.3f} "
              f"{r['p99'] * 1e3:>7.3f} {r['rate']:>11.0f}")
    for n in sizes:
        s, r = (next(x for x in results if x["backend"] == b and x["n"] == n)
                for b in ("sqlite", "redis"))
        print(f"redis - sqlite p50 at {n:>6} tasks: {(r['p50'] - s['p50']) * 1e3:+.3f} ms")


if __name__ == "__main__":
    asyncio.run(main())
