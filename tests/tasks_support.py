"""Helpers for the task-grant tests: the control plane, task rules, raw HTTPS tunnels."""

from __future__ import annotations

import base64
import http.client
import json
from typing import Any

import httpx

from tests.support import WORKLOAD, Gateway, Upstream


def admin_token(gw: Gateway) -> str:
    return (gw.home / "admin-token").read_text().strip()


def admin(gw: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_token(gw)}"}


def http_rule(up: Upstream, **kw: Any) -> dict[str, Any]:
    """A task rule within the 'up-http' ceiling rule."""
    return {"id": "plain", "host": "127.0.0.1", "port": up.http_port, "scheme": "http",
            "methods": ["GET"], "paths": ["/allowed/**", "/slow"], **kw}


def https_rule(up: Upstream, **kw: Any) -> dict[str, Any]:
    """A task rule within the 'up-https' ceiling rule."""
    return {"id": "tls", "host": "localhost", "allow_private": True,
            "port": up.https_port, "methods": ["GET"],
            "paths": ["/allowed/**"], **kw}


def post_task(gw: Gateway, rules: list[dict[str, Any]] | None = None, *, up: Upstream,
              **body: Any) -> httpx.Response:
    payload: dict[str, Any] = {"workload": WORKLOAD, "ttl_seconds": 300,
                               "rules": rules if rules is not None else [http_rule(up),
                                                                         https_rule(up)]}
    payload.update(body)
    return httpx.post(f"{gw.control_url}/v1/tasks", json=payload, headers=admin(gw),
                      timeout=10)


def create_task(gw: Gateway, up: Upstream, rules: list[dict[str, Any]] | None = None,
                **body: Any) -> dict[str, Any]:
    r = post_task(gw, rules, up=up, **body)
    assert r.status_code == 201, r.text
    return r.json()


def show(gw: Gateway, task_id: str) -> dict[str, Any]:
    r = httpx.get(f"{gw.control_url}/v1/tasks/{task_id}", headers=admin(gw), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def revoke(gw: Gateway, task_id: str) -> dict[str, Any]:
    r = httpx.delete(f"{gw.control_url}/v1/tasks/{task_id}", headers=admin(gw), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def client(gw: Gateway, task: dict[str, Any], **kw: Any) -> httpx.Client:
    """An httpx client using the task's proxy_url exactly as the control plane gave it."""
    return httpx.Client(proxy=task["proxy_url"], verify=gw.ssl_context(), timeout=10,
                        trust_env=False, **kw)


class Tunnel:
    """One CONNECT tunnel with TLS inside (http.client), kept open across requests."""

    def __init__(self, gw: Gateway, token: str, host: str, port: int) -> None:
        cred = base64.b64encode(f"agent:{token}".encode()).decode()
        self.conn = http.client.HTTPSConnection("127.0.0.1", gw.proxy_port, timeout=10,
                                                context=gw.ssl_context())
        self.conn.set_tunnel(host, port, headers={"Proxy-Authorization": f"Basic {cred}"})
        self.conn.connect()
        self.sock = self.conn.sock

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        body = resp.read()
        assert self.conn.sock is self.sock, "the tunnel was reopened"
        try:
            data = json.loads(body)
        except ValueError:
            data = {"raw": body.decode(errors="replace")}
        return resp.status, data

    def close(self) -> None:
        self.conn.close()
