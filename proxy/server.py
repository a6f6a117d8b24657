"""The one module that wires the running gateway: mitmproxy + aiohttp, one uvloop loop.

``serve`` builds the services (proxy/gateway/_build.py), starts the control plane,
embeds mitmproxy's :class:`~mitmproxy.master.Master` with only the addons a
gateway needs (not ``DumpMaster``, whose error check ``sys.exit``s on an
error log and would take the control plane down with it), and shuts both
down in order on SIGTERM/SIGINT: stop listening, refuse calls held for
approval, let calls in flight finish within the grace period, flush the audit log.

With ``proxy.workers`` > 1 this runs in each worker process (``worker``: a
:class:`Worker`), started by proxy/supervisor.py: no control plane (the
supervisor runs the one), the proxy port shared with the other workers through
``SO_REUSEPORT`` (:func:`share_proxy_port`), and ``/readyz`` and ``/metrics`` on a
Unix socket in home for the supervisor to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from mitmproxy import certs, options
from mitmproxy.addons import disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.proxy import mode_servers, mode_specs

from addons import HookTable, default_addons, json_error_responses
from proxy import __version__
from proxy.audit import Replica
from proxy.config import Config
from proxy.control import ControlSite, ControlState, make_app, make_worker_app
from proxy.gateway import RELOAD_SIGNAL, Services, build, reload, stop_signals
from proxy.identity import ENV_VAR as ADMIN_TOKEN_VAR
from proxy.identity import admin_token

__all__ = ["Worker", "banner", "ensure_ca", "mitm_options", "run", "serve", "settle_heap",
           "share_proxy_port", "start_control", "trim_heap", "worker_socket"]

log = logging.getLogger("taskgate")

TRIM_SECONDS = 10.0  # how often free C-heap pages go back to the OS (trim_heap)


@dataclass(frozen=True, slots=True)
class Worker:
    """This process is worker ``index`` (1…N) of the supervisor ``supervisor_pid``,
    serving the proxy on ``port`` (the one the supervisor reserved)."""

    index: int
    supervisor_pid: int
    port: int


def worker_socket(config: Config, index: int) -> str:
    """Where worker ``index`` answers ``/readyz`` and ``/metrics`` (home is 0700)."""
    return os.path.join(config.home, "run", f"w{index}.sock")


def share_proxy_port() -> None:
    """Make mitmproxy's regular- and transparent-mode listeners bind with
    ``SO_REUSEPORT``, so the workers all listen on one port and the kernel spreads
    connections over them.

    mitmproxy creates the listener in ``AsyncioServerInstance.listen`` with
    ``asyncio.start_server(handler, host, port)`` and has no option for the socket;
    this replaces that one method, in worker processes only, by the same call with
    ``reuse_port=True`` (a fresh socket each time mitmproxy starts the server, as
    before). The port is never 0 here: the supervisor reserved it.
    """
    async def listen(self: Any, host: str, port: int) -> list[Any]:
        return [await asyncio.start_server(self.handle_stream, host or None, port,
                                           reuse_port=True)]

    mode_servers.RegularInstance.listen = listen  # type: ignore[method-assign]
    mode_servers.TransparentInstance.listen = listen  # type: ignore[method-assign]


def ensure_ca(config: Config) -> str:
    """Create taskgate's interception CA under home on first use; return the cert path."""
    path = config.ca_dir
    if not os.path.exists(os.path.join(path, "mitmproxy-ca.pem")):
        os.makedirs(path, mode=0o700, exist_ok=True)
        certs.CertStore.create_store(
            Path(path), "mitmproxy", 2048,
            organization="taskgate", cn="taskgate egress CA")
    os.chmod(os.path.join(path, "mitmproxy-ca.pem"), 0o600)
    return config.ca_cert_file


