"""proxy/policy/_mcp_grant.py: parsing MCP grants, checking constraints, folding keys."""

from __future__ import annotations

import time
from typing import Any

import pytest

from proxy.config._model import parse_config
from proxy.errors import ConfigError, InvalidField
from proxy.mcp._jsonrpc import loads_strict
from proxy.policy import McpGrant, fold, parse_rule
from proxy.policy._mcp_grant import ArgConstraint, exact, json_equal

# (mcp mapping, the key the error names, a part of the message)
BAD_GRANTS: list[tuple[Any, str, str]] = [
    ("search", "mcp", "mcp must be a mapping"),
    ({"tool": ["x"]}, "mcp.tool", "unknown key"),
    ({"tools": "search"}, "mcp.tools", "list of tool names"),
    ({"tools": ["ok", "bad name"]}, "mcp.tools[1]", "is not a tool name"),
    ({"tools": ["x" * 129]}, "mcp.tools[0]", "is not a tool name"),
    ({"tools": [""]}, "mcp.tools[0]", "is not a tool name"),
    ({"tools": [7]}, "mcp.tools[0]", "is not a tool name"),
    ({"args": ["limit"]}, "mcp.args", "map argument names"),
    ({"args": {"limit": 50}}, "mcp.args.limit", "a constraint is a mapping"),
    ({"args": {"limit": {}}}, "mcp.args.limit", "a constraint is a mapping"),
    ({"args": {"limit": {"max": 5}}}, "mcp.args.limit.max", "unknown constraint"),
    ({"args": {"limit": {"maximum": "50"}}}, "mcp.args.limit.maximum", "is not a number"),
    ({"args": {"limit": {"maximum": True}}}, "mcp.args.limit.maximum", "is not a number"),
    ({"args": {"limit": {"minimum": float("nan")}}}, "mcp.args.limit.minimum",
     "is not a number"),
    ({"args": {"limit": {"minimum": 5, "maximum": 1}}}, "mcp.args.limit",
     "minimum 5 is above maximum 1"),
    ({"args": {"q": {"maxLength": -1}}}, "mcp.args.q.maxLength", "whole number"),
    ({"args": {"q": {"maxLength": 2.5}}}, "mcp.args.q.maxLength", "whole number"),
    ({"args": {"q": {"pattern": "("}}}, "mcp.args.q.pattern", "not a valid regular expression"),
    ({"args": {"q": {"pattern": ""}}}, "mcp.args.q.pattern", "1-1024 characters"),
    ({"args": {"q": {"pattern": 5}}}, "mcp.args.q.pattern", "1-1024 characters"),
    ({"args": {"q": {"enum": []}}}, "mcp.args.q.enum", "non-empty list"),
    ({"args": {"q": {"enum": "abc"}}}, "mcp.args.q.enum", "non-empty list"),
    ({"args": {"q": {"maximum": 3, "maxLength": 3}}}, "mcp.args.q", "no value can satisfy"),
    ({"args": {"q": {"const": object()}}}, "mcp.args.q.const", "is not a JSON value"),
    ({"args": {"limit": {"maximum": 1}, "Limit": {"maximum": 2}}}, "mcp.args",
     "differ only by case"),
    ({"methods": "resources/read"}, "mcp.methods", "must be a list"),
    ({"methods": ["resources read"]}, "mcp.methods[0]", "is not a JSON-RPC method name"),
    ({"methods": ["*"]}, "mcp.methods[0]", "is not a JSON-RPC method name"),
    ({"methods": ["tools/call"]}, "mcp.methods[0]", "grant tool calls with mcp.tools"),
    ({"methods": ["tools/*"]}, "mcp.methods[0]", "grant tool calls with mcp.tools"),
    ({"methods": ["Tools/Call"]}, "mcp.methods[0]", "grant tool calls with mcp.tools"),
    # the mapping form of tools: constraints per tool
    ({"tools": 5}, "mcp.tools", "list of tool names, or map each tool"),
    ({"tools": {"bad!": {}}}, "mcp.tools.bad!", "is not a tool name"),
    ({"tools": {"search": 5}}, "mcp.tools.search", "a tool maps to its constraints"),
    ({"tools": {"search": ["limit"]}}, "mcp.tools.search", "a tool maps to its constraints"),
    ({"tools": {"search": {"arg": {}}}}, "mcp.tools.search.arg", "unknown key; a tool has args"),
    ({"tools": {"search": {"args": ["limit"]}}}, "mcp.tools.search.args",
     "map argument names"),
    ({"tools": {"search": {"args": {"limit": 50}}}}, "mcp.tools.search.args.limit",
     "a constraint is a mapping"),
    ({"tools": {"search": {"args": {"limit": {"max": 5}}}}},
     "mcp.tools.search.args.limit.max", "unknown constraint"),
    ({"tools": {"search": {"args": {"limit": {"maximum": "50"}}}}},
     "mcp.tools.search.args.limit.maximum", "is not a number"),
    ({"tools": {"read": {"args": {"path": {"pattern": "("}}}}},
     "mcp.tools.read.args.path.pattern", "not a valid regular expression"),
    ({"tools": {"read": {"args": {"path": {"minimum": 2, "maximum": 1}}}}},
     "mcp.tools.read.args.path", "minimum 2 is above maximum 1"),
    ({"tools": {"read": {"args": {"a": {"maximum": 1}, "A": {"maximum": 2}}}}},
     "mcp.tools.read.args", "differ only by case"),
    ({"args": {"path": {"maxLength": 9}}, "tools": {"read": {"args": {"Path": {"maxLength": 3}}}}},
     "mcp.tools.read.args", "differs only by case or Unicode folding from 'path'"),
    # explicit tool pins
    ({"tools": ["a"], "pin": ["a"]}, "mcp.pin", "pin must map tool names to digests"),
    ({"tools": ["a"], "pin": {"b": "sha256:" + "0" * 64}}, "mcp.pin.b",
     "not among the rule's tools"),
    ({"tools": ["a"], "pin": {"a": "0" * 64}}, "mcp.pin.a", "'sha256:' and 64 lower-case hex"),
    ({"tools": ["a"], "pin": {"a": "sha256:" + "A" * 64}}, "mcp.pin.a", "64 lower-case hex"),
    ({"tools": ["a"], "pin": {"a": "sha256:" + "0" * 63}}, "mcp.pin.a", "64 lower-case hex"),
    ({"tools": ["a"], "pin": {"a": None}}, "mcp.pin.a", "64 lower-case hex"),
]


