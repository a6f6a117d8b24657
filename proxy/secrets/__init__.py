"""Secrets injected at the edge: the broker, its providers, redaction, binding.

The agent never holds a credential. A rule names a secret; once a call is
authorized, the inject addon asks the :class:`SecretBroker` for a value
(minting a short-lived, task-scoped token where the provider can), checks the
destination (:func:`check_destination`), puts the value on the request and
masks it in whatever the upstream sends back (:class:`Redactor`). Values are
:class:`SecretValue` (``[secure]`` in every ``repr``), in memory only.

Nothing here imports mitmproxy; :func:`install` wires the broker into a gateway.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .binding import check_destination
from .broker import SecretBroker
from .placement import (
    InjectSpec,
    Placement,
    replaced_params,
    set_query_param,
    strip_query_params,
)
from .redact import Redactor
from .seal import KEY_FILE
from .spec import SecretSpec, parse_secret
from .value import Minted, ProviderError, SecretValue

__all__ = [
    "COMPONENT",
    "InjectSpec",
    "Minted",
    "Placement",
    "ProviderError",
    "Redactor",
    "SecretBroker",
    "SecretSpec",
    "SecretValue",
    "check_destination",
    "install",
    "parse_secret",
    "replaced_params",
    "set_query_param",
    "strip_query_params",
]

if TYPE_CHECKING:  # the config imports this package; the gateway imports the config
    from proxy.gateway._core import Gateway

COMPONENT = "secrets"


def install(gateway: Gateway) -> SecretBroker:
    """Give ``gateway`` a broker over its config's secrets, using its HTTP session.

    With task grants installed, credentials to revoke are kept in their state store
    (sealed with ``<home>/revocation.key``) and the broker takes over those an
    earlier run left pending; each revocation outcome goes to the audit log."""
    tasks = gateway.components.get("tasks")
    store = getattr(tasks, "store", None)
    key_path = os.path.join(gateway.config.home, KEY_FILE) if store is not None else None
    broker = SecretBroker(gateway.config.secrets, gateway.http, store=store,
                          key_path=key_path, audit=gateway.audit.write)
    if tasks is not None:
        broker.revocations.owner_of = lambda task_id: getattr(tasks.get(task_id), "owner", None)
    gateway.components[COMPONENT] = broker
    gateway.on_task_end.append(broker.task_ended)
    metrics = gateway.components.get("metrics")
    if metrics is not None:
        broker.on_fetch = metrics.secret_fetch
        broker.on_background_error = metrics.secret_background_error
        broker.revocations.on_outcome = metrics.secret_revocation
        metrics.track("secret_revocations_pending", broker.pending_revocations)
    broker.start()
    return broker
