"""Stand-ins for the services a secret provider calls, which cannot run here.

Each is an aiohttp app over HTTPS on loopback (the trustme test CA, which the
gateway trusts through ``upstream.ca_file``), follows the documented API it
stands in for — the doc page is cited in its docstring — and records what it
received and what it issued, so tests can assert both. Each runs in its own
thread and loop (``tests.support.Upstream``), so sync and async tests share them.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import jwt
from aiohttp import web

from tests.support import Upstream


def canary(kind: str) -> str:
    """A value no test writes anywhere: finding it means it leaked."""
    return f"canary{kind}{uuid.uuid4().hex}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FailingRevocations:
    """Revocations that fail on demand: :meth:`fail_revocations` makes the next ``n``
    fail, as ``"503"`` (the service answers 503 Service Unavailable, as a sealed
    Vault or an overloaded API does) or ``"reset"`` (the connection is reset before
    any answer), then they succeed again. Every attempt is kept in
    ``revocation_attempts``: (subject — the lease id or token —, outcome, when)."""

    UNAVAILABLE: dict[str, Any] = {"message": "Service Unavailable"}

    def _init_failures(self) -> None:
        self.revoke_failures = 0
        self.revoke_failure_mode = "503"
        self.revocation_attempts: list[tuple[str, str, float]] = []

    def fail_revocations(self, n: int, mode: str = "503") -> None:
        if mode not in ("503", "reset"):
            raise ValueError(mode)
        self.revoke_failure_mode, self.revoke_failures = mode, n

    def attempts_for(self, subject: str) -> list[str]:
        return [outcome for s, outcome, _ in self.revocation_attempts if s == subject]

    def _fault(self, request: web.Request, subject: str) -> web.Response | None:
        """The failure to give for this attempt, or ``None`` to go on."""
        if self.revoke_failures <= 0:
            self.revocation_attempts.append((subject, "ok", time.time()))
            return None
        self.revoke_failures -= 1
        mode = self.revoke_failure_mode
        self.revocation_attempts.append((subject, mode, time.time()))
        if mode == "503":
            return web.json_response(self.UNAVAILABLE, status=503)
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0: the close is a TCP RST, not a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return web.Response(status=503)  # never reaches the client


# -- OAuth 2.0 ----------------------------------------------------------------
@dataclass
class OAuthClient:
    secret: str
    expires_in: int | None = 3600
    delay: float = 0.0


class OAuthServer(Upstream):
    """An OAuth 2.0 authorization server's token endpoint, client credentials grant.

    RFC 6749 §4.4 (https://datatracker.ietf.org/doc/html/rfc6749#section-4.4):
    ``POST /token``, form-encoded ``grant_type=client_credentials`` and optional
    ``scope``; client authentication per §2.3.1 — HTTP Basic with the
    form-urlencoded id and secret, or ``client_id``/``client_secret`` in the body,
    never both. Success per §5.1 (``access_token``, ``token_type``,
    ``expires_in``, ``Cache-Control: no-store``); errors per §5.2 (400 with an
    ``error`` code, 401 + ``WWW-Authenticate`` for a failed Basic client).
    ``audience`` is the extra parameter Auth0 documents
    (https://auth0.com/docs/get-started/authentication-and-authorization-flow/client-credentials-flow/call-your-api-using-the-client-credentials-flow).
    """

    def __init__(self, tls_ctx: Any) -> None:
        super().__init__(tls_ctx)
        self.clients: dict[str, OAuthClient] = {}
        self.requests: list[dict[str, Any]] = []
        self.issued: list[tuple[str, str, float]] = []  # (client, token, when)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        return app

    def fetches(self, client_id: str) -> int:
        return sum(1 for r in self.requests if r["client_id"] == client_id)

    def tokens(self, client_id: str) -> list[str]:
        return [t for c, t, _ in self.issued if c == client_id]

    @staticmethod
    def _error(status: int, code: str, basic: bool = False) -> web.Response:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if basic:
            headers["WWW-Authenticate"] = 'Basic realm="oauth"'
        return web.json_response({"error": code}, status=status, headers=headers)

    async def token(self, request: web.Request) -> web.Response:
        if not request.content_type == "application/x-www-form-urlencoded":
            return self._error(400, "invalid_request")
        form = await request.post()
        auth = request.headers.get("Authorization", "")
        basic = auth.lower().startswith("basic ")
        if basic and "client_secret" in form:
            return self._error(400, "invalid_request")  # §2.3: one method only
        if basic:
            try:
                pair = base64.b64decode(auth[6:].strip(), validate=True).decode()
            except ValueError:
                return self._error(401, "invalid_client", basic=True)
            raw_id, _, raw_secret = pair.partition(":")
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        else:
            client_id, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        self.requests.append({"client_id": client_id, "method": "basic" if basic else "post",
                              "grant_type": form.get("grant_type"), "scope": form.get("scope"),
                              "audience": form.get("audience"), "at": time.time()})
        client = self.clients.get(client_id)
        if client is None or client.secret != secret:
            return self._error(401 if basic else 400, "invalid_client", basic=basic)
        if form.get("grant_type") != "client_credentials":
            return self._error(400, "unsupported_grant_type")
        if client.delay:
            await asyncio.sleep(client.delay)
        token = canary("oauth")
        self.issued.append((client_id, token, time.time()))
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if client.expires_in is not None:
            body["expires_in"] = client.expires_in
        if form.get("scope"):
            body["scope"] = form["scope"]
        return web.json_response(body, headers={"Cache-Control": "no-store",
                                                "Pragma": "no-cache"})


# -- GitHub -------------------------------------------------------------------
@dataclass
class GitHubToken:
    token: str
    expires_at: float
    repositories: list[str] | None
    permissions: dict[str, str]
    revoked: bool = False


class GitHubServer(FailingRevocations, Upstream):
    """GitHub's REST API for a GitHub App: installation tokens, their use and revocation.

    - App JWT (https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/generating-a-json-web-token-jwt-for-a-github-app):
      RS256, ``iat`` (60 s in the past is advised), ``exp`` no more than 10
      minutes ahead, ``iss`` the app's id (or client id).
    - ``POST /app/installations/{installation_id}/access_tokens``
      (https://docs.github.com/en/rest/apps/apps#create-an-installation-access-token-for-an-app):
      JSON body with optional ``repositories`` (names) and ``permissions``;
      201 with ``token``, ``expires_at`` (one hour), ``permissions``,
      ``repository_selection``.
    - ``DELETE /installation/token``
      (https://docs.github.com/en/rest/apps/installations#revoke-an-installation-access-token):
      authenticated with the installation token itself; 204 (or, on demand, 503 or a
      reset connection: :class:`FailingRevocations`).
    - ``GET /repos/{owner}/{repo}/issues``
      (https://docs.github.com/en/rest/issues/issues#list-repository-issues):
      an installation token used as ``Bearer``/``token``; 401 ``Bad credentials``
      for an unknown, expired or revoked token.
    Every request needs a ``User-Agent``
    (https://docs.github.com/en/rest/using-the-rest-api/getting-started-with-the-rest-api#user-agent).
    """

    def __init__(self, tls_ctx: Any, public_key_pem: bytes, app_id: str,
                 installation_id: str, owner: str = "acme") -> None:
        super().__init__(tls_ctx)
        self.public_key, self.app_id, self.installation_id = public_key_pem, app_id, installation_id
        self.owner = owner
        self.lifetime = 3600
        self.delay = 0.0
        self.tokens: list[GitHubToken] = []
        self.jwt_claims: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.revocations: list[str] = []
        self._init_failures()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/app/installations/{iid}/access_tokens", self.create_token)
        app.router.add_delete("/installation/token", self.revoke)
        app.router.add_get("/repos/{owner}/{repo}/issues", self.issues)
        return app

    @staticmethod
    def _bad(status: int, message: str) -> web.Response:
        return web.json_response({"message": message,
                                  "documentation_url": "https://docs.github.com/rest"},
                                 status=status)

    def _bearer(self, request: web.Request) -> str | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return value.strip() if scheme.lower() in ("bearer", "token") else None

    def _find(self, token: str | None) -> GitHubToken | None:
        for t in self.tokens:
            if t.token == token and not t.revoked and t.expires_at > time.time():
                return t
        return None

    async def create_token(self, request: web.Request) -> web.Response:
        if not request.headers.get("User-Agent"):
            return self._bad(403, "Request forbidden by administrative rules.")
        try:
            claims = jwt.decode(self._bearer(request) or "", self.public_key,
                                algorithms=["RS256"], options={"require": ["iat", "exp", "iss"],
                                                              "verify_iss": False})
        except jwt.InvalidTokenError:
            return self._bad(401, "A JSON web token could not be decoded")
        now = time.time()
        self.jwt_claims.append({**claims, "_received": now,
                                "_headers": {k: v for k, v in request.headers.items()
                                             if k.lower() in ("accept", "x-github-api-version")}})
        if str(claims["iss"]) != self.app_id or claims["exp"] > now + 600 or claims["iat"] > now:
            return self._bad(401, "'Expiration time' claim ('exp') is too far in the future")
        if request.match_info["iid"] != self.installation_id:
            return self._bad(404, "Not Found")
        body = await request.json() if request.can_read_body else {}
        if self.delay:
            await asyncio.sleep(self.delay)
        repos = body.get("repositories")
        perms = body.get("permissions") or {"issues": "write", "contents": "write",
                                            "metadata": "read"}
        self.requests.append({"repositories": repos, "permissions": body.get("permissions")})
        token = GitHubToken("ghs_" + canary("gh"), now + self.lifetime, repos, perms)
        self.tokens.append(token)
        answer: dict[str, Any] = {
            "token": token.token, "expires_at": _iso(token.expires_at),
            "permissions": perms, "repository_selection": "selected" if repos else "all"}
        if repos:
            answer["repositories"] = [{"name": r, "full_name": f"{self.owner}/{r}"}
                                      for r in repos]
        return web.json_response(answer, status=201)

    async def revoke(self, request: web.Request) -> web.Response:
        fault = self._fault(request, self._bearer(request) or "")
        if fault is not None:
            return fault
        token = self._find(self._bearer(request))
        if token is None:
            return self._bad(401, "Bad credentials")
        token.revoked = True
        self.revocations.append(token.token)
        return web.Response(status=204)

    async def issues(self, request: web.Request) -> web.Response:
        token = self._find(self._bearer(request))
        if token is None:
            return self._bad(401, "Bad credentials")
        repo = request.match_info["repo"]
        if token.repositories is not None and repo not in token.repositories:
            return self._bad(404, "Not Found")
        return web.json_response([{"number": 42, "title": "widgets break",
                                   "seen_authorization": request.headers.get("Authorization")}])


# -- Vault --------------------------------------------------------------------
@dataclass
class Lease:
    lease_id: str
    value: str
    revoked: bool = False


class VaultServer(FailingRevocations, Upstream):
    """HashiCorp Vault's HTTP API: KV v2 reads, database credentials, lease revocation.

    - ``GET /v1/{mount}/data/{path}``
      (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2#read-secret-version):
      ``{"data": {"data": {...}, "metadata": {...}}, "lease_id": "", "lease_duration": 0}``.
    - ``GET /v1/database/creds/{name}``
      (https://developer.hashicorp.com/vault/api-docs/secret/databases#generate-credentials):
      ``{"lease_id": "database/creds/{name}/…", "lease_duration": N, "renewable": true,
      "data": {"username": …, "password": …}}``.
    - ``PUT /v1/sys/leases/revoke`` with ``{"lease_id": …}``
      (https://developer.hashicorp.com/vault/api-docs/system/leases#revoke-lease): 204
      (or, on demand, 503 as when sealed, or a reset connection: :class:`FailingRevocations`).
    Authentication: ``X-Vault-Token`` (https://developer.hashicorp.com/vault/api-docs#authentication);
    errors are ``{"errors": [...]}`` with 403 for a bad token, 404 for no such path.
    """

    def __init__(self, tls_ctx: Any, lease_duration: int = 3600) -> None:
        super().__init__(tls_ctx)
        self.vault_token = canary("vaulttoken")
        self.kv: dict[str, dict[str, str]] = {}
        self.lease_duration = lease_duration
        self.leases: list[Lease] = []
        self.requests: list[dict[str, Any]] = []
        self.revocations: list[str] = []
        self._init_failures()

    UNAVAILABLE = {"errors": ["Vault is sealed"]}  # what a sealed Vault answers, with 503

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/database/creds/{name}", self.creds)
        app.router.add_put("/v1/sys/leases/revoke", self.revoke)
        app.router.add_get("/v1/{mount}/data/{path:.+}", self.kv_read)
        return app

    def _denied(self, request: web.Request) -> web.Response | None:
        self.requests.append({"path": request.path, "method": request.method,
                              "namespace": request.headers.get("X-Vault-Namespace")})
        if request.headers.get("X-Vault-Token") != self.vault_token:
            return web.json_response({"errors": ["permission denied"]}, status=403)
        return None

    async def kv_read(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        key = f"{request.match_info['mount']}/{request.match_info['path']}"
        if key not in self.kv:
            return web.json_response({"errors": []}, status=404)
        return web.json_response({
            "request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False,
            "lease_duration": 0,
            "data": {"data": self.kv[key],
                     "metadata": {"created_time": _iso(time.time()), "custom_metadata": None,
                                  "deletion_time": "", "destroyed": False, "version": 1}},
            "wrap_info": None, "warnings": None, "auth": None})

    async def creds(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        name = request.match_info["name"]
        lease = Lease(f"database/creds/{name}/{uuid.uuid4().hex[:24]}", canary("vaultdb"))
        self.leases.append(lease)
        return web.json_response({
            "request_id": str(uuid.uuid4()), "lease_id": lease.lease_id, "renewable": True,
            "lease_duration": self.lease_duration,
            "data": {"username": f"v-token-{name}-{uuid.uuid4().hex[:8]}",
                     "password": lease.value},
            "wrap_info": None, "warnings": None, "auth": None})

    async def revoke(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        body = await request.json()
        lease_id = body.get("lease_id") if isinstance(body, dict) else None
        fault = self._fault(request, str(lease_id))
        if fault is not None:
            return fault
        if not isinstance(lease_id, str) or not lease_id:
            return web.json_response({"errors": ["missing lease ID"]}, status=400)
        for lease in self.leases:
            if lease.lease_id == lease_id:
                lease.revoked = True
        self.revocations.append(lease_id)
        return web.Response(status=204)


# -- an upstream API that echoes what it received ------------------------------
class EchoApi(Upstream):
    """An upstream that echoes the credential it received, every way a real one might.

    ``/{prefix}/{mode}`` where mode is ``echo`` (JSON of the request),
    ``header`` (in response headers and a redirect ``Location``), ``b64``
    (base64 of the credential and of the bare token), ``sse`` (server-sent
    events with the credential split across writes), ``large`` (a body over the
    streaming threshold, with ``Content-Length``), ``gzip`` (gzip-encoded,
    whatever the client accepts), ``redirect`` (302 to ``?to=``).
    """

    def __init__(self, tls_ctx: Any) -> None:
        super().__init__(tls_ctx)
        self.seen: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{prefix}/{mode}", self.handle)
        app.router.add_route("*", "/{prefix}/{mode}/{rest:.*}", self.handle)
        return app

    @staticmethod
    def _token(auth: str) -> str:
        return auth.partition(" ")[2] if " " in auth else auth

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        info = {"path": request.path, "query": dict(request.query), "scheme": request.scheme,
                "query_string": request.query_string, "headers": dict(request.headers),
                "authorization": request.headers.getall("Authorization", []),
                "at": time.time()}
        self.seen.append(info)
        mode = request.match_info["mode"]
        credential = auth or request.query.get("api_key", "")
        if mode == "header":
            return web.Response(status=302, text="moved", headers={
                "X-Echo": credential, "Location": f"/landing?token={self._token(credential)}"})
        if mode == "b64":
            token = self._token(credential)
            return web.json_response({
                "auth_b64": base64.b64encode(credential.encode()).decode(),
                "token_b64": base64.b64encode(token.encode()).decode(),
                "token_b64url": base64.urlsafe_b64encode(b"xy" + token.encode()).decode()})
        if mode == "sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            text = f"data: {credential}\n\n".encode()
            cut = [0, 9, len(text) // 2, len(text) - 6, len(text)]
            for a, b in zip(cut, cut[1:], strict=False):
                await resp.write(text[a:b])
                await asyncio.sleep(0.15)
            await resp.write(b"data: done\n\n")
            await resp.write_eof()
            return resp
        if mode == "large":
            body = b"x" * 3000 + credential.encode() + b"y" * 3000
            return web.Response(body=body, content_type="application/octet-stream")
        if mode == "gzip":
            body = gzip.compress(f'{{"echo": "{credential}"}}'.encode())
            return web.Response(body=body, headers={"Content-Encoding": "gzip",
                                                    "Content-Type": "application/json"})
        if mode == "redirect":
            return web.Response(status=302, headers={"Location": request.query["to"]})
        return web.json_response(info)


# -- fixtures' helpers ----------------------------------------------------------
def server_tls(ca: Any) -> Any:
    """A server TLS context for localhost / 127.0.0.1 signed by the test CA."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(ctx)
    return ctx


def rsa_key_pem() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) of a fresh GitHub App key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(65537, 2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def spellings(value: str) -> set[bytes]:
    """How a leaked value could be written: plain, and base64 at any alignment.

    Written independently of the gateway's redactor, on purpose.
    """
    raw = value.encode()
    out = {raw}
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + raw)
        core = enc[(8 * pad + 5) // 6:(8 * (pad + len(raw))) // 6]
        out.add(core[1:-1])
        out.add(core[1:-1].replace(b"+", b"-").replace(b"/", b"_"))
    return out
