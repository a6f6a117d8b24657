"""What a benchmark run is made of: a test CA, an issuer's key and token, the configs.

All generated fresh in a temporary folder at every run, so nothing depends on
the machine it runs on except Python and the venv.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import ssl
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import jwt
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["AUDIENCE", "ISSUER", "WORKLOAD", "Files", "machine_facts", "make_files",
           "taskgate_config"]

ISSUER = "https://issuer.bench.test"
AUDIENCE = "taskgate"
WORKLOAD = "spiffe://bench.test/agent/load"
KID = "bench-rsa"


@dataclass(frozen=True, slots=True)
class Files:
    """Paths written for one run, and the proxy credential the client presents."""

    root: Path
    upstream_ca: Path
    upstream_cert: Path
    upstream_key: Path
    jwks: Path
    proxy_authorization: str


def make_files(root: Path, token_ttl: float = 3600) -> Files:
    """A trustme CA with a loopback server cert, an RSA issuer key, its JWKS and a token."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    upstream_ca = root / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(upstream_ca))
    cert, key = root / "upstream-cert.pem", root / "upstream-key.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))

    signing = rsa.generate_private_key(65537, 2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key()))
    jwk.update(kid=KID, use="sig")
    jwks = root / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    token = jwt.encode({"sub": WORKLOAD, "iss": ISSUER, "aud": AUDIENCE, "iat": now,
                        "exp": now + int(token_ttl)}, signing, algorithm="RS256",
                       headers={"kid": KID})
    basic = base64.b64encode(f"bench:{token}".encode()).decode()
    return Files(root, upstream_ca, cert, key, jwks, f"Basic {basic}")


def taskgate_config(files: Files, proxy_port: int, control_port: int, http_port: int,
                    https_port: int, path_glob: str, methods: tuple[str, ...] = ("GET",)
                    ) -> dict[str, Any]:
    """A trusted issuer and one workload whose standing rules admit the bench upstream:
    every call goes through identity, rule matching and the audit log."""
    home = files.root / "taskgate-home"
    rule = {"methods": list(methods), "paths": [path_glob]}
    return {
        "version": 1,
        "listen": {"proxy": f"127.0.0.1:{proxy_port}", "control": f"127.0.0.1:{control_port}"},
        "home": str(home),
        "upstream": {"ca_file": str(files.upstream_ca)},
        "audit": {"path": str(home / "audit.jsonl")},
        "identity": {"issuers": [{"issuer": ISSUER, "audience": AUDIENCE,
                                  "jwks_file": str(files.jwks)}]},
        "workloads": {WORKLOAD: {"owner": "bench@taskgate.test", "standing": [
            {"id": "bench-http", "host": "127.0.0.1", "port": http_port, "scheme": "http",
             **rule},
            {"id": "bench-https", "host": "localhost", "allow_private": True, "port": https_port,
             "scheme": "https", **rule},
        ]}},
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tree_line(repo: Path) -> str:
    """This checkout and its commit (``+`` if it has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--",
                                "proxy", "addons"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return str(repo)
    return f"{repo} @ {head or '?'}{'+' if dirty else ''}"


def machine_facts(repo: Path) -> list[str]:
    """The facts a reader needs to compare two benchmark reports."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"machine:   {os.cpu_count()} cores ({usable} usable), {_cpu_model()}, "
        f"{platform.system()} {platform.release()}, load avg {load}",
        f"software:  Python {platform.python_version()}, mitmproxy {_version('mitmproxy')}, "
        f"aiohttp {_version('aiohttp')}, uvloop {_version('uvloop')}, {ssl.OPENSSL_VERSION}",
        f"taskgate:  {tree_line(repo)}",
    ]
