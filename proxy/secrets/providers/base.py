"""What every provider shares: the interface the broker calls, and one HTTP helper.

Provider requests go through the gateway's own aiohttp session (the trust
bundle with ``upstream.ca_file``), never follow redirects (a redirect would
carry our credential elsewhere), read at most :data:`MAX_BODY` bytes, and turn
every failure into a :class:`~proxy.secrets.value.ProviderError` whose text is
fixed: nothing the provider sent back (which might quote our credential) and
no exception text reaches a log line or the agent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import aiohttp
import orjson

from proxy.identity import Caller
from proxy.policy import Rule
from proxy.secrets.spec import SecretSpec
from proxy.secrets.value import Minted, ProviderError, SecretValue

__all__ = ["MAX_BODY", "Clock", "Provider", "field_of", "read_text_file", "request_json"]

MAX_BODY = 256 * 1024
Clock = Callable[[], float]


class Provider:
    """Produces values for one secret. Subclasses override :meth:`fetch` (and revoke)."""

    revocable = False  # True if what it mints can and must be revoked at task end
    credential_kind = "value"  # what it mints, as records name it (vault_lease, …)

    def __init__(self, spec: SecretSpec, session: Any, clock: Clock) -> None:
        self.spec, self.session, self.clock = spec, session, clock

    @property
    def name(self) -> str:
        return self.spec.name

    def scope(self, caller: Caller, rule: Rule) -> tuple[str | None, Hashable]:
        """(task, key) a value is cached under; ``(None, ())``: shared by every caller.

        Minted tokens are keyed by workload too, so a task-less (standing) token
        of one workload never serves another.
        """
        return None, ()

    async def fetch(self, task: str | None, rule: Rule) -> Minted:  # pragma: no cover
        raise NotImplementedError

    def handle(self, minted: Minted) -> SecretValue | None:
        """What :meth:`revoke` needs to revoke ``minted`` (a lease id, the token itself);
        ``None``: there is nothing to revoke."""
        return None

    def revoke_target(self) -> tuple[str, str]:
        """(method, URL) of the revocation call: what its audit record names."""
        raise NotImplementedError

    async def revoke(self, handle: SecretValue) -> None:
        """Revoke the credential ``handle`` stands for at its issuer; raise
        :class:`ProviderError` on failure (retried by the broker)."""

    def fail(self, kind: str, detail: str | None = None) -> ProviderError:
        return ProviderError(self.name, kind, detail)

    def minted(self, value: str, *, ttl: float | None, reported: bool = False,
               task: str | None = None, revoke: Any = None) -> Minted:
        now = self.clock()
        return Minted(self.name, SecretValue(value), now,
                      None if ttl is None else now + ttl, reported, task, revoke)

    async def credential(self, env: str | None, path: str | None, what: str) -> str:
        """The provider's own credential (client secret, Vault token), from env or file."""
        if env is not None:
            value = os.environ.get(env, "").strip()
            if not value:
                raise self.fail("misconfigured", f"environment variable {env} is not set")
            return value
        assert path is not None
        return await read_text_file(path, lambda: self.fail("misconfigured",
                                                            f"the {what} file cannot be read"))


async def read_text_file(path: str, error: Callable[[], ProviderError]) -> str:
    """A small secret file, read off the event loop; whitespace at the ends dropped."""

    def read() -> str:
        with open(path, "rb") as f:
            data = f.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise ValueError("too large")
        return data.decode("utf-8").strip()

    try:
        text = await asyncio.to_thread(read)
    except (OSError, ValueError):
        raise error() from None
    if not text:
        raise error()
    return text


async def request_json(provider: Provider, method: str, url: str, *,
                       expect: tuple[int, ...], headers: Mapping[str, str],
                       json: Any = None, data: Mapping[str, str] | None = None,
                       on_status: Callable[[int, Any], str | None] | None = None) -> Any:
    """One provider call; the parsed JSON body (``None`` for an empty one).

    A status outside ``expect`` is ``rejected``; ``on_status`` may add a fixed,
    value-free detail read from the error body (an OAuth error code).
    """
    timeout = aiohttp.ClientTimeout(total=provider.spec.timeout_seconds)
    try:
        async with provider.session.request(
                method, url, headers=dict(headers), json=json, data=data,
                allow_redirects=False, timeout=timeout) as resp:
            status = resp.status
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_BODY:
                    raise provider.fail("bad_response", "the answer is too large")
    except TimeoutError:
        raise provider.fail("timeout") from None
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError):
        raise provider.fail("unreachable", "its TLS certificate is not trusted; see "
                                           "upstream.ca_file") from None
    except aiohttp.ClientError:
        raise provider.fail("unreachable") from None
    parsed: Any = None
    if body:
        try:
            parsed = orjson.loads(bytes(body))
        except orjson.JSONDecodeError:
            parsed = None
            if status in expect:
                raise provider.fail("bad_response", "the answer is not JSON") from None
    if status not in expect:
        detail = f"HTTP {status}"
        extra = on_status(status, parsed) if on_status is not None else None
        raise provider.fail("rejected", f"{detail}, {extra}" if extra else detail)
    return parsed


def field_of(provider: Provider, data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]…`` or ``bad_response`` naming the missing field."""
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            raise provider.fail("bad_response", f"no {'.'.join(path)!r} in the answer")
        data = data[key]
    return data
