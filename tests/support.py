"""Test support: keys and tokens, loopback upstreams, and the real gateway as a process.

Nothing here stands in for taskgate itself: tests start ``python -m proxy run``
and talk to it over loopback with real clients.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import site
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

REPO = Path(__file__).resolve().parent.parent
ISSUER = "https://issuer.test"
AUDIENCE = "taskgate"
WORKLOAD = "spiffe://acme.test/agent/triage"


# Subprocesses run THIS checkout's code. `-S` keeps site's .pth files out: an
# editable install of another checkout (the venv is shared) would otherwise supply
# the optional modules this checkout lacks (addons.approve, proxy.control_*, ...),
# which the gateway imports when present. Site-packages come back via PYTHONPATH.
PYTHON = [sys.executable, "-S"]
PYTHONPATH = os.pathsep.join([str(REPO), *site.getsitepackages()])


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess running this checkout (see :data:`PYTHON`)."""
    return {**os.environ, "PYTHONPATH": PYTHONPATH, **extra}


def free_port() -> int:
    """A port nothing listened on a moment ago. Racy as a port to listen on (another
    process may take it before we bind), so a server of ours binds port 0 and reads
    the port back instead; for "nothing listens here" use :func:`dead_port`. Left
    for the one listener whose port a config must name before it starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HELD: list[socket.socket] = []  # the sockets behind dead_port(), open until the run ends
atexit.register(lambda: [s.close() for s in _HELD])


def dead_port() -> int:
    """A loopback port where nothing listens, and nothing can until the run ends.

    The port stays bound (by a socket that never listens: a connect is refused), so
    no other process, nor a gateway of ours binding port 0, can take it meanwhile.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return int(s.getsockname()[1])


class FakeClock:
    """Wall-clock time that moves only when a test moves it: the services that judge
    expiry take a ``clock=`` (TaskRegistry, Approvals, the secret broker), so a test
    passes one of these and :meth:`advance`s past a deadline instead of sleeping."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


# -- keys and tokens ----------------------------------------------------------
@dataclass
class Keys:
    """An issuer's signing keys and the JWKS file the gateway trusts."""

    rsa: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    ec: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(
        ec.SECP256R1()))
    other: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        rsa_jwk.update(kid="rsa1", use="sig")
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        ec_jwk.update(kid="ec1", use="sig")
        return {"keys": [rsa_jwk, ec_jwk]}

    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, sub: str = WORKLOAD, *, aud: str = AUDIENCE, iss: str = ISSUER,
              ttl: float = 600, kid: str | None = "rsa1", alg: str = "RS256",
              key: Any = None, nbf: float | None = None, **claims: Any) -> str:
        now = time.time()
        payload: dict[str, Any] = {"sub": sub, "aud": aud, "iss": iss, "iat": int(now),
                                   "exp": int(now + ttl), **claims}
        if nbf is not None:
            payload["nbf"] = int(nbf)
        headers = {"kid": kid} if kid is not None else {}
        if key is None:
            key = self.ec if alg.startswith("ES") else self.rsa
        return jwt.encode(payload, key, algorithm=alg, headers=headers)


def unsigned_token(payload: dict[str, Any], header: dict[str, Any]) -> str:
    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}."


def hs256_token(payload: dict[str, Any], header: dict[str, Any], secret: bytes) -> str:
    """A JWT HMAC-signed by hand: pyjwt refuses a PEM public key as an HMAC secret,
    which is exactly the algorithm-confusion token a gateway must refuse."""
    signing_input = unsigned_token(payload, {"typ": "JWT", **header, "alg": "HS256"})[:-1]
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def raw_signed_token(key: rsa.RSAPrivateKey, header: str, payload: str) -> str:
    """An RS256 JWT over header and payload JSON written by hand: duplicate members,
    strings where numbers belong, numbers no JSON encoder writes. Validly signed, so
    only the gateway's reading of the claims can refuse it."""

    def b64(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()

    signing_input = f"{b64(header)}.{b64(payload)}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def claims(sub: str = WORKLOAD, *, aud: str = AUDIENCE, iss: str = ISSUER,
           ttl: float = 600) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "aud": aud, "iss": iss, "iat": now, "exp": now + int(ttl)}


# -- upstreams ----------------------------------------------------------------
def bound_port(site: web.TCPSite) -> int:
    """The port a started aiohttp site listens on (it was asked for port 0)."""
    server = site._server  # aiohttp keeps the asyncio server private; no public accessor
    assert isinstance(server, asyncio.Server)
    return int(server.sockets[0].getsockname()[1])


