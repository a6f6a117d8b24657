"""The exceptions the core raises, and the one place they become statuses.

    TaskgateError
    ├── ConfigError            the config file is wrong (names file, line, key)
    ├── InvalidField           → 422: a request or rule is wrong; carries the field path
    ├── AuthError              → 407: the caller could not be identified
    │   ├── MissingCredential      no Proxy-Authorization at all
    │   └── InvalidCredential      malformed, expired, wrongly signed, unknown issuer
    ├── Refused                → 403: identified, but no rule allows the call
    ├── NotFound               → 404: the control plane has no such object (approval, task)
    ├── Conflict               → 409: the object's state forbids it (answering an ended approval)
    ├── PayloadTooLarge        → 413: a body the gateway must inspect is too big
    ├── LengthRequired         → 411: a body the gateway must inspect has no length
    ├── UpstreamSecretError    → 502: a secret provider failed (names the secret)
    └── Unavailable            → 503: a dependency the call needs failed (audit, store)

Anything else escaping a decision is a bug; the edge maps it to 500 and denies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AuthError",
    "ConfigError",
    "Conflict",
    "FieldPath",
    "InvalidCredential",
    "InvalidField",
    "LengthRequired",
    "MissingCredential",
    "NotFound",
    "PayloadTooLarge",
    "Refused",
    "TaskgateError",
    "Unavailable",
    "UpstreamSecretError",
    "as_path",
    "format_path",
    "status_for",
]


class TaskgateError(Exception):
    """Base of every error the core raises on purpose."""

    status: int = 500
    error: str = "internal_error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(TaskgateError):
    """The configuration is invalid; the message names where and how to fix it."""

    error = "config_error"


# Where a value sits in a document: keys and list indexes, outermost first.
FieldPath = tuple[str | int, ...]


def as_path(where: FieldPath | str | None) -> FieldPath:
    """A path from a tuple, or from text a caller has already spelled (one part)."""
    return () if where is None else (where,) if isinstance(where, str) else tuple(where)


def format_path(path: Sequence[str | int]) -> str:
    """``("rules", 2, "paths", 0)`` → ``rules[2].paths[0]``: the spelling every error uses.

    A leading string is kept as written, so a caller may pass a path it has already
    spelled (the config's ``workloads["spiffe://…"].ceiling[0]``)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class InvalidField(TaskgateError, ValueError):
    """A value is wrong, and ``path`` says where (→ 422 ``invalid_request`` by default).

    Parsers raise it with a path relative to what they parse (``("paths", 0)`` for a
    rule); a caller that knows where that thing sits prefixes its own part with
    :meth:`at` instead of taking the message apart. ``str()`` is the located sentence
    (``rules[2].paths[0]: …``); ``reason`` is the sentence alone; ``extra`` goes into
    the JSON body next to ``error``/``reason``/``field``. It is a ``ValueError`` too,
    as the parsers' errors were.
    """

    status = 422
    error = "invalid_request"

    def __init__(self, path: FieldPath | str | None, reason: str, *, status: int = 422,
                 error: str = "invalid_request", **extra: Any) -> None:
        super().__init__(reason)
        self.path = as_path(path)
        self.status, self.error, self.extra = status, error, extra

    @property
    def field(self) -> str | None:
        """The path as text, or ``None`` when the whole request is to blame."""
        return format_path(self.path) or None

    def at(self, *prefix: str | int) -> InvalidField:
        """The same error, located inside ``prefix`` (e.g. ``at("rules", 2)``)."""
        return InvalidField((*prefix, *self.path), self.reason, status=self.status,
                            error=self.error, **self.extra)

    def body(self) -> dict[str, Any]:
        """The JSON answer: ``error``, ``reason``, ``field`` (when known), ``extra``."""
        out: dict[str, Any] = {"error": self.error, "reason": self.reason}
        if self.field is not None:
            out["field"] = self.field
        return {**out, **self.extra}

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class AuthError(TaskgateError):
    """The caller could not be identified from the proxy credential."""

    status = 407
    error = "proxy_authentication_required"


class MissingCredential(AuthError):
    """No credential was presented."""


class InvalidCredential(AuthError):
    """A credential was presented but could not be accepted."""


class Refused(TaskgateError):
    """The caller is known, but policy does not allow the call."""

    status = 403
    error = "forbidden"

    def __init__(self, reason: str, rule: str | None = None) -> None:
        super().__init__(reason)
        self.rule = rule


class NotFound(TaskgateError):
    """The control plane has no object by that id (or no longer remembers it)."""

    status = 404
    error = "not_found"


class Conflict(TaskgateError):
    """The request contradicts the object's state, e.g. answering an approval twice."""

    status = 409
    error = "conflict"


class PayloadTooLarge(TaskgateError):
    """A body the gateway must inspect exceeds its cap."""

    status = 413
    error = "payload_too_large"


class LengthRequired(TaskgateError):
    """A body the gateway must inspect was sent without a Content-Length (chunked)."""

    status = 411
    error = "length_required"


class UpstreamSecretError(TaskgateError):
    """A secret provider failed; the message names the secret, never its value."""

    status = 502
    error = "secret_unavailable"


class Unavailable(TaskgateError):
    """A dependency the call needs (audit log, state store) failed; fail closed."""

    status = 503
    error = "unavailable"


def status_for(exc: BaseException) -> tuple[int, str, str]:
    """Map any exception to (status, error code, reason) — the one translation point.

    Unknown exceptions become a 500 with a fixed reason: their text may carry
    data (a header, a token) that must not reach the agent.
    """
    if isinstance(exc, TaskgateError):
        return exc.status, exc.error, exc.reason
    return 500, "internal_error", "the gateway failed while deciding; the call was refused"
