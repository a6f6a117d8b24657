"""A secret goes only where the rule, target, Host, CONNECT target and SNI all agree."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import Refused
from proxy.gateway import Tunnel
from proxy.identity import Caller
from proxy.policy import parse_rule
from proxy.secrets import check_destination

CALLER = Caller("spiffe://w", "https://issuer.test", 0.0)
RULE = parse_rule({"id": "gh", "host": "api.github.com", "methods": ["GET"], "secret": "gh"})
WILD = parse_rule({"id": "w", "host": "*.acme.dev", "methods": ["GET"], "secret": "gh"})
PLAIN = parse_rule({"id": "p", "host": "api.github.com", "scheme": "http", "methods": ["GET"],
                    "secret": "gh"})
GOOD: dict[str, Any] = {"scheme": "https", "host": "api.github.com", "port": 443,
                        "host_header": "api.github.com",
                        "tunnel": Tunnel(CALLER, "api.github.com", 443),
                        "sni": "api.github.com"}

ALLOWED = [
    ("all agree", RULE, {}),
    ("Host header with its port", RULE, {"host_header": "api.github.com:443"}),
    ("Host header spelt differently", RULE, {"host_header": "API.GitHub.com."}),
    ("no Host header (HTTP/2 authority only)", RULE, {"host_header": None}),
    ("no SNI", RULE, {"sni": None}),
    ("absolute-form URL naming the host", RULE, {"authority": "api.github.com:443"}),
    ("wildcard rule", WILD, {"host": "mcp.acme.dev", "host_header": "mcp.acme.dev",
                             "sni": "mcp.acme.dev",
                             "tunnel": Tunnel(CALLER, "mcp.acme.dev", 443)}),
    ("plain HTTP when the rule says so", PLAIN, {"scheme": "http", "port": 80, "tunnel": None,
                                                 "sni": None}),
]

REFUSED = [
    ("plain HTTP", RULE, {"scheme": "http", "port": 80, "tunnel": None, "sni": None},
     "over https only"),
    ("https without a tunnel", RULE, {"tunnel": None}, "through a CONNECT tunnel"),
    ("host outside the rule", RULE, {"host": "evil.test", "host_header": "evil.test",
                                     "tunnel": Tunnel(CALLER, "evil.test", 443),
                                     "sni": "evil.test"}, "rule's host and port"),
    ("port outside the rule", RULE, {"port": 8443, "host_header": "api.github.com:8443",
                                     "tunnel": Tunnel(CALLER, "api.github.com", 8443)},
     "rule's host and port"),
    ("Host header elsewhere", RULE, {"host_header": "evil.test"}, "Host header"),
    ("Host header other port", RULE, {"host_header": "api.github.com:8443"}, "Host header"),
    ("Host header garbage", RULE, {"host_header": "api.github.com:x"}, "Host header"),
    ("CONNECT elsewhere", RULE, {"tunnel": Tunnel(CALLER, "evil.test", 443)},
     "CONNECT target"),
    ("CONNECT other port", RULE, {"tunnel": Tunnel(CALLER, "api.github.com", 444)},
     "CONNECT target"),
    ("SNI elsewhere", RULE, {"sni": "evil.test"}, "TLS server name"),
    ("absolute-form URL elsewhere", RULE, {"authority": "evil.test"}, "request's URL"),
    ("absolute-form URL other port", RULE, {"authority": "api.github.com:8443"},
     "request's URL"),
    ("SNI a sibling under a wildcard", WILD,
     {"host": "mcp.acme.dev", "host_header": "mcp.acme.dev", "sni": "other.acme.dev",
      "tunnel": Tunnel(CALLER, "mcp.acme.dev", 443)}, "TLS server name"),
    ("invalid host", RULE, {"host": "bad host"}, "not a valid host name"),
]


@pytest.mark.parametrize(("case", "rule", "change"), ALLOWED, ids=[c[0] for c in ALLOWED])
def test_secret_may_go(case: str, rule: Any, change: dict[str, Any]) -> None:
    check_destination(rule, **{**GOOD, **change})


@pytest.mark.parametrize(("case", "rule", "change", "why"), REFUSED,
                         ids=[c[0] for c in REFUSED])
def test_secret_may_not_go(case: str, rule: Any, change: dict[str, Any], why: str) -> None:
    with pytest.raises(Refused) as e:
        check_destination(rule, **{**GOOD, **change})
    assert why in e.value.reason and "secret 'gh' not sent" in e.value.reason
    assert e.value.rule == rule.id
