"""Sealing what revokes a credential before it goes to the state store.

Revoking a GitHub installation token takes the token itself, so a revocation
that must survive a restart has to keep it somewhere. It goes to the store
sealed (AES-256-GCM, a fresh 96-bit nonce per value, the row's identity as
associated data) under a key of its own in the gateway's home
(``revocation.key``, mode 0600, made on first use): a copy of the database alone
(a backup, a support bundle) holds no usable credential, and a sealed handle
moved to another row does not open.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .value import SecretValue

__all__ = ["KEY_FILE", "Sealer"]

KEY_FILE = "revocation.key"
NONCE_BYTES = 12


class Sealer:
    """Seals and opens revocation handles with one AES-256-GCM key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a sealing key is 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Sealer([secure])"

    @classmethod
    def load_or_create(cls, path: str) -> Sealer:
        """The key in ``path`` (base64), made (0600, never overwritten) if missing.

        Raises ``OSError`` or ``ValueError`` if it exists but cannot be used."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            with open(path, "rb") as f:
                text = f.read().strip()
            try:
                key = base64.b64decode(text, validate=True)
            except ValueError:
                raise ValueError(f"{path}: not a base64 key") from None
            return cls(key)
        key = os.urandom(32)
        try:
            os.write(fd, base64.b64encode(key) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(key)

    def seal(self, value: SecretValue, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, value.reveal().encode(), context)

    def open(self, sealed: bytes, context: bytes) -> SecretValue:
        """The value; ``ValueError`` if it was sealed under another key or context,
        or altered."""
        try:
            plain = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context)
            return SecretValue(plain.decode())
        except (InvalidTag, UnicodeDecodeError, ValueError):
            raise ValueError("the sealed value does not open") from None
