"""SSRF by name against the real gateway: a name that resolves to a private address is
reached only by a rule that opts in; the address judged is the one connected to and
recorded (``upstream_ip``); a task opts in only within its ceiling.

Names: the test cannot change DNS, so it uses ``localhost`` (the system resolver says
127.0.0.1, where the test upstream listens). Wildcards, every deny-set range, the
IPv6 forms and public+private answers are judged by the same core with an injected
resolver in tests/unit/gateway/test_egress.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import base_config
from tests.e2e import assert_refusal
from tests.support import WORKLOAD, Gateway, Keys, Upstream, free_port
from tests.tasks_support import admin
from tests.wire import Tunnel, h2_request, request_bytes, send

OPT_IN = "allow_private: true"


class KeepAlive(ThreadingHTTPServer):
    """A plain HTTP/1.1 upstream that keeps connections open and notes each peer."""

    daemon_threads = True

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's spelling
                outer.peers.append(self.client_address)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def keepalive() -> Iterator[KeepAlive]:
    srv = KeepAlive()
    yield srv
    srv.shutdown()
    srv.server_close()


def ssrf_config(shared_files: dict[str, Path], up: Upstream, control_port: int,
                keepalive_port: int) -> dict[str, Any]:
    cfg = base_config(shared_files, up)
    wl = cfg["workloads"][WORKLOAD]
    h, s = up.http_port, up.https_port
    wl["standing"] = [
        # a name, no opt-in: refused though the rule names the host
        {"id": "name-tls", "host": "localhost", "port": s, "methods": ["GET"],
         "paths": ["/closed/**"]},
        {"id": "name-http", "host": "localhost", "port": h, "scheme": "http",
         "methods": ["GET"], "paths": ["/closed/**"]},
        # the same name, opted in
        {"id": "name-tls-private", "host": "localhost", "port": s, "allow_private": True,
         "methods": ["GET"], "paths": ["/open/**"]},
        {"id": "name-http-private", "host": "localhost", "port": h, "scheme": "http",
         "allow_private": True, "methods": ["GET"], "paths": ["/open/**"]},
        # an address as the host: the opt-in is the rule's own host
        {"id": "literal", "host": "127.0.0.1", "port": h, "scheme": "http",
         "methods": ["GET"], "paths": ["/open/**"]},
        # never: the gateway's own control plane, the unspecified address
        {"id": "own-control", "host": "127.0.0.1", "port": control_port, "scheme": "http",
         "methods": ["GET"]},
        {"id": "unspecified", "host": "0.0.0.0", "port": h, "scheme": "http",
         "allow_private": True, "methods": ["GET"]},
        {"id": "keepalive", "host": "localhost", "port": keepalive_port, "scheme": "http",
         "allow_private": True, "methods": ["GET"]},
    ]
    wl["ceiling"] = [
        {"id": "c-name", "host": "localhost", "port": s, "methods": ["GET"],
         "paths": ["/open/**", "/secret/**"], "secret": "demo-key"},
        {"id": "c-name-private", "host": "localhost", "port": h, "scheme": "http",
         "allow_private": True, "methods": ["GET"], "paths": ["/open/**"]},
        {"id": "c-clear", "host": "127.0.0.1", "port": h, "scheme": "http",
         "methods": ["GET"], "paths": ["/clear/**"], "secret": "demo-key"},
    ]
    cfg["secrets"] = {"demo-key": {"provider": "env", "var": "TASKGATE_SSRF_SECRET",
                                   "inject": {"header": "Authorization",
                                              "value": "Bearer {token}"}}}
    return cfg


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
       upstream: Upstream, keepalive: KeepAlive) -> Iterator[Gateway]:
    # A rule names the control plane's port, so it is chosen before the gateway starts
    # (the one listener not on port 0: if another process takes it first, the start
    # fails loudly with "control plane cannot listen on").
    control = free_port()
    cfg = ssrf_config(shared_files, upstream, control, keepalive.server_address[1])
    cfg["listen"] = {"proxy": "127.0.0.1:0", "control": f"127.0.0.1:{control}"}
    g = Gateway(tmp_path_factory.mktemp("gw-ssrf"), cfg,
                env={"TASKGATE_SSRF_SECRET": "sk-ssrf-canary-0042"})
    g.env.pop("TASKGATE_ADMIN_TOKEN", None)
    g.start()
    yield g
    g.stop()


def seen_paths(up: Upstream) -> list[str]:
    return [s["path"] for s in up.seen]


# -- a name without the opt-in: refused, says how to opt in ------------------------------
@pytest.mark.parametrize("form", ["httpx-https", "httpx-http", "raw-tunnel", "h2",
                                  "raw-plain"])
def test_a_private_name_without_opt_in_is_refused(gw: Gateway, upstream: Upstream,
                                                  keys: Keys, form: str) -> None:
    token = keys.token()
    path = f"/closed/{form}"
    if form.startswith("httpx"):
        scheme, port = ("https", upstream.https_port) if form.endswith("s") else (
            "http", upstream.http_port)
        with gw.client(token) as c:
            r = c.get(f"{scheme}://localhost:{port}{path}")
        status, headers, body = r.status_code, r.headers, r.content
    elif form == "raw-plain":
        target = f"localhost:{upstream.http_port}"
        rep = send(gw.proxy_port, request_bytes("GET", f"http://{target}{path}", target,
                                                token))
        status, headers, body = rep.status, rep.headers, rep.body
    else:
        target = f"localhost:{upstream.https_port}"
        with Tunnel(gw.proxy_port, target, token) as t:
            assert t.connect.status == 200
            if form == "h2":
                rep = h2_request(t, gw.ca, "localhost", [
                    (":method", "GET"), (":scheme", "https"), (":authority", target),
                    (":path", path)])
            else:
                t.start_tls(gw.ca, "localhost")
                rep = t.request(request_bytes("GET", path, target, None))
        status, headers, body = rep.status, rep.headers, rep.body
    data = assert_refusal(status, headers, body, 403, "a loopback address")
    assert OPT_IN in data["reason"] and "'localhost'" in data["reason"]
    assert "127.0.0.1" in data["reason"]
    assert path not in seen_paths(upstream)
    (rec,) = gw.records_for(data["request_id"])
    assert rec["decision"] == "deny" and rec["upstream_ip"] is None
    assert rec["rule"] in ("name-tls", "name-http")


# -- opted in: reached, pinned, recorded -------------------------------------------------
@pytest.mark.parametrize(("url", "rule"), [
    ("https://localhost:{s}/open/a", "name-tls-private"),
    ("http://localhost:{h}/open/b", "name-http-private"),
    ("http://127.0.0.1:{h}/open/c", "literal"),
    ("http://127.1:{h}/open/d", "literal"),
    ("http://0x7f.0.0.1:{h}/open/e", "literal"),
])
def test_opted_in_is_reached_and_the_address_recorded(gw: Gateway, upstream: Upstream,
                                                      keys: Keys, url: str,
                                                      rule: str) -> None:
    url = url.format(s=upstream.https_port, h=upstream.http_port)
    with gw.client(keys.token()) as c:
        r = c.get(url)
    assert r.status_code == 200, r.text
    (rec,) = gw.records_for(r.headers["x-taskgate-request-id"])
    assert rec["decision"] == "allow" and rec["rule"] == rule
    assert rec["upstream_ip"] == "127.0.0.1"


def test_many_calls_on_one_tunnel_stay_pinned(gw: Gateway, upstream: Upstream,
                                              keys: Keys) -> None:
    """Later calls on the agent connection reuse the pinned address (and its
    upstream connection); a closed rule on the same tunnel is still refused."""
    target = f"localhost:{upstream.https_port}"
    with Tunnel(gw.proxy_port, target, keys.token()) as t:
        t.start_tls(gw.ca, "localhost")
        for i in range(3):
            rep = t.request(request_bytes("GET", f"/open/pin{i}", target, None))
            assert rep.status == 200, rep.body
            assert gw.records_for(rep.request_id)[0]["upstream_ip"] == "127.0.0.1"
        rep = t.request(request_bytes("GET", "/closed/pin", target, None))
        assert_refusal(rep.status, rep.headers, rep.body, 403, OPT_IN)
        rep = t.request(request_bytes("GET", "/open/pin-after", target, None))
        assert rep.status == 200


def test_a_pinned_upstream_connection_is_reused(gw: Gateway, keepalive: KeepAlive,
                                                keys: Keys) -> None:
    """Pinning must not cost connection reuse: calls on one agent connection to one
    host:port share one upstream connection (to the pinned address)."""
    keepalive.peers.clear()
    with gw.client(keys.token()) as c:
        for i in range(4):
            r = c.get(f"http://localhost:{keepalive.server_address[1]}/k{i}")
            assert r.status_code == 200, r.text
            assert gw.records_for(r.headers["x-taskgate-request-id"])[0]["upstream_ip"] \
                == "127.0.0.1"
    assert len(keepalive.peers) == 4 and len(set(keepalive.peers)) == 1, keepalive.peers


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1:{c}/healthz", "the gateway itself"),
    ("http://0.0.0.0:{h}/x", "no rule can reach"),
])
def test_never_even_with_the_opt_in(gw: Gateway, upstream: Upstream, keys: Keys,
                                    url: str, says: str) -> None:
    url = url.format(c=gw.control_port, h=upstream.http_port)
    with gw.client(keys.token()) as c:
        r = c.get(url)
    assert_refusal(r.status_code, r.headers, r.content, 403, says)


# -- tasks: the opt-in and cleartext injection only within the ceiling ------------------
def post(gw: Gateway, rule: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.control_url}/v1/tasks", headers=admin(gw), timeout=10,
                      json={"workload": WORKLOAD, "ttl_seconds": 300, "rules": [rule]})


@pytest.mark.parametrize(("rule", "status", "says"), [
    # allow_private beyond the ceiling
    ({"host": "localhost", "port": "{s}", "allow_private": True, "paths": ["/open/**"]},
     422, OPT_IN),
    ({"host": "localhost", "port": "{h}", "scheme": "http", "allow_private": True,
      "paths": ["/open/**"]}, 201, None),
    ({"host": "localhost", "port": "{s}", "paths": ["/open/**"]}, 201, None),
    # cleartext injection beyond the ceiling
    ({"host": "localhost", "port": "{s}", "scheme": "http", "secret": "demo-key",
      "paths": ["/secret/**"]}, 422, "cleartext"),
    ({"host": "localhost", "port": "{s}", "scheme": "http", "paths": ["/open/**"]},
     201, None),
    ({"host": "localhost", "port": "{s}", "scheme": "https", "secret": "demo-key",
      "paths": ["/secret/**"]}, 201, None),
    ({"host": "127.0.0.1", "port": "{h}", "scheme": "http", "secret": "demo-key",
      "paths": ["/clear/**"]}, 201, None),
])
def test_task_opt_ins_are_bounded_by_the_ceiling(gw: Gateway, upstream: Upstream,
                                                 rule: dict[str, Any], status: int,
                                                 says: str | None) -> None:
    rule = {"id": "t-rule", "methods": ["GET"], **rule,
            "port": int(rule["port"].format(s=upstream.https_port, h=upstream.http_port))}
    r = post(gw, rule)
    assert r.status_code == status, r.text
    if status == 422:
        body = r.json()
        assert body["error"] == "beyond_ceiling" and body["rule"] == "t-rule"
        assert says in body["reason"] and "'t-rule'" in body["reason"]


def task_token(gw: Gateway, rule: dict[str, Any]) -> str:
    r = post(gw, rule)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_a_task_without_the_opt_in_is_refused_at_call_time(gw: Gateway,
                                                           upstream: Upstream) -> None:
    token = task_token(gw, {"id": "t-name", "host": "localhost", "port": upstream.https_port,
                            "methods": ["GET"], "paths": ["/open/**"]})
    with gw.client(token) as c:
        r = c.get(f"https://localhost:{upstream.https_port}/open/task-closed")
    assert_refusal(r.status_code, r.headers, r.content, 403, OPT_IN)


def test_a_task_with_the_ceilings_opt_in_is_reached(gw: Gateway, upstream: Upstream) -> None:
    token = task_token(gw, {"id": "t-priv", "host": "localhost", "port": upstream.http_port,
                            "scheme": "http", "allow_private": True, "methods": ["GET"],
                            "paths": ["/open/**"]})
    with gw.client(token) as c:
        r = c.get(f"http://localhost:{upstream.http_port}/open/task-open")
    assert r.status_code == 200, r.text
    (rec,) = gw.records_for(r.headers["x-taskgate-request-id"])
    assert rec["upstream_ip"] == "127.0.0.1" and rec["rule"] == "t-priv"


def test_cleartext_injection_the_ceiling_allows(gw: Gateway, upstream: Upstream) -> None:
    token = task_token(gw, {"id": "t-clear", "host": "127.0.0.1", "port": upstream.http_port,
                            "scheme": "http", "secret": "demo-key", "methods": ["GET"],
                            "paths": ["/clear/**"]})
    with gw.client(token) as c:
        r = c.get(f"http://127.0.0.1:{upstream.http_port}/clear/x")
    assert r.status_code == 200, r.text
    (seen,) = [s for s in upstream.seen if s["path"] == "/clear/x"]
    assert seen["headers"].get("Authorization") == "Bearer sk-ssrf-canary-0042"
