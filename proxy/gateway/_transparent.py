"""Transparent mode: who a redirected connection is, and where it may go.

A connection redirected to the transparent listener (nftables/iptables REDIRECT; see
deploy/transparent/) carries no proxy credential. So:

* **who** is its source address: the workload whose ``sources`` claim it (longest
  prefix first; the config refuses prefixes shared by two workloads). A live task of
  that workload bound to the address (``bind.client_cidrs``) makes the call the task's,
  judged on its grants; otherwise the workload's standing rules hold. An address no
  workload claims is refused (:class:`~proxy.errors.Refused`).
* **where** is the original destination address (``SO_ORIGINAL_DST``), named by the
  TLS server name or the Host header: the name must resolve to that address, or the
  call is refused. Otherwise a client could connect to an address it may reach and
  name another host in SNI/Host (domain fronting), or the reverse.
* **what** must be HTTP (or TLS carrying HTTP): anything else is refused, never relayed
  as raw bytes (:func:`looks_like_http`).

Pure logic; nothing here imports mitmproxy.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from proxy.config import Config, Network, WorkloadConfig
from proxy.errors import Refused
from proxy.gateway._egress import Resolver
from proxy.identity import TASK_ISSUER, Caller
from proxy.policy import canonical_host, split_hostport

__all__ = ["TRANSPARENT_ISSUER", "BoundTasks", "SourceIdentity", "Sources", "TaskBinds",
           "destination_name", "looks_like_http", "original_destination_reason"]

TRANSPARENT_ISSUER = "taskgate:transparent"  # a caller known by its source address

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(ip: str) -> IPAddress:
    """The client's address; an IPv4-mapped IPv6 peer (a dual-stack listener) as IPv4."""
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Sources:
    """Client networks → workload; the longest prefix that holds the address wins."""

    def __init__(self, workloads: Mapping[str, WorkloadConfig]) -> None:
        claims = [(net, name) for name, wl in workloads.items() for net in wl.sources]
        self._claims = sorted(claims, key=lambda c: c[0].prefixlen, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._claims)

    def workload_of(self, ip: str) -> str | None:
        try:
            addr = client_address(ip)
        except ValueError:
            return None
        for net, name in self._claims:
            if addr.version == net.version and addr in net:
                return name
        return None


class BoundTasks(Protocol):
    """The tasks a workload's agent can be at one address: the seam to the task registry.

    ``bind.client_cidrs`` on ``POST /v1/tasks`` (issue 14, token binding) fills it; the
    registry is read through :class:`TaskBinds`."""

    def bound_task(self, workload: str, client: IPAddress) -> Caller | None:
        """The live task of ``workload`` bound to ``client`` (narrowest bind, then newest)."""


class _BoundTask(Protocol):
    id: str
    workload: str
    owner: str | None
    created_at: float
    expires_at: float
    bind: tuple[Network, ...]


class _Bindings(Protocol):
    """The task registry as transparent mode reads it (``TaskRegistry.bound_to``)."""

    def bound_to(self, address: str, workload: str) -> Sequence[_BoundTask]:
        """The live tasks of ``workload`` bound to ``address``."""


class TaskBinds:
    """:class:`BoundTasks` over the task registry: which tasks are bound where (live,
    of the workload, holding the address) is the registry's to say, the same answer its
    token check gives; which of them the call is, is transparent mode's."""

    def __init__(self, registry: _Bindings) -> None:
        self._registry = registry

    def bound_task(self, workload: str, client: IPAddress) -> Caller | None:
        best: tuple[int, float, _BoundTask] | None = None
        for task in self._registry.bound_to(str(client), workload):
            width = max((net.prefixlen for net in task.bind
                         if client.version == net.version and client in net), default=-1)
            if width < 0:
                continue  # the registry's answer, checked again: a bind must hold it
            if best is None or (width, task.created_at) > best[:2]:
                best = (width, task.created_at, task)
        if best is None:
            return None
        task = best[2]
        return Caller(workload, TASK_ISSUER, task.expires_at, task=task.id, owner=task.owner)


class SourceIdentity:
    """Who a transparent connection is, from its source address."""

    def __init__(self, config: Config, tasks: BoundTasks) -> None:
        self.config = config  # the one it was built from (a reload swaps in another)
        self.sources = Sources(config.workloads)
        self._owners = {name: wl.owner for name, wl in config.workloads.items()}
        self._tasks = tasks

    def caller(self, client: str | None) -> Caller:
        """The caller at ``client``; :class:`Refused` if no workload claims the address."""
        workload = self.sources.workload_of(client) if client else None
        if workload is None:
            raise Refused(f"no workload claims the source address {client or '(unknown)'}: "
                          "transparent calls are identified by their address (the "
                          "workload's 'sources' in the config)")
        task = self._tasks.bound_task(workload, client_address(client or ""))
        if task is not None:
            return task
        return Caller(workload, TRANSPARENT_ISSUER, math.inf, owner=self._owners.get(workload))


def destination_name(sni: str | None, host_header: str | None, original: str) -> str:
    """The name a transparent call gives its destination: the TLS server name, else the
    Host header's host, else the original destination address itself. The Host header
    is checked against that name later, with the port (authorize)."""
    name = sni or (split_hostport(host_header)[0] if host_header else None) or original
    try:
        return canonical_host(name)
    except ValueError:
        raise Refused("the TLS server name or Host header is not a valid host name") from None


async def original_destination_reason(resolver: Resolver, name: str, port: int,
                                      original: str) -> str | None:
    """Why ``name`` may not stand for the connection's original destination, or None.

    The name must resolve to the address the client connected to; an address literal
    must be that address."""
    want = client_address(original)
    try:
        addresses = await resolver.resolve(name, port)
    except OSError as e:
        return f"{e}; the destination cannot be checked against the original address"
    for ip in addresses:
        try:
            if client_address(ip) == want:
                return None
        except ValueError:
            continue
    shown = ", ".join(addresses[:4]) + (", …" if len(addresses) > 4 else "")
    return (f"{name!r} resolves to {shown}, not to {want}, where the connection was sent: "
            "the TLS server name and Host must name the original destination (no domain "
            "fronting through the transparent listener)")


# -- is it HTTP? -------------------------------------------------------------------------
_REQUEST_LINE = re.compile(rb"[A-Z][A-Z-]{0,19} [\x21-\x7e]+ HTTP/[0-9](?:\.[0-9])?\r?\n")
_PARTIAL_LINE = re.compile(rb"[A-Z][A-Z-]{0,19}(?: [\x21-\x7e]*(?: [HTP/0-9.]*)?)?")
_MAX_LINE = 16 * 1024


def looks_like_http(data: bytes) -> bool | None:
    """Does a client's first data start an HTTP/1 request line (or the HTTP/2 preface)?
    ``None``: not enough data yet to say. Anything else is refused: no raw relay."""
    end = data.find(b"\n")
    if end < 0:
        if not data or (len(data) < _MAX_LINE and _PARTIAL_LINE.fullmatch(data)):
            return None
        return False
    return _REQUEST_LINE.fullmatch(data[:end + 1]) is not None
