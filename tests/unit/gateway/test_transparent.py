"""proxy/gateway/_transparent.py: who a redirected connection is (source address, bound
task), which name it gives its destination and whether that name leads there, and
whether its first bytes are HTTP. The end-to-end behaviour, in network namespaces, is
tests/e2e/test_transparent.py."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from proxy.config import Config
from proxy.config._model import parse_config
from proxy.errors import Refused
from proxy.gateway import (
    TRANSPARENT_ISSUER,
    Resolver,
    SourceIdentity,
    TaskBinds,
    destination_name,
    looks_like_http,
    original_destination_reason,
)
from proxy.identity import TASK_ISSUER

TRIAGE, OTHER = "spiffe://acme.dev/agent/triage", "spiffe://acme.dev/agent/other"


def config(triage: list[str], other: list[str]) -> Config:
    return parse_config({"workloads": {
        TRIAGE: {"owner": "t@acme.dev", "sources": triage},
        OTHER: {"sources": other}}})


@dataclass
class FakeTask:
    id: str
    workload: str
    cidrs: tuple[str, ...]
    created_at: float = 0.0
    expires_at: float = 2000.0
    owner: str | None = "task-owner@acme.dev"

    @property
    def bind(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c) for c in self.cidrs)


class FakeRegistry:
    """``TaskRegistry.bound_to`` over live tasks (which tasks are live is the registry's,
    tests/unit/tasks/test_binding.py)."""

    def __init__(self, tasks: list[FakeTask]) -> None:
        self.tasks = tasks
        self.asked: list[tuple[str, str]] = []

    def bound_to(self, address: str, workload: str) -> list[FakeTask]:
        self.asked.append((address, workload))
        ip = ipaddress.ip_address(address)
        return [t for t in self.tasks if t.workload == workload
                and any(ip.version == n.version and ip in n for n in t.bind)]


class NoTasks:
    def bound_task(self, workload: str, client: object) -> None:
        return None


# -- who -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("client", "workload"), [
    ("10.77.0.5", TRIAGE),
    ("10.77.1.5", OTHER),          # the longer prefix of another workload's network
    ("10.77.9.9", TRIAGE),
    ("::ffff:10.77.0.5", TRIAGE),  # an IPv4 client seen by a dual-stack listener
    ("fd77::1", TRIAGE),
    ("fd77:0:0:1::1", None),
    ("10.78.0.1", None),
    ("not-an-address", None),
])
def test_source_address_names_the_workload(client: str, workload: str | None) -> None:
    # Across workloads prefixes may not overlap (the config refuses it); within one
    # they may, and a longer prefix of the one workload changes nothing.
    ident = SourceIdentity(config(["10.77.0.0/24", "10.77.8.0/21", "10.77.9.0/24", "fd77::/64"],
                                  ["10.77.1.0/24"]), NoTasks())
    assert ident.sources.workload_of(client) == workload


def test_unclaimed_address_is_refused_with_its_address() -> None:
    ident = SourceIdentity(config(["10.77.0.0/24"], []), NoTasks())
    with pytest.raises(Refused, match="no workload claims the source address 10.99.0.1"):
        ident.caller("10.99.0.1")
    with pytest.raises(Refused, match=r"\(unknown\)"):
        ident.caller(None)


def test_standing_caller_has_the_workload_and_owner() -> None:
    caller = SourceIdentity(config(["10.77.0.0/24"], []), NoTasks()).caller("10.77.0.5")
    assert (caller.workload, caller.owner, caller.task, caller.issuer) == (
        TRIAGE, "t@acme.dev", None, TRANSPARENT_ISSUER)
    assert caller.expires_at == math.inf


def test_bound_task_makes_the_call_the_tasks() -> None:
    registry = FakeRegistry([
        FakeTask("wide", TRIAGE, ("10.77.0.0/24",), created_at=5),
        FakeTask("narrow", TRIAGE, ("10.77.0.5/32",), created_at=1),
        FakeTask("newer-wide", TRIAGE, ("10.77.0.0/24",), created_at=9),
        FakeTask("elsewhere", OTHER, ("10.77.0.8/32",)),
        FakeTask("unbound", TRIAGE, ())])
    ident = SourceIdentity(config(["10.77.0.0/24"], []), TaskBinds(registry))
    narrow = ident.caller("10.77.0.5")  # the narrowest bind wins
    assert (narrow.task, narrow.workload, narrow.issuer, narrow.owner, narrow.expires_at) == (
        "narrow", TRIAGE, TASK_ISSUER, "task-owner@acme.dev", 2000.0)
    assert ident.caller("10.77.0.9").task == "newer-wide"  # same width: the newest
    # Another workload's task bound to an address this workload owns is never picked.
    assert ident.caller("10.77.0.8").task == "newer-wide"
    # An IPv4 client seen by a dual-stack listener is looked up as its IPv4 address.
    assert ident.caller("::ffff:10.77.0.5").task == "narrow"
    assert registry.asked[-1] == ("10.77.0.5", TRIAGE)


def test_no_bound_task_means_standing_rules() -> None:
    registry = FakeRegistry([FakeTask("t", TRIAGE, ("10.77.0.5/32",)),
                             FakeTask("v6", TRIAGE, ("fd77::5/128",))])
    ident = SourceIdentity(config(["10.77.0.0/24", "fd77::/64"], []), TaskBinds(registry))
    assert ident.caller("10.77.0.4").task is None
    assert ident.caller("fd77::4").task is None
    assert ident.caller("fd77::5").task == "v6"


# -- where ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("sni", "host", "name"), [
    ("API.Up.Test.", "other.test", "api.up.test"),  # SNI first (Host is checked later)
    (None, "Up.Test:8443", "up.test"),
    (None, "[fd77::1]:80", "fd77::1"),
    (None, None, "10.77.0.1"),                        # no name at all: the address
])
def test_destination_name(sni: str | None, host: str | None, name: str) -> None:
    assert destination_name(sni, host, "10.77.0.1") == name


def test_destination_name_that_is_no_host_is_refused() -> None:
    with pytest.raises(Refused, match="not a valid host name"):
        destination_name(None, "bad host!", "10.77.0.1")


async def _dns(host: str, port: int) -> Sequence[str]:
    answers = {"up.test": ["10.77.0.1", "fd77::1"], "front.test": ["10.99.0.1"],
               "many.test": [f"10.0.0.{i}" for i in range(6)]}
    if host not in answers:
        raise OSError("no such name")
    return answers[host]


@pytest.mark.parametrize(("name", "original", "reason"), [
    ("up.test", "10.77.0.1", None),
    ("up.test", "fd77::1", None),
    ("up.test", "::ffff:10.77.0.1", None),
    ("10.77.0.1", "10.77.0.1", None),
    ("front.test", "10.77.0.1",
     "'front.test' resolves to 10.99.0.1, not to 10.77.0.1, where the connection was sent"),
    ("many.test", "10.77.0.1", "10.0.0.3, …, not to 10.77.0.1"),
    ("10.77.0.2", "10.77.0.1", "resolves to 10.77.0.2, not to 10.77.0.1"),
    ("nowhere.test", "10.77.0.1", "could not be resolved"),
])
async def test_name_must_lead_to_the_original_destination(name: str, original: str,
                                                          reason: str | None) -> None:
    why = await original_destination_reason(Resolver(_dns), name, 443, original)
    if reason is None:
        assert why is None
    else:
        assert why is not None and reason in why


# -- what ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "verdict"), [
    (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"POST http://up.test/a HTTP/1.0\n", True),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", True),
    (b"M-SEARCH * HTTP/1.1\r\n", True),
    (b"", None),
    (b"GE", None),
    (b"GET /partial", None),
    (b"GET /a HTT", None),
    (b"SSH-2.0-OpenSSH_9.2\r\n", False),
    (b"\x00\x1c\x12\x34", False),
    (b"get /a HTTP/1.1\r\n", False),
    (b"GET /a HTTP/1.1 extra\r\n", False),
    (b"GET  /a HTTP/1.1\r\n", False),
    (b"HELO mail.test\r\n", False),
    (b"G" * 30, False),
    (b"GET /" + b"a" * 20000, False),   # no line end in sight: not waited for forever
])
def test_looks_like_http(data: bytes, verdict: bool | None) -> None:
    assert looks_like_http(data) is verdict
