"""Host names and host patterns, normalised once so that matching is exact.

A host reaches us in many spellings: ``API.GitHub.com.``, ``xn--…``, ``127.1``,
``0x7f.0.0.1``, ``2130706433``, ``[::ffff:127.0.0.1]``. Rules and calls are both
brought to one canonical form here, so a rule can never be dodged by spelling.
Numeric IPv4 forms are read the way the system resolver reads them
(``inet_aton``), because that is what the upstream connection will use.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

import idna

__all__ = ["HostPattern", "canonical_host", "default_port"]

_NUMERIC_V4 = re.compile(r"^[0-9a-fA-FxX.]+$")
_NUMBER = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def default_port(scheme: str) -> int:
    """The port a scheme implies when the URL names none."""
    return 443 if scheme == "https" else 80


@functools.lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """Return the canonical form of ``host`` or raise ``ValueError``.

    Lower case, no trailing dot, IDNA 2008 A-labels for names; dotted-quad for
    every IPv4 spelling; compressed form for IPv6, with IPv4-mapped addresses
    turned into their IPv4 form.

    Memoised: a call is judged with it two or three times (target, Host header,
    SNI) and the IDNA codec is the costliest step of a decision. The function is
    pure, refusals (``ValueError``) are not cached, and inputs are at most 255
    characters, so the cache stays small and answers exactly as a fresh call.
    """
    if not host or len(host) > 255:
        raise ValueError("empty or overlong host")
    h = host.strip()
    if h != host:
        raise ValueError("host has surrounding whitespace")
    if h.startswith("[") or ":" in h:
        inner = h[1:-1] if h.startswith("[") and h.endswith("]") else h
        if "%" in inner:
            raise ValueError("IPv6 zone identifiers are not accepted")
        addr = ipaddress.IPv6Address(inner)
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return addr.compressed
    if h.endswith("."):
        h = h[:-1]
    if _NUMERIC_V4.match(h):  # digits, hex and dots: an address spelling, no IDNA needed
        ascii_host = h.lower()
    else:
        try:
            ascii_host = idna.encode(h, uts46=True).decode("ascii")
        except idna.IDNAError:
            # Underscores and other bytes IDNA refuses still appear in real names
            # (_acme-challenge, service records); accept plain ASCII labels as-is.
            ascii_host = h.lower()
    if not all(_LABEL.match(label) for label in ascii_host.split(".")):
        raise ValueError(f"{host!r} is not a valid host name")
    if _NUMBER.match(ascii_host.rpartition(".")[2]):
        # A host whose last label is a number is an IPv4 address or nothing (as
        # in the WHATWG URL parser): '0x100000000' must not pass as a "name".
        # After IDNA mapping, so full-width digits ('１２７.１') are caught too.
        try:
            return socket.inet_ntoa(socket.inet_aton(ascii_host))
        except OSError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    return ascii_host


@dataclass(frozen=True, slots=True)
class HostPattern:
    """An exact host, or ``*.suffix`` matching one or more labels below suffix."""

    host: str
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Parse a rule's ``host``; the ``ValueError`` says how to fix it."""
        if not isinstance(text, str) or not text:
            raise ValueError("host must be a non-empty string")
        if text.startswith("*.") and "*" not in text[2:]:
            try:
                suffix = canonical_host(text[2:])
            except ValueError as e:
                raise ValueError(f"{text!r} is not a valid pattern: {e}") from None
            if _is_ip(suffix):
                raise ValueError(f"{text!r}: a wildcard cannot stand over an IP address")
            if "." not in suffix:
                raise ValueError(
                    f"{text!r} would match a whole top-level domain; name a registrable domain"
                )
            return cls(suffix, True)
        if "*" in text:
            tail = text.rpartition("*")[2].lstrip(".")
            if "." in tail:
                raise ValueError(f"{text!r} is not a valid pattern; use {'*.' + tail!r}")
            raise ValueError(f"{text!r}: '*' is allowed only as a whole leading label, "
                             "as in '*.example.com'")
        return cls(canonical_host(text), False)

    def matches(self, host: str) -> bool:
        """``host`` must already be canonical."""
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def __str__(self) -> str:
        return f"*.{self.host}" if self.wildcard else self.host
