"""The redactor against every reversible spelling, the bounded decoder, query names.

Tables of pure functions; the end-to-end counterparts are in test_leaks_e2e.py.
"""

from __future__ import annotations

import gzip
import itertools
import random
import zlib

import brotli
import pytest

from proxy.secrets.codings import StreamDecoder, TooLarge, Undecodable, codings, decode
from proxy.secrets.placement import query_name, strip_query_params
from proxy.secrets.redact import MASK, Redactor, scrub_upstream_text
from tests.leak_upstream import SPELL

VALUE = "s3cr3t/Tok+en_value-0123.456789"
OTHER = "another-secret-AAAA"
R = Redactor([VALUE.encode(), OTHER.encode()])


def _core(name: str, text: bytes) -> bytes:
    """What must not survive of a spelling (base64: the part that is the value's alone)."""
    if name.startswith("b64"):
        return text[4:-4]
    if name.startswith("utf16"):
        return text[1:-1]
    return text


@pytest.mark.parametrize("name", sorted(SPELL))
def test_every_spelling_is_masked_in_place(name: str) -> None:
    text = SPELL[name](VALUE)
    out = R.redact(b"<<" + text + b">>")
    assert out.count(MASK) == 1  # one fixed marker: the value's length is not told
    assert _core(name, text) not in out
    assert VALUE.encode() not in out
    assert out.startswith(b"<<") and out.endswith(b">>")
    assert R.found_in(text)


@pytest.mark.parametrize(("name", "text"), [
    ("mixed escapes", b"s%33cr&#51;t\\/Tok%2Ben&lowbar;value-0123&period;456789"),
    ("mixed case hex", VALUE.encode().hex().encode()[:20] + VALUE.encode().hex().upper()
     .encode()[20:]),
    ("zero padded decimal", "".join(f"&#00{b};" for b in VALUE.encode()).encode()),
    ("references without ;", "".join(f"&#{b}" for b in VALUE.encode()).encode()),
    ("upper X hex reference", "".join(f"&#X{b:x};" for b in VALUE.encode()).encode()),
    ("json upper U hex", "".join(f"\\u{b:04X}" for b in VALUE.encode()).encode()),
    ("\\x escapes", "".join(f"\\x{b:02x}" for b in VALUE.encode()).encode()),
    ("double percent", "".join(f"%25{b:02X}" for b in VALUE.encode()).encode()),
    ("utf-16 with BOM", b"\xff\xfe" + VALUE.encode("utf-16-le")),
])
def test_more_spellings(name: str, text: bytes) -> None:
    out = R.redact(b"[" + text + b"]")
    assert out.count(MASK) == 1, (name, out)
    assert VALUE.encode() not in out


@pytest.mark.parametrize("text", [
    b"hello world &amp; %20 \\u0041 data 12345 abcdef",
    b"s3cr3t/Tok+en_value-012345678",  # one character short
    b"&#115;&#51;&#99;&#114;",  # the start only
    VALUE.encode().hex().encode()[:-2],
])
def test_text_without_a_whole_value_is_untouched(text: bytes) -> None:
    assert R.redact(text) == text and not R.found_in(text)


def feed(chunks: list[bytes]) -> bytes:
    step = R.stream()
    outs = [step(c) for c in chunks] + [step(b"")]
    assert all(all(o) for o in outs), "an empty chunk would end an HTTP/1 chunked body"
    return b"".join(itertools.chain.from_iterable(outs))


@pytest.mark.parametrize("name", sorted(SPELL))
def test_a_spelling_split_anywhere_across_chunks_is_masked(name: str) -> None:
    spelled = SPELL[name](VALUE)
    text = b"data: " + spelled + b"\n\n"

    def check(got: bytes) -> None:
        # One marker, nothing of the value left (a cut may leave an optional ';' of a
        # last character reference unmasked: it is not the value's).
        assert got.startswith(b"data: ") and got.endswith(b"\n\n")
        assert _core(name, spelled) not in got and not R.found_in(got), got
        assert got.count(MASK) == 1, got

    for i in range(1, len(text)):
        check(feed([text[:i], text[i:]]))
    rng = random.Random(name)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(8, len(text) - 1)))
        check(feed([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]))


def test_stream_holds_back_only_a_possible_start() -> None:
    step = R.stream()
    assert step(b"data: 1 &amp; 2 %41\n\n") == [b"data: 1 &amp; 2 %41\n\n"]
    assert step(b"x &#115;&#51;") == [b"x "]  # may be the value, entity-spelled: held
    assert step(b"&#9") == []  # 'c' is &#99;
    assert step(b"8;") == [b"&#115;&#51;&#98;"]  # &#98; is 'b': it was not


