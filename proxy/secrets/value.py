"""Secret values, minted tokens, and the one error a provider raises.

A secret's value lives in a :class:`SecretValue`, whose ``repr``/``str`` is
``[secure]``: a value that slips into a log call, an f-string, an exception
message or a dataclass ``repr`` prints as that, never as itself. The text is
reachable only through :meth:`SecretValue.reveal`, called where a value leaves
the gateway (an injected header, a provider request).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any, NoReturn

from proxy.errors import UpstreamSecretError

__all__ = ["FAILURES", "Minted", "ProviderError", "SecretValue"]

MASK = "[secure]"


class SecretValue:
    """A secret's text, masked everywhere except :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a secret value is a str")
        self._value = value

    def reveal(self) -> str:
        """The text itself: only where it leaves the gateway on purpose."""
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return MASK

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretValue):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((SecretValue, self._value))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecretValue is never pickled (secrets stay in memory)")


# The kinds of provider failure, as the agent and the log name them.
FAILURES = {
    "unreachable": "the provider could not be reached",
    "timeout": "the provider did not answer in time",
    "rejected": "the provider refused the request",
    "bad_response": "the provider's answer could not be used",
    "misconfigured": "the secret's own settings cannot be used",
    "expired": "the only token at hand has expired",
    "unrecorded": "the credential could not be recorded for its revocation",
    "internal": "the gateway failed while fetching it (see its log)",
}


class ProviderError(UpstreamSecretError):
    """A provider failed for secret ``secret``: → 502 naming the secret and the kind.

    ``detail`` is a fixed, value-free phrase (an HTTP status, an OAuth error
    code from the RFC's closed list, the name of an environment variable).
    """

    def __init__(self, secret: str, kind: str, detail: str | None = None) -> None:
        text = FAILURES[kind]
        if detail:
            text = f"{text} ({detail})"
        super().__init__(f"secret {secret!r} is unavailable: {text}")
        self.secret, self.kind, self.detail = secret, kind, detail
        self.what = text  # the failure without the secret's name: value-free too


@dataclass(slots=True)
class Minted:
    """One value a provider produced, and for how long it may be used.

    ``expires_at`` drives the cache: ``None`` means the value never expires (an
    environment variable). ``reported`` says the expiry came from the issuer
    (an OAuth ``expires_in``, a GitHub ``expires_at``, a Vault lease) rather than
    from our own reload interval, so it belongs in the audit record.
    ``revoke`` is what the provider needs to revoke it (a lease id), if anything.
    """

    secret: str
    value: SecretValue
    issued_at: float
    expires_at: float | None = None
    reported: bool = False
    task: str | None = None
    revoke: Any = field(default=None, repr=False)

    @property
    def lifetime(self) -> float | None:
        if self.expires_at is None:
            return None
        return self.expires_at - self.issued_at

    def fresh(self, now: float, skew: float) -> bool:
        """Still good without a refresh: more than min(half its life, skew) is left."""
        if self.expires_at is None:
            return True
        lifetime = max(self.expires_at - self.issued_at, 0.0)
        return now < self.expires_at - min(lifetime / 2, skew)

    def usable(self, now: float) -> bool:
        """Not yet expired: the last check before a value leaves the gateway."""
        return self.expires_at is None or now < self.expires_at
