"""The one audit-line reader: what a record is, and why a line is not one."""

from __future__ import annotations

import orjson
import pytest

from proxy.audit._log import GENESIS, chain_hash, new_record, rfc3339
from proxy.audit._reader import BadLine, Flaw, read_record

H = "a" * 64
GOOD = {"seq": 1, "prev": GENESIS, "hash": H, "decision": "allow"}


def line(**changes: object) -> bytes:
    rec: dict[str, object] = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in rec.items() if v is not DROP})


DROP = object()


@pytest.mark.parametrize("raw", [
    line(),
    line() + b"\n",  # as a file iterator yields it
    b"  " + line() + b"\r\n",
    line(seq=0), line(seq=-3), line(seq=2**63),  # order is verify's question, not the reader's
    line(prev="", hash=""),  # so is whether the chain links
    line(extra={"nested": [1, 2, {"x": None}]}),
    line(reason="x" * 5_000_000),  # a huge record is still a record
])
def test_a_record_is_read_as_it_is(raw: bytes) -> None:
    assert read_record(raw) == orjson.loads(raw)


def test_a_record_the_writer_made_is_read_back() -> None:
    rec = new_record(ts=rfc3339(0), request_id="r", decision="deny")
    rec.update(seq=7, prev=GENESIS)
    rec["hash"] = chain_hash(rec)
    assert read_record(orjson.dumps(rec) + b"\n") == rec


@pytest.mark.parametrize(("raw", "flaw"), [
    (b"", Flaw.NOT_JSON),
    (b"\n", Flaw.NOT_JSON),
    (line()[:-7], Flaw.NOT_JSON),  # cut off mid-write
    (b'{"seq": 4, "req', Flaw.NOT_JSON),
    (line(reason="x" * 5_000_000)[:-2], Flaw.NOT_JSON),  # a huge line, cut off
    (line() + b"}", Flaw.NOT_JSON),  # trailing garbage
    (line() + line(), Flaw.NOT_JSON),  # two records on one line
    (b'{"seq": 1, "prev": "\xff\xfe", "hash": "h"}', Flaw.NOT_JSON),  # not UTF-8
    (b'{"seq": NaN, "prev": "", "hash": ""}', Flaw.NOT_JSON),
    (b"[" * 100_000 + b"]" * 100_000, Flaw.NOT_JSON),  # a huge line nested past any sense
    (b"\x00" * 16, Flaw.NOT_JSON),
    (b"[]", Flaw.NOT_OBJECT),
    (b"[" + line() + b"]", Flaw.NOT_OBJECT),
    (b'"a string"', Flaw.NOT_OBJECT),
    (b"1", Flaw.NOT_OBJECT),
    (b"null", Flaw.NOT_OBJECT),
    (line(seq=DROP), Flaw.SEQ),
    (line(seq=None), Flaw.SEQ),
    (line(seq="1"), Flaw.SEQ),
    (line(seq=1.0), Flaw.SEQ),
    (line(seq=True), Flaw.SEQ),  # a bool is an int to Python, not to the chain
    (line(seq=[1]), Flaw.SEQ),
    (line(prev=DROP), Flaw.PREV),
    (line(prev=None), Flaw.PREV),
    (line(prev=0), Flaw.PREV),
    (line(prev=[GENESIS]), Flaw.PREV),
    (line(hash=DROP), Flaw.HASH),
    (line(hash=None), Flaw.HASH),
    (line(hash=123), Flaw.HASH),
    (line(hash={"sha256": H}), Flaw.HASH),
])
def test_a_line_that_is_not_a_record_says_why(raw: bytes, flaw: Flaw) -> None:
    with pytest.raises(BadLine) as e:
        read_record(raw)
    assert e.value.flaw is flaw
    assert str(e.value) == f"not an audit record: {flaw}"
    assert isinstance(e.value, ValueError)  # callers that catch ValueError still do
