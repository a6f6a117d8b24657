"""Benchmark workload-token identification at scale: a JWKS of 50 keys, 1,000 distinct
tokens a minute, and the verified-token cache that keeps them cheap.

    PYTHONPATH=. python bench/bench_identity.py [--rate 1000] [--new-per-minute 1000]
                                                [--call-cpu-us 1125]

In-process, the core only (``proxy.identity``): a ``WorkloadIssuer`` whose JWKS
holds 50 keys (RSA-2048, RS256 — what Kubernetes and most OIDC issuers publish),
and a simulated minute of ``--rate`` calls a second, each carrying a workload
token. Three runs over the same minute, CPU time measured (``process_time``):

* **one token**: every call carries the same token (the floor: a cache hit);
* **churn**: ``--new-per-minute`` tokens appear during the minute, spread evenly,
  each signed by one of the 50 keys; every other call reuses a token already seen
  (a uniformly random one), so each new token is verified once and then hit;
* **churn, no cache**: the same calls with the cache switched off (size 0).

It prints CPU per call, the extra CPU churn costs per call over "one token",
and that extra as a share of one gateway call's CPU (``--call-cpu-us``: the proxy
CPU per request bench/run.py measured for taskgate, HTTPS keep-alive) — the
throughput a CPU-bound gateway loses. Then the memory one cached token takes
(tracemalloc, 100,000 entries), which sizes the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.identity import Caller, Identity, JwksKeys, WorkloadIssuer  # noqa: E402
from proxy.identity._jwt import DEFAULT_CACHE_SIZE, TokenCache  # noqa: E402

ISSUER = "https://issuer.bench"
AUDIENCE = "taskgate"
KEYS = 50


def make_keys(n: int) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """``n`` RSA keys: (kid, private key) pairs and the JWKS publishing them."""
    private, published = [], []
    for i in range(n):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(),
                                                                 as_dict=True)
        jwk.update(kid=f"key-{i}", use="sig", alg="RS256")
        private.append((f"key-{i}", key))
        published.append(jwk)
    return private, {"keys": published}


def token(kid: str, key: Any, sub: str, now: float) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": int(now),
              "exp": int(now) + 3600}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def calls_for_a_minute(rate: int, new: int, keys: list[tuple[str, Any]],
                       rnd: random.Random) -> list[str]:
    """A minute of Proxy-Authorization values: ``new`` first sightings, spread evenly."""
    now = time.time()
    total = rate * 60
    every = max(total // max(new, 1), 1)
    seen: list[str] = []
    out = []
    for i in range(total):
        if i % every == 0 and len(seen) < new:
            kid, key = keys[len(seen) % len(keys)]
            seen.append("Bearer " + token(kid, key, f"spiffe://bench/wl-{len(seen)}", now))
            out.append(seen[-1])
        else:
            out.append(seen[rnd.randrange(len(seen))])
    return out


async def cpu_per_call(identity: Identity, calls: list[str]) -> float:
    t0 = time.process_time()
    for value in calls:
        await identity.identify(value)
    return (time.process_time() - t0) / len(calls)


def identity(jwks: dict[str, Any], cache_size: int) -> Identity:
    issuer = WorkloadIssuer(ISSUER, AUDIENCE, JwksKeys(source="bench", initial=jwks))
    return Identity([issuer], cache_size=cache_size)


def bytes_per_entry(n: int = 100_000) -> float:
    """Memory one cached token takes: its key, its Caller, the cache's bookkeeping."""
    now = time.time()
    workloads = [f"spiffe://cluster.local/ns/agents/sa/wl-{i:06d}" for i in range(n)]
    cache = TokenCache(n)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, wl in enumerate(workloads):
        cache.put(TokenCache.key(f"token-{i}"), Caller(wl, ISSUER, now + 3600, key="k" * 64))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


async def run(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    keys, jwks = make_keys(KEYS)
    print(f"{KEYS} RSA-2048 keys made in {time.perf_counter() - t0:.1f} s; a minute at "
          f"{args.rate} calls/s with {args.new_per_minute} new tokens "
          f"(one in {args.rate * 60 // max(args.new_per_minute, 1)} calls is a first sight)")
    rnd = random.Random(1)
    churn = calls_for_a_minute(args.rate, args.new_per_minute, keys, rnd)
    one = [churn[0]] * len(churn)
    results: dict[str, float] = {}
    for name, calls, size in (("one token", one, DEFAULT_CACHE_SIZE),
                              ("churn", churn, DEFAULT_CACHE_SIZE),
                              ("churn, no cache", churn[: len(churn) // 20], 0)):
        best = min([await cpu_per_call(identity(jwks, size), calls) for _ in range(2)])
        results[name] = best
    base = results["one token"]
    print(f"{'run':<18} {'CPU/call':>10} {'extra/call':>11} {'share of a call':>16}")
    for name, per in results.items():
        extra = per - base
        print(f"{name:<18} {per * 1e6:8.2f} µs {extra * 1e6:8.2f} µs "
              f"{extra * 1e6 / args.call_cpu_us * 100:14.2f} %")
    per_entry = bytes_per_entry()
    print(f"cache: {per_entry:.0f} bytes per cached token; the default size "
          f"{DEFAULT_CACHE_SIZE:,} holds {DEFAULT_CACHE_SIZE * per_entry / 2**20:.0f} MB, "
          f"{DEFAULT_CACHE_SIZE / max(args.new_per_minute, 1) / 60:.1f} h of "
          f"{args.new_per_minute} new tokens a minute")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=1000, help="calls per second")
    ap.add_argument("--new-per-minute", type=int, default=1000)
    ap.add_argument("--call-cpu-us", type=float, default=1125.0,
                    help="proxy CPU per gateway call (bench/run.py), for the share")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
