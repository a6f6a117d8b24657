"""Secrets injected at the edge: the broker, its providers, redaction, binding.

The agent never holds a credential. A rule names a secret; once a call is
authorized, the inject addon asks the :class:`SecretBroker` for a value
(minting a short-lived, task-scoped token where the provider can), checks the
destination (:func:`check_destination`), puts the value on the request and
masks it in whatever the upstream sends back (:class:`Redactor`). Values are
:class:`SecretValue` (``[secure]`` in every ``repr``), in memory only.

Nothing here imports mitmproxy; the builder (proxy/gateway/_build.py) wires the broker.
"""

from __future__ import annotations

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
from .spec import SecretSpec, check_token_scope, parse_secret
from .value import Minted, ProviderError, SecretValue

__all__ = [
    "KEY_FILE",
    "InjectSpec",
    "Minted",
    "Placement",
    "ProviderError",
    "Redactor",
    "SecretBroker",
    "SecretSpec",
    "SecretValue",
    "check_destination",
    "check_token_scope",
    "parse_secret",
    "replaced_params",
    "set_query_param",
    "strip_query_params",
]
