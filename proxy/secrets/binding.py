"""Bind a secret to its destination: every name for where a call goes must agree.

A secret is added only when the rule's host, the request's target (and an
absolute-form URL's authority), the Host header, the CONNECT target and the
TLS server name all name the same place — otherwise a tunnel to one host
with a request (or SNI) for another would carry the credential to a host the
rule never named. Over plain HTTP only when the rule says ``scheme: http``.
The authorize step checks most of this already; this is the second look,
right where the value leaves.
"""

from __future__ import annotations

from typing import Protocol

from proxy.errors import Refused
from proxy.policy import Rule, canonical_host, split_hostport


class Endpoint(Protocol):
    """Where a CONNECT tunnel leads (the gateway's ``Tunnel``)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

__all__ = ["check_destination"]


def _same(name: str | None, host: str) -> bool:
    if name is None:
        return False
    try:
        return canonical_host(name) == host
    except ValueError:
        return False


def check_destination(rule: Rule, *, scheme: str, host: str, port: int,
                      host_header: str | None, tunnel: Endpoint | None, sni: str | None,
                      authority: str = "") -> None:
    """Raise :class:`Refused` unless ``rule``'s secret may go to this destination."""
    secret = rule.secret

    def refuse(why: str) -> Refused:
        return Refused(f"secret {secret!r} not sent: {why}", rule.id)

    if scheme != "https" and rule.scheme != "http":
        raise refuse("secrets travel over https only, unless the rule names scheme: http")
    try:
        chost = canonical_host(host)
    except ValueError:
        raise refuse("the request's host is not a valid host name") from None
    if not rule.host.matches(chost) or port != rule.port_for(scheme):
        raise refuse("the request does not go to the rule's host and port")
    for what, value in (("Host header", host_header), ("request's URL", authority or None)):
        if value is not None:
            name, hport = split_hostport(value)
            if not _same(name, chost) or (hport is not None and hport != port):
                raise refuse(f"the {what} names another destination")
    if tunnel is None:
        if scheme == "https":
            raise refuse("an https call must come through a CONNECT tunnel")
        return
    if (tunnel.host, tunnel.port) != (chost, port):
        raise refuse("the CONNECT target names another destination")
    if scheme == "https" and sni is not None and not _same(sni, chost):
        raise refuse("the TLS server name names another destination")
