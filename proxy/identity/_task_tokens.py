"""Task tokens: JWTs taskgate signs for one task, and the keys it signs them with.

Keys are Ed25519 (``alg: EdDSA``), kept in ``<home>/task-keys.json`` (mode
0600, written atomically). Each key has a ``kid``, its RFC 7638 thumbprint.
One key is current and signs new tokens; :meth:`TaskKeys.rotate` makes a new
current key and retires the old one: its private half is dropped at once, its
public half is kept (so tokens it signed keep verifying) until the last task
it signed has expired, then :meth:`TaskKeys.prune` forgets it.

A token's claims: ``iss`` (:data:`TASK_ISSUER`), ``aud`` (:data:`TASK_AUDIENCE`),
``sub`` (the workload), ``task`` (the task id), ``iat`` and ``exp`` (the task's
expiry). :class:`TaskTokenIssuer` plugs into :class:`proxy.identity._jwt.Identity`
like any trusted issuer; it accepts only EdDSA under a ``kid`` it holds, so
``alg: none``, HMAC-with-the-public-key and foreign keys cannot pass, and a
token is only as good as its task: unknown, revoked or expired tasks refuse.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy.errors import InvalidCredential
from proxy.identity._jwt import Caller

__all__ = ["TASK_AUDIENCE", "TASK_ISSUER", "TaskKeys", "TaskTokenIssuer"]

log = logging.getLogger(__name__)

TASK_ISSUER = "urn:taskgate:tasks"
TASK_AUDIENCE = "urn:taskgate:proxy"
ALG = "EdDSA"
KEY_RELOAD_SECONDS = 0.1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def thumbprint(key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint: the key's ``kid``."""
    jwk = orjson.dumps({"crv": "Ed25519", "kty": "OKP", "x": _b64(_raw_public(key))})
    return _b64(hashlib.sha256(jwk).digest())


@dataclass(slots=True)
class _Key:
    kid: str
    public: Ed25519PublicKey
    private: Ed25519PrivateKey | None
    created_at: float
    retired_at: float | None = None


class TaskKeys:
    """taskgate's signing keys for task tokens. File I/O here is synchronous: run it
    off the event loop (``asyncio.to_thread``); signing and lookups are in memory."""

    def __init__(self, path: str, keys: list[_Key], current: str) -> None:
        self.path = path
        self._keys = {k.kid: k for k in keys}
        self.current = current

    @classmethod
    def load_or_create(cls, path: str) -> TaskKeys:
        try:
            with open(path, "rb") as f:
                data = orjson.loads(f.read())
        except FileNotFoundError:
            keys = cls(path, [], "")
            keys._add_new(time.time())
            keys._save()
            return keys
        if os.stat(path).st_mode & 0o077:
            log.warning("%s was readable by others; tightening it to 0600", path)
            os.chmod(path, 0o600)
        return cls.from_doc(path, data)

    @classmethod
    def from_doc(cls, path: str, data: Any) -> TaskKeys:
        """Keys from the parsed JSON of ``task-keys.json`` (or the shared state's copy)."""
        loaded = []
        for k in data["keys"]:
            public = Ed25519PublicKey.from_public_bytes(_unb64(k["public"]))
            private = (Ed25519PrivateKey.from_private_bytes(_unb64(k["private"]))
                       if k.get("private") else None)
            loaded.append(_Key(k["kid"], public, private, k["created_at"], k.get("retired_at")))
        keys = cls(path, loaded, data["current"])
        if keys._keys.get(keys.current) is None or keys._keys[keys.current].private is None:
            raise ValueError(f"{path}: the current signing key is missing")
        return keys

    def adopt(self, doc: bytes) -> None:
        """Take the keys of ``doc`` (shared state: another replica rotated them)."""
        other = TaskKeys.from_doc(self.path, orjson.loads(doc))
        self._keys, self.current = other._keys, other.current

    def _add_new(self, now: float) -> str:
        private = Ed25519PrivateKey.generate()
        key = _Key(thumbprint(private.public_key()), private.public_key(), private, now)
        self._keys[key.kid] = key
        self.current = key.kid
        return key.kid

    def doc(self) -> bytes:
        """The keys as the JSON of ``task-keys.json`` (private halves included)."""
        return orjson.dumps({"version": 1, "current": self.current, "keys": [
            {"kid": k.kid, "public": _b64(_raw_public(k.public)),
             "private": _b64(k.private.private_bytes(
                 serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                 serialization.NoEncryption())) if k.private else None,
             "created_at": k.created_at, "retired_at": k.retired_at}
            for k in self._keys.values()]}, option=orjson.OPT_INDENT_2)

    def _save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, self.doc())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    # -- use --------------------------------------------------------------------
    def sign(self, *, task_id: str, workload: str, expires_at: float, now: float) -> str:
        key = self._keys[self.current]
        assert key.private is not None
        claims = {"iss": TASK_ISSUER, "aud": TASK_AUDIENCE, "sub": workload, "task": task_id,
                  "iat": int(now), "exp": math.ceil(expires_at)}
        return jwt.encode(claims, key.private, algorithm=ALG,
                          headers={"kid": key.kid, "typ": "JWT"})

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        key = self._keys.get(kid)
        return key.public if key else None

    def kids(self) -> list[str]:
        return list(self._keys)

    def jwks(self) -> dict[str, Any]:
        """The public keys, as a JWKS others may verify task tokens with."""
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": _b64(_raw_public(k.public)),
                          "kid": k.kid, "alg": ALG, "use": "sig"}
                         for k in self._keys.values()]}

    # -- rotation (synchronous file writes: call off the loop) ------------------
    def rotate(self, now: float) -> str:
        """Make a new current key; the old one stops signing and keeps verifying."""
        old = self._keys[self.current]
        old.retired_at, old.private = now, None
        kid = self._add_new(now)
        self._save()
        return kid

    def prune(self, keep: Callable[[str], bool]) -> list[str]:
        """Forget retired keys for which ``keep(kid)`` is false (no live token left)."""
        gone = [kid for kid, k in self._keys.items()
                if kid != self.current and k.retired_at is not None and not keep(kid)]
        for kid in gone:
            del self._keys[kid]
        if gone:
            self._save()
        return gone