def mitm_options(config: Config, bundle: str, port: int | None = None) -> dict[str, Any]:
    host, listen_port = config.proxy_listen
    port = listen_port if port is None else port
    modes = [f"regular@{port}"]
    if config.transparent_listen is not None:
        # Redirected connections (nftables/iptables REDIRECT, SO_ORIGINAL_DST): who is
        # calling comes from the source address (addons/transparent.py).
        thost, tport = config.transparent_listen
        # '::' listens for both families, as on Linux by default (asyncio alone would
        # make it IPv6 only; mitmproxy's '' binds both on one port).
        modes.append(f"transparent@{'' if thost == '::' else thost}:{tport}")
    return {
        "mode": modes,
        "listen_host": host,
        "confdir": config.ca_dir,
        # Nothing passes unread: no raw TCP/UDP relay for what is not HTTP, no host whose
        # connections are ignored (passed through as raw TCP) by name or address.
        "rawtcp": False,
        "tcp_hosts": [],
        "udp_hosts": [],
        "ignore_hosts": [],
        "allow_hosts": [],
        # WebSocket upgrades pass only on rules with websocket: true (authorize); their
        # frames are counted, judged and recorded (addons/websocket.py). Other upgrades
        # are refused, and a 101 nobody asked for kills the call.
        "websocket": True,
        "http3": False,
        "connection_strategy": "lazy",
        "ssl_insecure": False,
        "ssl_verify_upstream_trusted_ca": bundle,
        "upstream_cert": False,
        "validate_inbound_headers": True,
        # Inactivity of a whole connection: mitmproxy has no timeout for reading a
        # request head (see proxy/gateway/_limits.py); max_connections_per_client bounds those.
        "tcp_timeout": config.idle_timeout_seconds,
    }


