"""Egress: which address a call may reach once its host name is resolved (SSRF).

A rule names hosts; DNS decides where a name leads. A name under ``*.good.test``
that resolves to ``127.0.0.1``, ``10.0.0.5`` or the cloud metadata address
``169.254.169.254`` would otherwise take an agent into the gateway's own network.
So a name is resolved once, **every** address it resolves to is judged, and the
connection goes to an address that was judged (pinned: nothing resolves again).

Addresses fall in three classes (:func:`classify`):

* ``public`` — reachable under any rule that names the host;
* ``private`` — loopback, RFC 1918, CGNAT (100.64/10), link-local (169.254/16,
  fe80::/10, the metadata services), ULA (fc00::/7), benchmarking, the host's own
  interface addresses. Reachable only by a rule that opts in explicitly: its host
  is an IP literal, or it says ``allow_private: true`` (for a task rule, only when
  the workload's ceiling rule says so too);
* ``never`` — unspecified, multicast, broadcast and other reserved ranges, and
  the gateway's own listening endpoints: no rule reaches them.

An IPv6 address that carries an IPv4 address (IPv4-mapped, IPv4-compatible,
SIIT-translated, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo) is judged by
the worst of itself and what it carries. A name that resolves to a public and a
private address is judged by the private one.

Pure logic and an injectable resolver; nothing here imports mitmproxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "NEVER",
    "PRIVATE",
    "PUBLIC",
    "EgressGuard",
    "OwnAddresses",
    "Resolver",
    "Verdict",
    "classify",
    "embedded_v4",
    "judge",
    "opt_in_hint",
]

PUBLIC, PRIVATE, NEVER = "public", "private", "never"
_RANK = {PUBLIC: 0, PRIVATE: 1, NEVER: 2}
VERDICTS_KEPT = 4096  # judged (host, port, addresses, …) remembered by an EgressGuard

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4: tuple[tuple[ipaddress.IPv4Network, str, str], ...] = tuple(
    (ipaddress.IPv4Network(net), kind, label) for net, kind, label in (
        ("0.0.0.0/8", NEVER, "unspecified ('this network')"),
        ("127.0.0.0/8", PRIVATE, "loopback"),
        ("10.0.0.0/8", PRIVATE, "private (RFC 1918)"),
        ("172.16.0.0/12", PRIVATE, "private (RFC 1918)"),
        ("192.168.0.0/16", PRIVATE, "private (RFC 1918)"),
        ("100.64.0.0/10", PRIVATE, "shared address space (CGNAT, RFC 6598)"),
        ("169.254.0.0/16", PRIVATE, "link-local (cloud metadata)"),
        ("192.0.0.0/24", PRIVATE, "IETF protocol assignments"),
        ("198.18.0.0/15", PRIVATE, "benchmarking (RFC 2544)"),
        ("192.0.2.0/24", NEVER, "documentation (TEST-NET-1)"),
        ("198.51.100.0/24", NEVER, "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", NEVER, "documentation (TEST-NET-3)"),
        ("192.88.99.0/24", NEVER, "reserved (6to4 relay anycast)"),
        ("224.0.0.0/4", NEVER, "multicast"),
        ("240.0.0.0/4", NEVER, "reserved / broadcast"),
    ))

_V6: tuple[tuple[ipaddress.IPv6Network, str, str], ...] = tuple(
    (ipaddress.IPv6Network(net), kind, label) for net, kind, label in (
        ("::/128", NEVER, "unspecified"),
        ("::1/128", PRIVATE, "loopback"),
        ("64:ff9b:1::/48", PRIVATE, "local-use NAT64 (RFC 8215)"),
        ("100::/64", NEVER, "discard-only (RFC 6666)"),
        ("2001:db8::/32", NEVER, "documentation"),
        ("fc00::/7", PRIVATE, "unique local (ULA)"),
        ("fe80::/10", PRIVATE, "link-local"),
        ("fec0::/10", PRIVATE, "site-local (deprecated)"),
        ("ff00::/8", NEVER, "multicast"),
    ))

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_COMPAT = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _address(ip: str | IPAddress) -> IPAddress:
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    return ipaddress.ip_address(ip.partition("%")[0])  # a zone id never changes the class


@functools.lru_cache(maxsize=4096)
def _literal(host: str) -> str | None:
    """``host`` written as an address (its normal spelling), ``None`` for a name. Cached:
    parsing, and the exception a name raises, cost microseconds on every call."""
    try:
        return str(_address(host))
    except ValueError:
        return None


def embedded_v4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, …)."""
    n = int(addr)
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    if addr in _MAPPED or addr in _TRANSLATED or addr in _NAT64:
        return [low]
    if addr in _COMPAT:
        return [low] if n > 1 else []  # '::' and '::1' are themselves, not 0.0.0.x
    if addr in _SIX_TO_FOUR:
        return [ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)]
    if addr in _TEREDO and addr.teredo is not None:
        server, client = addr.teredo
        return [server, client]
    return []


