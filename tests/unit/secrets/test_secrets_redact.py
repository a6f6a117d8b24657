"""Redaction of echoed secret values: every spelling, every chunk split, same length."""

from __future__ import annotations

import base64
import itertools
import json
import random
from urllib.parse import quote

import pytest

from proxy.secrets.redact import Redactor

VALUE = b"s3cr3t/Tok+en_value-0123456789"
OTHER = b"another-secret-AAAA"


def spelled(v: bytes) -> list[tuple[str, bytes]]:
    return [
        ("plain", v),
        ("bearer header", b"Authorization: Bearer " + v),
        ("percent", quote(v, safe="").encode()),
        ("json slash", json.dumps({"t": v.decode()}).replace("/", "\\/").encode()),
        ("base64", base64.b64encode(v)),
        ("base64 offset 1", base64.b64encode(b"x" + v + b"y")),
        ("base64 offset 2", base64.b64encode(b"xy" + v)),
        ("urlsafe base64", base64.urlsafe_b64encode(b"z" + v)),
        ("basic auth", b"Basic " + base64.b64encode(b"x-access-token:" + v)),
    ]


@pytest.mark.parametrize(("case", "text"), spelled(VALUE), ids=[c for c, _ in spelled(VALUE)])
def test_every_spelling_is_masked_in_place(case: str, text: bytes) -> None:
    r = Redactor([VALUE, OTHER])
    out = r.redact(b"<<" + text + b">>")
    assert out.count(b"REDACTED") == 1  # one fixed marker: the value's length is not told
    assert VALUE not in out and base64.b64encode(VALUE)[2:-2] not in out
    for shift in range(3):  # no 10-character run of any base64 alignment survives
        enc = base64.b64encode(b"\0" * shift + VALUE)
        for i in range(4, len(enc) - 14):
            assert enc[i:i + 10] not in out and enc[i:i + 10].replace(b"/", b"_").replace(
                b"+", b"-") not in out
    assert out.startswith(b"<<") and out.endswith(b">>")


def test_text_without_values_is_untouched() -> None:
    r = Redactor([VALUE])
    text = b'{"ok": true, "token": "s3cr3t/Tok+en_value-012345678"}'  # one char short
    assert r.redact(text) == text and not r.found_in(text)


def test_short_values_are_not_masked() -> None:
    assert Redactor([b"abc"]).empty
    assert Redactor([b"abc"]).redact(b"abcabc") == b"abcabc"


def test_header_text_is_masked() -> None:
    r = Redactor([VALUE])
    assert r.redact_text("Bearer " + VALUE.decode()) == "Bearer REDACTED"
    assert r.redact_text("naïve") == "naïve"


def feed(r: Redactor, chunks: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    step = r.stream()
    outs = [step(c) for c in chunks] + [step(b"")]
    for out in outs:
        assert all(out), "an empty chunk would end an HTTP/1 chunked body"
    return b"".join(itertools.chain.from_iterable(outs)), outs


def test_stream_split_at_every_position() -> None:
    r = Redactor([VALUE, OTHER])
    text = b"data: " + VALUE + b"\n\ndata: " + base64.b64encode(OTHER) + b"\n\n"
    expected = r.redact(text)
    assert VALUE not in expected
    for i in range(1, len(text)):
        got, _ = feed(r, [text[:i], text[i:]])
        assert got == expected, i


def test_stream_split_into_random_pieces() -> None:
    r = Redactor([VALUE])
    text = (b"x" * 50 + VALUE) * 5 + base64.b64encode(b"!" + VALUE) * 3
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), 12))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        got, _ = feed(r, chunks)
        assert got == r.redact(text)


def test_stream_holds_back_only_what_could_start_a_value() -> None:
    r = Redactor([VALUE])
    step = r.stream()
    assert step(b"data: event 0\n\n") == [b"data: event 0\n\n"]  # not delayed
    assert step(b"data: " + VALUE[:5]) == [b"data: "]  # may be a value: held
    assert step(b"zzz\n\n") == [VALUE[:5] + b"zzz\n\n"]  # was not: released
    assert step(b"data: " + VALUE[:9]) == [b"data: "]
    assert step(VALUE[9:] + b"\n\n") == [b"REDACTED\n\n"]
    assert step(VALUE[:3]) == []  # all held: nothing (not b"") is sent
    assert step(b"") == [VALUE[:3]]  # the end releases it
