"""Strict reading of JSON-RPC request bodies, so the gateway judges what the upstream runs.

Gateways have been bypassed again and again by parser differentials: the
gateway reads one tool, the server another. So a body is accepted only when
every reasonable parser reads it the same way, and refused otherwise:

- decoded from ``Content-Encoding`` first (``gzip``, ``deflate``, ``br``), with
  the output bounded (a compression bomb is refused); unknown codings refused;
- UTF-8 only: a BOM, invalid UTF-8 or a UTF-16/32 body is refused, and so is
  any string (key or value, at any depth) that is not valid Unicode — a lone
  surrogate, escaped (``"\\ud800"``) or as raw CESU-8 bytes — since no
  record, log line or response could carry it;
- duplicate keys refused at any depth (Python's json keeps the last one);
- two keys in one object that differ only by case or Unicode folding
  (``name``/``Name``/``ｎａｍｅ``) refused at any depth, and a JSON-RPC envelope
  key that only folds to a known field (``paramſ``, ``Method``) refused;
- ``NaN``/``Infinity`` and numbers that overflow to infinity refused; a number
  with a fraction or exponent keeps its text (:class:`~proxy.policy._mcp_grant.ExactFloat`), so
  constraints compare it exactly as written;
- ``jsonrpc`` must be ``"2.0"``; a message is exactly one of a request
  (``method``, optional ``id``), or a response (``result`` xor ``error``, ``id``).

The same reader judges the server's answers that the gateway rewrites (the
tools/list filter), so both directions are read alike.

The ``Content-Type`` is not consulted: whatever the agent calls it, the body
is read as JSON-RPC.

A single ``tools/call`` is first offered to the compiled scanner (``_scan.c``):
when it proves the body plain (ASCII, no duplicate or case look-alike key at any
depth, no escape or number another parser could read differently) it writes the
canonical form in the same pass, and the arguments are parsed only where a rule
constrains them (:class:`Arguments`). What it does not prove takes the readers
below, which decide and word every refusal.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import PayloadTooLarge, Refused
from proxy.policy import ExactFloat, fold

__all__ = ["Arguments", "Message", "canonical", "check_message", "decode_content", "digest",
           "dumps", "loads_strict", "parse_body"]

ENVELOPE = ("jsonrpc", "id", "method", "params", "result", "error")
_FOLDED_ENVELOPE = {fold(k): k for k in ENVELOPE}
MAX_ENCODINGS = 2
MAX_ID_CHARS = 256

try:  # built by setup.py; without a C compiler the Python readers do all the work.
    from proxy.mcp import _scan
except ImportError:  # pragma: no cover - depends on the build
    _scan = None  # type: ignore[assignment]  # the stub types the built module

try:  # brotli ships with mitmproxy; without it, 'br' is refused like any unknown coding.
    import brotli
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message of a body: a request, a notification, or a response."""

    method: str | None
    id: str | int | None
    has_id: bool
    params: Any

    @property
    def is_response(self) -> bool:
        return self.method is None


class Arguments(Mapping[str, Any]):
    """A tool call's arguments as the scanner proved them: their canonical JSON is
    already written, and a value is parsed (strictly) only when a rule reads it, so
    a large argument nobody constrains is never turned into Python objects."""

    __slots__ = ("_doc", "_start", "_end", "_spans")

    def __init__(self, doc: bytes, start: int, end: int,
                 members: list[tuple[str, int, int, Any]]) -> None:
        self._doc, self._start, self._end = doc, start, end
        self._spans = {key: (s, e) for key, s, e, _ in members}

    @property
    def canonical(self) -> bytes:
        return self._doc[self._start:self._end]

    def __getitem__(self, key: str) -> Any:
        s, e = self._spans[key]
        return loads_strict(self._doc[s:e])

    def __contains__(self, key: object) -> bool:
        return key in self._spans

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


class _Bad(ValueError):
    """A body that more than one parser could read differently."""


def _refuse(why: str) -> Refused:
    return Refused(f"JSON-RPC body refused: {why}")


# -- Content-Encoding -----------------------------------------------------------
def _inflate(data: bytes, wbits: int, cap: int, name: str) -> bytes:
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, cap + 1)
    except zlib.error:
        raise _refuse(f"the body is not valid {name} data") from None
    if len(out) > cap or d.unconsumed_tail:
        raise PayloadTooLarge(f"the {name}-decoded body is larger than {cap} bytes")
    if not d.eof:
        raise _refuse(f"the {name} data is truncated")
    if d.unused_data:
        raise _refuse(f"bytes follow the end of the {name} data")
    return out


def _unbrotli(data: bytes, cap: int) -> bytes:
    assert brotli is not None
    d = brotli.Decompressor()
    try:
        out = d.process(data, output_buffer_limit=cap + 1)
    except brotli.error:
        raise _refuse("the body is not valid br data") from None
    if len(out) > cap or not d.can_accept_more_data():
        raise PayloadTooLarge(f"the br-decoded body is larger than {cap} bytes")
    if not d.is_finished():
        raise _refuse("the br data is truncated")
    return out