def test_scrub_upstream_text() -> None:
    msg = f"Bad HTTP response line: b'HTTP/1.1 2x0 {VALUE}' and also {VALUE.encode().hex()}\x01"
    out = scrub_upstream_text(msg, R)
    assert VALUE not in out and VALUE.encode().hex() not in out
    assert out.startswith("Bad HTTP response line: [...] and also REDACTED")
    assert scrub_upstream_text("x" * 1000, None) == "x" * 300


# -- bounded decoding -------------------------------------------------------------------
ZEROS = b"\0" * (8 << 20)


@pytest.mark.parametrize(("coding", "encode"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress),
    ("br", lambda b: brotli.compress(b, quality=5)),
    ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
])
def test_decode_round_trips_and_stops_at_the_cap(coding: str, encode: object) -> None:
    assert callable(encode)
    assert decode(encode(b"hello"), codings(coding, None)) == b"hello"
    with pytest.raises(TooLarge):
        decode(encode(ZEROS), codings(coding, None), cap=1 << 20)


def test_zstd_bomb_stops_at_the_cap() -> None:
    from backports import zstd

    assert decode(zstd.compress(b"hi"), codings("zstd", None)) == b"hi"
    with pytest.raises(TooLarge):
        decode(zstd.compress(ZEROS), codings("zstd", None), cap=1 << 20)


@pytest.mark.parametrize(("ce", "te", "steps"), [
    ("gzip", None, ["gzip"]), ("br, gzip", None, ["gzip", "br"]),
    (None, "gzip, chunked", ["gzip"]), ("br", "gzip", ["gzip", "br"]),
    ("identity", "chunked", []), ("", None, []), (" GZIP ", None, ["gzip"]),
])
def test_codings(ce: str | None, te: str | None, steps: list[str]) -> None:
    assert codings(ce, te) == steps


@pytest.mark.parametrize(("ce", "te"), [("compress", None), ("gzip, gzip, gzip, gzip, gzip", None),
                                        ("x-unknown", None), (None, "compress, chunked")])
def test_undecodable_codings(ce: str | None, te: str | None) -> None:
    with pytest.raises(Undecodable):
        codings(ce, te)


@pytest.mark.parametrize("body", [b"not gzip at all", gzip.compress(b"x" * 100)[:-9],
                                  gzip.compress(b"x") + b"trailing"])
def test_corrupt_truncated_or_trailing_data_is_undecodable(body: bytes) -> None:
    with pytest.raises(Undecodable):
        decode(body, ["gzip"])


def test_stream_decoder_caps_each_chunk() -> None:
    d = StreamDecoder(["br"], cap=1 << 20)
    with pytest.raises(TooLarge):
        d.feed(brotli.compress(ZEROS, quality=5))
    d = StreamDecoder(["gzip"])
    data = gzip.compress(b"abc" * 1000)
    assert b"".join(d.feed(data[i:i + 5]) for i in range(0, len(data), 5)) == b"abc" * 1000
    d.end()


# -- query parameter names ---------------------------------------------------------------
@pytest.mark.parametrize(("raw", "name"), [
    (b"api_key", "apikey"), (b"API_KEY", "apikey"), (b"Api-Key", "apikey"),
    (b"api%5Fkey", "apikey"), (b"api%255Fkey", "apikey"), (b"api+key", "apikey"),
    (b"ACCESS%5ftoken", "accesstoken"), (b"x", "x"),
])
def test_query_name_folds(raw: bytes, name: str) -> None:
    assert query_name(raw) == name


@pytest.mark.parametrize("raw", [b"api_key%00", b"api_key%0a", b"%01", b"x%7f", b"a%2500"])
def test_query_name_refuses_control_bytes(raw: bytes) -> None:
    with pytest.raises(ValueError, match="control character"):
        query_name(raw)


@pytest.mark.parametrize(("target", "out"), [
    (b"/p?x=1&API_KEY=a&y=2", b"/p?x=1&y=2"),
    (b"/p?api%5Fkey=a", b"/p"),
    (b"/p?x=%41&Access-Token=t&access_token", b"/p?x=%41"),
    (b"/p", b"/p"),
    (b"/p?keyx=1&apikeys=2", b"/p?keyx=1&apikeys=2"),
])
def test_strip_query_params(target: bytes, out: bytes) -> None:
    assert strip_query_params(target, ("api_key", "access_token")) == out
