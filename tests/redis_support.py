"""A private Redis for the shared-state tests: Debian's ``redis-server`` on a free
loopback port with its own temp dir, started and stopped by the test that needs it.

Never a shared instance: each :class:`RedisServer` is a fresh, empty database, and
:meth:`RedisServer.stop` / :meth:`RedisServer.start` let a test take Redis away and
bring it back (with ``persist=True`` the data survives the restart, as with AOF).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


class PortTaken(RuntimeError):
    pass


class RedisServer:
    """One ``redis-server`` process; ``url`` is what a taskgate config names."""

    def __init__(self, *, persist: bool = False, password: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="taskgate-redis-")
        self.port = free_port()
        self.persist = persist
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) it; a port taken meanwhile (see free_port) means another."""
        for _ in range(3):
            try:
                return self._start()
            except PortTaken:
                self.port = free_port()
        raise RuntimeError("redis-server found no free port in 3 tries")

    def _start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--daemonize", "no",
                "--maxmemory-policy", "noeviction",
                "--appendonly", "yes" if self.persist else "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                if "Address already in use" in err:
                    raise PortTaken(err)
                raise RuntimeError(f"redis-server exited: {err[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL): the gateway must see Redis gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def redis_server(**kwargs: object) -> Iterator[RedisServer]:
    """A started private Redis, removed afterwards."""
    server = RedisServer(**kwargs)  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.close()
