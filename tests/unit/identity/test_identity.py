"""proxy/identity/_jwt.py: the proxy credential, the keys that may verify it, the caller."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import jwt
import pytest

from proxy.errors import InvalidCredential, MissingCredential
from proxy.identity import Caller, Identity, JwksKeys, WorkloadIssuer
from proxy.identity._jwt import algorithms_for, token_from_proxy_authorization
from tests.support import (
    AUDIENCE,
    ISSUER,
    WORKLOAD,
    Keys,
    claims,
    hs256_token,
    raw_signed_token,
    unsigned_token,
)


def basic(userpass: bytes) -> str:
    return "Basic " + base64.b64encode(userpass).decode()


# -- Proxy-Authorization ---------------------------------------------------------
@pytest.mark.parametrize(("value", "token"), [
    (basic(b"agent:tok.en.x"), "tok.en.x"),
    (basic(b"agent:pa:ss:word"), "pa:ss:word"),  # the password may contain ':'
    (basic(b":tok"), "tok"),
    (basic(b"task-1:" + b"x" * 1000), "x" * 1000),
    ("basic " + base64.b64encode(b"a:t").decode(), "t"),
    ("BASIC " + base64.b64encode(b"a:t").decode(), "t"),
    ("Bearer tok.en.x", "tok.en.x"),
    ("bearer tok", "tok"),
    ("  Bearer   tok  ", "tok"),
])
def test_token_from_proxy_authorization(value: str, token: str) -> None:
    assert token_from_proxy_authorization(value) == token


@pytest.mark.parametrize(("value", "error", "message"), [
    (None, MissingCredential, "no proxy credential"),
    ("", MissingCredential, "no proxy credential"),
    ("   ", MissingCredential, "no proxy credential"),
    ("Bearer", MissingCredential, "empty proxy credential"),
    ("Bearer ", MissingCredential, "empty proxy credential"),
    (basic(b"agent:"), MissingCredential, "empty proxy credential"),
    (basic(b"agent"), InvalidCredential, "has no password"),
    (basic(b""), InvalidCredential, "has no password"),
    ("Basic", InvalidCredential, "has no password"),
    ("Basic !!!not-base64!!!", InvalidCredential, "malformed Basic"),
    ("Basic YWdlbnQ6d", InvalidCredential, "malformed Basic"),  # bad padding
    (basic(b"agent:\xff\xfe"), InvalidCredential, "malformed Basic"),  # not UTF-8
    ("Digest username=x", InvalidCredential, "use Basic or Bearer"),
    ("tok.en.x", InvalidCredential, "use Basic or Bearer"),
    ("Bearer " + "x" * 17000, InvalidCredential, "too long"),
    # two headers folded into one value
    ("Bearer a.b.c, Bearer d.e.f", InvalidCredential, "malformed"),
    (basic(b"a:t") + ", " + basic(b"b:u"), InvalidCredential, "malformed"),
    ("Bearer a.b.c d.e.f", InvalidCredential, "malformed"),
])
def test_bad_proxy_authorization(value: str | None, error: type[Exception],
                                 message: str) -> None:
    with pytest.raises(error, match=message) as err:
        token_from_proxy_authorization(value)
    assert "x" * 100 not in str(err.value)  # the credential is never echoed


# -- key algorithms ------------------------------------------------------------------
@pytest.mark.parametrize(("jwk", "algs"), [
    ({"kty": "RSA"}, {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ({"kty": "RSA", "alg": "RS256"}, {"RS256"}),
    ({"kty": "RSA", "alg": "PS384"}, {"PS384"}),
    ({"kty": "RSA", "alg": "HS256"}, set()),  # a public key never verifies HMAC
    ({"kty": "RSA", "alg": "none"}, set()),
    ({"kty": "RSA", "alg": "ES256"}, set()),
    ({"kty": "EC", "crv": "P-256"}, {"ES256"}),
    ({"kty": "EC", "crv": "P-384"}, {"ES384"}),
    ({"kty": "EC", "crv": "P-521"}, {"ES512"}),
    ({"kty": "EC", "crv": "secp256k1"}, {"ES256K"}),
    ({"kty": "EC", "crv": "P-256", "alg": "ES384"}, set()),
    ({"kty": "EC", "crv": "P-192"}, set()),
    ({"kty": "EC"}, set()),
    ({"kty": "OKP", "crv": "Ed25519"}, {"EdDSA"}),
    ({"kty": "oct", "k": "c2VjcmV0"}, set()),  # shared secrets never come from a JWKS
    ({"kty": "oct", "alg": "HS256"}, set()),
    ({"kty": "XYZ"}, set()),
    ({}, set()),
])
def test_algorithms_for(jwk: dict[str, Any], algs: set[str]) -> None:
    assert algorithms_for(jwk) == algs


def test_jwks_skips_unusable_keys(keys: Keys) -> None:
    jwks = keys.jwks()
    jwks["keys"] += [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "RSA", "kid": "broken", "n": "x", "e": "AQAB"},
        {**jwks["keys"][0], "kid": "enc", "use": "enc"},
        "not a key",
    ]
    k = JwksKeys(source="test", initial=jwks)
    assert set(k._keys) == {"rsa1", "ec1"}


@pytest.mark.parametrize("data", [{}, {"keys": "x"}, []])
def test_not_a_jwks(data: Any) -> None:
    with pytest.raises(ValueError, match="not a JWKS"):
        JwksKeys(source="test", initial=data)


# -- JWKS refetch on an unknown kid: rate-limited, single-flight ------------------------
class FakeJwksServer:
    """A fetch function standing in for an issuer's JWKS URL; counts fetches."""

    def __init__(self, jwks: dict[str, Any], delay: float = 0.0) -> None:
        self.jwks = jwks
        self.delay = delay
        self.fetches = 0
        self.fail = False

    async def __call__(self, url: str) -> Any:
        assert url == "https://issuer.test/jwks"
        self.fetches += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise OSError("connection refused")
        return json.loads(json.dumps(self.jwks))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def url_keys(server: FakeJwksServer, clock: Clock, **kw: Any) -> JwksKeys:
    return JwksKeys(source="https://issuer.test/jwks", fetch=server, clock=clock,
                    min_refetch_seconds=30, **kw)


