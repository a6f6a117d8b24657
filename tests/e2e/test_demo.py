"""``taskgate demo`` end to end: the command as a user runs it, in a subprocess.

The demo starts its own gateway (a real ``taskgate run``), its upstreams and its
agent; these tests check what it prints, what it leaves behind (nothing, unless
``--home``), that the secret's value never shows, and that a tour that does not
go as scripted (here: a tampered audit log) fails the command.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support import PYTHON, python_env

SECRET = "demo_test_" + secrets.token_urlsafe(18)
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
              "https_proxy", "all_proxy", "no_proxy")
# (call, status, decision) of every step, in order.
EXPECTED = [
    ("ctl POST /v1/tasks (DELETE /repos/acme/**)", "422", "-"),
    ("ctl POST /v1/tasks (issues, docs, open PR)", "201", "-"),
    ("api GET /repos/acme/widgets/issues", "200", "allow"),
    ("api GET /repos/acme/widgets/collaborators", "403", "deny"),
    ("api DELETE /repos/acme/widgets/issues/42", "403", "deny"),
    ("api GET /repos/acme/widgets/issues/../../admin", "403", "deny"),
    ("mcp initialize", "200", "allow"),
    ("mcp notifications/initialized", "202", "allow"),
    ("mcp tools/list", "200", "allow"),
    ("mcp tools/call search_docs(limit=5)", "200", "allow"),
    ("mcp tools/call delete_repo(repo='acme/widgets')", "200", "deny"),
    ("mcp tools/call search_docs(limit=500)", "200", "deny"),
    ("api POST /repos/acme/widgets/pulls", "201", "approved"),
    ("ctl DELETE /v1/tasks/", "200", "-"),
    ("api GET /repos/acme/widgets/issues", "407", "deny"),
]
# What the audit log holds for the tour's proxied calls (the held call has two records).
LOGGED = ["allow", "deny", "deny", "deny", "allow", "allow", "allow", "allow", "deny", "deny",
          "held", "approved", "deny"]
ROW = re.compile(r"^\s*(\d+)  (.{50})  \s*(\S+)  (\S+)\s+(.*)$")


def demo_env() -> dict[str, str]:
    env = python_env(TASKGATE_DEMO_SECRET=SECRET)
    for var in (*PROXY_VARS, "TASKGATE_ADMIN_TOKEN"):
        env.pop(var, None)
    return env


def run_demo(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run([*PYTHON, "-m", "proxy", "demo", *args], cwd=cwd, env=demo_env(),
                          capture_output=True, text=True, timeout=90)
    return proc, time.monotonic() - start


def rows(out: str) -> list[tuple[str, str, str]]:
    found = []
    for line in out.splitlines():
        m = ROW.match(line)
        if m and m.group(3) != "ST":
            assert int(m.group(1)) == len(found) + 1, line
            found.append((m.group(2).strip(), m.group(3), m.group(4)))
    return found


def assert_scripted(out: str) -> None:
    got = rows(out)
    assert len(got) == len(EXPECTED), out
    for (call, status, decision), (want_call, want_status, want_decision) in zip(
            got, EXPECTED, strict=True):
        assert call.startswith(want_call), (call, want_call)
        assert (status, decision) == (want_status, want_decision), (call, out)
    assert "UNEXPECTED" not in out
    assert "-> delete_repo ran 0 times; repositories deleted: 0" in out
    assert "-> agent sees ['search_docs'] of the server's ['delete_repo', 'search_docs']" in out
    assert "upstream: Authorization valid" in out  # the secret was injected, and right
    assert "issue tracker: 2 requests: GET /repos/acme/widgets/issues (Authorization valid); " \
           "POST /repos/acme/widgets/pulls (Authorization valid)" in out
    assert "the secret's value: nowhere" in out
    assert "this tour's records by decision: deny 6, allow 5, held 1, approved 1" in out


def intro(out: str) -> dict[str, Any]:
    m = re.search(r"taskgate run \(pid (\d+)\): proxy 127\.0\.0\.1:(\d+), control plane "
                  r"http://127\.0\.0\.1:(\d+)", out)
    home = re.search(r"^  home +(\S+)", out, re.M)
    assert m and home, out
    return {"pid": int(m.group(1)), "ports": (int(m.group(2)), int(m.group(3))),
            "home": home.group(1)}


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (e.g. the demo's home)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def assert_cleaned_up(info: dict[str, Any], *, home_kept: bool) -> None:
    assert processes_naming(info["home"]) == [], "the gateway outlived the demo"
    for port in info["ports"]:
        with socket.socket() as s, contextlib.suppress(ConnectionRefusedError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
            raise AssertionError(f"port {port} still listens after the demo")
    assert Path(info["home"]).exists() == home_kept


def test_demo_tour(tmp_path: Path) -> None:
    proc, elapsed = run_demo(tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert elapsed < 30, f"the demo took {elapsed:.1f} s"
    assert_scripted(out)
    assert "taskgate audit verify: OK, intact: 13 records (seq 1..13)" in out
    assert "the tour went as scripted" in out
    assert SECRET not in out and SECRET not in proc.stderr
    info = intro(out)
    assert info["home"].startswith(tempfile.gettempdir())
    assert_cleaned_up(info, home_kept=False)
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYTHON, "-m", "proxy", *args], env=demo_env(), text=True,
                          capture_output=True, timeout=30)


def test_demo_home_kept_reused_and_a_tampered_log_fails(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first, _ = run_demo(tmp_path, "--home", str(home))
    assert first.returncode == 0, first.stdout + first.stderr
    second, _ = run_demo(tmp_path, "--home", str(home))  # the same home again
    assert second.returncode == 0, second.stdout + second.stderr
    assert_scripted(second.stdout)
    assert "taskgate audit verify: OK, intact: 26 records (seq 1..26)" in second.stdout
    assert_cleaned_up(intro(second.stdout), home_kept=True)
    config = home / "taskgate.yaml"
    assert f"taskgate logs -c {config} --task" in second.stdout

    verified = cli("audit", "verify", "-c", str(config))
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout
    task = re.search(r"--task ([0-9a-f]{32})", second.stdout)
    assert task
    logs = cli("logs", "-c", str(config), "--task", task.group(1), "--json")
    assert logs.returncode == 0, logs.stderr
    assert [orjson.loads(line)["decision"] for line in logs.stdout.splitlines()] == LOGGED
    for f in home.rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f

    # Security reviews this log: an edited record must fail the tour, loudly.
    audit = home / "audit.jsonl"
    lines = audit.read_bytes().splitlines(keepends=True)
    assert b'"decision":"deny"' in lines[1]
    lines[1] = lines[1].replace(b'"decision":"deny"', b'"decision":"allow"')
    audit.write_bytes(b"".join(lines))
    third, _ = run_demo(tmp_path, "--home", str(home))
    assert third.returncode == 1, third.stdout + third.stderr
    assert "taskgate audit verify: DAMAGED: edited" in third.stdout
    assert "the tour did NOT go as scripted" in third.stdout
    assert_cleaned_up(intro(third.stdout), home_kept=True)


def test_demo_serve_keeps_the_review_page_up_until_sigterm(tmp_path: Path) -> None:
    out_file = tmp_path / "out.txt"
    with open(out_file, "wb") as out:
        proc = subprocess.Popen([*PYTHON, "-m", "proxy", "demo", "--serve"], cwd=tmp_path,
                                env=demo_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "serving until Ctrl-C" not in out_file.read_text():
            assert proc.poll() is None, out_file.read_text()
            assert time.monotonic() < deadline, out_file.read_text()
            time.sleep(0.1)
        text = out_file.read_text()
        ui = re.search(r"(http://127\.0\.0\.1:\d+/ui)", text)
        assert ui, text
        page = httpx.get(ui.group(1), timeout=10, trust_env=False)
        assert page.status_code == 200 and "<form" in page.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out_file.read_text()
    assert_scripted(text)
    assert SECRET not in text
    assert_cleaned_up(intro(text), home_kept=False)
