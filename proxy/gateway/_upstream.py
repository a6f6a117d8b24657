"""Trust for upstream TLS: the default store plus ``upstream.ca_file``, in one bundle.

mitmproxy (for proxied calls) and aiohttp (for JWKS and secret providers) both
read the same bundle, so a provider is trusted exactly when an upstream is.
"""

from __future__ import annotations

import os
import ssl

import aiohttp
import certifi

from proxy.config import Config

__all__ = ["client_session", "trust_bundle"]


def trust_bundle(config: Config) -> str:
    """Write (if needed) and return the CA bundle upstream TLS is verified against."""
    if config.upstream_ca_file is None:
        return certifi.where()
    os.makedirs(config.home, exist_ok=True)
    path = os.path.join(config.home, "upstream-trust.pem")
    with open(certifi.where(), "rb") as f:
        data = f.read()
    with open(config.upstream_ca_file, "rb") as f:
        data += b"\n" + f.read()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def client_session(config: Config, bundle: str) -> aiohttp.ClientSession:
    """An aiohttp session for the gateway's own upstream calls (JWKS, secret providers)."""
    ctx = ssl.create_default_context(cafile=bundle)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=100),
        timeout=aiohttp.ClientTimeout(total=10),
        trust_env=False,
    )