@pytest.mark.parametrize(("mcp", "key", "message"), BAD_GRANTS)
def test_bad_grant_is_rejected_naming_the_key(mcp: Any, key: str, message: str) -> None:
    with pytest.raises(InvalidField) as e:
        parse_rule({"id": "r", "host": "mcp.test", "mcp": mcp})
    located = str(e.value.at("rules", 0))
    assert located.startswith(f"rules[0].{key}: "), located
    assert message in located


def test_config_error_names_file_line_and_key() -> None:
    from ruamel.yaml import YAML

    text = ("workloads:\n  w:\n    standing:\n      - id: r\n        host: mcp.test\n"
            "        mcp:\n          tools: [search]\n          args: {limit: {max: 5}}\n")
    with pytest.raises(ConfigError) as e:
        parse_config(YAML(typ="rt", pure=True).load(text), "t.yaml")
    assert str(e.value) == ('t.yaml:6: workloads["w"].standing[0].mcp.args.limit.max: '
                            "unknown constraint; use const, enum, pattern, minimum, maximum, "
                            "maxLength")


GOOD = {"tools": ["search_docs", "get.page"], "methods": ["resources/*", "prompts/get"],
        "args": {"limit": {"minimum": 1, "maximum": 50}, "mode": {"enum": ["a", "b"]},
                 "query": {"pattern": "[a-z ]+", "maxLength": 10}, "flag": {"const": True}}}