def decode_content(body: bytes, content_encoding: str | None, cap: int) -> bytes:
    """The body with its ``Content-Encoding`` removed, never more than ``cap`` bytes."""
    if len(body) > cap:
        raise PayloadTooLarge(f"the body is larger than {cap} bytes")
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if len(codings) > MAX_ENCODINGS:
        raise _refuse(f"more than {MAX_ENCODINGS} content codings")
    for coding in reversed(codings):  # the last one listed was applied last
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, cap, "gzip")
        elif coding == "deflate":  # RFC 9110: the zlib format, not raw deflate
            body = _inflate(body, zlib.MAX_WBITS, cap, "deflate")
        elif coding == "br" and brotli is not None:
            body = _unbrotli(body, cap)
        else:
            raise _refuse(f"unsupported Content-Encoding {coding[:32]!r}; "
                          "use gzip, deflate, br or none")
    return body


# -- strict JSON ----------------------------------------------------------------
def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build one object, refusing duplicate keys and keys that fold together.

    Runs for every object of every inspected body, so the common case (ASCII
    keys) stays in C: a join, ``isascii``, ``lower`` and, for mixed-case keys only, a set.
    """
    obj = dict(pairs)
    n = len(obj)
    if len(pairs) == 1 and pairs[0][0].isascii():
        return obj
    if n != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Bad(f"duplicate key {key[:64]!r}")
            seen.add(key)
    joined = "".join(obj)
    if joined.isascii():
        # Distinct keys without capitals cannot fold together; only mixed case needs the set.
        if joined.lower() != joined and len(set(map(str.lower, obj))) != n:
            raise _Bad("two keys in one object differ only by case or Unicode folding")
        return obj
    folded = set()
    for key in obj:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad(_UNPAIRED) from None
        folded.add(fold(key))
    if len(folded) != n:
        raise _Bad("two keys in one object differ only by case or Unicode folding")
    return obj


def _constant(name: str) -> Any:
    raise _Bad(f"{name} is not JSON")


def _float(text: str) -> float:
    value = ExactFloat(text)
    if not math.isfinite(value):
        raise _Bad("a number overflows to infinity")
    return value


# Only a \uD800-\uDFFF escape can put a surrogate into a decoded string (raw surrogate
# bytes are invalid UTF-8); a body without one needs no walk. False hits ("\\ud800",
# proper pairs) only cost the walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_UNPAIRED = "a string holds an unpaired surrogate (\\ud800-\\udfff); send valid Unicode"


def _check_unicode(doc: Any) -> None:
    """Refuse a document with a string (key or value, any depth) that UTF-8 cannot carry."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            strings: Any = (v,)
        elif isinstance(v, dict):
            strings = v.keys()
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
            continue
        else:
            continue
        for s in strings:
            if not s.isascii():
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Bad(_UNPAIRED) from None


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant,
                            parse_float=_float, strict=True)


_WHITESPACE = b" \t\r\n"
_NOT_PROVEN = object()


def _read_fast(data: bytes) -> Any:
    """The document if a C-speed reading is provably the strict one, else ``_NOT_PROVEN``.

    orjson parses; its output is then compared with the input, both with every
    whitespace byte deleted. They are equal only when nothing was lost or
    respelled: no duplicate key (orjson keeps the last, the output has fewer
    pairs), no number rounded, overflowed or turned from a huge integer into a
    float (the output spells it differently), no escape decoded (``\\u0041``,
    ``\\/``). So every number's text is orjson's spelling of its value, and a
    plain float compares exactly as written. The body must be ASCII, so keys
    can only fold together by case: if it has capitals at all, the lower-cased
    body is parsed too and must keep every pair. Anything else, or any error,
    goes to the strict reader below, which decides and words the refusal.
    """
    if not data.isascii():
        return _NOT_PROVEN
    try:
        doc = orjson.loads(data)
        out = orjson.dumps(doc)
        if out.translate(None, _WHITESPACE) != data.translate(None, _WHITESPACE):
            return _NOT_PROVEN
        if not data.islower() and (
                orjson.dumps(orjson.loads(data.lower())).count(b":") != out.count(b":")):
            return _NOT_PROVEN  # two keys of one object differ only by case
    except (orjson.JSONDecodeError, TypeError):  # TypeError: orjson.dumps nesting > 255
        return _NOT_PROVEN
    return doc


