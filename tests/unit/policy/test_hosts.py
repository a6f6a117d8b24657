"""proxy/policy/_hosts.py: one canonical spelling per host; patterns that cannot be dodged."""

from __future__ import annotations

import pytest

from proxy.policy import HostPattern, canonical_host, default_port


@pytest.mark.parametrize(("host", "canonical"), [
    # Every spelling of 127.0.0.1 the system resolver (inet_aton) accepts.
    ("127.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0X7F.0.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("0xdeadbeef", "222.173.190.239"),
    ("１２７.１", "127.0.0.1"),  # full-width digits map to an address, not a name
    # IPv6, bracketed or not; IPv4-mapped addresses become their IPv4 form.
    ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("::ffff:127.0.0.1", "127.0.0.1"),
    ("[::ffff:7f00:1]", "127.0.0.1"),
    ("[::1]", "::1"),
    ("::1", "::1"),
    ("[2001:DB8:0:0::1]", "2001:db8::1"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    # Names: case, trailing dot, IDNA 2008 (UTS 46 mapping).
    ("API.GitHub.com", "api.github.com"),
    ("api.github.com.", "api.github.com"),
    ("LOCALHOST.", "localhost"),
    ("bücher.de", "xn--bcher-kva.de"),
    ("BÜCHER.de", "xn--bcher-kva.de"),
    ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("faß.de", "xn--fa-hia.de"),  # IDNA 2008, not the 2003 'fass.de'
    ("ＡＢＣ.com", "abc.com"),  # full-width letters map to ASCII
    # Real names IDNA refuses but DNS carries.
    ("_acme-challenge.example.com", "_acme-challenge.example.com"),
    # Names that merely look numeric are names.
    ("deadbeef", "deadbeef"),
    ("cafe.com", "cafe.com"),
    ("1e3", "1e3"),
    ("ab.c1", "ab.c1"),
])
def test_canonical_host(host: str, canonical: str) -> None:
    assert canonical_host(host) == canonical


@pytest.mark.parametrize("host", [
    "",
    ".",
    "a" * 256,
    " example.com",
    "example.com ",
    "ex ample.com",
    "a..b",
    "-a.com",
    "a-.com",
    "a" * 64 + ".com",
    "exa/mple.com",
    "example.com:443",
    "256.1.1.1",
    "1.2.3.4.5",
    "08.0.0.1",
    "12345678901",
    "0x100000000",  # numeric, but more than 32 bits: neither an address nor a name
    "0x7f.0.0.0x100",
    "[127.0.0.1]",
    "[fe80::1%eth0]",
    "fe80::1%25eth0",
    "[::1",
    "[:::1]",
    "exa\x00mple.com",
])
def test_canonical_host_refuses(host: str) -> None:
    with pytest.raises(ValueError):
        canonical_host(host)


@pytest.mark.parametrize(("scheme", "port"), [("https", 443), ("http", 80)])
def test_default_port(scheme: str, port: int) -> None:
    assert default_port(scheme) == port


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("api.github.com", "api.github.com", True),
    ("API.GitHub.com.", "api.github.com", True),
    ("api.github.com", "github.com", False),
    ("api.github.com", "xapi.github.com", False),
    ("api.github.com", "api.github.com.evil.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),  # one or more labels
    ("*.example.com", "x.y.z.example.com", True),
    ("*.example.com", "example.com", False),  # the wildcard needs a label
    ("*.example.com", "badexample.com", False),
    ("*.example.com", "example.com.evil.com", False),
    ("*.EXAMPLE.com.", "a.example.com", True),
    ("*.bücher.de", "shop.xn--bcher-kva.de", True),
    ("127.1", "127.0.0.1", True),
    ("[::ffff:127.0.0.1]", "127.0.0.1", True),
])
def test_host_pattern_matches(pattern: str, host: str, matches: bool) -> None:
    assert HostPattern.parse(pattern).matches(host) is matches


@pytest.mark.parametrize(("pattern", "text"), [
    ("*.Example.COM", "*.example.com"),
    ("Example.COM.", "example.com"),
])
def test_host_pattern_str(pattern: str, text: str) -> None:
    assert str(HostPattern.parse(pattern)) == text


@pytest.mark.parametrize(("pattern", "message"), [
    ("*example.com", "use '*.example.com'"),
    ("**.example.com", "use '*.example.com'"),
    ("*.*.example.com", "use '*.example.com'"),
    ("api.*.example.com", "use '*.example.com'"),
    ("ex*.com", "only as a whole leading label"),
    ("*", "only as a whole leading label"),
    ("*.com", "whole top-level domain"),
    ("*.", "not a valid"),
    ("*.127.0.0.1", "IP address"),
    ("", "non-empty string"),
    ("ex ample.com", "not a valid host name"),
])
def test_host_pattern_refuses_with_fix(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        HostPattern.parse(pattern)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize("value", [None, 42, ["a.com"]])
def test_host_pattern_refuses_non_strings(value: object) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        HostPattern.parse(value)  # type: ignore[arg-type]
