"""``proxy.workers: N`` > 1: one supervisor process, N worker processes.

One Python process uses one core; workers use the others. The supervisor:

- reserves the proxy port: binds ``listen.proxy`` with ``SO_REUSEPORT`` (port 0: the
  OS picks one), never listens on it, and starts each worker with that port; the
  workers listen on it with ``SO_REUSEPORT`` too (proxy/server.py
  :func:`~proxy.server.share_proxy_port`), and the kernel spreads connections over
  them;
- runs the one control plane, with services of its own (tasks, approvals, its audit
  log; shared with the workers through the state backend): ``/readyz`` is ready when
  every worker is, ``/metrics`` merges every worker's
  (:func:`~proxy.gateway.merge_metrics`), which it reads from each worker's Unix
  socket in home (:func:`~proxy.server.worker_socket`);
- restarts a worker that exits while it runs (a crash, a kill), after
  :func:`backoff` — 0.5 s, doubling up to 30 s while it keeps failing within 30 s of
  its start;
- on SIGHUP (or POST /v1/reload) reloads its own services, then every worker;
  stops on any other stop signal
  (proxy/gateway/_signals.py): the control plane stops listening, every worker gets
  SIGTERM and drains its calls (``proxy.shutdown_grace_seconds``); a worker still
  running 15 s after that is killed. Exit 0 when every worker stopped cleanly, 1
  otherwise, 2 when it could not start.

A worker whose supervisor dies stops by itself (it watches its parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

import aiohttp
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from proxy.audit import Replica
from proxy.config import Config
from proxy.control import ControlState
from proxy.gateway import RELOAD_SIGNAL, Services, build, reload, stop_signals
from proxy.identity import admin_token
from proxy.server import banner, ensure_ca, start_control, worker_socket

__all__ = ["backoff", "run", "supervise"]

log = logging.getLogger("taskgate")

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_SECONDS = 30.0  # a worker that ran this long starts again without waiting
KILL_AFTER_SECONDS = 15.0  # past the grace period, on stop
READY_POLL_SECONDS = 0.25
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with its terminating NUL


def backoff(failures: int) -> float:
    """The wait before restarting a worker that failed ``failures`` times in a row."""
    return min(MAX_DELAY, FIRST_DELAY * 2 ** max(0, failures - 1))


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening: the port
    stays ours (another program cannot take it between worker restarts) and the
    workers can bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Worker:
    """One worker process, kept running until the supervisor stops."""

    def __init__(self, index: int, argv: list[str], socket_path: str) -> None:
        self.index = index
        self.argv = argv
        self.socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self.failures = 0
        self.exit_code: int | None = None
        self._session: aiohttp.ClientSession | None = None

    async def keep(self, stopping: asyncio.Event, restarts: Counter) -> None:
        while not stopping.is_set():
            started = time.monotonic()
            try:
                self.proc = await asyncio.create_subprocess_exec(*self.argv)
            except OSError as e:  # out of processes or descriptors: try again later
                how = f"could not be started ({e.strerror or e})"
                self.exit_code = -1
            else:
                if stopping.is_set():  # the stop came while it was being started
                    self.signal(signal.SIGTERM)
                code = await self.proc.wait()
                self.ready = False
                self.exit_code = code
                if stopping.is_set():
                    return
                how = f"(pid {self.proc.pid}) exited with {_how(code)}"
            self.failures = 1 if time.monotonic() - started >= STABLE_SECONDS \
                else self.failures + 1
            delay = backoff(self.failures)
            log.error("taskgate: worker %d %s; starting it again in %.1f s", self.index, how,
                      delay)
            restarts.inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` from the worker's own site (its Unix socket)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=2))
        async with self._session.get(f"http://worker{path}") as r:
            return r.status, await r.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 and -code in \
        signal.Signals._value2member_map_ else f"code {code}"


def _worker_argv(config: Config, index: int, port: int) -> list[str]:
    return [sys.executable, "-m", "proxy", "run", "-c", config.source,
            "--worker", f"{index}:{os.getpid()}:{port}"]


async def supervise(config: Config) -> int:
    """Run the control plane and ``config.workers`` workers until a stop signal."""
    loop = asyncio.get_running_loop()
    os.makedirs(config.home, mode=0o700, exist_ok=True)
    ca_cert = ensure_ca(config)  # before the workers: they must not race to create it
    host, port = config.proxy_listen
    try:
        reserved = reserve_port(host, port)
    except OSError as e:
        log.error("taskgate: the proxy cannot listen on %s:%d: %s", host, port, e.strerror)
        return 2
    port = reserved.getsockname()[1]
    try:
        async with build(config, Replica.of(config.replica_id)) as services:
            return await _supervise(config, services, ca_cert, port, loop)
    finally:
        reserved.close()


async def _supervise(config: Config, services: Services, ca_cert: str, port: int,
                     loop: asyncio.AbstractEventLoop) -> int:
    workers = [_Worker(i, _worker_argv(config, i, port), worker_socket(config, i))
               for i in range(1, config.workers + 1)]
    registry = CollectorRegistry()
    restarts = Counter("taskgate_worker_restarts", "Workers started again after they exited",
                       registry=registry)
    running = Gauge("taskgate_workers_ready", "Worker processes ready to serve",
                    registry=registry)

    async def peer_metrics() -> list[bytes]:
        running.set(sum(w.ready for w in workers))
        texts = [generate_latest(registry)]
        for w in workers:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                status, body = await w.get("/metrics")
                if status == 200:
                    texts.append(body)
        return texts

    def reload_workers() -> None:
        log.info("taskgate: the config was reloaded; reloading %d workers", len(workers))
        for w in workers:
            w.signal(RELOAD_SIGNAL)

    state = ControlState(admin_token=admin_token(config.admin_token_file),
                         peer_metrics=peer_metrics, reloaded=reload_workers)
    runner = await start_control(services, state)
    if runner is None:
        return 2
    stopping = asyncio.Event()
    handled = _handle_signals(loop, stopping, services, reload_workers)
    keepers = [asyncio.create_task(w.keep(stopping, restarts)) for w in workers]
    watcher = asyncio.create_task(_watch_ready(workers, state, stopping, config, ca_cert,
                                               port, runner, services.audit.path))
    try:
        await stopping.wait()
        state.proxy_listening = False
        log.info("taskgate: stopping %d workers", len(workers))
        for site in list(runner.sites):
            await site.stop()
        for w in workers:
            w.signal(signal.SIGTERM)
        held = services.approvals.close()
        if held:
            log.info("taskgate: refused %d calls held for approval", held)
        done, pending = await asyncio.wait(
            keepers, timeout=config.shutdown_grace_seconds + KILL_AFTER_SECONDS)
        for w in workers:
            if w.proc is not None and w.proc.returncode is None:
                log.error("taskgate: worker %d did not stop in time; killed", w.index)
                w.signal(signal.SIGKILL)
        if pending:
            await asyncio.wait(pending, timeout=5)
    finally:
        watcher.cancel()
        for k in keepers:
            k.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        for w in workers:
            await w.close()
    clean = all(w.exit_code == 0 for w in workers)
    if not clean:
        log.error("taskgate: workers exited with %s",
                  ", ".join(f"w{w.index}: {w.exit_code}" for w in workers))
    return 0 if clean else 1


async def _watch_ready(workers: list[_Worker], state: ControlState, stopping: asyncio.Event,
                       config: Config, ca_cert: str, port: int, runner: web.AppRunner,
                       audit_log: str) -> None:
    """Keep each worker's readiness, and print the banner once they are all ready."""
    announced = False
    while not stopping.is_set():
        for w in workers:
            try:
                status, _ = await w.get("/readyz")
                w.ready = status == 200
            except (aiohttp.ClientError, OSError, TimeoutError):
                w.ready = False
        state.proxy_listening = all(w.ready for w in workers) and not stopping.is_set()
        if state.proxy_listening and not announced:
            announced = True
            bound = runner.addresses
            cport = bound[0][1] if bound else config.control_listen[1]
            print(banner(config, ca_cert, port, cport, audit_log, len(workers)), flush=True)
        await asyncio.sleep(READY_POLL_SECONDS)