async def test_jwks_url_fetched_on_first_use(keys: Keys) -> None:
    server, clock = FakeJwksServer(keys.jwks()), Clock()
    k = url_keys(server, clock)
    assert server.fetches == 0
    assert len(await k.lookup("rsa1")) == 1
    assert len(await k.lookup("ec1")) == 1
    assert server.fetches == 1


async def test_unknown_kid_refetch_is_rate_limited(keys: Keys) -> None:
    server, clock = FakeJwksServer(keys.jwks()), Clock()
    k = url_keys(server, clock)
    await k.lookup("rsa1")
    clock.now += 31
    for _ in range(40):  # 40 s of unknown kids, one a second
        assert await k.lookup("made-up") == []
        clock.now += 1
    # one refetch for the first unknown kid, then one more once 30 s had passed
    assert server.fetches == 3
    for _ in range(20):
        await k.lookup("made-up")
    assert server.fetches == 3


async def test_unknown_kid_refetch_finds_a_rotated_key(keys: Keys) -> None:
    server, clock = FakeJwksServer({"keys": []}), Clock()
    k = url_keys(server, clock)
    assert await k.lookup("rsa1") == []
    server.jwks = keys.jwks()  # the issuer rotates its keys
    assert await k.lookup("rsa1") == []  # within the rate limit: not fetched again
    clock.now += 30
    assert len(await k.lookup("rsa1")) == 1
    assert server.fetches == 2


async def test_unknown_kid_refetch_is_single_flight(keys: Keys) -> None:
    server, clock = FakeJwksServer(keys.jwks(), delay=0.05), Clock()
    k = url_keys(server, clock)
    await k.lookup("rsa1")
    clock.now += 60
    results = await asyncio.gather(*(k.lookup(f"kid-{i}") for i in range(50)))
    assert results == [[]] * 50
    assert server.fetches == 2


async def test_failed_fetch_keeps_old_keys_and_is_rate_limited(keys: Keys) -> None:
    server, clock = FakeJwksServer(keys.jwks()), Clock()
    k = url_keys(server, clock)
    await k.lookup("rsa1")
    server.fail = True
    clock.now += 3601  # past max age: refetch, which fails
    assert len(await k.lookup("rsa1")) == 1
    for _ in range(10):
        await k.lookup("other")
    assert server.fetches == 2


