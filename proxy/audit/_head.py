"""The audit chain's head: the last ``seq`` and ``hash`` written, kept next to the log.

A hash chain shows a record removed from the middle, but not records cut
from the very end: what remains is still a valid chain. So after every batch
the writer also records where the chain ends in ``<audit path>.head`` (written
to a temporary file, then ``os.replace``d, so it is always whole). When the
chain is keyed (``audit.hmac_key_file``) the head carries an HMAC over its
seq and hash, so someone who can write files but has no key cannot make a
head that agrees with a shortened log.

Uses: on start the writer continues from the head when the log is behind it
(the gap stays for ``audit verify`` to name), and ``audit verify`` compares
the end of the chain with it. The head covers the whole chain, so it sits
beside the current (newest) file, whatever was rotated before it.

What it cannot show alone: a head deleted together with the records, or an old
head put back with a log cut back to it (a keyed head proves who wrote it, not
that it is the latest). So the writer keeps the same end in the state store
too (``AuditAnchor`` in proxy/store/_store.py, with the same MAC when keyed), which
only moves forward and which the log's folder cannot roll back; ``audit verify``
with the config compares the log and its head with it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

import orjson

__all__ = ["Head", "check_mac", "head_mac", "head_path", "read_head", "write_head"]

_DOMAIN = b"taskgate audit head\n"  # a head MAC can never pass for a record's hash


@dataclass(frozen=True, slots=True)
class Head:
    """Where the chain ends: the last record's seq and hash."""

    seq: int
    hash: str


def head_path(log_path: str) -> str:
    """The head file of the log at ``log_path`` (its current file)."""
    return f"{log_path}.head"


def head_mac(head: Head, key: bytes) -> str:
    """The MAC of a chain end (head file or anchor) under the chain's key."""
    return hmac.new(key, _DOMAIN + f"{head.seq}:{head.hash}".encode(), hashlib.sha256
                    ).hexdigest()


def check_mac(head: Head, mac: object, key: bytes | None, what: str) -> None:
    """With ``key``, raise ``ValueError`` (naming ``what``) unless ``mac`` is the MAC of
    ``head``: it was forged, or written with another key (or without one)."""
    if key is None:
        return
    if not isinstance(mac, str) or not hmac.compare_digest(mac, head_mac(head, key)):
        raise ValueError(f"{what}: the chain head's MAC does not match the key: it was "
                         "forged, or written with another key")


def encode(head: Head, key: bytes | None) -> bytes:
    return orjson.dumps({"seq": head.seq, "hash": head.hash,
                         "mac": head_mac(head, key) if key else None}) + b"\n"


def write_head(log_path: str, head: Head, key: bytes | None, *, sync: bool = False) -> None:
    """Replace the head file atomically; ``sync`` also flushes it to the disk."""
    path = head_path(log_path)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, encode(head, key))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_head(log_path: str, key: bytes | None) -> Head | None:
    """The head next to the log, ``None`` when there is none.

    Raises ``ValueError`` saying why when the file is not a head, or (with
    ``key``) its MAC does not match: it was forged, or written with another key.
    """
    path = head_path(log_path)
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except FileNotFoundError:
        return None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ValueError(f"{path} is not a chain head (not JSON)") from None
    if (not isinstance(doc, dict) or type(doc.get("seq")) is not int or doc["seq"] < 0
            or not isinstance(doc.get("hash"), str)):
        raise ValueError(f"{path} is not a chain head (seq or hash missing)")
    head = Head(doc["seq"], doc["hash"])
    check_mac(head, doc.get("mac"), key, path)
    return head