def loads_strict(data: bytes) -> Any:
    """Parse UTF-8 JSON strictly (see the module docstring); raise :class:`Refused`."""
    if data.startswith(b"\xef\xbb\xbf"):
        raise _refuse("a byte order mark is not allowed; send plain UTF-8")
    doc = _read_fast(data)
    if doc is not _NOT_PROVEN:
        return doc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("the body is not valid UTF-8") from None
    try:
        doc = _DECODER.decode(text)
        if _SURROGATE_ESCAPE.search(text) is not None:
            _check_unicode(doc)
        return doc
    except _Bad as e:
        raise _refuse(str(e)) from None
    except RecursionError:
        raise _refuse("the JSON nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints beyond the digit limit
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "a number is too long"
        raise _refuse(f"not valid JSON ({msg})") from None


# -- JSON-RPC -------------------------------------------------------------------
def check_message(obj: Any) -> Message:
    """One parsed JSON-RPC message (request, notification or response), checked as
    strictly as a request body's; raise :class:`Refused`."""
    return _message(obj)


def _message(obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise _refuse("a JSON-RPC message must be an object")
    for key in obj:
        known = _FOLDED_ENVELOPE.get(fold(key))
        if known is None:
            raise _refuse(f"unknown JSON-RPC member {key[:64]!r}")
        if known != key:
            raise _refuse(f"member {key[:64]!r} differs only by case or Unicode folding "
                          f"from {known!r}")
    if obj.get("jsonrpc") != "2.0" or not isinstance(obj.get("jsonrpc"), str):
        raise _refuse('"jsonrpc" must be "2.0"')
    has_id = "id" in obj
    rid = obj.get("id")
    if has_id and not _valid_id(rid):
        raise _refuse("id must be a string or an integer")
    if "method" in obj:
        if "result" in obj or "error" in obj:
            raise _refuse("a message cannot carry both a method and a result or error")
        method = obj["method"]
        if not isinstance(method, str) or not method:
            raise _refuse("method must be a non-empty string")
        params = obj.get("params")
        if "params" in obj and not isinstance(params, (dict, list)):
            raise _refuse("params must be an object or an array")
        return Message(method, rid, has_id, params)
    if ("result" in obj) == ("error" in obj):
        raise _refuse("a message needs a method, or exactly one of result and error")
    if not has_id or "params" in obj:
        raise _refuse("a response carries an id and no params")
    return Message(None, rid, True, None)


def _valid_id(rid: Any) -> bool:
    if isinstance(rid, bool):
        return False
    if isinstance(rid, int):
        return -(1 << 63) <= rid < (1 << 63)
    return isinstance(rid, str) and len(rid) <= MAX_ID_CHARS


def _read_tool_call(data: bytes) -> Message | None:
    """A single ``tools/call`` read from the scanner's canonical form, or ``None`` when
    the scanner does not prove the body plain or it is anything else (a batch, another
    method, a message the checks would refuse: the full reader words the refusal)."""
    if _scan is None or not data.isascii():
        return None
    read = _scan.read(data, 3)  # the canonical form; the envelope, params, arguments
    if read is None:
        return None
    doc, top = read
    if top is None:
        return None
    obj: dict[str, Any] = {}
    members = None
    for key, s, e, inner in top:
        if key == "params":
            members = inner
        else:
            obj[key] = orjson.loads(doc[s:e])
    if obj.get("method") != "tools/call" or members is None:
        return None
    params: dict[str, Any] = {}
    for key, s, e, inner in members:
        if key == "arguments":
            if inner is None:
                return None
            params[key] = Arguments(doc, s, e, inner)
        else:
            params[key] = orjson.loads(doc[s:e])
    obj["params"] = params
    try:
        return _message(obj)
    except Refused:
        return None


def parse_body(data: bytes) -> tuple[list[Message], bool]:
    """The messages of a decoded body and whether it was a batch; raise :class:`Refused`."""
    call = _read_tool_call(data)
    if call is not None:
        return [call], False
    doc = loads_strict(data)
    if isinstance(doc, list):
        if not doc:
            raise _refuse("an empty batch")
        return [_message(m) for m in doc], True
    return [_message(doc)], False


def _exact_number(value: Any) -> Any:
    """orjson's ``default``: a number written with a fraction or exponent, as written."""
    if isinstance(value, ExactFloat):
        return orjson.Fragment(value.text)
    raise TypeError


def dumps(value: Any) -> bytes | None:
    """``value`` (as :func:`loads_strict` read it) as JSON, numbers as written; ``None``
    if it cannot be written (integers beyond 64 bits, nesting deeper than 255)."""
    try:
        return orjson.dumps(value, default=_exact_number)
    except (orjson.JSONEncodeError, TypeError):
        return None


def canonical(value: Any) -> bytes | None:
    """The canonical JSON of ``value``: sorted keys, no spaces, UTF-8, numbers as written."""
    if isinstance(value, Arguments):
        return value.canonical
    try:
        return orjson.dumps(value, default=_exact_number, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):  # integers beyond 64 bits, deep nesting
        try:
            return json.dumps(value, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode("utf-8", "surrogatepass")
        except (ValueError, RecursionError):
            return None


def digest(value: Any) -> str | None:
    """SHA-256 of the canonical JSON of ``value``, for the audit record."""
    data = canonical(value) if value is not None else None
    return hashlib.sha256(data).hexdigest() if data is not None else None
