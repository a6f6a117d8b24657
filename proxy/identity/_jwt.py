"""Who is calling: the proxy credential, the JWT inside it, the caller it names.

An agent puts its token in the proxy URL; clients send it as
``Proxy-Authorization: Basic base64(anything:TOKEN)`` (the password may itself
contain ':') or ``Bearer TOKEN``. The token is a JWT from one of the trusted
issuers. Which algorithms a key may verify follows from the key alone, never
from the token's header, so ``alg: none`` and HS256-signed-with-the-public-key
cannot pass.

Verified tokens are cached (:class:`TokenCache`) by the SHA-256 of their exact
text (same bytes, same verdict; the cache holds no token). A cached verdict is
re-checked on every use: past the token's ``exp`` (plus the leeway a fresh
verification allows) it is dropped and refused; when the key that verified it
is no longer published — removed or rotated out of the JWKS, or the JWKS is
older than its ``max_age`` and must be fetched again — the token is verified
afresh, which then fails or passes on the keys as they are now. Revoking a task
drops its callers (:meth:`Identity.forget`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
import orjson

from proxy.errors import InvalidCredential, MissingCredential

__all__ = [
    "Caller",
    "Identity",
    "JwksKeys",
    "TokenCache",
    "TokenIssuer",
    "WorkloadIssuer",
    "check_token_structure",
    "token_from_proxy_authorization",
]

log = logging.getLogger(__name__)

FetchJson = Callable[[str], Awaitable[Any]]

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
MAX_TOKEN_BYTES = 16 * 1024
# NumericDate claims (RFC 7519 2): a JSON number, no later than 9999-12-31T23:59:59Z.
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
MAX_NUMERIC_DATE = 253402300799
STRING_CLAIMS = ("iss", "sub", "jti", "task")


@dataclass(frozen=True, slots=True)
class Caller:
    """An identified workload, and the task it acts for (if its token names one)."""

    workload: str
    issuer: str
    expires_at: float
    task: str | None = None
    owner: str | None = None
    # The key that verified the token (a JWK fingerprint, or a task key's kid): a cached
    # verdict stands only while its issuer still publishes this key.
    key: str | None = field(default=None, compare=False, repr=False)

    def expired(self, now: float, leeway: float = 0.0) -> bool:
        return now >= self.expires_at + leeway


def token_from_proxy_authorization(value: str | None) -> str:
    """Extract the token from a ``Proxy-Authorization`` header value."""
    if value is None or not value.strip():
        raise MissingCredential("no proxy credential; put the token in the proxy URL password")
    scheme, _, param = value.strip().partition(" ")
    param = param.strip()
    if scheme.lower() == "bearer":
        token = param
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(param, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidCredential("malformed Basic proxy credential") from None
        user, sep, token = decoded.partition(":")
        if not sep:
            raise InvalidCredential("Basic proxy credential has no password; the token goes there")
    else:
        raise InvalidCredential("unsupported proxy authorization scheme; use Basic or Bearer")
    if not token:
        raise MissingCredential("empty proxy credential")
    if any(c in token for c in " \t,"):
        # Two credentials folded into one value ("Bearer a, Bearer b"), or junk.
        raise InvalidCredential("malformed proxy credential")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidCredential("proxy credential is too long")
    return token


def algorithms_for(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The algorithms a JWK may verify, decided by its type (and its own 'alg')."""
    kty = jwk.get("kty")
    if kty == "RSA":
        allowed = _RSA_ALGS
    elif kty == "EC":
        crv = jwk.get("crv")
        allowed = frozenset({_EC_ALGS[crv]}) if crv in _EC_ALGS else frozenset()
    elif kty == "OKP":
        allowed = frozenset({"EdDSA"})
    else:  # 'oct' and anything else: shared secrets are never trusted from a JWKS
        allowed = frozenset()
    declared = jwk.get("alg")
    if declared is not None:
        allowed = allowed & {declared}
    return allowed


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidCredential(f"token repeats the {key!r} member")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise InvalidCredential(f"token holds {name}, which is not JSON")