def test_rule_round_trips_to_plain_data() -> None:
    rule = parse_rule({"id": "r", "host": "mcp.test", "paths": ["/mcp"], "mcp": GOOD})
    plain = rule.to_dict()
    assert plain["mcp"] == {**GOOD, "tools": ["get.page", "search_docs"]}
    assert parse_rule(plain) == rule
    assert isinstance(rule.mcp, McpGrant)
    assert rule.methods == {"GET", "POST", "DELETE"}


def test_empty_grant_allows_lifecycle_only() -> None:
    g = McpGrant.parse({})
    assert g.tools == frozenset() and g.to_dict() == {"tools": []}
    assert g.why_not_tool("search", {}) == "tool 'search' is not granted"


# (constraint, value, None if allowed else part of the reason)
CONSTRAINTS: list[tuple[dict[str, Any], Any, str | None]] = [
    ({"maximum": 50}, 50, None),
    ({"maximum": 50}, 50.0, None),
    ({"maximum": 50}, 51, "above the maximum 50"),
    ({"maximum": 50}, 50.0000001, "above the maximum"),
    ({"maximum": 50}, 10**30, "above the maximum"),
    ({"maximum": 50}, "10", "must be a number"),
    ({"maximum": 50}, True, "must be a number"),
    ({"maximum": 50}, None, "must be a number"),
    ({"maximum": 50}, [1], "must be a number"),
    ({"minimum": 1}, 0, "below the minimum 1"),
    ({"minimum": 1}, -(10**30), "below the minimum"),
    ({"minimum": 1}, 1, None),
    ({"minimum": -1.5, "maximum": 1.5}, 0, None),
    ({"maxLength": 3}, "abc", None),
    ({"maxLength": 3}, "abcd", "longer than 3"),
    ({"maxLength": 3}, "ééé", None),
    ({"maxLength": 3}, "😀😀😀😀", "longer than 3"),
    ({"maxLength": 3}, 123, "must be a string"),
    ({"maxLength": 3}, ["a"], "must be a string"),
    ({"pattern": "[a-z]+"}, "abc", None),
    ({"pattern": "[a-z]+"}, "abc1", "does not match"),
    ({"pattern": "[a-z]+"}, "1abc", "does not match"),
    ({"pattern": "[a-z]+"}, "abc\n", "does not match"),
    ({"pattern": "[a-z]+$"}, "abc\n", "does not match"),
    ({"pattern": "a|b"}, "ab", "does not match"),
    ({"pattern": "[a-z]+"}, 5, "must be a string"),
    ({"enum": ["a", 1, None]}, "a", None),
    ({"enum": ["a", 1, None]}, 1.0, None),
    ({"enum": ["a", 1, None]}, None, None),
    ({"enum": ["a", 1, None]}, True, "not one of the allowed values"),
    ({"enum": ["a", 1, None]}, "A", "not one of the allowed values"),
    ({"enum": ["a", 1, None]}, ["a"], "not one of the allowed values"),
    ({"enum": [False]}, 0, "not one of the allowed values"),
    ({"const": "prod"}, "prod", None),
    ({"const": "prod"}, "Prod", "not the allowed value"),
    ({"const": 1}, True, "not the allowed value"),
    ({"const": True}, 1, "not the allowed value"),
    ({"const": {"a": [1, "x"]}}, {"a": [1.0, "x"]}, None),
    ({"const": {"a": [1, "x"]}}, {"a": [1, "x"], "b": 2}, "not the allowed value"),
    ({"const": [1, 2]}, [2, 1], "not the allowed value"),
    ({"const": None}, None, None),
    ({"const": None}, "null", "not the allowed value"),
]


@pytest.mark.parametrize(("spec", "value", "why"), CONSTRAINTS)
def test_constraint(spec: dict[str, Any], value: Any, why: str | None) -> None:
    got = ArgConstraint.parse(spec, "c").why_not(value)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got


GRANT = McpGrant.parse({"tools": ["search", "get"],
                        "args": {"limit": {"maximum": 50}, "q": {"maxLength": 5}}})

