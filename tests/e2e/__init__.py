"""Shared pieces of the end-to-end tests: curl, a TCP sink, refusal checks.

The gateway, upstreams and keys come from tests/support.py and conftest.py;
what is here is only what several e2e modules need on top.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support import Gateway

# Never let a proxy from the environment slip between curl and the gateway.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}


@dataclass
class CurlReply:
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str

    def json(self) -> Any:
        return orjson.loads(self.body)


def curl(gateway: Gateway, url: str, token: str | None, *args: str,
         timeout: float = 15) -> CurlReply:
    """curl through the gateway, as an agent would: ``-x`` with the token as password."""
    with tempfile.TemporaryDirectory() as tmp:
        head, body = Path(tmp, "head"), Path(tmp, "body")
        cmd = ["curl", "-sS", "--max-time", str(int(timeout)), "-x", gateway.proxy_url,
               "--cacert", str(gateway.ca), "-D", str(head), "-o", str(body),
               "-w", "%{http_code}"]
        if token is not None:
            cmd += ["--proxy-user", f"agent:{token}"]
        out = subprocess.run([*cmd, *args, url], capture_output=True, env=CLEAN_ENV,
                             timeout=timeout + 5)
        raw_head = head.read_text("latin-1") if head.exists() else ""
        data = body.read_bytes() if body.exists() else b""
    blocks = [b for b in raw_head.replace("\r\n", "\n").split("\n\n") if b.strip()]
    headers: dict[str, str] = {}
    if blocks:  # the last header block is the final response (after any CONNECT)
        for line in blocks[-1].split("\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    code = out.stdout.decode().strip()
    return CurlReply(int(code) if code.isdigit() else 0, headers, data,
                     out.stderr.decode(errors="replace"))


def assert_refusal(status: int, headers: Any, body: bytes, expected: int,
                   reason: str | None = None) -> dict[str, Any]:
    """A refusal: the status, a JSON body with error/reason/request_id, the id header."""
    assert status == expected, body
    data = orjson.loads(body)
    assert set(data) >= {"error", "reason", "request_id"}, data
    rid = headers.get("x-taskgate-request-id") or headers.get("X-Taskgate-Request-Id")
    assert rid and data["request_id"] == rid, (rid, data)
    err = data["error"]  # the shape LLM SDKs read: error.message has reason and id
    assert err["type"] == "taskgate_refusal" and err["code"] and err["request_id"] == rid, err
    assert data["reason"] in err["message"] and rid in err["message"], err
    if expected == 407:
        assert headers.get("proxy-authenticate") == 'Basic realm="taskgate"'
    if reason is not None:
        assert reason in data["reason"], data
    return data


def healthy(gateway: Gateway, url: str, token: str) -> None:
    """The gateway still answers: ready, and an allowed call still goes through."""
    assert httpx.get(f"{gateway.control_url}/readyz", timeout=5).status_code == 200
    with gateway.client(token) as c:
        assert c.get(url).status_code == 200
    assert gateway.proc is not None and gateway.proc.poll() is None


@dataclass
class TcpSink:
    """A TCP listener that records every connection and every byte it receives.

    The target for 'nothing reaches the upstream': unlike an HTTP server it
    also sees connections that never carry a valid request.
    """

    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(0.5)
            with conn, contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    self.received += chunk

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)


def audit_text(gateway: Gateway) -> str:
    return gateway.audit_path.read_text() if gateway.audit_path.exists() else ""


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
