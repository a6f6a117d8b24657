"""proxy/policy/_rules.py: deny by default, the closest miss named, rule errors naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import InvalidField
from proxy.policy import Call, Decision, RuleSet, parse_rule, parse_rules
from proxy.policy._rules import DENY

RULES = parse_rules([
    {"id": "read-issues", "host": "api.github.com", "methods": ["GET"],
     "paths": ["/repos/acme/widgets/issues/**"]},
    {"id": "open-pr", "host": "api.github.com", "methods": ["post"],
     "paths": ["/repos/acme/widgets/pulls"]},
    {"id": "any-path", "host": "*.acme.dev", "methods": ["GET", "HEAD"]},
    {"id": "plain", "host": "127.0.0.1", "port": 8000, "scheme": "http", "methods": ["GET"],
     "paths": ["/allowed/**"]},
    {"id": "tls-only", "host": "tls.example", "scheme": "https", "methods": ["GET"]},
    {"id": "mcp", "host": "mcp.acme.dev", "paths": ["/mcp"], "mcp": {"tools": ["search"]}},
])
RULESET = RuleSet(RULES)


def call(method: str = "GET", host: str = "api.github.com", path: str = "/",
         scheme: str = "https", port: int | None = None) -> Call:
    return Call(method, scheme, host, port if port is not None else
                (443 if scheme == "https" else 80), path)


@pytest.mark.parametrize(("c", "rule"), [
    (call(path="/repos/acme/widgets/issues"), "read-issues"),
    (call(path="/repos/acme/widgets/issues/42/comments"), "read-issues"),
    (call("POST", path="/repos/acme/widgets/pulls"), "open-pr"),
    (call(host="docs.acme.dev", path="/anything/here"), "any-path"),
    (call("HEAD", host="a.b.acme.dev", path="/"), "any-path"),
    (call(host="127.0.0.1", scheme="http", port=8000, path="/allowed/x"), "plain"),
    (call(host="tls.example"), "tls-only"),
    (call("POST", host="mcp.acme.dev", path="/mcp"), "mcp"),
    (call("GET", host="mcp.acme.dev", path="/mcp"), "mcp"),
    # a rule naming no scheme admits both, each on its default port
    (call(scheme="http", path="/repos/acme/widgets/issues"), "read-issues"),
])
def test_allowed(c: Call, rule: str) -> None:
    d = RULESET.decide(c)
    assert d.allowed and d.rule_id == rule and d.reason == "allowed by rule"


@pytest.mark.parametrize(("c", "reason"), [
    (call(host="github.com"), "no rule allows this host"),
    (call(host="acme.dev"), "no rule allows this host"),  # '*.acme.dev' needs a label
    (call(host="evil.com", path="/repos/acme/widgets/issues"), "no rule allows this host"),
    (call(path="/repos/acme/other/issues"), "no rule for this host allows this path"),
    (call(path="/repos/acme/widgets/issuesx"), "no rule for this host allows this path"),
    (call("DELETE", path="/repos/acme/widgets/issues/1"),
     "no rule for this host and path allows this method"),
    (call("GET", path="/repos/acme/widgets/pulls"),
     "no rule for this host and path allows this method"),
    (call(port=8443, path="/repos/acme/widgets/issues"),
     "no rule for this host allows this port"),
    (call(host="tls.example", scheme="http", port=443),
     "no rule for this host allows this scheme"),
    (call(host="127.0.0.1", scheme="https", port=8000, path="/allowed/x"),
     "no rule for this host allows this scheme"),
    (call(host="127.0.0.1", scheme="http", port=8001, path="/allowed/x"),
     "no rule for this host allows this port"),
    (call("POST", host="127.0.0.1", scheme="http", port=8000, path="/other"),
     "no rule for this host allows this path"),  # the path is checked before the method
])
def test_denied_with_closest_miss(c: Call, reason: str) -> None:
    d = RULESET.decide(c)
    assert not d.allowed and d.rule is None and d.reason == reason


def test_empty_ruleset_denies() -> None:
    d = RuleSet().decide(call())
    assert not d.allowed and d.rule is None and d.reason == "no rule allows this host"
    assert not RuleSet()


def test_decision_zero_value_denies() -> None:
    assert Decision() == DENY
    assert not DENY.allowed and DENY.rule_id is None


@pytest.mark.parametrize(("host", "port", "named"), [
    ("api.github.com", 443, True),
    ("api.github.com", 80, True),  # no port, no scheme: either default port
    ("api.github.com", 8443, False),
    ("x.acme.dev", 443, True),
    ("acme.dev", 443, False),
    ("127.0.0.1", 8000, True),
    ("127.0.0.1", 80, False),
    ("tls.example", 443, True),
    ("tls.example", 80, False),  # scheme https: 443 only
    ("nothing.example", 443, False),
])
def test_names_endpoint(host: str, port: int, named: bool) -> None:
    assert RULESET.names_endpoint(host, port) is named


def test_rule_round_trips_as_data() -> None:
    data = {"id": "r", "host": "*.Example.com", "port": 8443, "scheme": "https",
            "methods": ["post", "GET"], "paths": ["/a/**"], "secret": "s",
            "approval": "required"}
    rule = parse_rule(data)
    assert rule.to_dict() == {"id": "r", "host": "*.example.com", "port": 8443,
                              "scheme": "https", "methods": ["GET", "POST"],
                              "paths": ["/a/**"], "secret": "s", "approval": "required"}
    assert parse_rule(rule.to_dict()) == rule


def test_mcp_rule_gets_streamable_http_methods() -> None:
    rule = parse_rule({"id": "m", "host": "mcp.example", "mcp": {"tools": ["t"]}})
    assert rule.methods == {"POST", "GET", "DELETE"}


def test_approval_none_is_no_approval() -> None:
    assert not parse_rule({"id": "r", "host": "a.com", "methods": ["GET"],
                           "approval": "none"}).approval


BASE: dict[str, Any] = {"id": "r1", "host": "a.com", "methods": ["GET"]}


@pytest.mark.parametrize(("change", "key", "message"), [
    ({"colour": "blue"}, "colour", "unknown key"),
    ({"id": None}, "id", "every rule needs an id"),
    ({"id": ""}, "id", "every rule needs an id"),
    ({"id": "x" * 129}, "id", "every rule needs an id"),
    ({"id": 7}, "id", "every rule needs an id"),
    ({"host": None}, "host", "non-empty string"),
    ({"host": "*foo.com"}, "host", "use '*.foo.com'"),
    ({"host": "ex ample.com"}, "host", "not a valid host name"),
    ({"port": 0}, "port", "is not a port"),
    ({"port": 65536}, "port", "is not a port"),
    ({"port": "443"}, "port", "is not a port"),
    ({"port": True}, "port", "is not a port"),
    ({"scheme": "ftp"}, "scheme", "use 'https' or 'http'"),
    ({"scheme": "HTTPS"}, "scheme", "use 'https' or 'http'"),
    ({"methods": "GET"}, "methods", "must be a list"),
    ({"methods": ["FETCH"]}, "methods", "'FETCH' is not an HTTP method"),
    ({"methods": []}, "methods", "must list its methods"),
    ({"methods": None}, "methods", "must list its methods"),
    ({"paths": "/a"}, "paths", "non-empty list of globs"),
    ({"paths": []}, "paths", "non-empty list of globs"),
    ({"paths": ["/ok", "nope"]}, "paths[1]", "must start with '/'"),
    ({"paths": ["/a/../b"]}, "paths[0]", "dot segment"),
    ({"mcp": ["tools"]}, "mcp", "must be a mapping"),
    ({"secret": ""}, "secret", "must name an entry"),
    ({"secret": 3}, "secret", "must name an entry"),
    ({"approval": "yes"}, "approval", "use 'required'"),
    ({"approval": True}, "approval", "use 'required'"),
])
def test_parse_rule_errors_name_the_key(change: dict[str, Any], key: str,
                                        message: str) -> None:
    """The path is relative to the rule; a caller prefixes where the rule sits."""
    data = {**BASE, **change}
    with pytest.raises(InvalidField) as err:
        parse_rule(data)
    text = str(err.value)
    assert text.startswith(f"{key}: "), text
    assert message in text, text
    assert message in err.value.reason and err.value.field == key
    assert str(err.value.at("rules", 2)).startswith(f"rules[2].{key}: ")
    assert isinstance(err.value, ValueError)  # as the parser's errors always were


@pytest.mark.parametrize("data", [None, "rule", ["id", "r"], 3])
def test_parse_rule_needs_a_mapping(data: Any) -> None:
    with pytest.raises(InvalidField, match="^a rule must be a mapping") as err:
        parse_rule(data)
    assert err.value.path == () and err.value.field is None
    assert str(err.value.at("rule")) == "rule: a rule must be a mapping"


def test_parse_rules_names_the_index() -> None:
    with pytest.raises(InvalidField, match=r"^\[1\]\.host: ") as err:
        parse_rules([BASE, {**BASE, "id": "r2", "host": "*foo.com"}])
    assert err.value.path == (1, "host")
    assert str(err.value.at("rules")).startswith("rules[1].host: ")


def test_parse_rules_duplicate_id() -> None:
    with pytest.raises(InvalidField) as err:
        parse_rules([BASE, {**BASE, "host": "b.com"}])
    assert str(err.value.at("rules")) == "rules[1].id: duplicate rule id 'r1'"


@pytest.mark.parametrize("data", [None, "x", {"id": "r"}])
def test_parse_rules_needs_a_list(data: Any) -> None:
    with pytest.raises(InvalidField) as err:
        parse_rules(data)
    assert str(err.value.at("rules")) == "rules: rules must be a list"
