"""Task tokens: signing keys under home, verification, tampering, rotation."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from proxy.errors import InvalidCredential
from proxy.identity import TASK_ISSUER, Identity, TaskKeys, TaskTokenIssuer
from proxy.identity._task_tokens import thumbprint
from tests.support import Keys, unsigned_token


@dataclass
class FakeTask:
    """What the issuer looks up: the fields of proxy.tasks._model.Task it reads."""

    id: str
    workload: str
    owner: str | None
    expires_at: float
    kid: str


def setup(tmp_path: Path) -> tuple[TaskKeys, dict[str, FakeTask], Identity]:
    keys = TaskKeys.load_or_create(str(tmp_path / "task-keys.json"))
    tasks: dict[str, FakeTask] = {}
    identity = Identity([])
    identity.add_issuer(TaskTokenIssuer(keys, tasks.get))
    return keys, tasks, identity


def issue(keys: TaskKeys, tasks: dict[str, FakeTask], task_id: str = "t1",
          ttl: float = 600) -> str:
    now = time.time()
    tasks[task_id] = FakeTask(task_id, "spiffe://w", "alice", now + ttl, keys.current)
    return keys.sign(task_id=task_id, workload="spiffe://w", expires_at=now + ttl, now=now)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    keys = TaskKeys.load_or_create(str(tmp_path / "k.json"))
    assert stat.S_IMODE(os.stat(tmp_path / "k.json").st_mode) == 0o600
    again = TaskKeys.load_or_create(str(tmp_path / "k.json"))
    assert again.current == keys.current
    assert keys.current == thumbprint(keys.public_key(keys.current))  # type: ignore[arg-type]


def test_loose_key_file_is_tightened(tmp_path: Path) -> None:
    TaskKeys.load_or_create(str(tmp_path / "k.json"))
    os.chmod(tmp_path / "k.json", 0o644)
    TaskKeys.load_or_create(str(tmp_path / "k.json"))
    assert stat.S_IMODE(os.stat(tmp_path / "k.json").st_mode) == 0o600


async def test_token_names_task_workload_expiry(tmp_path: Path) -> None:
    keys, tasks, identity = setup(tmp_path)
    token = issue(keys, tasks)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "EdDSA" and header["kid"] == keys.current
    assert claims["task"] == "t1" and claims["sub"] == "spiffe://w" and claims["iss"] == TASK_ISSUER
    assert claims["exp"] >= tasks["t1"].expires_at
    caller = await identity.identify(bearer(token))
    assert (caller.task, caller.workload, caller.owner) == ("t1", "spiffe://w", "alice")
    assert caller.expires_at == tasks["t1"].expires_at


def _segments(token: str) -> list[str]:
    return token.split(".")


def _b64(d: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


async def test_tampered_payload_is_refused(tmp_path: Path) -> None:
    keys, tasks, identity = setup(tmp_path)
    token = issue(keys, tasks)
    issue(keys, tasks, "t2")
    h, p, s = _segments(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    for change in ({"task": "t2"}, {"exp": claims["exp"] + 3600}, {"sub": "spiffe://admin"}):
        forged = f"{h}.{_b64({**claims, **change})}.{s}"
        with pytest.raises(InvalidCredential, match="signature does not verify"):
            await identity.identify(bearer(forged))


async def test_foreign_key_alg_none_and_hmac_confusion_are_refused(tmp_path: Path) -> None:
    keys, tasks, identity = setup(tmp_path)
    issue(keys, tasks)
    claims = {"iss": TASK_ISSUER, "aud": "urn:taskgate:proxy", "sub": "spiffe://w",
              "task": "t1", "exp": int(time.time()) + 600}
    other = TaskKeys.load_or_create(str(tmp_path / "other.json"))
    forged = other.sign(task_id="t1", workload="spiffe://w", expires_at=time.time() + 600,
                        now=time.time())
    with pytest.raises(InvalidCredential, match="key taskgate does not hold"):
        await identity.identify(bearer(forged))
    # the right kid, but signed by another key
    h = _b64({"alg": "EdDSA", "kid": keys.current, "typ": "JWT"})
    _, p, s = _segments(forged)
    with pytest.raises(InvalidCredential, match="signature does not verify"):
        await identity.identify(bearer(f"{h}.{p}.{s}"))
    with pytest.raises(InvalidCredential, match="not accepted"):
        await identity.identify(bearer(unsigned_token(claims, {"alg": "none",
                                                               "kid": keys.current})))
    public = keys.public_key(keys.current)
    assert public is not None
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    hs = jwt.encode(claims, raw, algorithm="HS256", headers={"kid": keys.current})
    with pytest.raises(InvalidCredential, match="not accepted"):
        await identity.identify(bearer(hs))
    # an RSA key under our kid, with an RSA algorithm: the kid's key decides the algorithm
    rs = jwt.encode(claims, Keys().rsa, algorithm="RS256", headers={"kid": keys.current})
    with pytest.raises(InvalidCredential, match="not accepted for task tokens"):
        await identity.identify(bearer(rs))


async def test_expired_unknown_and_mismatched_tasks(tmp_path: Path) -> None:
    keys, tasks, identity = setup(tmp_path)
    now = time.time()
    expired = keys.sign(task_id="old", workload="spiffe://w", expires_at=now - 5, now=now - 60)
    tasks["old"] = FakeTask("old", "spiffe://w", None, now - 5, keys.current)
    with pytest.raises(InvalidCredential, match="task expired"):
        await identity.identify(bearer(expired))
    ghost = keys.sign(task_id="ghost", workload="spiffe://w", expires_at=now + 60, now=now)
    with pytest.raises(InvalidCredential, match="task unknown"):
        await identity.identify(bearer(ghost))
    tasks["ghost"] = FakeTask("ghost", "spiffe://other", None, now + 60, keys.current)
    with pytest.raises(InvalidCredential, match="does not match its task"):
        await identity.identify(bearer(ghost))


async def test_rotation_keeps_old_tokens_until_pruned(tmp_path: Path) -> None:
    keys, tasks, identity = setup(tmp_path)
    old_token = issue(keys, tasks, "t-old")
    old_kid = keys.current
    new_kid = keys.rotate(time.time())
    assert new_kid != old_kid and keys.current == new_kid
    new_token = issue(keys, tasks, "t-new")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    identity.forget(lambda c: True)
    assert (await identity.identify(bearer(old_token))).task == "t-old"
    assert (await identity.identify(bearer(new_token))).task == "t-new"
    # The retired private key is gone from disk at once; the public key stays.
    saved = json.loads((tmp_path / "task-keys.json").read_text())
    by_kid = {k["kid"]: k for k in saved["keys"]}
    assert by_kid[old_kid]["private"] is None and by_kid[new_kid]["private"]
    reloaded = TaskKeys.load_or_create(str(tmp_path / "task-keys.json"))
    assert set(reloaded.kids()) == {old_kid, new_kid}
    # Once its tokens have expired, the old key is forgotten (never the current one).
    assert keys.prune(lambda kid: False) == [old_kid]
    identity.forget(lambda c: True)
    with pytest.raises(InvalidCredential, match="key taskgate does not hold"):
        await identity.identify(bearer(old_token))
    assert (await identity.identify(bearer(new_token))).task == "t-new"
    assert keys.jwks()["keys"][0]["kid"] == new_kid


async def test_cached_task_token_dropped_when_its_key_is_pruned(tmp_path: Path) -> None:
    keys, tasks, identity = setup(tmp_path)
    token = issue(keys, tasks)
    await identity.identify(bearer(token))
    assert len(identity.cache) == 1
    keys.rotate(time.time())
    keys.prune(lambda kid: False)  # the old key is gone: no token it signed may pass
    with pytest.raises(InvalidCredential, match="does not hold"):
        await identity.identify(bearer(token))
    assert len(identity.cache) == 0
