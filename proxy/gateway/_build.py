"""The one place a gateway is built: every service in dependency order, closed in reverse.

``taskgate run`` (proxy/server.py), the addons under plain ``mitmdump -s``, the demo
and the tests all enter :func:`build`; what it yields is a frozen :class:`Services`,
so who depends on what is written here once, not spread over install functions.

Closing runs backwards: the secret broker revokes what it minted (the store and the
audit log still open for what is pending and for each outcome), the task registry
stops its sweeper and closes the store, 407s counted but not yet summarized are
written, the audit log is flushed, and the HTTP session closes last.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.approvals import Approvals, SharedApprovals
from proxy.audit import AuditAnchor, AuditLog, Replica, anchor_log, load_hmac_key
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.gateway._core import Gateway
from proxy.gateway._limits import AuthFailures
from proxy.gateway._metrics import Metrics
from proxy.gateway._pins import ToolPins
from proxy.gateway._upstream import client_session, trust_bundle
from proxy.identity import Identity, JwksKeys, TokenIssuer, WorkloadIssuer
from proxy.secrets import KEY_FILE, SecretBroker
from proxy.store import store_path
from proxy.tasks import (
    SharedTaskRegistry,
    TaskPolicy,
    TaskRegistry,
    open_registry,
    open_shared_registry,
    shared_issuer,
    token_issuer,
)

__all__ = ["Services", "build"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """Everything one running gateway is made of; the addons and the control plane
    reach each service by name and type."""

    replica: Replica  # who this process is in the audit records, and its log
    trust_bundle: str  # the CA file upstream certificates are checked against
    http: aiohttp.ClientSession  # the gateway's own upstream calls (JWKS, providers)
    audit: AuditLog
    gateway: Gateway
    metrics: Metrics
    tasks: TaskRegistry
    approvals: Approvals
    secrets: SecretBroker
    auth_failures: AuthFailures
    pins: ToolPins  # MCP tool pins (rug-pull defence), kept in the task store

    @property
    def config(self) -> Config:
        """The config in force: the gateway's, which a reload swaps (proxy/gateway/_reload.py)."""
        return self.gateway.config


def _identity(config: Config, http: aiohttp.ClientSession) -> Identity:
    async def fetch_json(url: str) -> Any:
        async with http.get(url, allow_redirects=False) as resp:
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
    return Identity(issuers, leeway=config.leeway_seconds)


async def _audit_log(config: Config, replica: Replica) -> AuditLog:
    try:
        hmac_key = load_hmac_key(config.audit_hmac_key_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"audit.hmac_key_file: {e}") from None
    path = replica.log_path(config.audit_path)
    anchor = AuditAnchor(store_path(config.home), log=anchor_log(config.audit_path, path))
    audit = AuditLog(path, hmac_key=hmac_key, max_bytes=config.audit_max_bytes,
                     anchor=anchor, replica=replica.label)  # anchor: beyond the log's folder
    await audit.start()
    return audit


@contextlib.asynccontextmanager
async def build(config: Config, replica: Replica | None = None
                ) -> AsyncIterator[Services]:
    """Build the gateway's services from ``config``; the audit log is open, the task
    store loaded and the background workers running while the context is entered.

    ``replica``: who this process is (a worker says so); by default the one process
    of ``config.replica_id`` (else ``<hostname>-<pid>``)."""
    if replica is None:
        replica = Replica.of(config.replica_id)
    async with contextlib.AsyncExitStack() as stack:
        bundle = trust_bundle(config)
        http = client_session(config, bundle)
        stack.push_async_callback(http.close)

        audit = await _audit_log(config, replica)
        stack.push_async_callback(audit.close)
        auth_failures = AuthFailures(audit.write)
        stack.push_async_callback(auth_failures.flush)  # 407s counted, not yet written

        identity = _identity(config, http)
        tasks: TaskRegistry
        if config.state_backend == "redis":  # shared by workers and replicas
            tasks = await open_shared_registry(config, identity)
        else:
            tasks = await open_registry(config, identity)
        stack.push_async_callback(tasks.close)  # last counters to disk before the audit closes
        identity.add_issuer(shared_issuer(tasks) if isinstance(tasks, SharedTaskRegistry)
                            else token_issuer(tasks))

        gateway = Gateway(config, identity, TaskPolicy(config, tasks), audit,
                          floods=auth_failures)
        metrics = Metrics(gateway)
        gateway.on_record.append(metrics.observe)
        gateway.on_record.append(tasks.on_record)
        metrics.track("active_tasks", tasks.active_count)

        approvals = (SharedApprovals(config.approval_timeout_seconds, tasks.store)
                     if isinstance(tasks, SharedTaskRegistry)
                     else Approvals(config.approval_timeout_seconds))
        metrics.track("pending_approvals", lambda: len(approvals.waiting()))

        async def refuse_held(task_id: str) -> None:
            task = tasks.get(task_id)
            how = task.state(time.time()) if task is not None else None
            await approvals.task_ended(task_id, how if how in ("revoked", "expired") else None)

        # With task grants, credentials to revoke are kept in their state store (sealed
        # with <home>/revocation.key); the broker takes over those an earlier run left
        # pending, and each revocation outcome goes to the audit log.
        secrets = SecretBroker(config.secrets, http, store=tasks.store,
                               key_path=os.path.join(config.home, KEY_FILE),
                               audit=audit.write)
        secrets.revocations.owner_of = lambda task_id: getattr(tasks.get(task_id), "owner",
                                                               None)
        secrets.on_fetch = metrics.secret_fetch
        secrets.on_background_error = metrics.secret_background_error
        secrets.revocations.on_outcome = metrics.secret_revocation
        metrics.track("secret_revocations_pending", secrets.pending_revocations)
        tasks.on_end.append(refuse_held)
        tasks.on_end.append(secrets.task_ended)
        secrets.start()
        stack.push_async_callback(secrets.close)  # minted tokens die with the process

        pins = ToolPins(store=tasks.store, audit=audit.write)
        await pins.load()
        tasks.on_end.append(pins.task_ended)
        stack.push_async_callback(pins.close)  # changes seen are stored before the store closes

        tasks.start_sweeper()
        yield Services(replica=replica, trust_bundle=bundle, http=http, audit=audit,
                       gateway=gateway, metrics=metrics, tasks=tasks, approvals=approvals,
                       secrets=secrets, auth_failures=auth_failures, pins=pins)
