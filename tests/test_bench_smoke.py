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