def classify(ip: str | IPAddress) -> tuple[str, str]:
    """``(class, label)`` of an address: ``public``, ``private`` or ``never``."""
    addr = _address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        for net, kind, label in _V4:
            if addr in net:
                return kind, label
        return PUBLIC, "public"
    worst = (PUBLIC, "public")
    for net6, kind, label in _V6:
        if addr in net6:
            worst = (kind, label)
            break
    for v4 in embedded_v4(addr):
        kind, label = classify(v4)
        if _RANK[kind] > _RANK[worst[0]]:
            worst = (kind, f"{label}, as {v4} inside an IPv6 address")
    return worst


@dataclass(frozen=True, slots=True)
class OwnAddresses:
    """The gateway's own addresses: its listening endpoints and its interfaces.

    A listener on an unspecified address (``0.0.0.0``, ``::``) answers on every
    local address, so its port is the gateway's on all of ``local``."""

    endpoints: frozenset[tuple[str, int]] = frozenset()
    local: frozenset[str] = frozenset()

    @classmethod
    def of(cls, listens: Iterable[tuple[str, int]],
           local: Iterable[str] = ()) -> OwnAddresses:
        locals_ = {str(_address(a)) for a in local}
        endpoints: set[tuple[str, int]] = set()
        for host, port in listens:
            try:
                addr = _address(host)
            except ValueError:
                continue  # a listen host is an address (config checks it)
            if addr.is_unspecified:
                endpoints.update((a, port) for a in locals_ | {"127.0.0.1", "::1"})
                endpoints.update({("0.0.0.0", port), ("::", port)})
            else:
                endpoints.add((str(addr), port))
        return cls(frozenset(endpoints), frozenset(locals_))

    def endpoint(self, ip: str, port: int) -> bool:
        addr = _address(ip)
        if (str(addr), port) in self.endpoints:
            return True
        if isinstance(addr, ipaddress.IPv6Address):
            return any((str(v4), port) in self.endpoints for v4 in embedded_v4(addr))
        return False

    def interface(self, ip: str) -> bool:
        addr = _address(ip)
        if str(addr) in self.local:
            return True
        return isinstance(addr, ipaddress.IPv6Address) and any(
            str(v4) in self.local for v4 in embedded_v4(addr))


def local_addresses() -> frozenset[str]:
    """This host's addresses, as far as the resolver knows them (best effort)."""
    found: set[str] = set()
    with contextlib.suppress(OSError, UnicodeError):
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(sockaddr[0]))
    found.update(_interface_v4())
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open("/proc/net/if_inet6") as f:  # noqa: PTH123 - Linux: every IPv6 address
        for line in f:
            found.add(str(ipaddress.IPv6Address(int(line.split()[0], 16))))
    return frozenset(found)


def _interface_v4() -> set[str]:
    """Each interface's IPv4 address (Linux ``SIOCGIFADDR``); empty where unsupported."""
    found: set[str] = set()
    try:  # here, not at the top: fcntl exists on POSIX only (ImportError elsewhere)
        import fcntl
        import struct

        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError):
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            with contextlib.suppress(OSError):
                req = struct.pack("256s", name.encode()[:15])
                found.add(socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24]))
    return found


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a call may go. The zero value refuses."""

    allowed: bool = False
    reason: str = "the upstream's address was not checked"
    ip: str | None = None


def opt_in_hint(host: str) -> str:
    return (f"to reach a private address on purpose, add 'allow_private: true' to the "
            f"rule for {host!r} (and to the workload's ceiling rule, for a task), or "
            "name the address itself as the rule's host")


def judge(host: str, port: int, addresses: Sequence[str], *, opt_in: bool,
          own: OwnAddresses = OwnAddresses()) -> Verdict:
    """May a call to ``host:port`` go to these resolved ``addresses``? Pin the first.

    Every address is judged, not just the one connected to: a name is only as safe
    as the worst address it can resolve to."""
    if not addresses:
        return Verdict(False, f"{host!r} did not resolve to any address")
    for ip in addresses:
        try:
            kind, label = classify(ip)
        except ValueError:
            return Verdict(False, f"{host!r} resolved to {ip!r}, which is not an address")
        if own.endpoint(ip, port):
            return Verdict(False, f"{host!r} resolves to {ip}, port {port}: the gateway "
                                  "itself; no rule reaches the gateway through the gateway")
        if kind == NEVER:
            return Verdict(False, f"{host!r} resolves to {ip}, a {label} address, which "
                                  "no rule can reach")
        if kind == PUBLIC and own.interface(ip):
            kind, label = PRIVATE, "one of the gateway's own"
        if kind == PRIVATE and not opt_in:
            also = " (among public ones)" if any(
                _safe_class(a) == PUBLIC for a in addresses) else ""
            return Verdict(False, f"{host!r} resolves to {ip}, a {label} address{also}; "
                                  + opt_in_hint(host))
    return Verdict(True, "every resolved address is allowed", str(_address(addresses[0])))


def _safe_class(ip: str) -> str:
    try:
        return classify(ip)[0]
    except ValueError:
        return NEVER


# -- resolution -------------------------------------------------------------------
Lookup = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_lookup(host: str, port: int) -> list[str]:
    """The system resolver, off the event loop (``loop.getaddrinfo`` runs in a thread)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for *_, sockaddr in infos:
        ip = str(sockaddr[0])
        if ip not in out:
            out.append(ip)
    return out


