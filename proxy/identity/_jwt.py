"""Who is calling: the proxy credential, the JWT inside it, the caller it names.

An agent puts its token in the proxy URL; clients send it as
``Proxy-Authorization: Basic base64(anything:TOKEN)`` (the password may itself
contain ':') or ``Bearer TOKEN``. The token is a JWT from one of the trusted
issuers. Which algorithms a key may verify follows from the key alone, never
from the token's header, so ``alg: none`` and HS256-signed-with-the-public-key
cannot pass.

Verified tokens are cached by their exact text (same bytes, same verdict);
expiry is re-checked on every use.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
import orjson

from proxy.errors import InvalidCredential, MissingCredential

__all__ = [
    "Caller",
    "Identity",
    "JwksKeys",
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
        self._keys: dict[str, tuple[jwt.PyJWK, frozenset[str]]] = {}
        self._unnamed: list[tuple[jwt.PyJWK, frozenset[str]]] = []
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
        named: dict[str, tuple[jwt.PyJWK, frozenset[str]]] = {}
        unnamed: list[tuple[jwt.PyJWK, frozenset[str]]] = []
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
            if isinstance(k.get("kid"), str):
                named[k["kid"]] = (jwk, algs)
            else:
                unnamed.append((jwk, algs))
        self._keys, self._unnamed = named, unnamed
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

    async def lookup(self, kid: str | None) -> list[tuple[jwt.PyJWK, frozenset[str]]]:
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

    def _find(self, kid: str | None) -> list[tuple[jwt.PyJWK, frozenset[str]]]:
        if kid is not None:
            hit = self._keys.get(kid)
            return [hit] if hit else []
        return list(self._unnamed) or list(self._keys.values())


class TokenIssuer(Protocol):
    """Something that can verify tokens carrying its ``iss``."""

    issuer: str

    async def verify(self, token: str, header: Mapping[str, Any]) -> Caller: ...


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
        for jwk, algs in candidates:
            if alg not in algs:
                continue
            try:
                claims = jwt.decode(
                    token, key=jwk.key, algorithms=[alg], audience=self.audience,
                    issuer=self.issuer, leeway=self.leeway,
                    options={"require": ["exp", "iss", "sub", "aud"]},
                )
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
        if claims is None:
            if not any(alg in algs for _, algs in candidates):
                raise InvalidCredential(f"algorithm {alg!r} is not accepted for this key")
            raise InvalidCredential("token signature does not verify")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise InvalidCredential("token subject is not a workload id")
        return Caller(
            workload=sub, issuer=self.issuer, expires_at=float(claims["exp"]),
            owner=self._owners.get(sub),
        )


class Identity:
    """Turns a ``Proxy-Authorization`` value into a :class:`Caller`, or raises AuthError."""

    def __init__(self, issuers: list[TokenIssuer], *, cache_size: int = 200_000,
                 leeway: float = 30.0) -> None:
        self._issuers: dict[str, TokenIssuer] = {i.issuer: i for i in issuers}
        self._cache: OrderedDict[str, Caller] = OrderedDict()
        self._cache_size = cache_size
        self.leeway = leeway

    def add_issuer(self, issuer: TokenIssuer) -> None:
        self._issuers[issuer.issuer] = issuer
        self._cache.clear()

    def forget(self, predicate: Callable[[Caller], bool]) -> None:
        """Drop cached verdicts for callers matching ``predicate`` (revocation, key change)."""
        for token in [t for t, c in self._cache.items() if predicate(c)]:
            del self._cache[token]

    def check_fresh(self, caller: Caller) -> None:
        """Re-check a caller established earlier (a tunnel's) at the moment of a call."""
        if caller.expired(time.time(), self.leeway):
            raise InvalidCredential("token has expired")

    async def identify(self, proxy_authorization: str | None) -> Caller:
        token = token_from_proxy_authorization(proxy_authorization)
        cached = self._cache.get(token)
        if cached is not None:
            self._cache.move_to_end(token)  # least recently used goes first
            self.check_fresh(cached)
            return cached
        caller = await self._verify(token)
        self._cache[token] = caller
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return caller

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
