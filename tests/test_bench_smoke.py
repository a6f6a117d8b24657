"""The benchmark runs end to end in seconds and prints what it promises, so it cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROW = r"^{scheme}\s+{via}\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+ us|-)\s+\d+%\s+0$"


def test_bench_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--requests", "60", "--warmup", "10",
         "--concurrency", "2", "--rounds", "1", "--duration", "20"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"^machine: +\d+ cores", out, re.M), out
    assert re.search(r"mitmproxy 12\.\d", out), out
    for scheme in ("http", "https"):
        for via in ("direct", "mitmdump", "taskgate", "mitm-min"):
            row = re.search(ROW.format(scheme=scheme, via=via), out, re.M)
            assert row is not None, f"no {scheme} {via} row in:\n{out}"
            assert int(row.group(1)) > 0 and float(row.group(2)) > 0, row.group(0)
        for base in ("mitmdump", "mitm-min"):
            ratio = re.search(rf"^ratio taskgate/{base}\s+{scheme}\s*: (\d+\.\d+)x req/s",
                              out, re.M)
            assert ratio is not None and float(ratio.group(1)) > 0, out
    audit = re.search(r"^audit: +(\d+) records, (\d+) 'allow', for (\d+) calls .*: OK$",
                      out, re.M)
    assert audit is not None and int(audit.group(1)) == 2 * (60 + 10), out


def test_bench_workers_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_workers.py"), "--requests", "60",
         "--warmup", "10", "--concurrency", "4", "--rounds", "1"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"^uptime before: .*load average", out, re.M), out
    for scheme in ("http", "https"):
        for workers in (1, 2):
            row = re.search(rf"^{scheme}\s+{workers}\s+(\d+)\s+\d+\.\d+", out, re.M)
            assert row is not None and int(row.group(1)) > 0, out
        assert re.search(rf"^ratio 2 workers/1 worker {scheme}\s*: \d+\.\d+x", out, re.M), out
    assert re.search(r"^errors: 0$", out, re.M), out
    for workers in (1, 2):  # every call audited, by the worker that served it
        assert re.search(rf"^audit workers={workers}: (\d+) 'allow' records for \1 calls "
                         r"\(.*\): OK$", out, re.M), out
def test_bench_smoke_connection_per_call() -> None:
    """Every call its own CONNECT and TLS handshakes: the mode runs, counts and audits."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--requests", "20", "--warmup", "4",
         "--concurrency", "2", "--rounds", "1", "--duration", "20", "--schemes", "https",
         "--proxies", "mitmdump,taskgate", "--connection-per-call"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "a new one per call (CONNECT + TLS for https)" in out, out
    for via in ("direct", "mitmdump", "taskgate"):
        row = re.search(ROW.format(scheme="https", via=via), out, re.M)
        assert row is not None and int(row.group(1)) > 0, f"no https {via} row in:\n{out}"
    assert re.search(r"^ratio taskgate/mitmdump\s+https: \d+\.\d+x req/s .*target >= 1\.0x",
                     out, re.M), out
    audit = re.search(r"^audit: +(\d+) records, (\d+) 'allow', for (\d+) calls .*: OK$",
                      out, re.M)
    assert audit is not None and int(audit.group(1)) == 20 + 4, out


def test_memory_bench_smoke() -> None:
    """Idle connections held and counted, streamed transfers measured, calls audited."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "memory.py"), "--connections", "40",
         "--parallel", "8", "--transfer-bytes", str(16 << 20), "--settle", "2"],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    held = re.search(r"^idle +40 held: proxy RSS (\d+) MB .*; (\d+)/(\d+) sampled still answer: "
                     r"target <= 1024 MB met$", out, re.M)
    assert held is not None and held.group(2) == held.group(3), out
    for kind in ("upload", "download"):
        assert re.search(rf"^{kind} +16 MB in .*target \+<= 64 MB met$", out, re.M), out
    assert re.search(r"^audit: +(\d+) 'allow' records for \1 calls through taskgate: OK$",
                     out, re.M), out


def test_bench_compares_another_checkout() -> None:
    """--compare runs taskgate from another checkout in the same rounds (here: this one)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--requests", "30", "--warmup", "5",
         "--concurrency", "2", "--rounds", "2", "--duration", "20", "--schemes", "http",
         "--proxies", "taskgate", "--compare", str(REPO)],
        capture_output=True, text=True, timeout=180, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(rf"^other: +{re.escape(str(REPO))} @ ", out, re.M), out
    row = re.search(ROW.format(scheme="http", via="other"), out, re.M)
    assert row is not None and int(row.group(1)) > 0, out
    ratio = re.search(r"^ratio taskgate/other\s+http\s*: (\d+\.\d+)x req/s \(rounds "
                      r"\d+\.\d+ \d+\.\d+;", out, re.M)
    assert ratio is not None and float(ratio.group(1)) > 0, out
    assert "target" not in ratio.group(0), out  # a comparison, not a goal


def test_bench_compare_refuses_what_is_not_a_checkout(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--compare", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "not a taskgate checkout" in proc.stderr, proc.stderr
