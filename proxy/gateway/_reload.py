"""Hot reload: read the config file again, validate it, and swap it in whole.

:func:`reload` is the one entry point (SIGHUP, ``POST /v1/reload``, ``taskgate reload``;
worker processes call it too). A file that does not load changes nothing: the error
names the file, line and key, and the failed reload is an audit record. A good one is
swapped in in one step on the event loop: calls in flight keep the rules they were
judged on (:attr:`~proxy.gateway.Exchange.rules`), the next call — the next request
inside an open tunnel too — is judged on the new ones.

What a reload changes: every workload's standing rules, ceiling, mode and task
settings; the secret specs (a changed one is fetched anew on its next use); the
approval timeout, inspection and streaming limits, the shutdown grace. Tasks whose
rules no longer fit their workload's lowered ceiling are revoked, each with an audit
record saying why. What needs the process restarted (listeners, home, the audit log,
trusted issuers, connection caps) keeps its running value and is reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from proxy.audit import new_record, rfc3339
from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.gateway._build import Services
from proxy.gateway._core import Gateway

__all__ = ["RESTART_KEYS", "ReloadResult", "reload"]

log = logging.getLogger(__name__)

# Settings a running gateway cannot take over, by the file's key: they keep their
# running value until a restart, and a reload that changes them says so.
RESTART_KEYS: dict[str, str] = {
    "proxy_listen": "listen.proxy", "control_listen": "listen.control",
    "transparent_listen": "listen.transparent", "home": "home",
    "admin_token_file": "admin_token_file", "upstream_ca_file": "upstream.ca_file",
    "audit_path": "audit.path", "audit_hmac_key_file": "audit.hmac_key_file",
    "audit_max_bytes": "audit.max_bytes", "issuers": "identity.issuers",
    "leeway_seconds": "identity.leeway_seconds", "max_connections": "proxy.max_connections",
    "max_connections_per_client": "proxy.max_connections_per_client",
    "idle_timeout_seconds": "proxy.idle_timeout_seconds",
    "control_max_connections": "control.max_connections",
    "control_header_timeout_seconds": "control.header_timeout_seconds",
    "control_idle_timeout_seconds": "control.idle_timeout_seconds",
}

_LOCKS: weakref.WeakKeyDictionary[Gateway, asyncio.Lock] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did; ``error`` set (and nothing changed) when the file was refused."""

    applied: bool
    old_digest: str | None
    new_digest: str | None
    source: str = ""  # the file read
    error: str | None = None
    restart_needed: tuple[str, ...] = ()
    revoked: tuple[str, ...] = ()  # task ids
    secrets_refetched: tuple[str, ...] = ()
    seconds: float = 0.0

    def view(self) -> dict[str, Any]:
        return {"applied": self.applied, "config": self.source, "old_digest": self.old_digest,
                "new_digest": self.new_digest, "error": self.error,
                "restart_needed": list(self.restart_needed),
                "revoked_tasks": list(self.revoked),
                "secrets_refetched": list(self.secrets_refetched),
                "seconds": round(self.seconds, 6)}


# Listeners: the running config names the port bound, the file may say 0 (any port).
_LISTENS = ("proxy_listen", "control_listen", "transparent_listen")


def _differs(attr: str, running: Any, wanted: Any) -> bool:
    """Does the file ask for another value than the one running? A listener the file
    gives port 0 is satisfied by whatever port its host got at start."""
    if attr in _LISTENS and running is not None and wanted is not None and wanted[1] == 0:
        return bool(running[0] != wanted[0])
    return bool(running != wanted)


def _keep_running(old: Config, new: Config) -> tuple[Config, tuple[str, ...]]:
    """``new`` with every restart-only setting as it runs now; the keys that differed."""
    changed = tuple(key for attr, key in RESTART_KEYS.items()
                    if _differs(attr, getattr(old, attr), getattr(new, attr)))
    kept = {attr: getattr(old, attr) for attr in RESTART_KEYS}
    return dataclasses.replace(new, **kept), changed


