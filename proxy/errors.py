"""The exceptions the core raises, and the one place they become statuses.

    TaskgateError
    ├── ConfigError            the config file is wrong (names file, line, key)
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

__all__ = [
    "AuthError",
    "ConfigError",
    "Conflict",
    "InvalidCredential",
    "LengthRequired",
    "MissingCredential",
    "NotFound",
    "PayloadTooLarge",
    "Refused",
    "TaskgateError",
    "Unavailable",
    "UpstreamSecretError",
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
