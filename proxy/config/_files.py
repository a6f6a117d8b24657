"""The files a config names, loaded and checked the way the running gateway loads them.

``check-config`` and ``run`` read the config through :func:`proxy.config._model.load_config`,
which calls these: a file that would make the gateway fail later (a JWKS that is not
one, a CA file with no certificate, an empty HMAC key, a GitHub App key that is not an
RSA private key) is a config error naming the key and line, never a traceback at start
or at the first call. Each check returns what is wrong (``None`` when nothing is); a
message never quotes the file's content (it may be a secret).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from proxy.identity import JwksKeys

__all__ = ["FILE_CHECKS", "check_ca_file", "check_hmac_key_file", "check_jwks_file",
           "check_rsa_private_key_file", "check_secret_file"]

MAX_FILE_BYTES = 1 << 20  # a key, a JWKS or a CA bundle is far smaller


def _read(path: str) -> bytes | str:
    """The file's bytes, or what stops them being read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError:
        return f"{path!r} is a directory, not a file"
    except OSError as e:
        return f"{path!r} cannot be read: {e.strerror}"
    if len(data) > MAX_FILE_BYTES:
        return f"{path!r} is larger than {MAX_FILE_BYTES} bytes"
    return data


def check_jwks_file(path: str) -> str | None:
    """A JSON Web Key Set with at least one signing key the gateway can use."""
    data = _read(path)
    if isinstance(data, str):
        return data
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return f"{path!r} is not JSON; expected a JWKS ({{\"keys\": [...]}})"
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return f"{path!r} is not a JWKS: expected an object with a 'keys' list"
    quiet = logging.getLogger(JwksKeys.__module__)
    was, quiet.disabled = quiet.disabled, True  # the verdict below says it once
    try:
        keys = JwksKeys(source=path, initial=doc)
    except (ValueError, TypeError) as e:
        return f"{path!r} is not a usable JWKS: {e}"
    finally:
        quiet.disabled = was
    if doc["keys"] and not (keys._keys or keys._unnamed):  # noqa: SLF001 - what lookup() searches
        return (f"{path!r} has no signing key the gateway can use (RSA, EC or OKP public "
                "keys with use 'sig')")
    return None


def check_ca_file(path: str) -> str | None:
    """PEM certificates an SSL context accepts as trust anchors."""
    data = _read(path)
    if isinstance(data, str):
        return data
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError, OSError):
        return f"{path!r} holds no PEM certificate; give a CA bundle (-----BEGIN CERTIFICATE-----)"
    if not ctx.get_ca_certs():
        return f"{path!r} holds no CA certificate"
    return None


def check_hmac_key_file(path: str) -> str | None:
    """A non-empty key (whitespace at the ends is dropped, as the audit log does)."""
    data = _read(path)
    if isinstance(data, str):
        return data
    if not data.strip():
        return f"{path!r} is empty; put the audit HMAC key in it (e.g. 32 random bytes)"
    return None


def check_secret_file(path: str) -> str | None:
    """A secret read from a file at call time: readable, UTF-8, not empty."""
    data = _read(path)
    if isinstance(data, str):
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"{path!r} is not UTF-8 text"
    if not text.strip():
        return f"{path!r} is empty"
    return None


def check_rsa_private_key_file(path: str) -> str | None:
    """A PEM RSA private key without a password (a GitHub App's key)."""
    problem = check_secret_file(path)
    if problem is not None:
        return problem
    data = _read(path)
    assert isinstance(data, bytes)
    try:
        key = load_pem_private_key(data.strip(), password=None)
    except (ValueError, TypeError):
        return f"{path!r} is not a PEM private key without a password"
    if not isinstance(key, RSAPrivateKey):
        return f"{path!r} is not an RSA private key (GitHub App keys are RSA)"
    return None


# secret provider → its options that name a file → the check of that file
FILE_CHECKS: dict[str, dict[str, Callable[[str], str | None]]] = {
    "file": {"path": check_secret_file},
    "oauth2_client_credentials": {"client_secret_file": check_secret_file},
    "github_app": {"private_key_file": check_rsa_private_key_file},
    "vault": {"token_file": check_secret_file},  # its `path` is Vault's, not a file
}