async def test_cancelled_fetch_does_not_strand_waiters(keys: Keys) -> None:
    server, clock = FakeJwksServer(keys.jwks(), delay=0.2), Clock()
    k = url_keys(server, clock)
    first = asyncio.create_task(k.lookup("rsa1"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(k.lookup("rsa1"))
    await asyncio.sleep(0.01)
    first.cancel()
    # the second waited on the first's fetch; it must not hang, and fetches itself
    assert len(await asyncio.wait_for(second, 2)) == 1


# -- verifying workload tokens ------------------------------------------------------
def identity(keys: Keys, leeway: float = 30.0) -> Identity:
    issuer = WorkloadIssuer(ISSUER, AUDIENCE, JwksKeys(source="test", initial=keys.jwks()),
                            leeway=leeway, owners={WORKLOAD: "platform@acme.test"})
    return Identity([issuer], leeway=leeway)


async def test_valid_token(keys: Keys) -> None:
    caller = await identity(keys).identify("Bearer " + keys.token())
    assert caller.workload == WORKLOAD and caller.issuer == ISSUER
    assert caller.owner == "platform@acme.test" and caller.task is None
    assert caller.expires_at > time.time()


@pytest.mark.parametrize("make", [
    lambda k: k.token(alg="ES256", kid="ec1"),
    lambda k: k.token(alg="PS256"),
    lambda k: k.token(kid=None),  # no kid: every key of the issuer is tried
    lambda k: k.token(sub="other-workload"),
])
async def test_other_valid_tokens(keys: Keys, make: Any) -> None:
    caller = await identity(keys).identify("Bearer " + make(keys))
    assert caller.issuer == ISSUER


def _forge(keys: Keys, case: str) -> str:
    if case == "alg none":
        return unsigned_token(claims(), {"alg": "none", "kid": "rsa1"})
    if case == "alg None":
        return unsigned_token(claims(), {"alg": "None", "kid": "rsa1"})
    if case == "HS256 with the RSA public key":
        return hs256_token(claims(), {"kid": "rsa1"}, keys.rsa_public_pem())
    if case == "ES256 header on the RSA key":
        return keys.token(alg="ES256", kid="rsa1")
    if case == "unknown kid":
        return keys.token(kid="no-such-key")
    if case == "another key, known kid":
        return keys.token(key=keys.other)
    if case == "expired":
        return keys.token(ttl=-120)
    if case == "not yet valid":
        return keys.token(nbf=time.time() + 600)
    if case == "wrong audience":
        return keys.token(aud="someone-else")
    if case == "wrong issuer":
        return keys.token(iss="https://evil.test")
    if case == "no sub":
        payload = claims()
        del payload["sub"]
        return jwt.encode(payload, keys.rsa, algorithm="RS256", headers={"kid": "rsa1"})
    if case == "no exp":
        payload = claims()
        del payload["exp"]
        return jwt.encode(payload, keys.rsa, algorithm="RS256", headers={"kid": "rsa1"})
    if case == "empty sub":
        return keys.token(sub="")
    if case == "not a JWT":
        return "not-a-jwt"
    if case == "tampered payload":
        h, _, s = keys.token().split(".")
        forged = base64.urlsafe_b64encode(json.dumps(claims(sub="admin")).encode())
        return f"{h}.{forged.rstrip(b'=').decode()}.{s}"
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "message"), [
    ("alg none", "algorithm 'none' is not accepted"),
    ("alg None", "algorithm 'None' is not accepted"),
    ("HS256 with the RSA public key", "algorithm 'HS256' is not accepted"),
    ("ES256 header on the RSA key", "algorithm 'ES256' is not accepted for this key"),
    ("unknown kid", "signed with a key this issuer does not publish"),
    ("another key, known kid", "signature does not verify"),
    ("tampered payload", "signature does not verify"),
    ("expired", "token has expired"),
    ("not yet valid", "not valid yet"),
    ("wrong audience", "audience does not name this gateway"),
    ("wrong issuer", "issuer is not trusted"),
    ("no sub", "lacks the 'sub' claim"),
    ("no exp", "lacks the 'exp' claim"),
    ("empty sub", "subject is not a workload id"),
    ("not a JWT", "not a well-formed JWT"),
])
async def test_refused_tokens(keys: Keys, case: str, message: str) -> None:
    with pytest.raises(InvalidCredential, match=message) as err:
        await identity(keys).identify("Bearer " + _forge(keys, case))
    assert err.value.status == 407


HEADER = '{"alg":"RS256","kid":"rsa1","typ":"JWT"}'


