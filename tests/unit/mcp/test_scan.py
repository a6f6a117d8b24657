"""proxy/mcp/_scan.c: the compiled fast path proves only what the strict reader reads alike.

The scanner never refuses: it proves a body plain (and writes its canonical form) or
leaves it to the Python readers. So every test here is a comparison with those
readers: whatever it proves, they accept with the same canonical form; whatever
they refuse, it does not prove; and a tool call judged through it gets the same
decision, reason and audit digest as without it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import orjson
import pytest

from proxy.errors import PayloadTooLarge, Refused
from proxy.mcp import _jsonrpc, _scan, inspect
from proxy.mcp._jsonrpc import canonical, loads_strict, parse_body
from proxy.policy import parse_rule
from tests.unit.mcp.test_jsonrpc import BAD_MESSAGES, REFUSED

_REFUSED = object()


def strict_canonical(data: bytes) -> Any:
    """The canonical form the Python readers give ``data``, or ``_REFUSED``."""
    try:
        return canonical(loads_strict(data))
    except Refused:
        return _REFUSED


def agrees(data: bytes) -> bytes | None:
    """The scanner's answer, asserted to agree with the strict reader's."""
    fast = _scan.canonical(data)
    if fast is not None:
        assert fast == strict_canonical(data), data[:200]
    return fast


def test_the_scanner_is_built() -> None:
    """CI builds it (setup.py); without it every body takes the slower Python path."""
    assert _jsonrpc._scan is _scan


@pytest.mark.parametrize(("body", "why"), REFUSED)
def test_never_proves_what_the_strict_reader_refuses(body: bytes, why: str) -> None:
    assert _scan.canonical(body) is None
    assert _scan.read(body, 3) is None


@pytest.mark.parametrize("body", [
    b'{"ab":1,"aB":2}',                  # out of order: sorted, then compared folded
    b'{"aB":1,"ab":2}',                  # in byte order already
    b'{"b":1,"c":2,"ab":3,"AB":4}',      # the only capitals in the last key
    b'{"x":{"k":1,"K":2},"y":3}',        # in a nested object, its parent has none
    b'{"K":{"a":1},"k":{"b":2}}',        # values that differ do not matter
])
def test_never_proves_keys_equal_but_for_case(body: bytes) -> None:
    """Capitals are noted per object as its keys are read; a key with one is what
    makes the folded comparison run."""
    assert strict_canonical(body) is _REFUSED
    assert _scan.canonical(body) is None


def test_capitals_in_a_nested_object_are_its_own() -> None:
    """A capital inside a child does not make its parent's keys fold: a parent whose
    keys are plain is still proven (and its child, whose keys do not fold)."""
    assert agrees(b'{"x":{"Ab":1,"c":2},"ab":2}') == b'{"ab":2,"x":{"Ab":1,"c":2}}'


@pytest.mark.parametrize("body", [
    b'{"a":1,"a":1}',                          # a duplicate
    b'{"x":{"y":[{"k":1,"k":2}]}}',            # ... at depth
    b'{"x":[{"name":1,"Name":2}]}',            # keys equal but for case, at depth
    b'{"b":1,"a":2,"A":3}',                    # ... not next to each other
    b'{"a\\u0041":1}',                          # an escape in a key
    b'{"a\\n":1}',
    b'{"a":"\\u0041"}',                         # \u and \/ orjson writes differently
    b'{"a":"\\/"}',
    b'{"a":"\\x"}',                             # not an escape at all
    b'{"a":"\\',                                # cut inside an escape
    b'{"a":"\xc3\xa9"}',                        # not ASCII
    b'{"\xc3\xa9":1}',
    b'{"a":"\x7f\x1f"}',                       # a raw control character
    b'{"a":1e2}', b'{"a":1E2}', b'{"a":1.5e-3}',  # an exponent
    b'{"a":-0}', b"-0",                        # read as the integer 0
    b'{"a":1234567890123456789}',              # 19 integer digits
    b'{"a":0.' + b"1" * 65 + b"}",             # 65 fraction digits
    b'{"a":01}', b'{"a":+1}', b'{"a":.5}', b'{"a":1.}', b'{"a":-}', b'{"a":--1}',
    b'{"a":tru}', b'{"a":nul}', b'{"a":True}', b'{"a":NaN}',
    b'{"a":1,}', b'{,"a":1}', b'{"a" 1}', b'{"a":}', b'{"a"}', b'{1:1}', b"{'a':1}",
    b"[1,]", b"[,1]", b"[1 2]", b'{"a":[1}', b'{"a":1]', b"[", b"]", b"{", b"}", b"",
    b"   ", b'{"a":1} x', b'{"a":1}{}', b"\x0c{}", b"{}\x00",
    b"\xef\xbb\xbf{}",                          # a byte order mark
    b"[" * 129 + b"]" * 129,                   # deeper than the scanner goes
    b'{"a":' * 129 + b"1" + b"}" * 129,
])
def test_defers_to_the_python_readers(body: bytes) -> None:
    assert _scan.canonical(body) is None


def _nested_unsorted(levels: int) -> bytes:
    """Objects whose keys are out of order, each holding the next and 10 KB of its own."""
    body = b"1"
    for _ in range(levels):
        body = b'{"z":0,"a":' + body + b',"pad":"' + b"x" * 10_000 + b'"}'
    return body


def test_bounds_the_bytes_reordering_moves() -> None:
    """Each level of unsorted objects moves what it holds again; a body nested to make
    that quadratic goes to the (linear) Python readers, which accept it."""
    deep = _nested_unsorted(100)
    assert _scan.canonical(deep) is None and strict_canonical(deep) is not _REFUSED
    assert agrees(_nested_unsorted(10)) is not None


@pytest.mark.parametrize(("body", "canon"), [
    (b'{"b":1,"a":2}', b'{"a":2,"b":1}'),
    (b' \t\r\n{ "b" : [ 1 , 2.50 , -0.0 , 0 ] ,\n"a":{"d":null,"c":true,"B":false}} \n',
     b'{"a":{"B":false,"c":true,"d":null},"b":[1,2.50,-0.0,0]}'),
    (b'{"a":"\\"\\\\\\b\\f\\n\\r\\t","":"","B":[]}',
     b'{"":"","B":[],"a":"\\"\\\\\\b\\f\\n\\r\\t"}'),
    (b'{"aa":1,"a":2,"a_":3,"a0":4}', b'{"a":2,"a0":4,"a_":3,"aa":1}'),
    (b'[{}, [], "x", -12.5, 123456789012345678, false]',
     b'[{},[],"x",-12.5,123456789012345678,false]'),
    (b'"a string"', b'"a string"'),
    (b"  7 ", b"7"),
    (b"[" * 128 + b"]" * 128, b"[" * 128 + b"]" * 128),
])
def test_proves_and_writes_the_canonical_form(body: bytes, canon: bytes) -> None:
    assert agrees(body) == canon


def _key(rng: random.Random) -> str:
    return rng.choice(["a", "b", "A", "B", "ab", "aB", "name", "Name", "x_1", "", "z z",
                       "arguments", "id", "k", "tools", "a\\u0062", "\\n"])


def _string(rng: random.Random) -> str:
    """A JSON string literal, sometimes with an escape the scanner must defer."""
    parts = rng.choices(["a", " ", "Z", "\\n", "\\\"", "\\\\", "\\t", "\\b", "\\f", "\\r",
                         "\\/", "\\u0041", "\\ud800", "é", "<", "}", "]", ",", ":"],
                        weights=[20, 6, 6, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                        k=rng.randrange(0, 8))
    return '"' + "".join(parts) + '"'


def _number(rng: random.Random) -> str:
    return rng.choice([
        str(rng.randrange(-10**6, 10**6)), str(rng.randrange(10**17, 10**18)),
        str(rng.randrange(10**18, 10**19)), "-0", "0", "-0.0", "0.5", "1.50",
        repr(rng.random() * 10**rng.randrange(-5, 20)), "1e5", "2E-3", "0.1", "3.0",
        "12345678901234567.25", "-7.125",
    ])


def _value(rng: random.Random, depth: int) -> str:
    kind = rng.random()
    ws = lambda: rng.choice(["", "", "", " ", "\n", " \t"])  # noqa: E731
    if depth < 5 and kind < 0.3:
        n = rng.randrange(0, 6)
        members = [f"{ws()}\"{_key(rng)}\"{ws()}:{ws()}{_value(rng, depth + 1)}{ws()}"
                   for _ in range(n)]
        return "{" + ",".join(members) + "}"
    if depth < 5 and kind < 0.45:
        return "[" + ",".join(ws() + _value(rng, depth + 1) + ws()
                              for _ in range(rng.randrange(0, 5))) + "]"
    if kind < 0.7:
        return _string(rng)
    if kind < 0.9:
        return _number(rng)
    return rng.choice(["true", "false", "null"])


def _bodies(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        text = _value(rng, 0)
        if rng.random() < 0.05:  # a damaged body: cut, or a byte flipped
            cut = rng.randrange(0, len(text) + 1)
            text = text[:cut] if rng.random() < 0.5 else (
                text[:cut] + rng.choice("{}[],:\"\\ x0") + text[cut + 1:])
        yield text.encode()


def test_random_bodies_agree_with_the_strict_reader() -> None:
    """Thousands of generated bodies, hazards included (duplicate and case look-alike
    keys, every escape, numbers of every shape, damaged bytes): the scanner proves
    only bodies the strict reader accepts, with the same canonical form."""
    proven = deferred_refused = 0
    for body in _bodies(seed=20261206, count=6000):
        fast = agrees(body)
        if fast is not None:
            proven += 1
            read_agrees(body, fast)
        elif strict_canonical(body) is _REFUSED:
            deferred_refused += 1
    # Both sides are exercised: many bodies proven, many refused ones deferred.
    assert proven > 1500 and deferred_refused > 500, (proven, deferred_refused)


def read_agrees(body: bytes, canon: bytes) -> None:
    """read() gives canonical()'s bytes and lists exactly the members orjson reads from
    them, at every depth asked."""
    doc = orjson.loads(canon)
    for levels in (1, 2, 3, 4):
        read = _scan.read(body, levels)
        assert read is not None and read[0] == canon, body[:200]
        if not isinstance(doc, dict):
            assert read[1] is None
            continue
        _members_agree(canon, doc, read[1], levels)


def _members_agree(canon: bytes, doc: dict[str, Any], listed: Any, levels: int) -> None:
    assert [k for k, *_ in listed] == sorted(doc)
    for key, start, end, inner in listed:
        assert orjson.loads(canon[start:end]) == doc[key]
        if levels > 1 and isinstance(doc[key], dict):
            _members_agree(canon, doc[key], inner, levels - 1)
        else:
            assert inner is None


@pytest.mark.parametrize("body", [
    b' {"b":{"y":{"z":{}} ,"x":[{"q":1}]},"a":1} ',  # objects in an array are not listed
    b'{"B":1,"a":{"c":{"e":1,"d":2}}}',   # capitals, in byte order: left as they are
    b'{"a":{"C":1,"b":2},"B":{"D":{"c":[]}}}',  # capitals, out of order
    b'{"a":{}}', b"{}",
    b'{"k":{"a":1,"b":{"c":{"d":{"e":1}}}}}',    # deeper than asked: not listed
    b'"x"', b"7", b"[{}]",
])
def test_read_lists_the_members_in_the_canonical_form(body: bytes) -> None:
    """Where each member's value is, relative to its object: an enclosing object's
    reordering moves the whole object, so the places stay right."""
    canon = agrees(body)
    assert canon is not None
    read_agrees(body, canon)


@pytest.mark.parametrize("body", [b'{"a":1', b'{"a":1,"a":2}', b"", b'{"x":{"k":1,"K":2}}',
                                  b'{"a":{"b":[1]', b'{"a":"\\u0041"}'])
def test_read_proves_only_what_canonical_proves(body: bytes) -> None:
    assert _scan.canonical(body) is None and _scan.read(body, 3) is None


@pytest.mark.parametrize("levels", [0, -1, 129])
def test_read_takes_1_to_128_levels(levels: int) -> None:
    with pytest.raises(ValueError, match="levels"):
        _scan.read(b"{}", levels)


# -- a tool call judged through the scanner gets the same decision -----------------------
RULES = [
    parse_rule({"id": "docs", "host": "h", "paths": ["/mcp"], "mcp": {
        "tools": ["search_docs", "summarize"],
        "args": {"limit": {"maximum": 50}, "ratio": {"minimum": 0.1, "maximum": 0.5},
                 "query": {"maxLength": 20, "pattern": "[a-z ]+"}}}}),
    parse_rule({"id": "plain", "host": "h", "paths": ["/mcp"], "mcp": {"tools": ["add"]}}),
]


def _call(arguments: Any, name: Any = "search_docs", **extra: Any) -> bytes:
    params = {"name": name, "arguments": arguments, **extra}
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": params}).encode()


CALLS: list[bytes] = [
    _call({"query": "taskgate docs", "limit": 10, "ratio": 0.1}),
    _call({"query": "taskgate docs", "limit": 10, "ratio": 0.5, "items": [{"a": 1}] * 50}),
    _call({"query": "taskgate docs", "limit": 51, "ratio": 0.2}),           # over a maximum
    _call({"query": "taskgate docs", "limit": 10, "ratio": 0.50001}),
    _call({"query": "taskgate docs", "limit": 10, "ratio": 0.09999}),
    _call({"query": "Taskgate", "limit": 10, "ratio": 0.2}),                # pattern
    _call({"query": "x" * 21, "limit": 10, "ratio": 0.2}),                  # maxLength
    _call({"query": "docs", "ratio": 0.2}),                                  # missing
    _call({"query": "docs", "Limit": 10, "ratio": 0.2}),                     # look-alike
    _call({"query": "docs", "limit": "10", "ratio": 0.2}),                   # a string
    _call({"query": "docs", "limit": [10], "ratio": 0.2}),
    _call({"query": "docs", "limit": 10.0, "ratio": 0.2}),
    _call({}, name="add"), _call({"x": {"y": [1, 2, {"z": None}]}}, name="add"),
    _call({}, name="delete_repo"), _call({}, name="bad name!"), _call({}, name=7),
    _call([1, 2], name="add"), _call("x", name="add"), _call(None, name="add"),
    _call({"a": 1}, name="add", _meta={"progressToken": 3}),
    _call({"a": 1}, name="add", Name="other"),                                 # look-alike param
    _call({"a": 1}, name="add", extra=[1, 2]),
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add"}}',
    b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"add","arguments":{}}}',
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":[1]}',
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call"}',
    b'{"jsonrpc":"2.0","id":7,"Method":"tools/call","params":{"name":"add"}}',
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{},'
    b'"ARGUMENTS":{"x":1}}}',
    b'{"jsonrpc":"2.0","id":7,"method":"Tools/Call","params":{"name":"add","arguments":{}}}',
    b'{"jsonrpc":"2.0","id":1.5,"method":"tools/call","params":{"name":"add","arguments":{}}}',
    b'{"jsonrpc":"2.0","id":"a\\nb","method":"tools/call","params":{"name":"add","arguments"'
    b':{"t":"x\\ty"}}}',
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":'
    b'{"x":{"k":1,"K":2}}}}',                                                  # case at depth
    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":'
    b'{"x":[{"k":1,"k":1}]}}}',                                                # duplicate
    b'{"jsonrpc":"2.0","id":7,"id":8,"method":"tools/call","params":{"name":"add"}}',
    b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}',
    b'[{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{}}}]',
]


def _decision(body: bytes) -> Any:
    try:
        d = inspect(RULES, "POST", body, None, 1 << 20)
    except (Refused, PayloadTooLarge) as e:
        return (type(e).__name__, str(e))
    seen = {f.name: getattr(d, f.name) for f in fields(d)}
    return {**seen, "rule": d.rule.id if d.rule else None}


@pytest.mark.parametrize("body", CALLS)
def test_same_decision_with_and_without_the_scanner(body: bytes,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _decision(body)
    monkeypatch.setattr(_jsonrpc, "_scan", None)
    assert fast == _decision(body)


def test_a_plain_tool_call_is_read_through_the_scanner() -> None:
    """The fast path is taken (not only agreed with): arguments stay unparsed."""
    body = _call({"query": "docs", "limit": 5, "ratio": 0.2, "items": [{"a": 1}] * 10})
    [message], batch = parse_body(body)
    arguments = message.params["arguments"]
    assert isinstance(arguments, _jsonrpc.Arguments) and not batch
    assert sorted(arguments) == ["items", "limit", "query", "ratio"] and len(arguments) == 4
    assert "limit" in arguments and "Limit" not in arguments
    assert arguments["limit"] == 5 and arguments["items"] == [{"a": 1}] * 10
    assert canonical(arguments) == canonical(loads_strict(body)["params"]["arguments"])


@pytest.mark.parametrize(("body", "why"), [
    (b.replace(b'"method":"x"', b'"method":"tools/call"'), w) for b, w in BAD_MESSAGES
    if b'"method":"x"' in b])
def test_refusals_keep_their_words(body: bytes, why: str) -> None:
    """An envelope the checks refuse is worded by the full reader, as before."""
    with pytest.raises(Refused) as e:
        parse_body(body)
    assert why in e.value.reason
