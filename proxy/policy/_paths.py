"""Request paths: refuse the ambiguous, match the rest against globs.

Gateways are bypassed when they judge one path and the upstream serves
another. So a raw path that different servers could read differently (dot
segments, encoded ``/`` or ``\\``, double encoding, ``//``, ``;`` parameters,
control bytes, characters NFKC folds into others such as full-width ``．／``)
is refused outright rather than "normalised into" a grant. What remains has
exactly one reading, which globs are matched against.

Globs: ``*`` matches within one segment, ``**`` any number of segments; a
trailing ``/**`` also matches the directory itself (``/issues/**`` matches
``/issues``, ``/issues/`` and ``/issues/1/comments``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = ["PathGlob", "ambiguity", "split_target"]

_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_PCT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# The first byte that is a control byte or not ASCII (one scan in C, on every call).
_ODD_BYTE = re.compile(rb"[\x00-\x1f\x7f-\xff]")
# Anything :func:`ambiguity` looks at further; a path without any is read as it is
# (one scan in C; the checks below each scan the path again).
_SUSPECT = re.compile(rb"[\x00-\x1f\x7f-\xff\\#;%]|//|/\.")
# Escapes whose decoded byte changes how the path is split or read.
_FORBIDDEN_ESCAPES = {
    0x2F: "an encoded '/' (%2f)",
    0x5C: "an encoded '\\' (%5c)",
    0x2E: "an encoded '.' (%2e)",
    0x25: "double encoding (%25)",
    0x3B: "an encoded ';' (%3b)",
    0x3F: "an encoded '?' (%3f)",
    0x23: "an encoded '#' (%23)",
}


def split_target(raw: bytes) -> tuple[bytes, bytes]:
    """Split a raw request target into (path, query), query without the '?'."""
    path, sep, query = raw.partition(b"?")
    return path, query


def ambiguity(raw_path: bytes) -> str | None:
    """Why ``raw_path`` (no query) is ambiguous, or ``None`` if it has one reading."""
    if not raw_path.startswith(b"/"):
        return "the path must start with '/'"
    if _SUSPECT.search(raw_path) is None:
        return None
    odd = _ODD_BYTE.search(raw_path)
    if odd is not None:
        if odd[0][0] < 0x80:
            return "the path contains a control byte"
        return "the path contains a raw non-ASCII byte; percent-encode it"
    if b"\\" in raw_path:
        return "the path contains '\\'"
    if b"#" in raw_path:
        return "the path contains a fragment"
    if b";" in raw_path:
        return "the path contains ';' parameters"
    if b"//" in raw_path:
        return "the path contains an empty segment ('//')"
    escaped = b"%" in raw_path
    if escaped:
        if _BAD_PCT.search(raw_path):
            return "the path contains a malformed percent escape"
        for m in _PCT.finditer(raw_path):
            byte = int(m.group(1), 16)
            if byte in _FORBIDDEN_ESCAPES:
                return f"the path contains {_FORBIDDEN_ESCAPES[byte]}"
            if byte < 0x20 or byte == 0x7F:
                return "the path contains an encoded control byte"
    if b"/." in raw_path:  # the path starts with '/': a dot segment follows one
        for segment in raw_path.split(b"/"):
            if segment in (b".", b".."):
                return "the path contains a dot segment"
    if not escaped:
        return None  # ASCII (above) with nothing escaped: read as it is, its own NFKC form
    try:
        text = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        return "the path does not decode to UTF-8"
    if not unicodedata.is_normalized("NFKC", text):
        # Full-width '．' and '／', '‥' …: a server that folds compatibility forms
        # reads dot segments and slashes the globs never saw.
        return "the path contains look-alike characters (its NFKC form differs)"
    return None


def decode(raw_path: bytes) -> str:
    """The single reading of an unambiguous raw path."""
    return unquote_to_bytes(raw_path).decode("utf-8")


@dataclass(frozen=True, slots=True)
class PathGlob:
    """A compiled path glob."""

    text: str
    regex: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> PathGlob:
        """Compile a rule's path glob; ``ValueError`` says what is wrong."""
        if not isinstance(text, str) or not text.startswith("/"):
            raise ValueError(f"{text!r} is not a path glob; it must start with '/'")
        if "//" in text or any(seg in (".", "..") for seg in text.split("/")):
            raise ValueError(f"{text!r} contains an empty or dot segment")
        if any(ord(c) < 0x20 or c in "?#;\\" for c in text):
            raise ValueError(f"{text!r} contains a character paths are never matched with")
        out = ["^"]
        segments = text.split("/")[1:]
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            if seg == "**":
                # '/**' = this directory and anything below it.
                out.append("(?:/.*)?" if last else "(?:/[^/]+)*")
                continue
            if "**" in seg:
                raise ValueError(f"{text!r}: '**' must be a whole segment")
            out.append("/")
            out.append("[^/]*".join(re.escape(part) for part in seg.split("*")))
        out.append("$")
        return cls(text, re.compile("".join(out)))

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None

    def __str__(self) -> str:
        return self.text