class TaskLookup(Protocol):
    """What the issuer needs to know about a task (see :class:`proxy.tasks._model.Task`)."""

    id: str
    workload: str
    owner: str | None
    expires_at: float
    kid: str


class TaskTokenIssuer:
    """Verifies task tokens for :class:`~proxy.identity._jwt.Identity` (a ``TokenIssuer``)."""

    issuer = TASK_ISSUER

    def __init__(self, keys: TaskKeys, lookup: Callable[[str], TaskLookup | None],
                 fetch: Callable[[str], Awaitable[TaskLookup | None]] | None = None,
                 reload_keys: Callable[[], Awaitable[None]] | None = None) -> None:
        self.keys = keys
        self._lookup = lookup
        # Shared state: a task another replica created, a key another replica rotated in,
        # not yet here. Keys are re-read at most every KEY_RELOAD_SECONDS (unknown kids
        # cost nothing more than that).
        self._fetch = fetch
        self._reload_keys = reload_keys
        self._keys_reloaded = 0.0

    async def verify(self, token: str, header: Mapping[str, Any]) -> Caller:
        kid = header.get("kid")
        key = self.keys.public_key(kid) if isinstance(kid, str) else None
        if (key is None and isinstance(kid, str) and self._reload_keys is not None
                and time.monotonic() - self._keys_reloaded >= KEY_RELOAD_SECONDS):
            self._keys_reloaded = time.monotonic()
            await self._reload_keys()
            key = self.keys.public_key(kid)
        if key is None:
            raise InvalidCredential("task token is signed with a key taskgate does not hold")
        if header.get("alg") != ALG:
            raise InvalidCredential(f"algorithm {header.get('alg')!r} is not accepted "
                                    "for task tokens")
        try:
            claims = jwt.decode(token, key=key, algorithms=[ALG], audience=TASK_AUDIENCE,
                                issuer=TASK_ISSUER, leeway=0,
                                options={"require": ["exp", "iss", "aud", "sub", "task"]})
        except jwt.ExpiredSignatureError:
            raise InvalidCredential("task expired") from None
        except jwt.InvalidSignatureError:
            raise InvalidCredential("task token signature does not verify") from None
        except jwt.InvalidTokenError:
            raise InvalidCredential("task token is malformed") from None
        task_id = claims["task"]
        task = self._lookup(task_id) if isinstance(task_id, str) else None
        if task is None and self._fetch is not None and isinstance(task_id, str):
            task = await self._fetch(task_id)
        if task is None:
            raise InvalidCredential("task unknown: it ended and was purged, or never existed")
        if task.workload != claims["sub"] or task.kid != kid:
            raise InvalidCredential("task token does not match its task")
        return Caller(workload=task.workload, issuer=TASK_ISSUER, expires_at=task.expires_at,
                      task=task.id, owner=task.owner, key=kid)

    def holds(self, key: str | None) -> bool:
        """Whether taskgate still holds the task key ``key`` (a pruned key verifies nothing)."""
        return key is not None and self.keys.public_key(key) is not None