def _unicode(value: Any) -> bool:
    """Is every string in ``value`` valid Unicode (no lone surrogate from a \\u escape)?"""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_unicode(k) and _unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_unicode(v) for v in value)
    return True


def _segment(text: str, what: str) -> dict[str, Any]:
    try:
        data = jwt.utils.base64url_decode(text.encode("ascii"))
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constant)
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidCredential("proxy credential is not a well-formed JWT") from None
    if not isinstance(value, dict):
        raise InvalidCredential(f"token {what} is not a JSON object")
    if not _unicode(value):
        raise InvalidCredential(f"token {what} holds a string that is not valid Unicode")
    return value


def check_token_structure(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a JWT's header and claims strictly, before any library reads them leniently.

    pyjwt keeps the last of duplicate members and turns ``"exp": "1e30"`` or a float of
    any size into a number; a gateway that judges a claim must read the one value a
    token has, of the type RFC 7519 gives it. Returns (header, claims); raises
    :class:`InvalidCredential` for duplicates, wrong types or out-of-range dates.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidCredential("proxy credential is not a well-formed JWT")
    header, claims = _segment(parts[0], "header"), _segment(parts[1], "claims")
    for name in NUMERIC_DATE_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise InvalidCredential(f"token claim {name!r} is not a NumericDate")
        if not 0 <= value <= MAX_NUMERIC_DATE:
            raise InvalidCredential(f"token claim {name!r} is out of range")
    for name in STRING_CLAIMS:
        if name in claims and not isinstance(claims[name], str):
            raise InvalidCredential(f"token claim {name!r} is not a string")
    aud = claims.get("aud")
    if aud is not None and not (isinstance(aud, str) or (
            isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud))):
        raise InvalidCredential("token claim 'aud' is not a string or a list of strings")
    return header, claims


