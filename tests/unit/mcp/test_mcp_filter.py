"""proxy/mcp/_filter.py: tools/list answers filtered in JSON and event by event in SSE."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from proxy.mcp import JsonFilter, ReplaceFilter, SseFilter

GRANTED = frozenset({"add", "search"})


def tools_result(names: list[str], id: Any = 2) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id,
            "result": {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in names],
                       "nextCursor": "c"}}


LISTED = json.dumps(tools_result(["add", "danger", "search", "drop_db"])).encode()


def run(f: Callable[[bytes], list[bytes]], chunks: list[bytes]) -> list[list[bytes]]:
    """Feed ``chunks`` then the end; what came out per call (b"" never allowed)."""
    outs = [f(c) for c in chunks] + [f(b"")]
    for out in outs:
        assert isinstance(out, list) and all(isinstance(o, bytes) and o for o in out)
    return outs


def joined(outs: list[list[bytes]]) -> bytes:
    return b"".join(b"".join(o) for o in outs)


def splits(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rnd.randint(1, 7)
        out.append(data[i:i + n])
        i += n
    return out


def sse_data(stream: bytes) -> list[Any]:
    """The messages a client reads from ``stream`` (WHATWG rules, any line ending)."""
    text = stream.decode().replace("\r\n", "\n").replace("\r", "\n")
    msgs = []
    for event in text.split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in event.split("\n")
                if line.startswith("data:")]
        if data and "\n".join(data).strip():
            msgs.append(json.loads("\n".join(data)))
    return msgs


def names(msg: Any) -> list[str]:
    return [t["name"] for t in msg["result"]["tools"]]


# -- JSON ---------------------------------------------------------------------
def test_json_filters_tools() -> None:
    out = json.loads(joined(run(JsonFilter(GRANTED, 1 << 20), splits(LISTED, 1))))
    assert names(out) == ["add", "search"] and out["result"]["nextCursor"] == "c"


def test_json_batch_filtered() -> None:
    body = json.dumps([tools_result(["danger"], 1), tools_result(["add"], 2)]).encode()
    out = json.loads(joined(run(JsonFilter(GRANTED, 1 << 20), [body])))
    assert [names(m) for m in out] == [[], ["add"]]


@pytest.mark.parametrize("body", [
    json.dumps(tools_result(["add"])).encode(),
    b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}',
    b'{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"x"}}',
])
def test_json_unchanged_passes_byte_for_byte(body: bytes) -> None:
    assert joined(run(JsonFilter(GRANTED, 1 << 20), [body])) == body


def test_json_holds_until_the_end() -> None:
    f = JsonFilter(GRANTED, 1 << 20)
    assert f(LISTED[:10]) == [] and f(LISTED[10:]) == []
    assert f(b"")


@pytest.mark.parametrize(("body", "why"), [
    (b'{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"danger"}]', "could not be inspected"),
    (b'{"result":{"tools":[{"name":"danger"}]},"x":NaN}', "could not be inspected"),
    (LISTED + b" " * 100, "larger than"),
])
def test_json_unreadable_or_oversize_becomes_error(body: bytes, why: str) -> None:
    out = json.loads(joined(run(JsonFilter(GRANTED, len(LISTED) + 10), [body])))
    assert out["id"] is None and why in out["error"]["message"]
    assert "danger" not in json.dumps(out)


def test_json_tools_not_a_list() -> None:
    body = b'{"jsonrpc":"2.0","id":2,"result":{"tools":{"name":"danger"}}}'
    out = json.loads(joined(run(JsonFilter(GRANTED, 1 << 20), [body])))
    assert out["result"]["tools"] == []


def test_json_empty_body() -> None:
    assert joined(run(JsonFilter(GRANTED, 100), [])) == b""


def test_replace_filter() -> None:
    assert joined(run(ReplaceFilter(b"instead"), [b"a", b"b"])) == b"instead"


# -- SSE ----------------------------------------------------------------------
def event(data: bytes, eol: bytes = b"\n", extra: bytes = b"") -> bytes:
    return extra + b"data: " + data + eol + eol


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("seed", range(6))
def test_sse_filters_event_by_event(eol: bytes, seed: int) -> None:
    notice = b'{"jsonrpc":"2.0","method":"notifications/message","params":{}}'
    stream = (b": keepalive" + eol + eol
              + event(notice, eol, b"event: message" + eol)
              + event(LISTED, eol, b"event: message" + eol + b"id: 7" + eol)
              + event(notice, eol))
    out = joined(run(SseFilter(GRANTED, 1 << 20, every=True), splits(stream, seed)))
    msgs = sse_data(out)
    assert [m.get("method") for m in msgs] == ["notifications/message", None,
                                               "notifications/message"]
    assert names(msgs[1]) == ["add", "search"]
    assert b"id: 7" in out and b"danger" not in out


@pytest.mark.parametrize("seed", range(4))
def test_sse_untouched_events_pass_byte_for_byte(seed: int) -> None:
    stream = (b"retry: 1000\r\n\r\n" + event(b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}')
              + b"data: {\"jsonrpc\":\"2.0\",\ndata: \"method\":\"notifications/progress\"}\n\n"
              + b"id: 3\ndata\n\n")
    for every in (True, False):
        assert joined(run(SseFilter(GRANTED, 1 << 20, every), splits(stream, seed))) == stream


def test_sse_multiline_data_filtered() -> None:
    pretty = json.dumps(tools_result(["danger", "add"]), indent=1).encode()
    stream = b"".join(b"data: " + line + b"\n" for line in pretty.split(b"\n")) + b"\n"
    msgs = sse_data(joined(run(SseFilter(GRANTED, 1 << 20, every=True), [stream])))
    assert names(msgs[0]) == ["add"]


def test_sse_stays_a_stream() -> None:
    """A complete event leaves at once; the stream is never held whole."""
    f = SseFilter(GRANTED, 1 << 20, every=True)
    first = event(b'{"jsonrpc":"2.0","method":"notifications/progress","params":{}}')
    assert f(first) == [first]
    assert f(b"data: {\"jsonrpc\"") == []
    out = f(b':"2.0","id":1,"result":{}}\n\n')
    assert b"".join(out) == b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'


def test_sse_get_stream_reads_only_tool_lists() -> None:
    """On a GET stream (every=False) only events mentioning tools are parsed."""
    bad = event(b"not json at all")
    stream = bad + event(LISTED)
    out = joined(run(SseFilter(GRANTED, 1 << 20, every=False), [stream]))
    assert out.startswith(bad) and b"danger" not in out


def test_sse_unreadable_answer_becomes_error() -> None:
    out = joined(run(SseFilter(GRANTED, 1 << 20, every=True),
                     [event(b'{"result":{"tools":[{"name":"danger"}]},')]))
    assert b"danger" not in out and b"could not be inspected" in out


@pytest.mark.parametrize("every", [True, False])
def test_sse_oversize_event_dropped(every: bool) -> None:
    f = SseFilter(GRANTED, 256, every)
    big = event(json.dumps(tools_result(["danger"] * 50)).encode())
    small = event(b'{"jsonrpc":"2.0","method":"notifications/x"}')
    out = joined(run(f, [*splits(big, 3), small]))
    assert b"danger" not in out
    assert b"larger than 256 bytes was dropped" in out
    assert out.endswith(small)


def test_sse_incomplete_tail_not_sent() -> None:
    out = joined(run(SseFilter(GRANTED, 1 << 20, every=True), [event(LISTED)[:-1]]))
    assert out == b""


# -- answers read as strictly as requests ------------------------------------------------
TOOLS = '[{"name":"add"},{"name":"danger"}]'


def t(text: str) -> str:
    return text.replace("%s", TOOLS)


# (a tools/list answer a lenient client could read differently from the filter, why)
UNREADABLE: list[tuple[str, str]] = [
    (t('{"jsonrpc":"2.0","id":2,"result":{"Tools":%s}}'), "Tools look-alike"),
    (t('{"jsonrpc":"2.0","id":2,"result":{"TOOLS":%s}}'), "upper case"),
    (t('{"jsonrpc":"2.0","id":2,"result":{"ｔｏｏｌｓ":%s}}'), "fullwidth"),
    (t('{"jsonrpc":"2.0","id":2,"result":{"tools":[],"Tools":%s}}'), "both spellings"),
    (t('{"jsonrpc":"2.0","id":2,"result":{"tools":[]},"result":{"tools":%s}}'),
     "duplicate result"),
    (t('{"jsonrpc":"2.0","id":2,"result":{"tools":[],"tools":%s}}'), "duplicate tools"),
    ('{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"add","name":"danger"}]}}',
     "duplicate name"),
    ('{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"add","Name":"danger"}]}}',
     "name look-alike"),
    (t('{"jsonrpc":"2.0","id":2,"Result":{"tools":%s}}'), "Result look-alike"),
    (t('{"jsonrpc":"2.0","id":2,"resulſ":{"tools":%s}}'), "long-s result"),
    ('{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"add","x":"\\ud800"}]}}',
     "lone surrogate"),
    (t('{"jsonrpc":"2.0","id":2,"result":{"tools":%s},"error":{"code":1}}'),
     "result and error"),
    (t('{"id":2,"result":{"tools":%s}}'), "no jsonrpc"),
    (t('{"jsonrpc":"2.0","id":2,"result":{"tools":%s},"x":1}'), "unknown member"),
    (t('[{"jsonrpc":"2.0","id":2,"result":{"tools":[]}},{"jsonrpc":"2.0","id":3,'
     '"result":{"tools":%s},"id":4}]'), "duplicate in a batch"),
    ("[]", "empty batch"),
    (t('{"jsonrpc":"2.0","id":2,"result":{"tools":%s,"n":NaN}}'), "NaN"),
]


@pytest.mark.parametrize("body", [b for b, _ in UNREADABLE], ids=[w for _, w in UNREADABLE])
def test_json_answer_unreadable_strictly_becomes_error(body: str) -> None:
    out = joined(run(JsonFilter(GRANTED, 1 << 20), [body.encode()]))
    assert b"danger" not in out and b"could not be inspected" in out
    assert json.loads(out)["error"]["code"] == -32052


# A GET stream (every=False) reads only events that mention tools: those cases only.
@pytest.mark.parametrize(("body", "every"), [
    *((b, True) for b, _ in UNREADABLE),
    *((b, False) for b, _ in UNREADABLE if "tools" in b)],
    ids=[*(f"{w}-True" for _, w in UNREADABLE),
         *(f"{w}-False" for b, w in UNREADABLE if "tools" in b)])
def test_sse_answer_unreadable_strictly_becomes_error(body: str, every: bool) -> None:
    raw = body.encode()
    out = joined(run(SseFilter(GRANTED, 1 << 20, every), [event(raw)]))
    assert b"danger" not in out and b"could not be inspected" in out


def test_exact_numbers_survive_a_rewrite() -> None:
    body = (b'{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"add","x":'
            b'50.0000000000000001},{"name":"danger"}],"big":123456789012345678901234567890}}')
    out = joined(run(JsonFilter(GRANTED, 1 << 20), [body]))
    # orjson cannot write a 96-bit integer: the filter answers an error, never a rounding.
    assert b"danger" not in out and b"could not be re-encoded" in out
    body = (b'{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"add","x":'
            b'50.0000000000000001},{"name":"danger"}]}}')
    out = joined(run(JsonFilter(GRANTED, 1 << 20), [body]))
    assert out == b'{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"add","x":' \
                  b'50.0000000000000001}]}}'