def _claims_text(**override: str) -> str:
    """The claims object as JSON text, each value given as the raw JSON it is written as."""
    now = int(time.time())
    members = {"sub": json.dumps(WORKLOAD), "aud": json.dumps(AUDIENCE),
               "iss": json.dumps(ISSUER), "iat": str(now), "exp": str(now + 600), **override}
    return "{" + ",".join(f'"{k}":{v}' for k, v in members.items() if v != "") + "}"


def _dup(name: str, value: str) -> str:
    return _claims_text()[:-1] + f',"{name}":{value}}}'


# A token the issuer really signed, whose claims a lenient reader would still take.
STRICT_CASES: dict[str, tuple[str, str, str]] = {
    "exp as a string": (HEADER, _claims_text(exp=f'"{int(time.time()) + 600}"'),
                        "'exp' is not a NumericDate"),
    "exp 1e30": (HEADER, _claims_text(exp="1e30"), "'exp' is out of range"),
    "exp past year 9999": (HEADER, _claims_text(exp="253402300800"), "'exp' is out of range"),
    "exp true": (HEADER, _claims_text(exp="true"), "'exp' is not a NumericDate"),
    "exp null": (HEADER, _claims_text(exp="null"), "'exp' is not a NumericDate"),
    "exp a list": (HEADER, _claims_text(exp="[1]"), "'exp' is not a NumericDate"),
    "exp NaN": (HEADER, _claims_text(exp="NaN"), "not JSON"),
    "exp Infinity": (HEADER, _claims_text(exp="Infinity"), "not JSON"),
    "exp negative": (HEADER, _claims_text(exp="-1"), "'exp' is out of range"),
    "nbf as a string": (HEADER, _claims_text(nbf='"0"'), "'nbf' is not a NumericDate"),
    "iat as a string": (HEADER, _claims_text(iat='"0"'), "'iat' is not a NumericDate"),
    "duplicate exp": (HEADER, _dup("exp", str(int(time.time()) + 10**8)), "repeats the 'exp'"),
    "duplicate sub": (HEADER, _dup("sub", '"spiffe://acme.test/agent/admin"'),
                      "repeats the 'sub'"),
    "duplicate aud": (HEADER, _dup("aud", '"other"'), "repeats the 'aud'"),
    "duplicate header alg": ('{"alg":"none","kid":"rsa1","alg":"RS256"}', _claims_text(),
                             "repeats the 'alg'"),
    "sub a number": (HEADER, _claims_text(sub="42"), "'sub' is not a string"),
    "iss a list": (HEADER, _claims_text(iss=json.dumps([ISSUER])), "'iss' is not a string"),
    "aud a number": (HEADER, _claims_text(aud="7"), "'aud' is not a string or a list"),
    "aud an empty list": (HEADER, _claims_text(aud="[]"), "'aud' is not a string or a list"),
    "sub a lone surrogate": (HEADER, _claims_text(sub='"spiffe://a/\\ud800"'),
                             "not valid Unicode"),
    "claims an array": (HEADER, "[1,2]", "claims is not a JSON object"),
    "header an array": ('["RS256"]', _claims_text(), "header is not a JSON object"),
}


@pytest.mark.parametrize("case", STRICT_CASES)
async def test_claims_read_strictly(keys: Keys, case: str) -> None:
    header, payload, message = STRICT_CASES[case]
    with pytest.raises(InvalidCredential, match=message):
        await identity(keys).identify("Bearer " + raw_signed_token(keys.rsa, header, payload))


@pytest.mark.parametrize("spelled", ["integer", "fraction"])
async def test_numeric_dates_as_rfc_7519_writes_them(keys: Keys, spelled: str) -> None:
    """Integers and fractions both are NumericDates: the strict reading refuses no
    token a conforming issuer writes. (The date is taken when the test runs, not when
    it is collected: a long run must not see it expire.)"""
    exp = str(int(time.time()) + 600) if spelled == "integer" else f"{time.time() + 600:.3f}"
    token = raw_signed_token(keys.rsa, HEADER, _claims_text(exp=exp))
    assert (await identity(keys).identify("Bearer " + token)).workload == WORKLOAD


async def test_leeway_applies_to_expiry(keys: Keys) -> None:
    token = keys.token(ttl=-10)
    assert (await identity(keys, leeway=30).identify("Bearer " + token)).workload == WORKLOAD
    with pytest.raises(InvalidCredential, match="expired"):
        await identity(keys, leeway=0).identify("Bearer " + token)


