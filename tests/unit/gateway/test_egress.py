"""proxy/gateway/_egress.py: the deny set, embedded IPv4 forms, the decision, the resolver."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

import pytest

from proxy.gateway import EgressGuard, OwnAddresses
from proxy.gateway._egress import NEVER, PRIVATE, PUBLIC, Resolver, classify, embedded_v4, judge

# (address, class): every range of the deny set, and public neighbours of each.
CLASSES = [
    # loopback
    ("127.0.0.1", PRIVATE), ("127.255.255.254", PRIVATE), ("127.1.2.3", PRIVATE),
    ("::1", PRIVATE),
    # RFC 1918
    ("10.0.0.1", PRIVATE), ("10.255.255.255", PRIVATE), ("172.16.0.1", PRIVATE),
    ("172.31.255.254", PRIVATE), ("192.168.1.1", PRIVATE),
    ("172.15.255.255", PUBLIC), ("172.32.0.0", PUBLIC), ("11.0.0.1", PUBLIC),
    ("192.169.0.1", PUBLIC),
    # CGNAT 100.64/10 (and Alibaba's metadata address in it)
    ("100.64.0.1", PRIVATE), ("100.127.255.254", PRIVATE), ("100.100.100.200", PRIVATE),
    ("100.63.255.255", PUBLIC), ("100.128.0.0", PUBLIC),
    # link-local, cloud metadata
    ("169.254.169.254", PRIVATE), ("169.254.0.1", PRIVATE), ("169.253.255.255", PUBLIC),
    ("fe80::1", PRIVATE), ("fe80::a:b:c:d", PRIVATE), ("febf::1", PRIVATE),
    ("fe80::1%eth0", PRIVATE),
    # ULA fc00::/7 (AWS IPv6 metadata fd00:ec2::254)
    ("fc00::1", PRIVATE), ("fd00:ec2::254", PRIVATE), ("fdff:ffff::1", PRIVATE),
    ("fec0::1", PRIVATE),
    # other private-use
    ("192.0.0.8", PRIVATE), ("198.18.0.1", PRIVATE), ("198.19.255.255", PRIVATE),
    ("64:ff9b:1::a00:1", PRIVATE),
    # never: unspecified, multicast, broadcast, reserved, documentation
    ("0.0.0.0", NEVER), ("0.1.2.3", NEVER), ("::", NEVER),
    ("224.0.0.1", NEVER), ("239.255.255.250", NEVER), ("ff02::1", NEVER), ("ff05::2", NEVER),
    ("255.255.255.255", NEVER), ("240.0.0.1", NEVER), ("192.0.2.1", NEVER),
    ("198.51.100.7", NEVER), ("203.0.113.9", NEVER), ("2001:db8::1", NEVER),
    ("100::1", NEVER), ("192.88.99.1", NEVER),
    # public
    ("8.8.8.8", PUBLIC), ("1.1.1.1", PUBLIC), ("93.184.216.34", PUBLIC),
    ("2606:4700:4700::1111", PUBLIC), ("2a00:1450:4001::1", PUBLIC),
    # IPv4-mapped
    ("::ffff:127.0.0.1", PRIVATE), ("::ffff:7f00:1", PRIVATE), ("::ffff:10.0.0.1", PRIVATE),
    ("::ffff:169.254.169.254", PRIVATE), ("::ffff:100.64.0.1", PRIVATE),
    ("::ffff:0.0.0.0", NEVER), ("::ffff:224.0.0.1", NEVER), ("::ffff:8.8.8.8", PUBLIC),
    # IPv4-compatible (deprecated)
    ("::127.0.0.1", PRIVATE), ("::10.1.2.3", PRIVATE), ("::169.254.169.254", PRIVATE),
    ("::8.8.8.8", PUBLIC),
    # SIIT IPv4-translated
    ("::ffff:0:127.0.0.1", PRIVATE), ("::ffff:0:8.8.8.8", PUBLIC),
    # NAT64 well-known prefix
    ("64:ff9b::127.0.0.1", PRIVATE), ("64:ff9b::a9fe:a9fe", PRIVATE),
    ("64:ff9b::192.168.0.1", PRIVATE), ("64:ff9b::8.8.8.8", PUBLIC),
    ("64:ff9b::255.255.255.255", NEVER),
    # 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD
    ("2002:7f00:1::", PRIVATE), ("2002:7f00:0001:1234::1", PRIVATE),
    ("2002:a9fe:a9fe::1", PRIVATE), ("2002:0a00:0001::", PRIVATE),
    ("2002:0808:0808::1", PUBLIC), ("2002:e000:0001::", NEVER),
    # Teredo: server and (obfuscated) client
    ("2001:0:7f00:1::f7f7:f7f7", PRIVATE), ("2001:0:808:808::f5ff:fffe", PRIVATE),
    ("2001:0:808:808::f7f7:f7f7", PUBLIC),
]


@pytest.mark.parametrize(("ip", "kind"), CLASSES)
def test_classify(ip: str, kind: str) -> None:
    assert classify(ip)[0] == kind, classify(ip)


@pytest.mark.parametrize("ip", ["::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1",
                                "2002:7f00:1::1", "::ffff:0:7f00:1"])
def test_embedded_forms_name_the_ipv4_inside(ip: str) -> None:
    assert ipaddress.IPv4Address("127.0.0.1") in embedded_v4(ipaddress.IPv6Address(ip))
    assert "127.0.0.1" in classify(ip)[1]  # the reason says which IPv4 address


@pytest.mark.parametrize("ip", ["::", "::1", "2606:4700::1", "fe80::1"])
def test_plain_ipv6_carries_nothing(ip: str) -> None:
    assert embedded_v4(ipaddress.IPv6Address(ip)) == []


# -- the decision -----------------------------------------------------------------
OWN = OwnAddresses.of([("127.0.0.1", 8080), ("0.0.0.0", 8081)], ["10.1.2.3", "203.0.114.5"])


@pytest.mark.parametrize(("addresses", "opt_in", "allowed", "pin", "says"), [
    (["8.8.8.8"], False, True, "8.8.8.8", ""),
    (["8.8.8.8", "2606:4700::1"], False, True, "8.8.8.8", ""),
    (["2606:4700::1", "8.8.8.8"], False, True, "2606:4700::1", ""),
    # every private range, by name, refused without the opt-in
    (["127.0.0.1"], False, False, None, "loopback"),
    (["::1"], False, False, None, "loopback"),
    (["10.0.0.5"], False, False, None, "RFC 1918"),
    (["172.20.0.1"], False, False, None, "RFC 1918"),
    (["192.168.0.10"], False, False, None, "RFC 1918"),
    (["100.64.1.1"], False, False, None, "CGNAT"),
    (["169.254.169.254"], False, False, None, "metadata"),
    (["fe80::1"], False, False, None, "link-local"),
    (["fd00::1"], False, False, None, "ULA"),
    (["::ffff:127.0.0.1"], False, False, None, "127.0.0.1 inside"),
    (["64:ff9b::a9fe:a9fe"], False, False, None, "169.254.169.254 inside"),
    (["2002:c0a8:0001::"], False, False, None, "192.168.0.1 inside"),
    # a public and a private address: refused, whichever comes first
    (["8.8.8.8", "127.0.0.1"], False, False, None, "among public ones"),
    (["10.0.0.1", "8.8.8.8"], False, False, None, "among public ones"),
    (["2606:4700::1", "::ffff:10.0.0.1"], False, False, None, "among public ones"),
    # with the opt-in: allowed, pinned to the first
    (["127.0.0.1"], True, True, "127.0.0.1", ""),
    (["8.8.8.8", "10.0.0.1"], True, True, "8.8.8.8", ""),
    (["169.254.169.254"], True, True, "169.254.169.254", ""),
    (["fe80::1%eth0"], True, True, "fe80::1", ""),
    # never, even opted in
    (["0.0.0.0"], True, False, None, "no rule can reach"),
    (["::"], True, False, None, "no rule can reach"),
    (["224.0.0.251"], True, False, None, "multicast"),
    (["ff02::1"], True, False, None, "multicast"),
    (["255.255.255.255"], True, False, None, "broadcast"),
    (["8.8.8.8", "0.0.0.0"], True, False, None, "no rule can reach"),
    # the gateway's own interfaces count as private; its own listeners as never
    (["203.0.114.5"], False, False, None, "gateway's own"),
    (["203.0.114.5"], True, True, "203.0.114.5", ""),
    (["10.1.2.3"], False, False, None, "RFC 1918"),
    ([], True, False, None, "did not resolve"),
    (["not-an-ip"], True, False, None, "not an address"),
])
def test_judge(addresses: list[str], opt_in: bool, allowed: bool, pin: str | None,
               says: str) -> None:
    v = judge("x.good.test", 443, addresses, opt_in=opt_in, own=OWN)
    assert (v.allowed, v.ip) == (allowed, pin), v
    assert says in v.reason
    if not allowed and any(classify(a)[0] == PRIVATE for a in addresses
                           if a != "not-an-ip") and not opt_in:
        assert "allow_private: true" in v.reason  # says how to opt in


@pytest.mark.parametrize(("ip", "port", "own"), [
    ("127.0.0.1", 8080, True), ("::ffff:127.0.0.1", 8080, True), ("127.0.0.1", 8081, True),
    ("10.1.2.3", 8081, True), ("::1", 8081, True), ("127.0.0.1", 9999, False),
    ("10.1.2.3", 8080, False), ("127.0.0.2", 8080, False),
])
def test_own_listeners_are_never_reached(ip: str, port: int, own: bool) -> None:
    v = judge("gw.test", port, [ip], opt_in=True, own=OWN)
    assert v.allowed is not own
    if own:
        assert "the gateway itself" in v.reason


# -- the resolver -------------------------------------------------------------------
class FakeDns:
    def __init__(self, answers: dict[str, Sequence[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        await asyncio.sleep(0.01)
        if host not in self.answers:
            raise OSError(f"{host}: no such name")
        return self.answers[host]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_resolver_caches_for_ttl_and_shares_concurrent_lookups() -> None:
    dns, clock = FakeDns({"a.good.test": ["8.8.8.8"]}), Clock()
    r = Resolver(dns, ttl=30, clock=clock)

    async def go() -> None:
        got = await asyncio.gather(*(r.resolve("a.good.test", 443) for _ in range(5)))
        assert all(g == ("8.8.8.8",) for g in got)
        assert dns.asked == ["a.good.test"]
        clock.now += 29
        await r.resolve("a.good.test", 443)
        assert dns.asked == ["a.good.test"]
        dns.answers["a.good.test"] = ["127.0.0.1"]
        clock.now += 2  # expired: asked again, the new answer
        assert await r.resolve("a.good.test", 443) == ("127.0.0.1",)
        assert dns.asked == ["a.good.test"] * 2

    asyncio.run(go())


def test_resolver_remembers_failures_briefly_and_never_asks_for_literals() -> None:
    dns, clock = FakeDns({}), Clock()
    r = Resolver(dns, negative_ttl=5, clock=clock)

    async def go() -> None:
        for _ in range(2):
            with pytest.raises(OSError, match="could not be resolved"):
                await r.resolve("nx.good.test", 443)
        assert dns.asked == ["nx.good.test"]
        clock.now += 6
        with pytest.raises(OSError):
            await r.resolve("nx.good.test", 443)
        assert len(dns.asked) == 2
        assert await r.resolve("10.0.0.1", 80) == ("10.0.0.1",)
        assert await r.resolve("::ffff:7f00:1", 80) == ("::ffff:7f00:1",)
        assert len(dns.asked) == 2

    asyncio.run(go())


def test_resolver_times_out_and_stays_bounded() -> None:
    async def slow(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(5)
        return ["8.8.8.8"]

    async def go() -> None:
        r = Resolver(slow, timeout=0.05)
        with pytest.raises(OSError, match="could not be resolved"):
            await r.resolve("slow.good.test", 443)
        fast = Resolver(FakeDns({f"h{i}.test": ["8.8.8.8"] for i in range(50)}), size=16)
        for i in range(50):
            await fast.resolve(f"h{i}.test", 443)
        assert len(fast._cache) <= 16

    asyncio.run(go())


@pytest.mark.parametrize(("answers", "opt_in", "pinned", "allowed", "ip"), [
    # a wildcard's name resolving to each kind of private address: refused
    ({"x.good.test": ["127.0.0.1"]}, False, None, False, None),
    ({"x.good.test": ["169.254.169.254"]}, False, None, False, None),
    ({"x.good.test": ["::ffff:10.0.0.1"]}, False, None, False, None),
    ({"x.good.test": ["93.184.216.34", "10.0.0.1"]}, False, None, False, None),
    ({"x.good.test": ["93.184.216.34"]}, False, None, True, "93.184.216.34"),
    ({"x.good.test": ["10.0.0.1"]}, True, None, True, "10.0.0.1"),
    # an agent connection already pinned: the pin stays; it is judged for this rule too
    ({"x.good.test": ["93.184.216.35"]}, False, "93.184.216.34", True, "93.184.216.34"),
    ({"x.good.test": ["93.184.216.34"]}, False, "10.0.0.1", False, None),
    ({"x.good.test": ["93.184.216.34"]}, True, "10.0.0.1", True, "10.0.0.1"),
    ({}, True, None, False, None),  # does not resolve
])
def test_guard(answers: dict[str, list[str]], opt_in: bool, pinned: str | None,
               allowed: bool, ip: str | None) -> None:
    guard = EgressGuard(OwnAddresses(), Resolver(FakeDns(answers)))
    v = asyncio.run(guard.check("x.good.test", 443, opt_in=opt_in, pinned=pinned))
    assert (v.allowed, v.ip) == (allowed, ip), v


def test_guard_resolves_with_the_system_resolver() -> None:
    v = asyncio.run(EgressGuard(OwnAddresses()).check("localhost", 80, opt_in=False))
    assert not v.allowed and "loopback" in v.reason and "allow_private: true" in v.reason
    v = asyncio.run(EgressGuard(OwnAddresses()).check("localhost", 80, opt_in=True))
    assert v.allowed and v.ip is not None and classify(v.ip)[0] == PRIVATE


def test_the_hosts_own_addresses_are_found() -> None:
    from proxy.gateway import local_addresses

    found = local_addresses()
    assert "127.0.0.1" in found  # the loopback interface's address (SIOCGIFADDR)
    assert all(ipaddress.ip_address(a) for a in found)
