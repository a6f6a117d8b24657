"""Redact active secret values from what an upstream sends back.

An upstream may echo what it received (a debug endpoint, an error page that
quotes the request, a ``Location`` with the token in it). Every reversible
spelling of a value we know is replaced by one fixed marker, :data:`MASK` (not
``*`` × its length, which would tell the value's length; a streamed answer that is
scanned loses its ``Content-Length`` instead, addons/inject.py):

- character by character, each character either as itself or escaped, the
  escapes mixed freely: percent-encoding (either case of hex digit, also
  double-encoded ``%25XX``), JSON ``\\uXXXX`` and ``\\/``, ``\\xXX``, HTML
  character references (decimal, hex, named; zero-padded; with or without ``;``);
- its hex (any mix of upper and lower case);
- UTF-16 (little- or big-endian: the value's bytes with NULs between; the
  first character is left, the rest masked from the NUL that follows it);
- its base64 (standard and URL-safe alphabets) at each of the three byte
  alignments, so it is found inside a larger base64 blob too (``Basic
  base64(user:token)``): only the characters that depend on the value alone are
  matched, the one or two at each edge that mix with neighbours are not.

Each spelling is a sequence of *tokens* (one per character of the value), a
token a set of alternatives, an alternative a sequence of *atoms* (the bytes
allowed at one position). One regular expression is built from them to find
and mask; the same tables answer, for a streamed body, whether the end of a
chunk could be the start of a spelling.

A streamed body is filtered chunk by chunk. A value split across chunks is
caught by holding back, at the end of each chunk, the shortest tail that could
still be the start of a spelling (at most ``longest - 1`` bytes). Holding
only what could match — rather than always the last ``longest - 1`` bytes —
keeps server-sent events flowing event by event.
"""

from __future__ import annotations

import base64
import html.entities
import re
from collections.abc import Callable, Iterable

__all__ = ["MASK", "MIN_VALUE_BYTES", "Redactor", "scrub_upstream_text", "spellings"]

MASK = b"REDACTED"  # every echo of a secret, whatever its length (a valid header name too)
MIN_VALUE_BYTES = 6  # shorter "secrets" would mask ordinary text; they are refused at use
_MIN_FRAGMENT = 8
_MAX_ZEROS = 3  # zero padding accepted in a numeric character reference (&#x002F;)

Atom = bytes  # the bytes allowed at one position
Alt = tuple[Atom, ...]  # one way to write one character
Token = tuple[Alt, ...]  # every way to write it
Spelling = tuple[Token, ...]


def _lit(text: bytes) -> Alt:
    return tuple(bytes([b]) for b in text)


def _hex_atoms(b: int, width: int = 2) -> Alt:
    """The hex digits of ``b``, each in either case."""
    return tuple(bytes(sorted({ord(c.lower()), ord(c.upper())}))
                 for c in f"{b:0{width}x}")


def _named() -> dict[int, list[bytes]]:
    """HTML5 named references of each printable ASCII character (``&sol;`` for ``/``)."""
    out: dict[int, list[bytes]] = {}
    for name, text in html.entities.html5.items():
        if len(text) == 1 and " " <= text <= "~":
            out.setdefault(ord(text), []).append(name.encode("ascii"))
    return out


_NAMED = _named()


def _char_token(b: int) -> Token:
    """Every way one character of a value may be written, escaped or not."""
    hx = _hex_atoms(b)
    alts: list[Alt] = [(bytes([b]),), _lit(b"%") + hx, _lit(b"%25") + hx,
                       _lit(b"\\u00") + hx, _lit(b"\\x") + hx]
    if b in b'/"\\':
        alts.append(_lit(b"\\" + bytes([b])))  # JSON's escapes
    dec, hexdigits = str(b).encode(), _hex_atoms(b, 1 if b < 16 else 2)
    for zeros in range(_MAX_ZEROS + 1):
        for end in (b";", b""):
            alts.append(_lit(b"&#" + b"0" * zeros + dec + end))
            alts.append(_lit(b"&#") + (b"Xx",) + _lit(b"0" * zeros) + hexdigits + _lit(end))
    for name in _NAMED.get(b, ()):
        alts.append(_lit(b"&" + name))
    return tuple(alts)