# (tool, arguments, None if allowed else part of the reason)
TOOL_CALLS: list[tuple[str, dict[str, Any], str | None]] = [
    ("search", {"limit": 1, "q": "x"}, None),
    ("get", {"limit": 50, "q": "", "extra": [1, 2]}, None),
    ("delete", {"limit": 1, "q": "x"}, "tool 'delete' is not granted"),
    ("Search", {"limit": 1, "q": "x"}, "tool 'Search' is not granted"),
    ("search", {"q": "x"}, "argument 'limit' is required by the grant and missing"),
    ("search", {}, "is required by the grant and missing"),
    ("search", {"limit": None, "q": "x"}, "argument 'limit' must be a number"),
    ("search", {"limit": 51, "q": "x"}, "argument 'limit' is above the maximum 50"),
    ("search", {"limit": 1, "q": "toolong"}, "argument 'q' is longer than 5"),
    ("search", {"limit": 1, "q": "x", "LIMIT": 99},
     "'LIMIT' differs only by case or Unicode folding from the constrained argument 'limit'"),
    ("search", {"limit": 1, "q": "x", "ｌｉｍｉｔ": 99}, "differs only by case"),
    ("search", {"limit": 1, "ｑ": "x" * 99, "q": "x"}, "differs only by case"),
]


@pytest.mark.parametrize(("tool", "arguments", "why"), TOOL_CALLS)
def test_tool_call(tool: str, arguments: dict[str, Any], why: str | None) -> None:
    got = GRANT.why_not_tool(tool, arguments)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got


@pytest.mark.parametrize(("methods", "method", "allowed"), [
    ([], "initialize", True),
    ([], "server/discover", True),
    ([], "ping", True),
    ([], "tools/list", True),
    ([], "notifications/initialized", True),
    ([], "notifications/cancelled", True),
    ([], "resources/read", False),
    ([], "prompts/get", False),
    ([], "completion/complete", False),
    ([], "logging/setLevel", False),
    ([], "eth_call", False),
    (["resources/*"], "resources/read", True),
    (["resources/*"], "resources/templates/list", True),
    (["resources/*"], "resources", False),
    (["resources/*"], "resourcesX/read", False),
    (["resources/*"], "resources/read\n", False),
    (["resources/*"], "resources/ read", False),
    (["prompts/get"], "prompts/get", True),
    (["prompts/get"], "prompts/list", False),
    (["eth_call"], "eth_call", True),
    (["eth_call"], "eth_sendTransaction", False),
])
def test_methods(methods: list[str], method: str, allowed: bool) -> None:
    assert McpGrant.parse({"methods": methods}).allows_method(method) is allowed


@pytest.mark.parametrize(("a", "b", "same"), [
    ("name", "Name", True),
    ("name", "NAME", True),
    ("name", "ｎａｍｅ", True),
    ("params", "paramſ", True),
    ("limit", "lımit", True),
    ("ss", "ß", True),
    ("kelvin", "\u212aelvin", True),
    ("name", "names", False),
    ("name", "nam e", False),
])
def test_fold(a: str, b: str, same: bool) -> None:
    assert (fold(a) == fold(b)) is same


@pytest.mark.parametrize(("a", "b", "equal"), [
    (1, 1.0, True), (True, 1, False), (False, 0, False), (None, None, True),
    ("1", 1, False), ([1, [2]], [1.0, [2]], True), ({"a": 1}, {"a": 1, "b": 2}, False),
    ({"a": True}, {"a": True}, True), ([], {}, False),
])
def test_json_equal(a: Any, b: Any, equal: bool) -> None:
    assert json_equal(a, b) is equal
    assert json_equal(b, a) is equal


# -- numbers compared exactly as written (item: no float rounding) ---------------------
def num(text: str) -> Any:
    """A number as the strict JSON-RPC reader hands it over."""
    return loads_strict(b'{"v":' + text.encode() + b"}")["v"]


