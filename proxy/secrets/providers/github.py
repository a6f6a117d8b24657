"""GitHub App installation tokens, down-scoped per task and revoked when it ends.

1. An app JWT, RS256, ``iat`` 60 s in the past (clock drift), ``exp`` 9 min
   ahead (GitHub refuses more than 10), ``iss`` the app's id.
2. ``POST {api_url}/app/installations/{id}/access_tokens`` with the
   ``repositories`` and ``permissions`` the rule names, so a task's token can do
   no more than the task was granted.
3. ``DELETE {api_url}/installation/token``, authenticated with the token
   itself, when the task ends.

Docs: https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app
https://docs.github.com/en/rest/apps/apps#create-an-installation-access-token-for-an-app
https://docs.github.com/en/rest/apps/installations#revoke-an-installation-access-token
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from datetime import datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from proxy.identity import Caller
from proxy.policy import Rule
from proxy.secrets.spec import GitHubAppOptions
from proxy.secrets.value import Minted, SecretValue

from .base import Provider, field_of, read_text_file, request_json

__all__ = ["GitHubAppProvider", "app_jwt_claims"]

API_VERSION = "2022-11-28"
JWT_BACKDATE = 60
JWT_LIFETIME = 540


def app_jwt_claims(app_id: str, now: float) -> dict[str, Any]:
    return {"iat": int(now) - JWT_BACKDATE, "exp": int(now) + JWT_LIFETIME, "iss": app_id}


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


class GitHubAppProvider(Provider):
    revocable = True
    credential_kind = "github_installation_token"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._key: RSAPrivateKey | None = None

    @property
    def opts(self) -> GitHubAppOptions:
        assert isinstance(self.spec.options, GitHubAppOptions)
        return self.spec.options

    def headers(self, bearer: str) -> dict[str, str]:
        return {"Accept": "application/vnd.github+json", "Authorization": f"Bearer {bearer}",
                "X-GitHub-Api-Version": API_VERSION, "User-Agent": "taskgate"}

    def scope(self, caller: Caller, rule: Rule) -> tuple[str | None, Hashable]:
        perms = tuple(sorted((rule.permissions or {}).items()))
        return caller.task, (caller.workload, tuple(sorted(rule.repositories)), perms)

    async def _private_key(self) -> RSAPrivateKey:
        if self._key is None:
            bad = lambda: self.fail("misconfigured", "the app's private key cannot be read")  # noqa: E731
            pem = await read_text_file(self.opts.private_key_file, bad)
            try:
                key = load_pem_private_key(pem.encode(), password=None)
            except (ValueError, TypeError):
                raise bad() from None
            if not isinstance(key, RSAPrivateKey):
                raise self.fail("misconfigured", "the app's private key is not an RSA key")
            self._key = key
        return self._key

    async def fetch(self, task: str | None, rule: Rule) -> Minted:
        o = self.opts
        key = await self._private_key()
        claims = app_jwt_claims(o.app_id, self.clock())
        app_jwt = await asyncio.to_thread(jwt.encode, claims, key, algorithm="RS256")
        body: dict[str, Any] = {}
        if rule.repositories:
            body["repositories"] = list(rule.repositories)
        if rule.permissions:
            body["permissions"] = dict(rule.permissions)
        answer = await request_json(
            self, "POST", f"{o.api_url}/app/installations/{o.installation_id}/access_tokens",
            expect=(201,), headers=self.headers(app_jwt), json=body)
        token = field_of(self, answer, "token")
        expires_at = _parse_time(field_of(self, answer, "expires_at"))
        if not isinstance(token, str) or not token or expires_at is None:
            raise self.fail("bad_response", "no usable token and expires_at")
        return self.minted(token, ttl=expires_at - self.clock(), reported=True, task=task,
                           revoke=True)

    def handle(self, minted: Minted) -> SecretValue | None:
        return minted.value if minted.revoke else None  # revoked with itself

    def revoke_target(self) -> tuple[str, str]:
        return "DELETE", f"{self.opts.api_url}/installation/token"

    async def revoke(self, handle: SecretValue) -> None:
        # 401: the token is already invalid (expired or revoked), which is what we want.
        method, url = self.revoke_target()
        await request_json(self, method, url, expect=(204, 401),
                           headers=self.headers(handle.reveal()))