class Upstream:
    """aiohttp upstream on loopback (HTTP and HTTPS), in its own thread and loop.

    It records every request it receives, so tests can assert what reached it.
    """

    def __init__(self, tls_ctx: Any = None) -> None:
        self.seen: list[dict[str, Any]] = []
        self.tls_ctx = tls_ctx
        self.http_port = 0  # bound on port 0 by start(), read back from the socket
        self.https_port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/sse", self.sse)
        app.router.add_route("*", "/slow", self.slow)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        info = {"method": request.method, "path": request.raw_path,
                "headers": dict(request.headers), "body_len": len(body),
                "scheme": request.scheme}
        self.seen.append(info)
        return web.json_response(info)

    async def slow(self, request: web.Request) -> web.Response:
        self.seen.append({"method": request.method, "path": request.raw_path,
                          "headers": dict(request.headers)})
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.json_response({"slow": True})

    async def sse(self, request: web.Request) -> web.StreamResponse:
        self.seen.append({"method": request.method, "path": request.raw_path,
                          "headers": dict(request.headers)})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = int(request.query.get("n", "3"))
        gap = float(request.query.get("gap", "0.5"))
        for i in range(n):
            await resp.write(f"data: event {i} at {time.time():.3f}\n\n".encode())
            await asyncio.sleep(gap)
        await resp.write_eof()
        return resp

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.app(), access_log=None)
        self._loop.run_until_complete(runner.setup())
        http = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(http.start())
        self.http_port = bound_port(http)
        if self.tls_ctx is not None:
            https = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.tls_ctx)
            self._loop.run_until_complete(https.start())
            self.https_port = bound_port(https)
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> Upstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the upstream did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# -- the gateway --------------------------------------------------------------
# The addresses in ``taskgate run``'s start-up banner (proxy/server.py), the bound ports.
BANNER = re.compile(r"^  proxy: +http://\S+:(\d+)\n  control plane: +http://\S+:(\d+)$",
                    re.MULTILINE)


def _port_of(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


class Gateway:
    """``python -m proxy run -c taskgate.yaml`` in a temp folder.

    Unless the config says where to listen, the gateway binds port 0 for both
    listeners and :meth:`wait_ready` reads the ports it got from its start-up
    banner: no port is picked here and then raced for. They are then written into
    the config file (see :meth:`_keep_ports`).
    """

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None
                 ) -> None:
        self.dir = workdir
        config = dict(config)
        self._any_ports = "listen" not in config
        config.setdefault("listen", {"proxy": "127.0.0.1:0", "control": "127.0.0.1:0"})
        self.proxy_port = _port_of(config["listen"].get("proxy", "127.0.0.1:8080"))
        self.control_port = _port_of(config["listen"].get("control", "127.0.0.1:8081"))
        self._banners = 0  # start-up banners read so far from the (appended) log
        self.config = config
        self.config_path = workdir / "taskgate.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.env = {**python_env(PYTHONUNBUFFERED="1"), **(env or {})}
        if env is None:  # the gateway makes its own admin token unless a test sets one
            self.env.pop("TASKGATE_ADMIN_TOKEN", None)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
                    "all_proxy", "NO_PROXY", "no_proxy"):
            self.env.pop(var, None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "gateway.log"

    @property
    def home(self) -> Path:
        return self.dir / self.config.get("home", ".taskgate")

    @property
    def ca(self) -> Path:
        return self.home / "ca" / "mitmproxy-ca-cert.pem"

    @property
    def audit_path(self) -> Path:
        """This gateway's log: ``audit.path``, named after ``replica_id`` when the config
        gives one (``audit-<id>.jsonl``, proxy/audit/_replicas.py; workers add ``-wN``)."""
        path = self.dir / self.config.get("audit", {}).get("path", ".taskgate/audit.jsonl")
        replica = self.config.get("replica_id")
        return path if replica is None else path.with_name(f"{path.stem}-{replica}{path.suffix}")

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def proxy_url_with(self, token: str) -> str:
        return f"http://agent:{token}@127.0.0.1:{self.proxy_port}"

    def command(self) -> list[str]:
        """The gateway's command line; a subclass wraps it (a namespace) or replaces it."""
        return [*PYTHON, "-m", "proxy", "run", "-c", str(self.config_path)]

    def start(self, wait: bool = True) -> Gateway:
        self._out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.dir, env=self.env,
                                     stdout=self._out, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def _keep_ports(self) -> None:
        """Write the ports the gateway got into its config: ``taskgate task -c`` finds the
        control plane there, and a restart listens where the first start did (as a real
        gateway does: proxy URLs handed out before it still reach it)."""
        self.config["listen"] = {"proxy": f"127.0.0.1:{self.proxy_port}",
                                 "control": f"127.0.0.1:{self.control_port}"}
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._any_ports = False

    def wait_ready(self, timeout: float = 45) -> None:
        """Wait for this start's banner (it names the bound ports), then for /readyz."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.output()}")
            banners = BANNER.findall(self.output())
            if len(banners) > self._banners:
                proxy, control = banners[self._banners]
                self._banners = len(banners)
                self.proxy_port, self.control_port = int(proxy), int(control)
                if self._any_ports:
                    self._keep_ports()
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"gateway printed no start-up banner:\n{self.output()}")
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.control_url}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"gateway not ready:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def records_for(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r["request_id"] == request_id]

    def client(self, token: str | None, **kw: Any) -> httpx.Client:
        proxy = self.proxy_url_with(token) if token else self.proxy_url
        return httpx.Client(proxy=proxy, verify=self.ssl_context(), timeout=10,
                            trust_env=False, **kw)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@contextlib.contextmanager
def running_gateway(workdir: Path, config: dict[str, Any], **kw: Any) -> Iterator[Gateway]:
    gw = Gateway(workdir, config, **kw).start()
    try:
        yield gw
    finally:
        gw.stop()