# (constraint, the argument as written in the body, None if allowed else part of the reason)
EXACT: list[tuple[dict[str, Any], str, str | None]] = [
    ({"maximum": 50}, "50.0000000000000001", "above the maximum 50"),
    ({"maximum": 50}, "50.00000000000000000000000000001", "above the maximum 50"),
    ({"maximum": 50}, "5.00000000000000001e1", "above the maximum 50"),
    ({"maximum": 50}, "50.0", None),
    ({"maximum": 50}, "5e1", None),
    ({"maximum": 50}, "50e0", None),
    ({"maximum": 50}, "0.5E2", None),
    ({"maximum": 50}, "49.99999999999999999", None),
    ({"maximum": 50}, "50000000000000000000000000000000000000001e-39", "above the maximum"),
    ({"maximum": 50}, "50000000000000000000000000000000000000000e-39", None),
    ({"maximum": 50}, "12345678901234567890123456789", "above the maximum"),
    ({"maximum": 9007199254740992}, "9007199254740993", "above the maximum"),
    ({"maximum": 9007199254740992}, "9007199254740992.5", "above the maximum"),
    ({"maximum": 9007199254740992}, "9007199254740992", None),
    ({"minimum": 0}, "-0", None),
    ({"minimum": 0}, "-0.0", None),
    ({"minimum": 0}, "-0e10", None),
    ({"minimum": 0}, "-1e-400", "below the minimum 0"),  # a float rounds it to -0.0
    ({"minimum": 0}, "-0.0000000000000000000001", "below the minimum 0"),
    ({"maximum": 0}, "1e-400", "above the maximum 0"),
    ({"minimum": 0.1}, "0.1", None),  # the config's 0.1 as written, not its binary value
    ({"minimum": 0.1}, "0.09999999999999999999", "below the minimum 0.1"),
    ({"maximum": 0.1}, "0.10000000000000000001", "above the maximum 0.1"),
    ({"minimum": -1.5, "maximum": 1.5}, "1.5000000000000000001", "above the maximum 1.5"),
    ({"minimum": -1.5, "maximum": 1.5}, "-1.5000000000000000001", "below the minimum -1.5"),
    ({"const": 50}, "50.0000000000000001", "not the allowed value"),
    ({"const": 50}, "50.000", None),
    ({"const": 50}, "5E1", None),
    ({"enum": [1, 2]}, "1.0000000000000000001", "not one of the allowed values"),
    ({"enum": [1, 2]}, "2e0", None),
    ({"const": 0.1}, "0.1000000000000000000001", "not the allowed value"),
    ({"const": 0}, "-0", None),
]


@pytest.mark.parametrize(("spec", "text", "why"), EXACT)
def test_numbers_compared_as_written(spec: dict[str, Any], text: str, why: str | None) -> None:
    got = ArgConstraint.parse(spec, "c").why_not(num(text))
    if why is None:
        assert got is None, got
    else:
        assert got is not None and why in got, got


def test_const_compares_nested_numbers_exactly() -> None:
    c = ArgConstraint.parse({"const": {"a": [1, 2.5]}}, "c")
    assert c.why_not(loads_strict(b'{"a":[1,2.50]}')) is None
    assert c.why_not(loads_strict(b'{"a":[1.0000000000000000001,2.5]}')) is not None


def test_json_equal_exact() -> None:
    assert json_equal(num("50.0000000000000001"), 50) is False
    assert json_equal(num("50.0000000000000001"), num("50.00000000000000010")) is True
    assert exact(num("1.10")) == exact(1.1) and exact(2) == exact(num("2.0"))


# -- patterns run on RE2 (linear time) ------------------------------------------------
# (pattern, why RE2 refuses it)
BAD_PATTERNS: list[tuple[str, str]] = [
    ("(a)\\1", "invalid escape sequence"),  # backreference
    ("(?=a)a", "invalid perl operator"),  # lookahead
    ("(?!a)b", "invalid perl operator"),
    ("(?<=a)b", "invalid perl operator"),  # lookbehind
    ("a++", "bad repetition operator"),  # possessive
    ("(?>a)", "invalid"),  # atomic group
    ("a{1001}", "invalid repetition size"),
    ("(a{100}){100}", "invalid repetition size"),  # nested counts multiply
    ("\\pL{1000}", "pattern too large"),  # over RE2's memory budget
    ("(\\pL{100}){10}", "pattern too large"),
    ("[z-a]", "invalid character class range"),
    ("(", "missing )"),
    ("a\\Z", "invalid escape sequence"),
    ("\ud800", "valid Unicode"),
]