def _short(digest: str | None) -> str:
    return f"sha256:{digest[:16]}" if digest else "none"


async def reload(services: Services, *, who: str, path: str | None = None) -> ReloadResult:
    """Re-read the config (``path``, else the file the gateway runs from) and apply it.

    Never raises for a bad file: the result carries the error, the old config stays.
    ``who`` says who asked (``signal SIGHUP``, ``control plane from 127.0.0.1``), for
    the audit record. One reload at a time."""
    gateway = services.gateway
    lock = _LOCKS.setdefault(gateway, asyncio.Lock())
    async with lock:
        return await _reload(services, who, path)


async def _reload(services: Services, who: str, path: str | None) -> ReloadResult:
    started = time.monotonic()
    gateway, tasks = services.gateway, services.tasks
    old = gateway.config
    source = path or old.source
    try:
        if source.startswith("<"):
            raise ConfigError(f"{source}: the gateway runs on the embedded defaults; there is "
                              "no config file to reload")
        loaded = await asyncio.to_thread(load_config, source)
    except ConfigError as e:
        result = ReloadResult(False, old.digest, None, source, error=str(e),
                              seconds=time.monotonic() - started)
        await _record(services, "error", f"config reload asked by {who}: refused, the "
                                         f"running config stays ({_short(old.digest)}): {e}",
                      path=source)
        log.error("taskgate: config reload refused: %s", e)
        return result
    new, restart = _keep_running(old, loaded)
    async with tasks.creation_paused():
        # Judged before the swap, on tasks listed on the loop; none is created meanwhile.
        offenders = await asyncio.to_thread(tasks.beyond_ceiling, new, tasks.live())
        # -- the swap: no await from here to the end of the block ----------------------
        gateway.config = new
        tasks.config = new
        reconfigure = getattr(gateway.policy, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(new)
        services.approvals.timeout = new.approval_timeout_seconds
        refetch = services.secrets.reconfigure(new.secrets)
        revoked = [(t, why) for t, why in offenders if tasks.revoke_now(t)]
    result = ReloadResult(True, old.digest, new.digest, source, restart_needed=restart,
                          revoked=tuple(t.id for t, _ in revoked),
                          secrets_refetched=tuple(refetch),
                          seconds=time.monotonic() - started)
    for task, why in revoked:
        await _record(services, "deny", f"task revoked at config reload: {why}",
                      workload=task.workload, task=task.id, owner=task.owner, path=source)
        try:
            await tasks.revoke(task.id)  # persisted, task-end hooks (secrets, approvals)
        except Exception:  # noqa: BLE001 - revoked in memory already; said, not raised
            log.exception("taskgate: persisting the revocation of task %s failed", task.id)
    parts = [f"config {_short(old.digest)} -> {_short(new.digest)}"]
    if restart:
        parts.append(f"needs a restart to change: {', '.join(restart)}")
    if revoked:
        parts.append(f"{len(revoked)} tasks revoked (beyond the new ceilings)")
    if refetch:
        parts.append(f"secrets to fetch anew: {', '.join(refetch)}")
    await _record(services, "allow", f"config reload asked by {who}: applied; "
                                     + "; ".join(parts), path=source)
    log.info("taskgate: config reloaded (%s) in %.1f ms", "; ".join(parts),
             result.seconds * 1000)
    return result


async def _record(services: Services, decision: str, reason: str, **fields: Any) -> None:
    """A reload's audit record (no call: no client, method or status); a failed write
    is logged, never raised — the reload happened or did not either way."""
    record = new_record(ts=rfc3339(time.time()), request_id=uuid.uuid4().hex,
                        method="RELOAD", decision=decision, reason=reason, bytes_in=0,
                        bytes_out=0, duration_ms=0.0, **fields)
    try:
        await services.audit.write(record)
    except Exception as e:  # noqa: BLE001
        log.error("audit: the record of a config reload could not be written: %s", e)