_CHAR_TOKENS = {b: _char_token(b) for b in range(32, 127)}


def _b64_fragments(value: bytes) -> set[bytes]:
    out = set()
    n = len(value)
    for k in range(3):
        enc = base64.b64encode(b"\0" * k + value)
        start, end = (8 * k + 5) // 6, (8 * (k + n)) // 6
        frag = enc[start:end]
        if len(frag) >= _MIN_FRAGMENT:
            out.add(frag)
            out.add(frag.translate(bytes.maketrans(b"+/", b"-_")))
    return out


def spellings(value: bytes) -> list[Spelling]:
    """Every spelling of ``value`` that is masked (none for a value too short to mask)."""
    if len(value) < MIN_VALUE_BYTES:
        return []
    out: list[Spelling] = [
        tuple(_CHAR_TOKENS.get(b) or ((bytes([b]),),) for b in value),
        tuple((_hex_atoms(b),) for b in value),
        # UTF-16, LE or BE: from the NUL after the first character (a spelling that
        # starts with a NUL is tried only where one is: text has few)
        tuple(((b"\0", bytes([b])),) for b in value[1:]),
    ]
    out += [tuple(((bytes([c]),),) for c in frag) for frag in sorted(_b64_fragments(value))]
    return out


def _atom_re(atom: Atom) -> bytes:
    if len(atom) == 1:
        return re.escape(atom)
    return b"[" + b"".join(re.escape(bytes([c])) for c in atom) + b"]"


def _alt_re(alt: Alt) -> bytes:
    return b"".join(_atom_re(a) for a in alt)


def _trie_re(alts: Iterable[Alt], partial: bool = False) -> bytes:
    """One regex for a set of alternatives, common starts shared (so the engine tries
    one branch per byte, not every alternative). ``partial``: the subject may also end
    anywhere inside (``\\Z``)."""
    root: dict[Atom, dict] = {}
    for alt in alts:
        node = root
        for atom in alt:
            node = node.setdefault(atom, {})
        node[b""] = {}  # an alternative ends here

    def emit(node: dict[Atom, dict]) -> bytes:
        parts = [b"" if atom == b"" else _atom_re(atom) + emit(child)
                 for atom, child in node.items()]
        if partial:
            parts.append(rb"\Z")
        return parts[0] if len(parts) == 1 else b"(?:" + b"|".join(parts) + b")"

    return emit(root)


def _char_re(b: int) -> bytes:
    """:func:`_char_token` as a compact regex (the same spellings: one value's
    pattern is a few hundred of these)."""
    hx = _alt_re(_hex_atoms(b))
    alts = [re.escape(bytes([b])), rb"%(?:25)?" + hx, rb"\\(?:u00|x)" + hx]
    if b in b'/"\\':
        alts.append(re.escape(b"\\" + bytes([b])))
    # Decimal and hex references share one branch (compiling a long value's pattern
    # costs half): it also takes &#x<decimal>, which is no spelling of anything.
    alts.append(b"&#[Xx]?0{0,%d}(?:%d|%s);?" % (_MAX_ZEROS, b, hx))
    names = _NAMED.get(b)
    if names:
        alts.append(b"&(?:" + b"|".join(re.escape(n) for n in names) + b")")
    return b"(?:" + b"|".join(alts) + b")"


_COMPACT = {id(token): _char_re(b) for b, token in _CHAR_TOKENS.items()}
_HOLD_TOKENS = 8  # a tail matching this many tokens of a spelling is held, whatever follows


def _token_re(token: Token) -> bytes:
    return _COMPACT.get(id(token)) or _trie_re(token)