@pytest.mark.parametrize(("pattern", "why"), BAD_PATTERNS)
def test_pattern_re2_cannot_compile_is_refused(pattern: str, why: str) -> None:
    with pytest.raises(InvalidField) as e:
        parse_rule({"id": "r", "host": "mcp.test",
                    "mcp": {"tools": ["t"], "args": {"q": {"pattern": pattern}}}})
    assert e.value.path == ("mcp", "args", "q", "pattern")
    assert str(e.value.at("rules", 0)).startswith("rules[0].mcp.args.q.pattern: ")
    assert why in str(e.value), str(e.value)


REDOS = ["([A-Za-z0-9]+ ?)*", "(a+)+", "(a|a)*", "(a|aa)+", "(.*a){12}", "(x+x+)+y",
         "([a-zA-Z]+)*", "(\\w+\\s?)*"]


@pytest.mark.parametrize("pattern", REDOS)
def test_redos_pattern_matches_in_linear_time(pattern: str) -> None:
    c = ArgConstraint.parse({"pattern": pattern}, "c")
    evil = ["a" * 28 + "!", "A1 " * 9 + "!", "x" * 5000 + "!", "a" * 60000 + "!"]
    start = time.monotonic()
    for value in evil:
        assert c.why_not(value) == "does not match the allowed pattern"
    assert time.monotonic() - start < 1.0


# (pattern, value, None if allowed else part of the reason): full-match semantics, as today
FULLMATCH: list[tuple[str, str, str | None]] = [
    ("[a-z ]+", "abc def", None),
    ("[a-z ]+", "abc<def", "does not match"),
    ("[a-z]+", "xabc1", "does not match"),  # not a search
    ("abc", "xabcx", "does not match"),
    ("a|b", "ab", "does not match"),
    ("[^<>]*", "line\nbreak", None),
    ("[a-z]+$", "abc\n", "does not match"),
    (".*", "a\nb", "does not match"),  # '.' does not match a newline, as in Python's re
    ("(?s).*", "a\nb", None),
    ("\\d+", "123", None),
    ("\\d+", "١٢٣", "does not match"),  # RE2's \d is ASCII (stricter than re's)
    ("[é]+", "ééé", None),
    (".", "😀", None),
    ("[a-z]*", "a" * (64 * 1024), None),
    ("[a-z]*", "a" * (64 * 1024 + 1), "longer than the 65536 characters"),
]


@pytest.mark.parametrize(("pattern", "value", "why"), FULLMATCH)
def test_pattern_full_match(pattern: str, value: str, why: str | None) -> None:
    got = ArgConstraint.parse({"pattern": pattern}, "c").why_not(value)
    if why is None:
        assert got is None, got
    else:
        assert got is not None and why in got, got


def test_pattern_compiled_once_and_round_trips() -> None:
    rule = parse_rule({"id": "r", "host": "mcp.test",
                       "mcp": {"tools": ["t"], "args": {"q": {"pattern": "[a-z]+"}}}})
    assert rule.mcp is not None
    c = rule.mcp.args["q"]
    assert c.pattern == "[a-z]+" and c._regex is c._regex
    assert rule.to_dict()["mcp"]["args"] == {"q": {"pattern": "[a-z]+"}}
    assert parse_rule(rule.to_dict()) == rule


def test_config_with_unsupported_pattern_is_a_config_error() -> None:
    from ruamel.yaml import YAML

    text = ("workloads:\n  w:\n    standing:\n      - id: r\n        host: mcp.test\n"
            "        mcp:\n          tools: [search]\n"
            "          args: {q: {pattern: '(?=x)x'}}\n")
    with pytest.raises(ConfigError) as e:
        parse_config(YAML(typ="rt", pure=True).load(text), "t.yaml")
    assert 'workloads["w"].standing[0].mcp.args.q.pattern' in str(e.value)
    assert "RE2" in str(e.value)


