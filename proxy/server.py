"""The one module that wires the running gateway: mitmproxy + aiohttp, one uvloop loop.

``serve`` builds the core (identity, policy, audit), starts the control plane,
embeds mitmproxy's :class:`~mitmproxy.master.Master` with only the addons a
gateway needs (not ``DumpMaster``, whose error check ``sys.exit``s on an
error log and would take the control plane down with it), and shuts both
down in order on SIGTERM/SIGINT: stop listening, refuse calls held for
approval, let calls in flight finish within the grace period, flush the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from mitmproxy import certs, http, options, version
from mitmproxy.addons import disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2

from addons.approve import Approve, ApprovedAsShown
from addons.audit import Audit
from addons.authorize import Authorize
from addons.egress import Egress
from addons.framing import Framing
from addons.framing import install as install_framing
from addons.identify import Identify
from addons.inject import Inject
from addons.limits import Limits
from addons.mcp import Mcp

from proxy.approvals import _held as approvals
from proxy.identity._admin import admin_token
from proxy.audit._log import AuditLog, load_hmac_key
from proxy.config._model import Config, load_config
from proxy.control._app import ControlSite, ControlState, make_app
from proxy.errors import ConfigError
from proxy.gateway._core import REQUEST_ID_HEADER, Gateway, StandingPolicy, new_request_id, refusal_body
from proxy.tasks._registry import install_tasks
from proxy.identity._jwt import Identity, JwksKeys, TokenIssuer, WorkloadIssuer
from proxy.gateway._limits import AuthFailures
from proxy.gateway._metrics import install_metrics
from proxy.secrets import install as install_secrets
from proxy.gateway._signals import stop_signals
from proxy.store._store import AuditAnchor, store_path
from proxy.gateway._upstream import client_session, trust_bundle

__all__ = ["build_gateway", "ensure_ca", "gateway_addons", "json_error_responses", "run",
           "serve", "settle_heap", "shared_gateway"]

log = logging.getLogger("taskgate")


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


async def build_gateway(config: Config, session: aiohttp.ClientSession) -> Gateway:
    """Assemble the core from a config; the audit log is open when this returns."""

    async def fetch_json(url: str) -> Any:
        async with session.get(url, allow_redirects=False) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    owners = {name: wl.owner for name, wl in config.workloads.items() if wl.owner}
    issuers: list[TokenIssuer] = []
    for ic in config.issuers:
        if ic.jwks_file is not None:
            keys = JwksKeys.from_file(ic.jwks_file)
        else:
            assert ic.jwks_url is not None
            keys = JwksKeys(source=ic.jwks_url, fetch=fetch_json)
        issuers.append(WorkloadIssuer(ic.issuer, ic.audience, keys,
                                      leeway=config.leeway_seconds, owners=owners))
    identity = Identity(issuers, leeway=config.leeway_seconds)
    try:
        hmac_key = load_hmac_key(config.audit_hmac_key_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"audit.hmac_key_file: {e}") from None
    audit = AuditLog(config.audit_path, hmac_key=hmac_key, max_bytes=config.audit_max_bytes,
                     anchor=AuditAnchor(store_path(config.home)))  # beyond the log's folder
    await audit.start()
    gateway = Gateway(config, identity, StandingPolicy(config), audit)
    gateway.http = session
    install_metrics(gateway)  # first: the features below report to it
    await install_tasks(gateway)  # task grants: store, signing keys, TaskPolicy
    approvals.attach(gateway)
    install_secrets(gateway)
    gateway.components["auth_failures"] = AuthFailures(audit.write)
    return gateway


# The addon chain, in the order hooks must run: who is calling, may it, where its name
# leads (egress), what is in the body (MCP), does a person have to say yes, which
# secret to add, and the record.
# Every one is policy: plain imports, so a missing module stops the start, never a hook.
# Limits comes first: connections per client are counted before anything is read.
# Framing last: it patches mitmproxy's HTTP/1 framing when loaded (addons/framing.py).
ADDON_CHAIN = (Limits, Identify, Authorize, Egress, Mcp, Approve, Inject, ApprovedAsShown, Audit,
               Framing)


def gateway_addons(gateway: Gateway) -> list[Any]:
    """The taskgate addons, in chain order."""
    return [addon(gateway) for addon in ADDON_CHAIN]


def mitm_options(config: Config, bundle: str) -> dict[str, Any]:
    host, port = config.proxy_listen
    return {
        "mode": [f"regular@{port}"],
        "listen_host": host,
        "confdir": config.ca_dir,
        "rawtcp": False,
        # After an upgrade the connection carries frames no rule or record sees
        # (the authorize addon refuses upgrade requests too).
        "websocket": False,
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


# -- responses mitmproxy writes itself ------------------------------------------
_ERROR_CODES = {400: ("bad_request", "malformed request"),
                413: ("payload_too_large", "request body too large"),
                502: ("bad_gateway", "the upstream failed")}
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')
_h2_error_id: list[str] = []  # the id send_headers put on an h2 error, for its body


def _error_body(status: int, message: str, request_id: str) -> bytes:
    """taskgate's JSON refusal for an error mitmproxy answers itself. Its message loses
    what it quotes (a request line, an upstream's header: bytes that may hold a secret)."""
    error, what = _ERROR_CODES.get(status, ("error", "the call failed"))
    detail = "".join(c if c.isprintable() else " " for c in _QUOTED.sub("[...]", message))
    reason = f"{what}: {detail.strip()[:300]}" if detail.strip() else what
    return refusal_body(error, reason, request_id)


def _error_response(status_code: int, message: str = "") -> bytes:
    """Replaces ``mitmproxy.proxy.layers.http._http1.make_error_response`` (HTML, no id).

    A fresh request id: mitmproxy makes this response where the flow (and the id of
    its audit record) is out of reach."""
    request_id = new_request_id()
    resp = http.Response.make(status_code, _error_body(status_code, message, request_id),
                              {"Content-Type": "application/json", "Connection": "close",
                               REQUEST_ID_HEADER: request_id})
    return bytes(http1.assemble_response(resp))


def json_error_responses() -> None:
    """Make mitmproxy's own error responses (400 for a malformed request, 502 for an
    unreachable upstream, …) taskgate refusals, over HTTP/1 and HTTP/2. Idempotent."""
    _http1.make_error_response = _error_response
    conn = _http_h2.BufferedH2Connection
    if getattr(conn, "_taskgate_errors", False):
        return
    send_headers = conn.send_headers
    server = (b"server", version.MITMPROXY.encode())

    def headers_of_errors(self: Any, stream_id: int, headers: Any, *args: Any,
                          **kw: Any) -> None:
        # mitmproxy's h2 error response is exactly these three headers, then its body.
        if (isinstance(headers, list) and len(headers) == 3 and headers[1] == server
                and headers[2] == (b"content-type", b"text/html")):
            request_id = new_request_id()
            _h2_error_id[:] = [request_id]
            headers = [headers[0], (b"content-type", b"application/json"),
                       (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
        send_headers(self, stream_id, headers, *args, **kw)

    def body_of_errors(status: int, message: str) -> bytes:
        request_id = _h2_error_id.pop() if _h2_error_id else new_request_id()
        return _error_body(status, message, request_id)

    conn.send_headers = headers_of_errors  # type: ignore[method-assign]
    conn._taskgate_errors = True  # type: ignore[attr-defined]
    _http2.format_error = body_of_errors


def settle_heap() -> None:
    """Collect start-up garbage, then exempt what survives from the cyclic GC.

    Start-up leaves a large heap that lives as long as the process (mitmproxy,
    the CA, the IDNA tables, …). Left in the GC's oldest generation, every full
    collection walks it again and stalls the event loop for ~100 ms, a few times
    a minute under load: the whole p99. Frozen, a full collection takes ~3 ms.
    """
    gc.collect()
    gc.freeze()


class _GatewayMaster(Master):
    """A Master that refuses to run when a listener failed to bind."""

    bind_failed = False

    async def running(self) -> None:
        ps = self.addons.get("proxyserver")
        if ps is None or not len(ps.servers) or any(not s.is_running for s in ps.servers):
            self.bind_failed = True
            self.should_exit.set()
            return
        await super().running()


async def serve(config: Config) -> int:
    """Run the gateway until SIGTERM/SIGINT; return the process exit code."""
    loop = asyncio.get_running_loop()
    os.makedirs(config.home, mode=0o700, exist_ok=True)
    ca_cert = ensure_ca(config)
    bundle = trust_bundle(config)
    token_path = config.admin_token_file
    state = ControlState(admin_token=admin_token(token_path))
    session = client_session(config, bundle)
    gateway = await build_gateway(config, session)
    runner = web.AppRunner(make_app(gateway, state), access_log=None, handle_signals=False,
                           keepalive_timeout=config.control_idle_timeout_seconds)
    await runner.setup()
    chost, cport = config.control_listen
    _file_budget(config)
    try:
        await ControlSite(runner, chost, cport,
                          max_connections=config.control_max_connections,
                          header_timeout=config.control_header_timeout_seconds).start()
    except OSError as e:
        log.error("control plane cannot listen on %s:%d: %s", chost, cport, e.strerror)
        await _close(runner, gateway, session)
        return 2

    json_error_responses()
    opts = options.Options()
    master = _GatewayMaster(opts, event_loop=loop)
    ps = proxyserver.Proxyserver()
    master.addons.add(ps, next_layer.NextLayer(), tlsconfig.TlsConfig(),
                      disable_h2c.DisableH2C(), *gateway_addons(gateway))
    opts.update(**mitm_options(config, bundle))

    stopping = asyncio.Event()
    handled = _handle_stop_signals(loop, stopping)

    async def on_stop() -> None:
        await stopping.wait()
        state.proxy_listening = False
        log.info("taskgate: shutting down; closing listeners")
        await ps.servers.update([])
        for site in list(runner.sites):  # runner.shutdown() alone leaves them listening
            await site.stop()
        held = gateway.components["approvals"].close()
        if held:
            log.info("taskgate: refused %d calls held for approval", held)
        await runner.shutdown()
        if not await gateway.drained(config.shutdown_grace_seconds):
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
        print(f"taskgate {_version()} running\n"
              f"  proxy:         http://{config.proxy_listen[0]}:{config.proxy_listen[1]}\n"
              f"  control plane: http://{chost}:{cport}\n"
              f"  CA cert:       {os.path.abspath(ca_cert)}\n"
              f"  admin token:   {os.path.abspath(token_path)}\n"
              f"  audit log:     {os.path.abspath(config.audit_path)}\n"
              f"  config:        {config.source}", flush=True)

    stopper = asyncio.create_task(on_stop())
    readier = asyncio.create_task(on_ready())
    try:
        await master.run()
    finally:
        stopper.cancel()
        readier.cancel()
        # The handlers stay until the audit log is flushed: a second signal then
        # must not kill the process mid-write.
        await _close(runner, gateway, session)
        for sig in handled:
            loop.remove_signal_handler(sig)
    if master.bind_failed:
        log.error("taskgate: the proxy could not listen on %s:%d",
                  config.proxy_listen[0], config.proxy_listen[1])
        return 2
    return 0


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


def _file_budget(config: Config) -> None:
    """Raise the soft open-file limit to the hard one, and say when the caps do not fit
    in it: each agent connection can hold two descriptors (agent and upstream), the
    control plane has its own cap, and the audit log, CA and listeners need a few."""
    try:
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


async def _close(runner: web.AppRunner, gateway: Gateway,
                 session: aiohttp.ClientSession) -> None:
    await runner.cleanup()
    tasks = gateway.components.get("tasks")
    if tasks is not None:  # last counters and revocations to disk before the audit closes
        await tasks.close()
    await gateway.components["auth_failures"].flush()  # 407s counted, not yet written
    await gateway.audit.close()
    secrets = gateway.components.get("secrets")
    if secrets is not None:  # minted tokens die with the process: revoke them first
        await secrets.close()
    await session.close()


def _version() -> str:
    from proxy import __version__

    return __version__


def run(config: Config) -> int:
    """Entry point of ``taskgate run``."""
    import uvloop

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    return uvloop.run(serve(config))


_shared: dict[str | None, Gateway] = {}


async def shared_gateway(config_path: str | None) -> Gateway:
    """The gateway for standalone addons (``mitmdump -s``): one per config file."""
    if config_path not in _shared:
        json_error_responses()
        install_framing()  # the chain's Framing addon does this inside `taskgate run`
        config = load_config(config_path)
        session = client_session(config, trust_bundle(config))
        _shared[config_path] = await build_gateway(config, session)
    return _shared[config_path]