def _handle_signals(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event,
                    services: Services, reload_workers: Callable[[], None]) -> list[int]:
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def stop(sig: int) -> None:
        if not stopping.is_set():
            log.info("taskgate: %s received; stopping", _name(sig))
        stopping.set()

    running: set[asyncio.Task[None]] = set()

    async def reload_all(sig: int) -> None:
        """The supervisor's own services first (the control plane judges new tasks by
        the file too): a file it refuses changes nothing anywhere; one it applies, every
        worker then reads."""
        result = await reload(services, who=f"signal {_name(sig)}")
        if result.applied:
            reload_workers()

    def on_reload(sig: int) -> None:
        if stopping.is_set():
            return
        log.info("taskgate: %s received; reloading the config", _name(sig))
        task = loop.create_task(reload_all(sig))
        running.add(task)
        task.add_done_callback(running.discard)

    handled = []
    for sig in (*stop_signals(), RELOAD_SIGNAL):
        try:
            loop.add_signal_handler(sig, on_reload if sig == RELOAD_SIGNAL else stop, int(sig))
        except (OSError, RuntimeError, ValueError):  # reserved by the C library
            continue
        handled.append(int(sig))
    return handled


def _name(sig: int) -> str:
    return signal.Signals(sig).name if sig in signal.Signals._value2member_map_ \
        else f"signal {sig}"


def run(config: Config) -> int:
    """Entry point of ``taskgate run`` with ``proxy.workers`` > 1."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isfile(config.source):
        log.error("taskgate: workers read the config file again; %s is not one",
                  config.source)
        return 2
    longest = os.path.abspath(worker_socket(config, config.workers))
    if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
        log.error("taskgate: the workers' sockets under home (%s) would have paths longer "
                  "than %d bytes, more than a Unix socket takes; use a shorter home",
                  longest, MAX_SOCKET_PATH)
        return 2
    return uvloop.run(supervise(config))