# -- constraints per tool (the mapping form of tools) --------------------------------
PER_TOOL = {"search_docs": {"args": {"limit": {"maximum": 50}}},
            "read_file": {"args": {"path": {"pattern": "/docs/[a-z/]+"}}},
            "list_docs": None, "get_page": {}}
PER_TOOL_GRANT = McpGrant.parse({"tools": PER_TOOL, "args": {"q": {"maxLength": 5}}})

PER_TOOL_CALLS: list[tuple[str, dict[str, Any], str | None]] = [
    ("search_docs", {"limit": 50, "q": "x"}, None),
    ("search_docs", {"limit": 51, "q": "x"}, "argument 'limit' is above the maximum 50"),
    ("search_docs", {"q": "x"}, "argument 'limit' is required by the grant and missing"),
    ("search_docs", {"limit": 1}, "argument 'q' is required by the grant and missing"),
    ("search_docs", {"limit": 1, "q": "x", "Limit": 99}, "differs only by case"),
    ("read_file", {"path": "/docs/a/b", "q": ""}, None),
    ("read_file", {"path": "/etc/passwd", "q": ""}, "'path' does not match the allowed pattern"),
    ("read_file", {"q": ""}, "argument 'path' is required by the grant and missing"),
    ("read_file", {"path": "/docs/a", "q": "", "limit": 999}, None),  # limit: search only
    ("list_docs", {"q": ""}, None),
    ("get_page", {"q": "", "path": "/etc/passwd"}, None),
    ("get_page", {}, "argument 'q' is required by the grant and missing"),
    ("delete_docs", {"q": ""}, "tool 'delete_docs' is not granted"),
]


@pytest.mark.parametrize(("tool", "arguments", "why"), PER_TOOL_CALLS)
def test_tool_call_per_tool(tool: str, arguments: dict[str, Any], why: str | None) -> None:
    got = PER_TOOL_GRANT.why_not_tool(tool, arguments)
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got


def test_per_tool_grant_round_trips() -> None:
    rule = parse_rule({"id": "r", "host": "mcp.test", "mcp": {"tools": PER_TOOL}})
    plain = rule.to_dict()
    assert plain["mcp"]["tools"] == {"get_page": {}, "list_docs": {},
                                     "read_file": PER_TOOL["read_file"],
                                     "search_docs": PER_TOOL["search_docs"]}
    assert parse_rule(plain) == rule
    assert rule.mcp is not None and rule.mcp.tools == frozenset(PER_TOOL)
    # without any per-tool constraint, the list form comes back
    listed = parse_rule({"id": "r", "host": "mcp.test", "mcp": {"tools": {"a": None}}})
    assert listed.to_dict()["mcp"]["tools"] == ["a"]


def test_config_error_names_the_tool_argument() -> None:
    from ruamel.yaml import YAML

    text = ("workloads:\n  w:\n    standing:\n      - id: r\n        host: mcp.test\n"
            "        mcp:\n          tools:\n            read_file:\n"
            "              args: {path: {pattern: '('}}\n")
    with pytest.raises(ConfigError) as e:
        parse_config(YAML(typ="rt", pure=True).load(text), "t.yaml")
    assert str(e.value).startswith(
        't.yaml:6: workloads["w"].standing[0].mcp.tools.read_file.args.path.pattern: '
        "'(' is not a valid regular expression")


def test_pin_round_trips() -> None:
    pin = "sha256:" + "ab" * 32
    rule = parse_rule({"id": "r", "host": "mcp.test", "mcp": {"tools": ["a"], "pin": {"a": pin}}})
    assert rule.mcp is not None and rule.mcp.pins == {"a": pin}
    assert rule.to_dict()["mcp"]["pin"] == {"a": pin}
    assert parse_rule(rule.to_dict()) == rule