def fingerprint(jwk: Mapping[str, Any]) -> str:
    """A JWK's identity: the SHA-256 of its members (kid, alg and key material alike),
    so a key republished under the same kid with other material is another key."""
    return hashlib.sha256(orjson.dumps(jwk, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class _Key:
    """One published key: what verifies, the algorithms it may verify, its fingerprint."""

    jwk: jwt.PyJWK
    algs: frozenset[str]
    fingerprint: str


class JwksKeys:
    """One issuer's keys by ``kid``: from a file, or a URL refetched on an unknown kid.

    Refetches are rate-limited (``min_refetch_seconds``) and single-flight, so a
    stream of tokens with made-up kids cannot turn into a stream of fetches.
    """

    def __init__(
        self,
        *,
        source: str,
        fetch: FetchJson | None = None,
        initial: Mapping[str, Any] | None = None,
        min_refetch_seconds: float = 30.0,
        max_age_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._clock = clock
        self._fetch = fetch
        self._keys: dict[str, _Key] = {}
        self._unnamed: list[_Key] = []
        self._held: frozenset[str] = frozenset()
        self._fetched_at = 0.0
        self._min_refetch = min_refetch_seconds
        self._max_age = max_age_seconds
        self._inflight: asyncio.Future[None] | None = None
        self.generation = 0
        if initial is not None:
            self._load(initial)

    @classmethod
    def from_file(cls, path: str) -> JwksKeys:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
        return cls(source=path, initial=data)

    def _load(self, data: Mapping[str, Any]) -> None:
        keys = data.get("keys") if isinstance(data, Mapping) else None
        if not isinstance(keys, list):
            raise ValueError(f"{self.source}: not a JWKS (no 'keys' list)")
        named: dict[str, _Key] = {}
        unnamed: list[_Key] = []
        for i, k in enumerate(keys):
            if not isinstance(k, dict) or k.get("use", "sig") != "sig":
                continue
            try:
                jwk = jwt.PyJWK(k)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
                log.warning("%s: key %d skipped: %s", self.source, i, e)
                continue
            algs = algorithms_for(k)
            if not algs:
                log.warning("%s: key %d skipped: no asymmetric algorithm fits it", self.source, i)
                continue
            key = _Key(jwk, algs, fingerprint(k))
            if isinstance(k.get("kid"), str):
                named[k["kid"]] = key
            else:
                unnamed.append(key)
        self._keys, self._unnamed = named, unnamed
        self._held = frozenset(k.fingerprint for k in (*named.values(), *unnamed))
        self._fetched_at = self._clock()
        self.generation += 1

    async def _refresh(self) -> None:
        assert self._fetch is not None
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        inflight = self._inflight = asyncio.get_running_loop().create_future()
        try:
            self._load(await self._fetch(self.source))
        except Exception as e:  # noqa: BLE001 - any fetch failure keeps the old keys
            log.warning("JWKS refresh from %s failed: %s", self.source, type(e).__name__)
            self._fetched_at = self._clock()  # rate-limit retries too
        finally:
            # Also when the fetching call is cancelled: the others waiting on it
            # must not wait forever.
            self._inflight = None
            inflight.set_result(None)

    def holds(self, key: str | None) -> bool:
        """Whether the key with this fingerprint is published, as of a fetch within
        ``max_age`` (a JWKS that must be fetched again vouches for nothing)."""
        if self._fetch is not None and self._clock() - self._fetched_at > self._max_age:
            return False
        return key in self._held

    async def lookup(self, kid: str | None) -> list[_Key]:
        """Keys that may have signed a token with this ``kid``."""
        now = self._clock()
        if self._fetch is not None and (
            self._fetched_at == 0.0 or now - self._fetched_at > self._max_age
        ):
            await self._refresh()
        found = self._find(kid)
        if not found and self._fetch is not None and now - self._fetched_at >= self._min_refetch:
            await self._refresh()
            found = self._find(kid)
        return found

    def _find(self, kid: str | None) -> list[_Key]:
        if kid is not None:
            hit = self._keys.get(kid)
            return [hit] if hit else []
        return list(self._unnamed) or list(self._keys.values())


class TokenIssuer(Protocol):
    """Something that can verify tokens carrying its ``iss``."""

    issuer: str

    async def verify(self, token: str, header: Mapping[str, Any]) -> Caller: ...

    def holds(self, key: str | None) -> bool:
        """Whether the key that verified a cached caller (``Caller.key``) still counts."""
        ...


class WorkloadIssuer:
    """A trusted external issuer (Kubernetes, SPIFFE JWT-SVID, OIDC): subject = workload."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        keys: JwksKeys,
        *,
        leeway: float = 30.0,
        owners: Mapping[str, str] | None = None,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self.leeway = leeway
        self._owners = owners or {}

    async def verify(self, token: str, header: Mapping[str, Any]) -> Caller:
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidCredential("token header 'kid' is not a string")
        candidates = await self.keys.lookup(kid)
        if not candidates:
            raise InvalidCredential("token is signed with a key this issuer does not publish")
        alg = header.get("alg")
        claims: dict[str, Any] | None = None
        verified_by: _Key | None = None
        for candidate in candidates:
            if alg not in candidate.algs:
                continue
            try:
                claims = jwt.decode(
                    token, key=candidate.jwk.key, algorithms=[alg], audience=self.audience,
                    issuer=self.issuer, leeway=self.leeway,
                    options={"require": ["exp", "iss", "sub", "aud"]},
                )
                verified_by = candidate
                break
            except jwt.ExpiredSignatureError:
                raise InvalidCredential("token has expired") from None
            except jwt.ImmatureSignatureError:
                raise InvalidCredential("token is not valid yet") from None
            except jwt.InvalidAudienceError:
                raise InvalidCredential("token audience does not name this gateway") from None
            except jwt.InvalidIssuerError:
                raise InvalidCredential("token issuer is not trusted") from None
            except jwt.MissingRequiredClaimError as e:
                raise InvalidCredential(f"token lacks the '{e.claim}' claim") from None
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidTokenError:
                raise InvalidCredential("token is malformed") from None
        if claims is None or verified_by is None:
            if not any(alg in c.algs for c in candidates):
                raise InvalidCredential(f"algorithm {alg!r} is not accepted for this key")
            raise InvalidCredential("token signature does not verify")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise InvalidCredential("token subject is not a workload id")
        return Caller(
            workload=sub, issuer=self.issuer, expires_at=float(claims["exp"]),
            owner=self._owners.get(sub), key=verified_by.fingerprint,
        )

    def holds(self, key: str | None) -> bool:
        return self.keys.holds(key)


# Measured (bench/bench_identity.py): ~270 bytes per cached token, so the default
# takes ~26 MB and holds 1.7 h of 1,000 new tokens a minute. Past it, the least
# recently used verdict is dropped and that token pays one verification again
# (~70 µs for RS256, ~6% of a gateway call).
DEFAULT_CACHE_SIZE = 100_000


class TokenCache:
    """Verified callers by the SHA-256 of their token, least recently used dropped first."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, Caller] = OrderedDict()

    @staticmethod
    def key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, key: bytes) -> Caller | None:
        caller = self._entries.get(key)
        if caller is not None:
            self._entries.move_to_end(key)
        return caller

    def put(self, key: bytes, caller: Caller) -> None:
        self._entries[key] = caller
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def forget(self, predicate: Callable[[Caller], bool]) -> None:
        for key in [k for k, c in self._entries.items() if predicate(c)]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Identity:
    """Turns a ``Proxy-Authorization`` value into a :class:`Caller`, or raises AuthError."""

    def __init__(self, issuers: list[TokenIssuer], *, cache_size: int = DEFAULT_CACHE_SIZE,
                 leeway: float = 30.0) -> None:
        self._issuers: dict[str, TokenIssuer] = {i.issuer: i for i in issuers}
        self.cache = TokenCache(cache_size)
        self.leeway = leeway

    def add_issuer(self, issuer: TokenIssuer) -> None:
        self._issuers[issuer.issuer] = issuer
        self.cache.clear()

    def forget(self, predicate: Callable[[Caller], bool]) -> None:
        """Drop cached verdicts for callers matching ``predicate`` (revocation, key change)."""
        self.cache.forget(predicate)

    def check_fresh(self, caller: Caller) -> None:
        """Re-check a caller established earlier (a tunnel's) at the moment of a call."""
        if caller.expired(time.time(), self.leeway):
            raise InvalidCredential("token has expired")

    async def identify(self, proxy_authorization: str | None) -> Caller:
        token = token_from_proxy_authorization(proxy_authorization)
        key = TokenCache.key(token)
        caller = self._cached(key)
        if caller is None:
            caller = await self._verify(token)
            self.cache.put(key, caller)
        return caller

    @staticmethod
    def key_of(proxy_authorization: str | None) -> bytes:
        """The cache key of the credential's token (the SHA-256 of the token, never
        the token); raises as :meth:`identify` does on a missing or malformed one."""
        return TokenCache.key(token_from_proxy_authorization(proxy_authorization))

    def known_key(self, key: bytes) -> Caller | None:
        """:meth:`identify` without waiting, for the token whose :meth:`key_of` is
        ``key``: its cached verdict, re-checked as in :meth:`identify`, or ``None`` when
        the token has to be verified (which may wait for the issuer's keys). Raises as
        :meth:`identify` does. The usual call then needs no coroutine."""
        return self._cached(key)

    def _cached(self, key: bytes) -> Caller | None:
        """The cached verdict for ``key`` if it still holds; raises once it expired."""
        cached = self.cache.get(key)
        if cached is None:
            return None
        issuer = self._issuers.get(cached.issuer)
        if cached.expired(time.time(), self.leeway):
            self.cache.drop(key)
            raise InvalidCredential("token has expired")
        if issuer is not None and issuer.holds(cached.key):
            return cached
        self.cache.drop(key)  # its key was removed or rotated: verify afresh
        return None

    async def _verify(self, token: str) -> Caller:
        header, unverified = check_token_structure(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none" or alg.upper().startswith("HS"):
            raise InvalidCredential(f"algorithm {alg!r} is not accepted")
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidCredential("token issuer is not trusted")
        return await issuer.verify(token, header)