@dataclass(slots=True)
class Resolver:
    """Resolves a name once per ``ttl`` seconds; concurrent lookups share one query.

    Failures are remembered for ``negative_ttl`` seconds. At most ``size`` names
    are kept (the oldest go first)."""

    lookup: Lookup = system_lookup
    ttl: float = 30.0
    negative_ttl: float = 5.0
    size: int = 4096
    timeout: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _cache: dict[str, tuple[float, asyncio.Future[tuple[str, ...]]]] = field(
        default_factory=dict, repr=False)

    def known(self, host: str) -> tuple[str, ...] | None:
        """What :meth:`resolve` would return without waiting: an IP literal, or the
        addresses of a name resolved within its ``ttl``; ``None`` for anything else
        (a lookup to make or still under way, a remembered failure)."""
        literal = _literal(host)
        if literal is not None:
            return (literal,)
        hit = self._cache.get(host)
        if hit is None or hit[0] <= self.clock():
            return None
        fut = hit[1]
        if not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

    async def resolve(self, host: str, port: int) -> tuple[str, ...]:
        """The addresses of ``host`` (an IP literal is itself); ``OSError`` if none."""
        literal = _literal(host)
        if literal is not None:
            return (literal,)
        now = self.clock()
        hit = self._cache.get(host)
        if hit is not None and hit[0] > now:
            return await asyncio.shield(hit[1])
        fut: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()
        if len(self._cache) >= self.size:
            for key in list(self._cache)[: max(1, self.size // 8)]:
                del self._cache[key]
        self._cache[host] = (now + self.ttl, fut)
        try:
            addrs = tuple(await asyncio.wait_for(self.lookup(host, port), self.timeout))
            if not addrs:
                raise OSError(f"{host!r} has no address")
        except (OSError, TimeoutError, UnicodeError) as e:
            self._cache[host] = (now + self.negative_ttl, fut)
            err = OSError(f"{host!r} could not be resolved: "
                          f"{getattr(e, 'strerror', None) or e or 'timed out'}")
            fut.set_exception(err)
            fut.exception()  # retrieved: waiters re-raise it, nothing logs it as lost
            raise err from None
        except BaseException:
            self._cache.pop(host, None)
            fut.cancel()
            raise
        fut.set_result(addrs)
        return addrs


@dataclass(slots=True)
class EgressGuard:
    """Resolve, judge, pin: the one question the data plane asks before connecting."""

    own: OwnAddresses
    resolver: Resolver = field(default_factory=Resolver)
    _verdicts: dict[tuple[str, int, tuple[str, ...], bool, str | None], Verdict] = field(
        default_factory=dict, repr=False)

    async def check(self, host: str, port: int, *, opt_in: bool,
                    pinned: str | None = None) -> Verdict:
        """Judge ``host:port`` for a rule that does (not) ``opt_in`` to private addresses.

        ``pinned``: the address an earlier call on the same agent connection was
        pinned to (its upstream connection may be reused): it stays the pin, and is
        judged for this call's rule together with what the name resolves to now."""
        try:
            addresses = await self.resolver.resolve(host, port)
        except OSError as e:
            return Verdict(False, str(e))
        return self._judge(host, port, addresses, opt_in, pinned)

    def check_known(self, host: str, port: int, *, opt_in: bool,
                    pinned: str | None = None) -> Verdict | None:
        """:meth:`check` without waiting, when the resolver knows ``host`` already (an IP
        literal, a name resolved within its TTL); ``None``: call :meth:`check`."""
        addresses = self.resolver.known(host)
        if addresses is None:
            return None
        return self._judge(host, port, addresses, opt_in, pinned)

    def _judge(self, host: str, port: int, addresses: tuple[str, ...], opt_in: bool,
               pinned: str | None) -> Verdict:
        """:func:`judge`, remembered: a verdict depends on nothing but these arguments
        and ``own`` (frozen), and a keep-alive agent asks the same question per call."""
        key = (host, port, addresses, opt_in, pinned)
        verdict = self._verdicts.get(key)
        if verdict is None:
            if pinned is not None:
                addresses = (pinned, *(a for a in addresses if a != pinned))
            verdict = judge(host, port, addresses, opt_in=opt_in, own=self.own)
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict
