"""proxy/mcp/_jsonrpc.py: strict decoding and reading of JSON-RPC bodies."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from decimal import Decimal
from typing import Any

import brotli
import pytest

from proxy.errors import PayloadTooLarge, Refused
from proxy.mcp._jsonrpc import (
    _NOT_PROVEN,
    _read_fast,
    canonical,
    decode_content,
    digest,
    loads_strict,
    parse_body,
)
from proxy.policy._mcp_grant import exact

OK = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{}}}'

# (body, part of the refusal reason)
REFUSED: list[tuple[bytes, str]] = [
    (b"\xef\xbb\xbf" + OK, "byte order mark"),
    (OK.decode().encode("utf-16"), "not valid UTF-8"),
    (OK.decode().encode("utf-32"), "not valid UTF-8"),
    (b'{"a":"\xc0\xaf"}', "not valid UTF-8"),  # overlong '/'
    (b'{"a":"\xed\xa0\x80"}', "not valid UTF-8"),  # an encoded surrogate
    (b'{"a":"\xff"}', "not valid UTF-8"),
    (b'{"a":1,"a":2}', "duplicate key 'a'"),
    (b'{"a":1,"\\u0061":2}', "duplicate key 'a'"),
    (b'{"x":{"y":[{"a":1,"a":1}]}}', "duplicate key 'a'"),
    (b'{"a":1,"A":2}', "differ only by case or Unicode folding"),
    (b'{"x":[{"name":1,"NAME":2}]}', "differ only by case or Unicode folding"),
    ('{"name":1,"ｎａｍｅ":2}'.encode(), "differ only by case or Unicode folding"),
    ('{"ss":1,"ß":2}'.encode(), "differ only by case or Unicode folding"),
    (b'{"\\ud800":1}', "unpaired surrogate"),
    (b'{"a":NaN}', "NaN is not JSON"),
    (b'{"a":Infinity}', "Infinity is not JSON"),
    (b'{"a":-Infinity}', "-Infinity is not JSON"),
    (b'{"a":1e400}', "overflows to infinity"),
    (b'{"a":-1e400}', "overflows to infinity"),
    (b'{"a":' + b"1" * 5000 + b"}", "a number is too long"),
    (b"[" * 50000 + b"]" * 50000, "nests too deeply"),
    (b'{"a":1} x', "Extra data"),
    (b'{"a":1}{"a":1}', "Extra data"),
    (b"{'a':1}", "not valid JSON"),
    (b'{"a":1,}', "not valid JSON"),
    (b'{"a":"\x01"}', "not valid JSON"),  # a raw control character in a string
    (b"", "not valid JSON"),
    (b"\x00", "not valid JSON"),
    (b"\x0c{}", "not valid JSON"),  # form feed is not JSON whitespace
]


@pytest.mark.parametrize(("body", "why"), REFUSED)
def test_strict_json_refuses(body: bytes, why: str) -> None:
    with pytest.raises(Refused) as e:
        loads_strict(body)
    assert why in e.value.reason


@pytest.mark.parametrize(("body", "value"), [
    (b'{"a":1,"b":2}', {"a": 1, "b": 2}),
    (b' \t\r\n{"a":[1,2.5,"x",null,true]} \n', {"a": [1, 2.5, "x", None, True]}),
    ('{"é":"ü","name":1,"nom":2}'.encode(), {"é": "ü", "name": 1, "nom": 2}),
    (b'{"a":"\\ud83d\\ude00"}', {"a": "😀"}),
    (b'{"a":"\\u0000"}', {"a": "\x00"}),
    (b'{"a":12345678901234567890123}', {"a": 12345678901234567890123}),
    (b'{"a":{},"b":[]}', {"a": {}, "b": []}),
])
def test_strict_json_reads(body: bytes, value: Any) -> None:
    assert loads_strict(body) == value


# (body, part of the refusal reason) for the JSON-RPC envelope
BAD_MESSAGES: list[tuple[bytes, str]] = [
    (b'{"id":1,"method":"x"}', '"jsonrpc" must be "2.0"'),
    (b'{"jsonrpc":"1.0","id":1,"method":"x"}', '"jsonrpc" must be "2.0"'),
    (b'{"jsonrpc":2.0,"id":1,"method":"x"}', '"jsonrpc" must be "2.0"'),
    (b'{"jsonrpc":"2.0 ","id":1,"method":"x"}', '"jsonrpc" must be "2.0"'),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","result":1}', "both a method and a result"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","error":{}}', "both a method and a result"),
    (b'{"jsonrpc":"2.0","id":1,"result":1,"error":{}}', "exactly one of result and error"),
    (b'{"jsonrpc":"2.0","id":1}', "exactly one of result and error"),
    (b'{"jsonrpc":"2.0","result":1}', "a response carries an id"),
    (b'{"jsonrpc":"2.0","id":1,"result":1,"params":{}}', "a response carries an id"),
    (b'{"jsonrpc":"2.0","id":1,"method":""}', "method must be a non-empty string"),
    (b'{"jsonrpc":"2.0","id":1,"method":["x"]}', "method must be a non-empty string"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":"a"}', "params must be an object"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":null}', "params must be an object"),
    (b'{"jsonrpc":"2.0","id":true,"method":"x"}', "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"x"}', "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":{},"method":"x"}', "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":null,"method":"x"}', "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":9223372036854775808,"method":"x"}', "id must be a string"),
    (b'{"jsonrpc":"2.0","id":"' + b"x" * 257 + b'","method":"x"}', "id must be a string"),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","extra":1}', "unknown JSON-RPC member 'extra'"),
    (b'{"jsonrpc":"2.0","ID":1,"method":"x"}', "'ID' differs only by case"),
    ('{"jsonrpc":"2.0","id":1,"method":"x","paramſ":{}}'.encode(),
     "'paramſ' differs only by case or Unicode folding from 'params'"),
    ('{"jsonrpc":"2.0","id":1,"ｍｅｔｈｏｄ":"x"}'.encode(), "differs only by case"),
    (b"[]", "an empty batch"),
    (b"[1]", "must be an object"),
    (b"[[]]", "must be an object"),
    (b'"tools/call"', "must be an object"),
    (b"null", "must be an object"),
    (b'[{"jsonrpc":"2.0","id":1,"method":"x"},{"jsonrpc":"1.0","id":2,"method":"x"}]',
     '"jsonrpc" must be "2.0"'),
]


@pytest.mark.parametrize(("body", "why"), BAD_MESSAGES)
def test_bad_messages(body: bytes, why: str) -> None:
    with pytest.raises(Refused) as e:
        parse_body(body)
    assert why in e.value.reason


def test_messages_and_batches() -> None:
    msgs, batch = parse_body(OK)
    assert not batch and msgs[0].method == "tools/call" and msgs[0].id == 1
    msgs, batch = parse_body(b'[{"jsonrpc":"2.0","method":"notifications/x"},'
                             b'{"jsonrpc":"2.0","id":"a","result":{}},'
                             b'{"jsonrpc":"2.0","id":2,"method":"m","params":[1]}]')
    assert batch and [m.method for m in msgs] == ["notifications/x", None, "m"]
    assert not msgs[0].has_id and msgs[1].is_response and msgs[2].params == [1]


CAP = 4096


# (content-encoding, body, expected decoded body or the exception and part of its reason)
ENCODINGS: list[tuple[str | None, bytes, Any]] = [
    (None, OK, OK),
    ("identity", OK, OK),
    ("gzip", gzip.compress(OK), OK),
    ("GZIP", gzip.compress(OK), OK),
    ("x-gzip", gzip.compress(OK), OK),
    ("deflate", zlib.compress(OK), OK),
    ("br", brotli.compress(OK), OK),
    ("gzip, br", brotli.compress(gzip.compress(OK)), OK),
    ("identity, gzip", gzip.compress(OK), OK),
    ("gzip, gzip, gzip", gzip.compress(gzip.compress(gzip.compress(OK))),
     (Refused, "more than 2 content codings")),
    ("gzip", gzip.compress(b" " * (CAP + 1)), (PayloadTooLarge, "gzip-decoded body is larger")),
    ("gzip", gzip.compress(b"x" * (2 << 20)), (PayloadTooLarge, "gzip-decoded body is larger")),
    ("deflate", zlib.compress(b"x" * (2 << 20)), (PayloadTooLarge, "deflate-decoded")),
    ("br", brotli.compress(b"x" * (100 << 20)), (PayloadTooLarge, "br-decoded")),
    ("gzip", gzip.compress(gzip.compress(b"x" * (100 << 20))), (PayloadTooLarge, "gzip-decoded")),
    ("gzip", gzip.compress(OK)[:-8], (Refused, "gzip data is truncated")),
    ("gzip", gzip.compress(OK) + b"x", (Refused, "bytes follow the end of the gzip data")),
    ("gzip", gzip.compress(OK) + gzip.compress(OK), (Refused, "bytes follow the end")),
    ("gzip", OK, (Refused, "not valid gzip data")),
    ("deflate", zlib.compress(OK)[2:], (Refused, "not valid deflate data")),
    ("br", brotli.compress(OK)[:-2], (Refused, "br data is truncated")),
    ("br", brotli.compress(OK) + b"junk", (Refused, "not valid br data")),
    ("br", OK, (Refused, "not valid br data")),
    ("zstd", OK, (Refused, "unsupported Content-Encoding 'zstd'")),
    ("compress", OK, (Refused, "unsupported Content-Encoding 'compress'")),
    ("gzip;q=1", gzip.compress(OK), (Refused, "unsupported Content-Encoding")),
    (None, b"x" * (CAP + 1), (PayloadTooLarge, "larger than 4096")),
]


@pytest.mark.parametrize(("coding", "body", "expected"), ENCODINGS)
def test_decode_content(coding: str | None, body: bytes, expected: Any) -> None:
    if isinstance(expected, bytes):
        assert decode_content(body, coding, CAP) == expected
        return
    exc, why = expected
    with pytest.raises(exc) as e:
        decode_content(body, coding, CAP)
    assert why in e.value.reason


def test_digest_is_canonical() -> None:
    assert digest({"b": 1, "a": [1, "é"]}) == digest({"a": [1, "é"], "b": 1})
    assert digest({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()
    assert digest(None) is None
    assert len(digest({"big": 10**30}) or "") == 64  # beyond orjson's 64-bit integers
    assert len(digest({"s": "\ud800"}) or "") == 64


# -- strings that are not valid Unicode (a lone surrogate) -----------------------------
def _rpc(params: str, method: str = '"tools/call"') -> bytes:
    return ('{"jsonrpc":"2.0","id":1,"method":' + method + ',"params":' + params + "}").encode()


LONE_SURROGATES: list[tuple[str, bytes]] = [
    ("value-high", _rpc('{"name":"add","arguments":{"a":"\\ud800"}}')),
    ("value-low", _rpc('{"name":"add","arguments":{"a":"\\udfff"}}')),
    ("value-upper-hex", _rpc('{"name":"add","arguments":{"a":"\\uD83D"}}')),
    ("value-mid-string", _rpc('{"name":"add","arguments":{"a":"ok \\udc00 ok"}}')),
    ("reversed-pair", _rpc('{"name":"add","arguments":{"a":"\\ude00\\ud83d"}}')),
    ("high-then-text", _rpc('{"name":"add","arguments":{"a":"\\ud83dx"}}')),
    ("two-highs", _rpc('{"name":"add","arguments":{"a":"\\ud83d\\ud83d"}}')),
    ("key-top", b'{"jsonrpc":"2.0","id":1,"method":"ping","\\ud800":1}'),
    ("key-arguments", _rpc('{"name":"add","arguments":{"\\udbff":1}}')),
    ("key-ascii-beside", _rpc('{"name":"add","arguments":{"a\\udbff":1,"b":2}}')),
    ("nested-list", _rpc('{"name":"add","arguments":{"a":[1,[{"b":["\\udabc"]}]]}}')),
    ("deep-object", _rpc('{"name":"add","arguments":{"a":{"b":{"c":{"d":"\\ud800"}}}}}')),
    ("tool-name", _rpc('{"name":"add\\ud800","arguments":{}}')),
    ("method", _rpc('{}', method='"tools/call\\ud800"')),
    ("id", b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}'),
    ("jsonrpc-member", b'{"jsonrpc":"2.0\\ud800","id":1,"method":"ping"}'),
    ("meta", _rpc('{"name":"add","_meta":{"progressToken":"\\udc80"}}')),
    ("batch-second", b'[{"jsonrpc":"2.0","id":1,"method":"ping"},'
                     b'{"jsonrpc":"2.0","id":2,"method":"x","params":["\\udfff"]}]'),
    ("response-result", b'{"jsonrpc":"2.0","id":1,"result":{"a":"\\ud800"}}'),
    ("response-error", b'{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"\\ud800"}}'),
]


@pytest.mark.parametrize("body", [b for _, b in LONE_SURROGATES],
                         ids=[n for n, _ in LONE_SURROGATES])
def test_lone_surrogate_refused_anywhere(body: bytes) -> None:
    with pytest.raises(Refused) as e:
        parse_body(body)
    assert "unpaired surrogate" in e.value.reason


@pytest.mark.parametrize("body", [
    b'{"a":"\xed\xa0\x80"}',  # CESU-8 high surrogate
    b'{"a":"\xed\xb0\x80"}',  # CESU-8 low surrogate
    b'{"a":"\xed\xa0\xbd\xed\xb8\x80"}',  # CESU-8 pair (😀 as two 3-byte units)
    b'{"\xed\xa0\x80":1}',  # in a key
])
def test_raw_surrogate_bytes_refused(body: bytes) -> None:
    with pytest.raises(Refused, match="not valid UTF-8"):
        loads_strict(body)


@pytest.mark.parametrize(("body", "value"), [
    (b'{"a":"\\ud83d\\ude00"}', "😀"),
    (b'{"a":"\\uD83D\\uDE00"}', "😀"),
    (b'{"a":"\\\\ud800"}', "\\ud800"),  # an escaped backslash, then plain text
    (b'{"a":"\\\\\\ud83d\\ude00"}', "\\😀"),
    (b'{"a":"\\ud7ff\\ue000"}', "\ud7ff\ue000"),  # just outside the surrogate range
])
def test_valid_unicode_escapes_read(body: bytes, value: str) -> None:
    assert loads_strict(body) == {"a": value}


# -- numbers keep the text they were written as ----------------------------------------
@pytest.mark.parametrize("text", [
    "50.0000000000000001", "1e2", "1E+2", "-0.0", "0.1", "1.5e-400", "123456789.123456789123",
    "-1e-7", "5e0",
])
def test_numbers_keep_their_text(text: str) -> None:
    """Read fast (orjson spells it alike) or strictly (an ExactFloat), a number keeps
    its value as written and its text in the canonical form."""
    doc = loads_strict(b'{"a":' + text.encode() + b"}")
    assert exact(doc["a"]) == Decimal(text) and float(doc["a"]) == float(text)
    assert canonical(doc) == b'{"a":' + text.encode() + b"}"


def test_canonical_keeps_exact_numbers_sorted() -> None:
    doc = loads_strict(b'{"b":50.0000000000000001,"a":[1,2.50]}')
    assert canonical(doc) == b'{"a":[1,2.50],"b":50.0000000000000001}'
    assert digest(doc) == hashlib.sha256(canonical(doc) or b"").hexdigest()


# -- the fast reading is taken only when it is provably the strict one -------------------
@pytest.mark.parametrize("body", [
    b'{"a":1,"a":1}',                          # a duplicate orjson would drop
    b'{"x":{"y":[{"k":1,"k":2}]}}',            # ... at depth
    b'{"x":[{"name":1,"Name":2}]}',            # keys that differ only by case, at depth
    b'{"N\\u0041me":1,"nAme":2}',               # ... hidden behind an escape
    b'{"a":"\\u0041"}',                         # an escape decoded
    b'{"a":"\\/"}',
    b'{"a":"\xc3\xa9"}',                        # not ASCII: keys may fold by NFKC
    b'{"a":1e2}', b'{"a":50.0000000000000001}', b'{"a":1.5e-400}', b'{"a":1e-05}',
    b'{"a":18446744073709551616}',             # a huge integer orjson reads as a float
    b'[' * 300 + b']' * 300,                   # deeper than orjson writes
])
def test_fast_reading_defers_to_the_strict_one(body: bytes) -> None:
    assert _read_fast(body) is _NOT_PROVEN


@pytest.mark.parametrize("body", [
    OK, b'{"a":[1,2.5,-0.0,0.1,true,null,"x y"],"B":{"c":"D"}}',
    b' {\n "a" : [ 1 , 2 ] }\t', b'{"a":"\\n\\"\\\\"}', b'{"a":9223372036854775807}',
])
def test_fast_reading_is_the_strict_one(body: bytes) -> None:
    fast = _read_fast(body)
    assert fast is not _NOT_PROVEN
    assert canonical(fast) == canonical(_strict_reading(body))


def _strict_reading(body: bytes) -> Any:
    """The strict reader alone (the fast one switched off)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("proxy.mcp._jsonrpc._read_fast", lambda data: _NOT_PROVEN)
        return loads_strict(body)