def settle_heap() -> None:
    """Collect start-up garbage, then exempt what survives from the cyclic GC.

    Start-up leaves a large heap that lives as long as the process (mitmproxy,
    the CA, the IDNA tables, …). Left in the GC's oldest generation, every full
    collection walks it again and stalls the event loop for ~100 ms, a few times
    a minute under load: the whole p99. Frozen, a full collection takes ~3 ms.
    """
    gc.collect()
    gc.freeze()


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` on a C library without it."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_MALLOC_TRIM = _libc_malloc_trim()


async def trim_heap(every: float = TRIM_SECONDS) -> None:
    """Every ``every`` seconds, hand the C heap's free pages back to the OS.

    Each TLS connection allocates and frees OpenSSL state in many small pieces; once
    an upstream connection closes, its pages are free but scattered among the live
    ones, and glibc keeps them. With thousands of idle agent connections that was
    ~13 KB of RSS per connection (bench/memory.py). ``malloc_trim`` walks the free
    lists (a few ms for hundreds of MB): in a thread, off the event loop.
    """
    if _MALLOC_TRIM is None:
        return
    while True:
        await asyncio.sleep(every)
        await asyncio.to_thread(_MALLOC_TRIM, 0)


class _GatewayMaster(Master):
    """A Master that refuses to run when a listener failed to bind, and finds each
    hook's handlers once (addons/_hooks.py)."""

    bind_failed = False

    def __init__(self, opts: options.Options, event_loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(opts, event_loop=event_loop)
        HookTable.install(self)

    async def running(self) -> None:
        ps = self.addons.get("proxyserver")
        if ps is None or not len(ps.servers) or any(not s.is_running for s in ps.servers):
            self.bind_failed = True
            self.should_exit.set()
            return
        await super().running()


async def serve(config: Config, worker: Worker | None = None) -> int:
    """Run the gateway (or one worker of it) until a stop signal; return the exit code."""
    loop = asyncio.get_running_loop()
    os.makedirs(config.home, mode=0o700, exist_ok=True)
    ca_cert = ensure_ca(config)
    handled: list[int] = []
    replica = None if worker is None else Replica.of(config.replica_id, worker.index,
                                                     pid=worker.supervisor_pid)
    try:
        async with build(config, replica) as services:
            return await _serve(services, ca_cert, handled, worker)
    finally:
        # The handlers stay until the services closed (the audit log flushed): a
        # second signal then must not kill the process mid-write.
        for sig in handled:
            loop.remove_signal_handler(sig)


async def start_control(services: Services, state: ControlState) -> web.AppRunner | None:
    """Start the control plane on ``listen.control``; ``None`` (logged) when it cannot
    listen."""
    config = services.config
    # lingering_time: after a refusal that left a body unread (a 401 to a POST), aiohttp
    # drains the rest before closing; its default of 10 s would let an unauthenticated
    # client hold a control-plane slot that long, so it gets what a head gets.
    runner = web.AppRunner(make_app(services, state), access_log=None, handle_signals=False,
                           keepalive_timeout=config.control_idle_timeout_seconds,
                           lingering_time=config.control_header_timeout_seconds)
    await runner.setup()
    chost, cport = config.control_listen
    try:
        await ControlSite(runner, chost, cport,
                          max_connections=config.control_max_connections,
                          header_timeout=config.control_header_timeout_seconds).start()
    except OSError as e:
        log.error("control plane cannot listen on %s:%d: %s", chost, cport, e.strerror)
        await runner.cleanup()
        return None
    return runner


async def _start_worker_site(services: Services, state: ControlState, index: int
                             ) -> web.AppRunner:
    """A worker's ``/readyz`` and ``/metrics``, on its Unix socket, for the supervisor."""
    path = worker_socket(services.config, index)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a worker that was killed
    runner = web.AppRunner(make_worker_app(services, state), access_log=None,
                           handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return runner


def banner(config: Config, ca_cert: str, proxy_port: int, control_port: int,
           audit_log: str, workers: int = 1, transparent_port: int | None = None) -> str:
    """The start-up banner: the ports actually bound (with port 0 in listen.* the OS
    picks them, and the banner is how a caller — the tests, a supervisor — learns where
    to connect)."""
    return (f"taskgate {__version__} running\n"
            f"  proxy:         http://{config.proxy_listen[0]}:{proxy_port}\n"
            f"  control plane: http://{config.control_listen[0]}:{control_port}\n"
            + (f"  transparent:   {config.transparent_listen[0]}:{transparent_port}\n"
               if config.transparent_listen is not None and transparent_port is not None
               else "")
            + (f"  workers:       {workers}\n" if workers > 1 else "") +
            f"  CA cert:       {os.path.abspath(ca_cert)}\n"
            f"  admin token:   {_token_source(config)}\n"
            f"  audit log:     {os.path.abspath(audit_log)}\n"
            f"  config:        {config.source}")


def _token_source(config: Config) -> str:
    """Where the admin token comes from: with TASKGATE_ADMIN_TOKEN set no file is made."""
    if os.environ.get(ADMIN_TOKEN_VAR):
        return f"from ${ADMIN_TOKEN_VAR}"
    return os.path.abspath(config.admin_token_file)


async def _serve(services: Services, ca_cert: str, handled: list[int],
                 worker: Worker | None = None) -> int:
    loop = asyncio.get_running_loop()
    config, gateway = services.config, services.gateway
    # A worker has no /v1/ endpoints: the supervisor made the token, and holds it.
    state = ControlState(admin_token=admin_token(config.admin_token_file)
                         if worker is None else "")
    _file_budget(config)
    runner: web.AppRunner | None = None
    if worker is None:
        runner = await start_control(services, state)
        if runner is None:
            return 2
    else:
        share_proxy_port()

    json_error_responses()
    opts = options.Options()
    master = _GatewayMaster(opts, event_loop=loop)
    ps = proxyserver.Proxyserver()
    master.addons.add(ps, next_layer.NextLayer(), tlsconfig.TlsConfig(),
                      disable_h2c.DisableH2C(), *default_addons(services))
    opts.update(**mitm_options(config, services.trust_bundle,
                               None if worker is None else worker.port))

    stopping = asyncio.Event()
    handled.extend(_handle_stop_signals(loop, stopping))
    handled.extend(_handle_reload_signal(loop, services, stopping))
    internal: list[web.AppRunner] = []  # a worker's site for the supervisor

    async def on_stop() -> None:
        await stopping.wait()
        state.proxy_listening = False
        log.info("taskgate: shutting down; closing listeners")
        await ps.servers.update([])
        if runner is not None:
            for site in list(runner.sites):  # runner.shutdown() alone leaves them listening
                await site.stop()
        held = services.approvals.close()
        if held:
            log.info("taskgate: refused %d calls held for approval", held)
        gateway.stopping()
        if runner is not None:
            await runner.shutdown()
        if not await gateway.drained(gateway.config.shutdown_grace_seconds):
            log.warning("taskgate: %d calls still in flight after the grace period",
                        gateway.in_flight)
        master.shutdown()

    async def on_ready() -> None:
        while not master.addons.get("proxyserver").is_running:
            if master.should_exit.is_set():
                return
            await asyncio.sleep(0.01)
        settle_heap()
        state.proxy_listening = True
        addrs = ps.listen_addrs()
        state.proxy_address = f"{addrs[0][0]}:{addrs[0][1]}" if addrs else ""
        pport = addrs[0][1] if addrs else config.proxy_listen[1]
        if worker is not None:
            try:
                internal.append(await _start_worker_site(services, state, worker.index))
            except OSError as e:  # the supervisor would wait for it forever: stop instead
                log.error("taskgate: worker %d cannot answer its supervisor on %s: %s",
                          worker.index, worker_socket(config, worker.index), e)
                stopping.set()
                return
            log.info("taskgate: worker %d (pid %d) serving the proxy on port %d",
                     worker.index, os.getpid(), pport)
            await _orphaned(worker, stopping)
            return
        assert runner is not None
        bound = runner.addresses
        cport = bound[0][1] if bound else config.control_listen[1]
        tport = None
        if config.transparent_listen is not None:
            tport = next((a[1] for s in ps.servers
                          if isinstance(s.mode, mode_specs.TransparentMode)
                          for a in s.listen_addrs), config.transparent_listen[1])
        # The running config names the ports bound: a reload of a file that names
        # them (as written after a port-0 start) changes no listener.
        gateway.config = dataclasses.replace(
            gateway.config, proxy_listen=(config.proxy_listen[0], pport),
            control_listen=(config.control_listen[0], cport),
            transparent_listen=(None if config.transparent_listen is None or tport is None
                                else (config.transparent_listen[0], tport)))
        print(banner(config, ca_cert, pport, cport, services.audit.path,
                     transparent_port=tport), flush=True)

    stopper = asyncio.create_task(on_stop())
    readier = asyncio.create_task(on_ready())
    trimmer = asyncio.create_task(trim_heap())
    try:
        await master.run()
    finally:
        stopper.cancel()
        readier.cancel()
        trimmer.cancel()
        for r in [*internal, *([runner] if runner is not None else [])]:
            await r.cleanup()  # the control plane first; the services close after it
    if master.bind_failed:
        also = config.transparent_listen
        log.error("taskgate: the proxy could not listen on %s:%d%s",
                  config.proxy_listen[0], config.proxy_listen[1],
                  f" (or transparently on {also[0]}:{also[1]})" if also else "")
        return 2
    return 0


async def _orphaned(worker: Worker, stopping: asyncio.Event) -> None:
    """A worker whose supervisor is gone (killed with no chance to stop it) stops too."""
    while not stopping.is_set():
        if os.getppid() != worker.supervisor_pid:
            log.error("taskgate: worker %d: the supervisor (pid %d) is gone; stopping",
                      worker.index, worker.supervisor_pid)
            stopping.set()
            return
        await asyncio.sleep(1.0)


def _handle_stop_signals(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> list[int]:
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    handled = []

    def stop(sig: int) -> None:
        if not stopping.is_set():
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ \
                else f"signal {sig}"
            log.info("taskgate: %s received; stopping", name)
        stopping.set()

    for sig in stop_signals():
        try:
            loop.add_signal_handler(sig, stop, int(sig))
        except (OSError, RuntimeError, ValueError):  # reserved by the C library
            continue
        handled.append(int(sig))
    return handled


def _handle_reload_signal(loop: asyncio.AbstractEventLoop, services: Services,
                          stopping: asyncio.Event) -> list[int]:
    """SIGHUP reloads the config (proxy/gateway/_reload.py); not while stopping."""
    running: set[asyncio.Task[Any]] = set()

    def on_signal() -> None:
        if stopping.is_set():
            return
        log.info("taskgate: SIGHUP received; reloading the config")
        task = loop.create_task(reload(services, who="signal SIGHUP"))
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_signal_handler(RELOAD_SIGNAL, on_signal)
    return [int(RELOAD_SIGNAL)]


def _file_budget(config: Config) -> None:
    """Raise the soft open-file limit to the hard one, and say when the caps do not fit
    in it: each agent connection can hold two descriptors (agent and upstream), the
    control plane has its own cap, and the audit log, CA and listeners need a few."""
    try:  # here, not at the top: resource exists on POSIX only
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    need = config.max_connections + config.control_max_connections + 64
    if soft != resource.RLIM_INFINITY and need > soft:
        log.warning("taskgate: the open-file limit is %d; proxy.max_connections (%d, one "
                    "descriptor each, two while calling upstream) and control.max_connections "
                    "(%d) need more: lower them or raise the limit (ulimit -n)", soft,
                    config.max_connections, config.control_max_connections)


def run(config: Config, worker: Worker | None = None) -> int:
    """Entry point of ``taskgate run`` (and of each worker process)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    return uvloop.run(serve(config, worker))
