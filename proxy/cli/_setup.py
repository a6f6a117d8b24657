"""What an agent's environment needs to go through the gateway and trust it: the proxy
variables (``taskgate task create``) and the CA variables (``taskgate ca``).

Clients disagree on which spelling they read: curl ignores upper-case ``HTTP_PROXY``
for ``http://`` URLs, grpcio reads only lower-case ``https_proxy``; a client that
finds no variable it reads goes direct, unseen. So both spellings are printed, and
``NO_PROXY`` is set empty: an inherited one would let its hosts go around.
"""

from __future__ import annotations

import os
import shlex
import ssl
from pathlib import Path

import certifi

__all__ = ["BUNDLE_NAME", "CA_VARS", "combined_bundle", "export_block", "proxy_env"]

# Each CA variable and who reads it. All but NODE_EXTRA_CA_CERTS replace the client's
# trust store; NODE_EXTRA_CA_CERTS adds to Node's built-in roots.
CA_VARS: tuple[tuple[str, str], ...] = (
    ("SSL_CERT_FILE", "Python ssl (httpx, aiohttp, urllib, openai, anthropic), OpenSSL, Go"),
    ("REQUESTS_CA_BUNDLE", "requests"),
    ("CURL_CA_BUNDLE", "curl"),
    ("GIT_SSL_CAINFO", "git (GnuTLS on Debian reads no SSL_CERT_FILE)"),
    ("PIP_CERT", "pip"),
    ("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "grpcio"),
    ("AWS_CA_BUNDLE", "AWS SDKs and CLI"),
    ("NODE_EXTRA_CA_CERTS", "Node.js (added to its own roots)"),
)
BUNDLE_NAME = "taskgate-ca-bundle.pem"


def proxy_env(proxy_url: str) -> dict[str, str]:
    """Both spellings of every proxy variable, ``NO_PROXY`` empty (nothing goes around)."""
    env: dict[str, str] = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = proxy_url
    env["NO_PROXY"] = env["no_proxy"] = ""
    return env


def export_block(env: dict[str, str]) -> str:
    """``export NAME=value`` lines a shell can ``eval``, values quoted."""
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())


def _system_roots() -> Path:
    """The system's trust store file, or certifi's when the system has none."""
    cafile = ssl.get_default_verify_paths().cafile
    return Path(cafile) if cafile and os.path.isfile(cafile) else Path(certifi.where())


def combined_bundle(ca: Path) -> Path:
    """The system roots followed by taskgate's CA, written next to the CA (again on
    every call: the system's roots change with its updates)."""
    bundle = ca.parent / BUNDLE_NAME
    roots = _system_roots().read_bytes()
    tmp = bundle.with_suffix(".tmp")
    tmp.write_bytes(roots.rstrip(b"\n") + b"\n" + ca.read_bytes())
    os.replace(tmp, bundle)
    return bundle
