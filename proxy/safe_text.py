"""Untrusted text on an operator's terminal: one rule, for every command.

Whatever came from a request, an agent or an upstream (a task's purpose, a URL,
a tool name, an audit reason, an error the control plane quotes) is printed
through :func:`safe`: every character that could drive or deceive a terminal —
C0 and C1 controls (ESC, CSI ``\\x9b``, OSC), DEL, CR/LF, bidi overrides and
isolates, zero-width and other invisible format characters, line and paragraph
separators, unassigned and private-use code points — is shown as a visible
escape (``\\x1b``, ``\\n``, ``\\u202e``) instead. A line printed through it stays
one line and shows what is there.

The control plane refuses such characters where people write text
(:func:`bad_char`: a task's purpose/owner/workload, an approver's name and
comment), so in practice only agent-controlled data ever needs the escapes.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["bad_char", "safe", "safe_json"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    if n <= 0xFF:
        return f"\\x{n:02x}"
    if n <= 0xFFFF:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def _shown(c: str) -> bool:
    """Printable and harmless: ``str.isprintable`` excludes Cc (C0, DEL, C1), Cf (bidi
    controls, zero-width characters, soft hyphen), Zl, Zp, Cs, Co, Cn and every space
    but ' '."""
    return c.isprintable()


def safe(value: Any) -> str:
    """``value`` as text that is safe to print: one line, no terminal control."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if text.isprintable():
        return text
    return "".join(c if _shown(c) else _escape(c) for c in text)


def bad_char(text: str, allowed: str = "") -> str | None:
    """The first character of ``text`` the control plane refuses in human-written
    fields (anything :func:`safe` would escape, but those in ``allowed``), or None."""
    for c in text:
        if not _shown(c) and c not in allowed:
            return c
    return None


def _json_escape(c: str) -> str:
    n = ord(c)
    if n > 0xFFFF:
        n -= 0x10000
        return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"
    return f"\\u{n:04x}"


def safe_json(obj: Any, *, indent: bool = True) -> str:
    """``obj`` as JSON whose every non-printable character is a ``\\uXXXX`` escape.

    orjson escapes C0 controls inside strings but writes C1 controls and bidi or
    zero-width characters as raw UTF-8; outside strings it writes only spaces and
    newlines (the indent), which are kept.
    """
    text = orjson.dumps(obj, option=orjson.OPT_INDENT_2 if indent else 0).decode()
    if text.isprintable():
        return text
    return "".join(c if c in "\n " or _shown(c) else _json_escape(c) for c in text)
