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

from proxy.approvals import Approvals
from proxy.audit import AuditAnchor, AuditLog, load_hmac_key
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.gateway._core import Gateway
from proxy.gateway._limits import AuthFailures
from proxy.gateway._metrics import Metrics
from proxy.gateway._upstream import client_session, trust_bundle
from proxy.identity import Identity, JwksKeys, TokenIssuer, WorkloadIssuer
from proxy.secrets import KEY_FILE, SecretBroker
from proxy.store import store_path
from proxy.tasks import TaskPolicy, TaskRegistry, open_registry, token_issuer

__all__ = ["Services", "build"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """Everything one running gateway is made of; the addons and the control plane
    reach each service by name and type."""

    trust_bundle: str  # the CA file upstream certificates are checked against
    http: aiohttp.ClientSession  # the gateway's own upstream calls (JWKS, providers)
    audit: AuditLog
    gateway: Gateway
    metrics: Metrics
    tasks: TaskRegistry
    approvals: Approvals
    secrets: SecretBroker
    auth_failures: AuthFailures

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


async def _audit_log(config: Config) -> AuditLog:
    try:
        hmac_key = load_hmac_key(config.audit_hmac_key_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"audit.hmac_key_file: {e}") from None
    audit = AuditLog(config.audit_path, hmac_key=hmac_key, max_bytes=config.audit_max_bytes,
                     anchor=AuditAnchor(store_path(config.home)))  # beyond the log's folder
    await audit.start()
    return audit


@contextlib.asynccontextmanager
async def build(config: Config) -> AsyncIterator[Services]:
    """Build the gateway's services from ``config``; the audit log is open, the task
    store loaded and the background workers running while the context is entered."""
    async with contextlib.AsyncExitStack() as stack:
        bundle = trust_bundle(config)
        http = client_session(config, bundle)
        stack.push_async_callback(http.close)

        audit = await _audit_log(config)
        stack.push_async_callback(audit.close)
        auth_failures = AuthFailures(audit.write)
        stack.push_async_callback(auth_failures.flush)  # 407s counted, not yet written

        identity = _identity(config, http)
        tasks = await open_registry(config, identity)
        stack.push_async_callback(tasks.close)  # last counters to disk before the audit closes
        identity.add_issuer(token_issuer(tasks))

        gateway = Gateway(config, identity, TaskPolicy(config, tasks), audit,
                          floods=auth_failures)
        metrics = Metrics(gateway)
        gateway.on_record.append(metrics.observe)
        gateway.on_record.append(tasks.on_record)
        metrics.track("active_tasks", tasks.active_count)

        approvals = Approvals(config.approval_timeout_seconds)
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

        tasks.start_sweeper()
        yield Services(trust_bundle=bundle, http=http, audit=audit,
                       gateway=gateway, metrics=metrics, tasks=tasks, approvals=approvals,
                       secrets=secrets, auth_failures=auth_failures)