def _pattern(sps: Iterable[Spelling], partial: bool) -> bytes:
    """One regex for every spelling. It starts with the class of every first byte, so
    the engine skips, in C, each position no spelling can start at; a look-behind then
    picks the first token's alternatives that start with that byte.

    ``partial``: match, instead, the start of a spelling that runs to the end of the
    subject — its first :data:`_HOLD_TOKENS` tokens, whole or cut short by the end."""
    firsts: set[int] = set()
    branches = []
    for sp in sps:
        heads: dict[int, list[Alt]] = {}
        for alt in sp[0]:
            for c in alt[0]:
                heads.setdefault(c, []).append(alt[1:])
        firsts |= heads.keys()
        head = b"|".join(b"(?<=" + re.escape(bytes([c])) + b")" + _trie_re(tails, partial)
                         for c, tails in sorted(heads.items()))
        if partial:
            rest = b"".join(_trie_re(t, True) for t in sp[1:_HOLD_TOKENS])
            rest += rb"\Z" if len(sp) <= _HOLD_TOKENS else b""
        else:
            rest = b"".join(_token_re(t) for t in sp[1:])
        branches.append(b"(?:" + head + b")" + rest)
    return _atom_re(bytes(sorted(firsts))) + b"(?:" + b"|".join(branches) + b")"


def _mask(_m: re.Match[bytes]) -> bytes:
    return MASK


def _longest(sp: Spelling) -> int:
    """The longest match of ``sp`` (+1 a token: :func:`_char_re` is a little wider)."""
    return sum(max(len(alt) for alt in token) + 1 for token in sp)


class Redactor:
    """Masks a fixed set of values; build a new one when the set changes."""

    def __init__(self, values: Iterable[bytes]) -> None:
        sps: list[Spelling] = []
        for v in sorted(set(values)):
            sps += spellings(v)
        self.empty = not sps
        self.longest = max((_longest(sp) for sp in sps), default=0)
        self._re = re.compile(_pattern(sps, False)) if sps else None
        self._start = re.compile(_pattern(sps, True)) if sps else None

    def redact(self, data: bytes) -> bytes:
        if self._re is None or not data:
            return data
        return self._re.sub(_mask, data)

    def redact_text(self, text: str) -> str:
        if self._re is None:
            return text
        raw = text.encode("utf-8", "surrogateescape")
        out = self.redact(raw)
        return text if out == raw else out.decode("utf-8", "surrogateescape")

    def found_in(self, data: bytes) -> bool:
        return self._re is not None and self._re.search(data) is not None

    def _held(self, buf: bytes) -> int:
        """Length of the tail of ``buf`` from the first place a spelling may start
        and run to the end (0: none may)."""
        if self._start is None or not buf:
            return 0
        m = self._start.search(buf, max(0, len(buf) - self.longest + 1))
        return len(buf) - m.start() if m else 0

    def stream(self) -> Callable[[bytes], list[bytes]]:
        """A filter for ``flow.response.stream``: called per chunk, ``b""`` at the end.

        Returns the chunks to send — never an empty one, which mitmproxy would
        send as the zero-length chunk that ends an HTTP/1 chunked body.
        """
        tail = b""

        def step(chunk: bytes) -> list[bytes]:
            nonlocal tail
            buf = self.redact(tail + chunk)
            keep = self._held(buf) if chunk else 0  # at the end nothing can complete a value
            tail = buf[len(buf) - keep:] if keep else b""
            out = buf[:len(buf) - keep]
            return [out] if out else []

        return step


_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')


def scrub_upstream_text(text: str, redactor: Redactor | None, limit: int = 300) -> str:
    """An error text that may quote upstream bytes (mitmproxy's ``Bad HTTP response line:
    b'...'``), fit for the audit log and an error body: what it quotes is dropped,
    what is not printable blanked, any spelling of a live secret masked."""
    text = _QUOTED.sub("[...]", text)
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    if redactor is not None:
        text = redactor.redact_text(text)
    return text[:limit]
