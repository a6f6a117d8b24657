"""OAuth 2.0 client credentials (RFC 6749 §4.4) against any token endpoint.

Client authentication is ``client_secret_basic`` (§2.3.1: id and secret
form-encoded, then base64 in ``Authorization: Basic``; the default, since every
server must support it) or ``client_secret_post`` (both in the form body).
``scope`` and ``audience`` (the extension Auth0 and others read) are sent when
configured. A token is cached per secret, or per task with ``per_task: true``;
one without ``expires_in`` lives ``default_ttl_seconds``, never forever.
"""

from __future__ import annotations

import base64
from collections.abc import Hashable
from typing import Any
from urllib.parse import quote_plus

from proxy.identity import Caller
from proxy.policy import Rule
from proxy.secrets.spec import OAuth2Options
from proxy.secrets.value import Minted

from .base import Provider, field_of, request_json

__all__ = ["OAuth2Provider"]

# RFC 6749 §5.2: the only error codes worth repeating (a closed, value-free list).
ERROR_CODES = frozenset({"invalid_request", "invalid_client", "invalid_grant",
                         "unauthorized_client", "unsupported_grant_type", "invalid_scope"})


def _error_code(status: int, body: Any) -> str | None:
    code = body.get("error") if isinstance(body, dict) else None
    return code if code in ERROR_CODES else None


class OAuth2Provider(Provider):
    @property
    def opts(self) -> OAuth2Options:
        assert isinstance(self.spec.options, OAuth2Options)
        return self.spec.options

    def scope(self, caller: Caller, rule: Rule) -> tuple[str | None, Hashable]:
        if self.opts.per_task:
            return caller.task, caller.workload
        return None, ()

    async def fetch(self, task: str | None, rule: Rule) -> Minted:
        o = self.opts
        secret = await self.credential(o.client_secret_env, o.client_secret_file,
                                       "client secret")
        form = {"grant_type": "client_credentials"}
        if o.scope:
            form["scope"] = o.scope
        if o.audience:
            form["audience"] = o.audience
        headers = {"Accept": "application/json"}
        if o.auth_method == "client_secret_basic":
            pair = f"{quote_plus(o.client_id)}:{quote_plus(secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"], form["client_secret"] = o.client_id, secret
        body = await request_json(self, "POST", o.token_url, expect=(200,), headers=headers,
                                  data=form, on_status=_error_code)
        token = field_of(self, body, "access_token")
        if not isinstance(token, str) or not token:
            raise self.fail("bad_response", "access_token is not a string")
        expires_in = body.get("expires_in")
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
                or expires_in <= 0:
            return self.minted(token, ttl=self.spec.default_ttl_seconds, task=task)
        return self.minted(token, ttl=float(expires_in), reported=True, task=task)