async def test_cached_verdict_rechecks_expiry(keys: Keys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ident = identity(keys, leeway=0)
    value = "Bearer " + keys.token(ttl=60)
    await ident.identify(value)
    later = time.time() + 120
    monkeypatch.setattr("proxy.identity._jwt.time.time", lambda: later)
    with pytest.raises(InvalidCredential, match="expired"):
        await ident.identify(value)


def test_check_fresh() -> None:
    ident = Identity([], leeway=5)
    now = time.time()
    ident.check_fresh(Caller("w", ISSUER, expires_at=now - 1))  # within leeway
    with pytest.raises(InvalidCredential, match="expired"):
        ident.check_fresh(Caller("w", ISSUER, expires_at=now - 10))


async def test_forget_drops_cached_callers(keys: Keys) -> None:
    ident = identity(keys)
    await ident.identify("Bearer " + keys.token())
    assert len(ident.cache) == 1
    ident.forget(lambda c: c.workload == WORKLOAD)
    assert len(ident.cache) == 0


# -- the verified-token cache: a verdict never outlives its exp or its key ----------------
def url_identity(server: FakeJwksServer, clock: Clock) -> Identity:
    issuer = WorkloadIssuer(ISSUER, AUDIENCE, url_keys(server, clock, max_age_seconds=300))
    return Identity([issuer])


async def test_cached_token_dropped_when_its_key_is_removed(keys: Keys) -> None:
    server, clock = FakeJwksServer(keys.jwks()), Clock()
    ident = url_identity(server, clock)
    value = "Bearer " + keys.token()
    await ident.identify(value)
    await ident.identify(value)  # a cache hit: no second fetch
    assert server.fetches == 1 and len(ident.cache) == 1
    server.jwks = {"keys": [k for k in keys.jwks()["keys"] if k["kid"] != "rsa1"]}
    clock.now += 301  # past max_age: the JWKS vouches for nothing until fetched again
    with pytest.raises(InvalidCredential, match="does not publish"):
        await ident.identify(value)
    assert server.fetches == 2 and len(ident.cache) == 0


async def test_cached_token_dropped_when_its_key_is_rotated(keys: Keys) -> None:
    """The same kid republished with other key material is another key."""
    server, clock = FakeJwksServer(keys.jwks()), Clock()
    ident = url_identity(server, clock)
    value = "Bearer " + keys.token()
    await ident.identify(value)
    other = Keys().jwks()  # fresh key material under the same kids
    server.jwks = other
    clock.now += 301
    with pytest.raises(InvalidCredential, match="signature does not verify"):
        await ident.identify(value)
    assert len(ident.cache) == 0


async def test_cached_token_kept_while_its_key_is_published(keys: Keys) -> None:
    server, clock = FakeJwksServer(keys.jwks()), Clock()
    ident = url_identity(server, clock)
    value = "Bearer " + keys.token()
    first = await ident.identify(value)
    clock.now += 301  # refetched, same keys: verified once more, then cached again
    assert await ident.identify(value) == first
    assert await ident.identify(value) == first
    assert server.fetches == 2 and len(ident.cache) == 1


async def test_expired_cached_token_is_refused_and_dropped(keys: Keys) -> None:
    ident = identity(keys, leeway=0)
    value = "Bearer " + keys.token()
    caller = await ident.identify(value)
    key = next(iter(ident.cache._entries))
    ident.cache.put(key, Caller(caller.workload, caller.issuer, time.time() - 1,
                                key=caller.key))
    with pytest.raises(InvalidCredential, match="expired"):
        await ident.identify(value)
    assert len(ident.cache) == 0


async def test_cache_is_bounded_and_holds_no_token(keys: Keys) -> None:
    issuer = WorkloadIssuer(ISSUER, AUDIENCE, JwksKeys(source="test", initial=keys.jwks()))
    ident = Identity([issuer], cache_size=3)
    tokens = [keys.token(sub=f"wl-{i}") for i in range(5)]
    for t in tokens:
        await ident.identify("Bearer " + t)
    assert len(ident.cache) == 3
    held = b"".join(ident.cache._entries)
    assert not any(t.encode()[-40:] in held for t in tokens)
    # the least recently used went first: the last three are hits
    assert [c.workload for c in ident.cache._entries.values()] == ["wl-2", "wl-3", "wl-4"]
