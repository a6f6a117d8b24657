"""The processes a benchmark run starts (upstream, mitmdump, taskgate), and their CPU time.

Every process is started here and stopped here, by its own pid, whatever
happens in between.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Proc", "cpu_seconds", "free_port", "start_upstream"]

REPO = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def child_env(tree: Path = REPO) -> dict[str, str]:
    """The environment for children: ``tree``'s code first (this repo's unless a
    benchmark compares another checkout), and no proxy variables."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path | None = None,
                 tree: Path = REPO) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, cwd=cwd, env=child_env(tree), stdout=self._out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def wait_listening(self, port: int, timeout: float = 30) -> None:
        """Until ``port`` accepts connections; a child that exits first is an error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n"
                                   f"{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} does not listen on {port} after {timeout}s:\n"
                           f"{self.output()}")

    def stop(self, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()


def start_upstream(cert: Path, key: Path, body_bytes: int, log_dir: Path,
                   timeout: float = 20, keepalive: float | None = None
                   ) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start ``bench.upstream``; return it with its HTTP and HTTPS ports."""
    log = open(log_dir / "upstream.log", "wb")  # noqa: SIM115 - the child owns it
    extra = [] if keepalive is None else [str(keepalive)]
    popen = subprocess.Popen([sys.executable, "-m", "bench.upstream", str(cert), str(key),
                              str(body_bytes), *extra], env=child_env(),
                             stdout=subprocess.PIPE,
                             stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    assert popen.stdout is not None
    ready, _, _ = select.select([popen.stdout], [], [], timeout)
    line = popen.stdout.readline().decode() if ready else ""
    if not line.startswith("ready "):
        popen.kill()
        popen.wait()
        raise RuntimeError(f"upstream did not start: {line!r}\n"
                           f"{(log_dir / 'upstream.log').read_text(errors='replace')}")
    _, http_port, https_port = line.split()
    return popen, int(http_port), int(https_port)
