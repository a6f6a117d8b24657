"""Transparent mode against the real gateway, with agents in their own network namespaces.

The module builds the deployments deploy/transparent/ describes, applying its rules as
its README says:

* a network namespace joined to the root namespace by veth pairs, the gateway in the
  root namespace with ``listen.transparent``; deploy/transparent/netns.nft on one link
  (IPv4 and IPv6), netns.iptables.sh (iptables-legacy) on the other;
* a pod: a second namespace with the gateway inside as its sidecar (root, the
  gateway's uid) and deploy/transparent/pod.nft loaded there; the agent another user.

The agents (curl, python) run with no proxy variables and call an upstream on a
root-side address: their calls are redirected, identified by source address, judged,
audited; everything else is refused, and nothing reaches the upstream from an agent
itself. Where transparent mode meets the rest of issue 14: a task bound to the agent's
address (its grants, its budget, its token refused on the proxy listener elsewhere),
report mode, and a reload of ``sources`` / ``listen.transparent``.

Names: each gateway resolves ``up.test`` and ``front.test`` through its own /etc/hosts
(a private mount namespace, ``unshare --mount``); the agent through curl's ``--resolve``.
Everything the module creates (namespaces, links, rules) is removed even on failure.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trustme
import yaml
from aiohttp import web

from tests.conftest import OTHER_WORKLOAD
from tests.e2e import assert_refusal
from tests.support import REPO, WORKLOAD, Gateway, Upstream, bound_port, free_port
from tests.tasks_support import admin, create_task, post_task, revoke

DEPLOY = REPO / "deploy" / "transparent"
NOT_HTTP = "only HTTP and HTTPS are accepted on the transparent listener"
N = os.getpid() % 200 + 20
NET, NET2 = f"10.77.{N}", f"10.78.{N}"  # the nftables link, the iptables-legacy link
NET6 = f"fd77:{N:x}:"  # the nftables link's IPv6 network, NET6 + ":1" the root side
NS = f"tg-agent-{os.getpid()}"
HOST_IF, AGENT_IF = f"tgh{os.getpid()}", f"tga{os.getpid()}"
NFT_TABLE = f"taskgate_transparent_{os.getpid()}"  # deploy's table, one per test run
HOST_IF2, AGENT_IF2 = f"tgi{os.getpid()}", f"tgb{os.getpid()}"
POD_NS, POD_NET = f"tg-pod-{os.getpid()}", f"10.79.{N}"  # a pod, the gateway its sidecar
HOST_IF3, POD_IF = f"tgp{os.getpid()}", f"tgq{os.getpid()}"
POD = f"{POD_NET}.2"
AGENT_UID = "65534"  # the agent's user in the pod; the gateway's is root (gateway_uid=0)
AGENT, OTHER, STRANGER = f"{NET}.2", f"{NET}.3", f"{NET}.9"  # workload, other, nobody
REPORTER = f"{NET}.4"  # a workload in report mode
NEWCOMER = f"{NET}.5"  # claimed by no workload until a reload gives it to one
REPORT_WORKLOAD = "spiffe://acme.test/agent/rollout"
UPSTREAM = f"{NET}.1"
FRONT = "10.99.77.1"  # where front.test resolves for the gateway: not the upstream


def _why_no_netns() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network namespaces are unavailable here: the tests need root on Linux"
    for tool in ("ip", "nft", "iptables-legacy", "ip6tables-legacy", "curl", "unshare"):
        if shutil.which(tool) is None:
            return (f"network namespaces are unavailable here: {tool} is not installed "
                    "(scripts/install-system-deps)")
    probe = f"tg-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"network namespaces are unavailable here: ip netns add: {made.stderr.strip()}"
    return None


_WHY = _why_no_netns()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def sh(*cmd: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                         env={**os.environ, **env} if env else None)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.returncode}: {out.stderr}")
    return out


# -- the network ---------------------------------------------------------------------------
def _link(host_if: str, agent_if: str, net: str, *agent_hosts: int, net6: str = "",
          ns: str = NS) -> None:
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", agent_if, "netns", ns)
    sh("ip", "addr", "add", f"{net}.1/24", "dev", host_if)
    for host in agent_hosts:
        sh("ip", "-n", ns, "addr", "add", f"{net}.{host}/24", "dev", agent_if)
    if net6:
        sh("ip", "addr", "add", f"{net6}:1/64", "dev", host_if, "nodad")
        sh("ip", "-n", ns, "addr", "add", f"{net6}:2/64", "dev", agent_if, "nodad")
    sh("ip", "link", "set", host_if, "up")
    sh("ip", "-n", ns, "link", "set", agent_if, "up")


def _netns_nft() -> Path:
    """deploy/transparent/netns.nft with its table named for this process: the shipped
    rules replace their one table on the host, and a second run of this module at the
    same time (another checkout) would otherwise take this run's redirect away."""
    rules = (DEPLOY / "netns.nft").read_text()
    assert "table inet taskgate_transparent {" in rules, "netns.nft renamed its table"
    out = Path(tempfile.gettempdir(), f"{NFT_TABLE}.nft")
    out.write_text(rules.replace("taskgate_transparent", NFT_TABLE))
    return out


def _teardown(gateway_port: int) -> None:
    """Remove whatever of the module's network exists; never fails."""
    sh("nft", "delete", "table", "inet", NFT_TABLE, check=False)
    Path(tempfile.gettempdir(), f"{NFT_TABLE}.nft").unlink(missing_ok=True)
    sh(str(DEPLOY / "netns.iptables.sh"), "delete", check=False, AGENT_IF=HOST_IF2,
       GATEWAY_PORT=str(gateway_port))
    for link in (HOST_IF, HOST_IF2, HOST_IF3):
        sh("ip", "link", "del", link, check=False)
    for ns in (NS, POD_NS):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def gateway_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def network(gateway_port: int) -> Iterator[None]:
    """The agent's namespace, its two links, and the deploy/transparent rules on them."""
    _teardown(gateway_port)
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        _link(HOST_IF, AGENT_IF, NET, 2, 3, 4, 5, 9, net6=NET6)
        _link(HOST_IF2, AGENT_IF2, NET2, 2)
        sh("ip", "-n", NS, "route", "add", "default", "via", f"{NET}.1")
        sh("ip", "-n", NS, "-6", "route", "add", "default", "via", f"{NET6}:1")
        # As deploy/transparent/README.md says: nftables on one link, iptables-legacy on
        # the other.
        sh("nft", "-D", f"agent_if={HOST_IF}", "-D", f"gateway_port={gateway_port}",
           "-f", str(_netns_nft()))
        sh(str(DEPLOY / "netns.iptables.sh"), "add", AGENT_IF=HOST_IF2,
           GATEWAY_PORT=str(gateway_port))
        # A pod: its own namespace, the gateway inside it as a sidecar; pod.nft is loaded
        # in the pod's namespace (the init container's job), gateway_uid root.
        sh("ip", "netns", "add", POD_NS)
        sh("ip", "-n", POD_NS, "link", "set", "lo", "up")
        _link(HOST_IF3, POD_IF, POD_NET, 2, ns=POD_NS)
        sh("ip", "-n", POD_NS, "route", "add", "default", "via", f"{POD_NET}.1")
        sh("ip", "netns", "exec", POD_NS, "nft", "-D", "gateway_uid=0", "-D",
           f"gateway_port={gateway_port}", "-D", f"dns_server={POD_NET}.1",
           "-f", str(DEPLOY / "pod.nft"))
        yield
    finally:
        _teardown(gateway_port)


# -- the upstream on the root side ------------------------------------------------------------
def _dual_stack() -> socket.socket:
    """A listening socket on every root-side address, IPv4 and IPv6, one port."""
    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    return sock


class RootUpstream(Upstream):
    """The test upstream, listening on every root-side address; each request notes its peer."""

    async def echo(self, request: web.Request) -> web.Response:
        peer = (request.remote or "").removeprefix("::ffff:")
        self.seen.append({"path": request.raw_path, "peer": peer})
        return web.json_response({"path": request.raw_path, "peer": peer,
                                  "host": request.headers.get("Host")})

    def _main(self) -> None:
        import asyncio  # noqa: PLC0415 - only this thread's loop needs it

        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.app(), access_log=None)
        self._loop.run_until_complete(runner.setup())
        http = web.SockSite(runner, _dual_stack())
        https = web.SockSite(runner, _dual_stack(), ssl_context=self.tls_ctx)
        self._loop.run_until_complete(http.start())
        self._loop.run_until_complete(https.start())
        self.http_port, self.https_port = bound_port(http), bound_port(https)
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())


@pytest.fixture(scope="module")
def root_upstream(test_ca: trustme.CA) -> Iterator[RootUpstream]:
    cert = test_ca.issue_cert("up.test", "up2.test", "front.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    up = RootUpstream(ctx).start()
    yield up
    up.stop()


@dataclass
class RawServer:
    """A TCP server on the root side that speaks first and counts who connected."""

    peers: list[str]
    port: int
    sock: socket.socket


@pytest.fixture(scope="module")
def raw_server() -> Iterator[RawServer]:
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))  # noqa: S104 - the agent side must be able to see it
    sock.listen(8)
    server = RawServer([], sock.getsockname()[1], sock)

    def serve() -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            server.peers.append(peer[0])
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"SSH-2.0-raw\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield server
    sock.close()


# -- the gateway ---------------------------------------------------------------------------------
class NamedGateway(Gateway):
    """The gateway with its own /etc/hosts and /etc/resolv.conf (a private mount
    namespace): the names the transparent checks resolve, without the machine's DNS."""

    hosts = ""
    netns: str | None = None  # run inside this network namespace (a pod's sidecar)
    control_host = "127.0.0.1"

    @property
    def control_url(self) -> str:
        return f"http://{self.control_host}:{self.control_port}"

    def _keep_ports(self) -> None:
        pass  # the config names where to listen; nothing restarts these gateways

    @property
    def etc_files(self) -> tuple[Path, Path]:
        """The gateway's /etc/hosts and /etc/resolv.conf."""
        return self.dir / "hosts", self.dir / "resolv.conf"

    def start(self, wait: bool = True) -> Gateway:
        hosts, resolv = self.etc_files
        hosts.write_text(self.hosts)
        # No name server: a name not in the hosts file (or its AAAA) fails at once,
        # instead of waiting for a server a pod's namespace cannot reach.
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        return super().start(wait)

    def command(self) -> list[str]:
        hosts, resolv = self.etc_files
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*inside, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/resolv.conf && '
                'shift && exec "$@"', str(hosts), str(resolv), *super().command()]


def _rule(rule_id: str, host: str, port: int, **more: Any) -> dict[str, Any]:
    return {"id": rule_id, "host": host, "port": port, "methods": ["GET"],
            "paths": ["/allowed/**"], "allow_private": True, **more}


@pytest.fixture(scope="module")
def gateway(network: None, tmp_path_factory: pytest.TempPathFactory,
            shared_files: dict[str, Path], root_upstream: RootUpstream,
            gateway_port: int) -> Iterator[Gateway]:
    h, s = root_upstream.http_port, root_upstream.https_port
    config = {
        "listen": {"proxy": "127.0.0.1:0", "control": "127.0.0.1:0",
                   "transparent": f"[::]:{gateway_port}"},  # both families
        "upstream": {"ca_file": str(shared_files["upstream_ca"])},
        "workloads": {
            WORKLOAD: {
                "owner": "platform@acme.test",
                "sources": [f"{AGENT}/32", f"{NET2}.0/24", f"{NET6}:2/128"],
                "standing": [
                    _rule("t-http", "up.test", h, scheme="http"),
                    _rule("t-https", "up.test", s),
                    _rule("t-front", "front.test", s),
                    _rule("t-front-http", "front.test", h, scheme="http"),
                    _rule("t-ip", UPSTREAM, h, scheme="http", paths=["/ip/**"]),
                    _rule("t-up2", "up2.test", h, scheme="http"),
                    _rule("t-up6", "up6.test", h, scheme="http"),
                ],
                # What its tasks may be given: more than its standing rules.
                "ceiling": [_rule("c-task", "up.test", h, scheme="http",
                                  paths=["/allowed/**", "/task/**"])],
                "report_allowed": True,
            },
            OTHER_WORKLOAD: {"owner": "other@acme.test", "sources": [f"{OTHER}/32"]},
            REPORT_WORKLOAD: {"owner": "rollout@acme.test", "mode": "report",
                              "sources": [f"{REPORTER}/32"],
                              "standing": [_rule("r-http", "up.test", h, scheme="http")]},
        },
    }
    gw = NamedGateway(tmp_path_factory.mktemp("gw-transparent"), config)
    gw.hosts = (f"127.0.0.1 localhost\n{UPSTREAM} up.test\n{NET2}.1 up2.test\n"
                f"{FRONT} front.test\n{NET6}:1 up6.test\n")
    gw.start()
    yield gw
    gw.stop()


# -- the agent -----------------------------------------------------------------------------------
AGENT_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/bin", "HOME=/tmp"]  # no proxy variables


@dataclass
class Reply:
    code: int  # curl's exit code
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def agent_curl(url: str, *args: str, source: str = AGENT) -> Reply:
    """curl inside the agent's namespace, from ``source``, with no proxy settings."""
    with tempfile.TemporaryDirectory() as tmp:
        head, body = Path(tmp, "head"), Path(tmp, "body")
        out = subprocess.run(
            ["ip", "netns", "exec", NS, *AGENT_ENV, "curl", "-sS", "--max-time", "10",
             "--interface", source, "-D", str(head), "-o", str(body), "-w", "%{http_code}",
             *args, url], capture_output=True, timeout=20)
        raw = head.read_text("latin-1") if head.exists() else ""
        data = body.read_bytes() if body.exists() else b""
    headers: dict[str, str] = {}
    for line in raw.replace("\r\n", "\n").split("\n")[1:]:
        name, _, value = line.partition(":")
        if value:
            headers[name.strip().lower()] = value.strip()
    code = out.stdout.decode().strip()
    return Reply(out.returncode, int(code) if code.isdigit() else 0, headers, data)


AGENT_SOCKET = """
import socket, ssl, sys
host, port, source, payload, ca, sni = sys.argv[1:7]
s = socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))
if ca:
    ctx = ssl.create_default_context(cafile=ca)
    s = ctx.wrap_socket(s, server_hostname=sni)
s.sendall(bytes.fromhex(payload))
got = b""
try:
    while chunk := s.recv(4096):
        got += chunk
except (TimeoutError, ConnectionError, ssl.SSLError):
    pass
sys.stdout.write(repr(got))
"""


def agent_socket(port: int, payload: bytes, *, host: str = UPSTREAM, source: str = AGENT,
                 ca: Path | None = None, sni: str = "up.test") -> bytes:
    """Send ``payload`` from inside the namespace on a bare TCP (or TLS) connection;
    return every byte that came back before the connection ended."""
    out = subprocess.run(
        ["ip", "netns", "exec", NS, *AGENT_ENV, sys.executable, "-I", "-c", AGENT_SOCKET,
         host, str(port), source, payload.hex(), str(ca or ""), sni],
        capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return bytes(eval(out.stdout))  # noqa: S307 - repr() of bytes from our own script


AGENT_SESSION = """
import http.client, json, sys
host, port, name, source = sys.argv[1:5]
conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
socks = []
for line in sys.stdin:
    conn.request("GET", line.strip(), headers={"Host": f"{name}:{port}"})
    resp = conn.getresponse()
    resp.read()
    if conn.sock not in socks:
        socks.append(conn.sock)
    print(json.dumps([resp.status, len(socks)]), flush=True)
"""


class AgentSession:
    """One keep-alive HTTP connection from inside the namespace; each :meth:`get` is
    the next request on it (and says how many connections have been used so far)."""

    def __init__(self, host: str, port: int, name: str, source: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, *AGENT_ENV, sys.executable, "-I", "-c", AGENT_SESSION,
             host, str(port), name, source],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def get(self, path: str) -> tuple[int, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        status, connections = orjson.loads(self.proc.stdout.readline())
        return int(status), int(connections)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def records(gw: Gateway, **match: Any) -> list[dict[str, Any]]:
    """The audit records with these field values (waiting briefly for the write)."""
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in gw.audit() if all(r.get(k) == v for k, v in match.items())]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def record_of(gw: Gateway, reply: Reply) -> dict[str, Any]:
    rid = reply.headers["x-taskgate-request-id"]
    found = records(gw, request_id=rid)
    assert len(found) == 1, found
    return found[0]


# -- the tests -----------------------------------------------------------------------------------
def test_http_call_is_redirected_judged_and_audited(gateway: Gateway,
                                                    root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    r = agent_curl(f"http://up.test:{h}/allowed/plain", "--resolve", f"up.test:{h}:{UPSTREAM}")
    assert r.status == 200, r
    seen = r.json()
    assert seen["path"] == "/allowed/plain" and seen["host"] == f"up.test:{h}"
    assert seen["peer"] != AGENT  # the gateway called the upstream, not the agent
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["owner"], rec["task"]) == (WORKLOAD, "platform@acme.test", None)
    assert (rec["client"], rec["scheme"], rec["host"], rec["port"]) == (AGENT, "http", "up.test", h)
    assert (rec["decision"], rec["rule"], rec["upstream_ip"], rec["status"]) == (
        "allow", "t-http", UPSTREAM, 200)


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_https_call_is_intercepted_with_the_gateway_ca(gateway: Gateway,
                                                       root_upstream: RootUpstream,
                                                       version: str) -> None:
    s = root_upstream.https_port
    # The agent trusts only the gateway's CA: the answer came through the interception.
    r = agent_curl(f"https://up.test:{s}/allowed/tls{version}", version, "--cacert",
                   str(gateway.ca), "--resolve", f"up.test:{s}:{UPSTREAM}")
    assert r.status == 200, r
    assert r.json()["path"] == f"/allowed/tls{version}"
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["client"], rec["scheme"], rec["host"], rec["port"]) == (
        WORKLOAD, AGENT, "https", "up.test", s)
    assert (rec["decision"], rec["rule"], rec["upstream_ip"]) == ("allow", "t-https", UPSTREAM)


def test_ipv6_call_is_redirected_judged_and_audited(gateway: Gateway,
                                                    root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    r = agent_curl(f"http://up6.test:{h}/allowed/v6", "-6", "--resolve",
                   f"up6.test:{h}:[{NET6}:1]", source=f"{NET6}:2")
    assert r.status == 200, r
    assert r.json()["peer"] != f"{NET6}:2"
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["client"], rec["rule"], rec["upstream_ip"]) == (
        WORKLOAD, f"{NET6}:2", "t-up6", f"{NET6}:1")


def test_call_by_address_is_judged_by_the_address(gateway: Gateway,
                                                  root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    r = agent_curl(f"http://{UPSTREAM}:{h}/ip/x")
    assert r.status == 200, r
    assert record_of(gateway, r)["rule"] == "t-ip"


def test_call_no_rule_allows_is_refused(gateway: Gateway, root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    r = agent_curl(f"http://up.test:{h}/denied", "--resolve", f"up.test:{h}:{UPSTREAM}")
    assert_refusal(r.status, r.headers, r.body, 403)
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["client"], rec["decision"]) == (WORKLOAD, AGENT, "deny")
    assert not any(s["path"] == "/denied" for s in root_upstream.seen)


def test_other_address_is_the_other_workload(gateway: Gateway,
                                             root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    r = agent_curl(f"http://up.test:{h}/allowed/other", "--resolve",
                   f"up.test:{h}:{UPSTREAM}", source=OTHER)
    assert_refusal(r.status, r.headers, r.body, 403, "no rule")
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["owner"], rec["client"]) == (
        OTHER_WORKLOAD, "other@acme.test", OTHER)


def test_address_outside_sources_is_refused_over_http(gateway: Gateway,
                                                      root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    r = agent_curl(f"http://up.test:{h}/allowed/stranger", "--resolve",
                   f"up.test:{h}:{UPSTREAM}", source=STRANGER)
    assert_refusal(r.status, r.headers, r.body, 403,
                   f"no workload claims the source address {STRANGER}")
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["client"], rec["decision"]) == (None, STRANGER, "deny")
    assert not any(s["path"] == "/allowed/stranger" for s in root_upstream.seen)


def test_address_outside_sources_is_refused_over_tls(gateway: Gateway,
                                                     root_upstream: RootUpstream) -> None:
    s = root_upstream.https_port
    r = agent_curl(f"https://up.test:{s}/allowed/stranger-tls", "--cacert", str(gateway.ca),
                   "--resolve", f"up.test:{s}:{UPSTREAM}", source=STRANGER)
    assert r.status == 0 and r.code != 0  # closed before the handshake: no HTTP to answer
    found = records(gateway, client=STRANGER, port=s)
    assert len(found) == 1, found
    assert found[0]["workload"] is None and found[0]["decision"] == "deny"
    assert found[0]["host"] == "up.test"  # the name the ClientHello asked for
    assert f"no workload claims the source address {STRANGER}" in found[0]["reason"]


def test_sni_naming_another_host_is_refused(gateway: Gateway,
                                            root_upstream: RootUpstream) -> None:
    s = root_upstream.https_port
    r = agent_curl(f"https://front.test:{s}/allowed/fronted", "--cacert", str(gateway.ca),
                   "--resolve", f"front.test:{s}:{UPSTREAM}")
    data = assert_refusal(r.status, r.headers, r.body, 403, "no domain fronting")
    assert f"'front.test' resolves to {FRONT}, not to {UPSTREAM}" in data["reason"]
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["decision"], rec["upstream_ip"]) == (WORKLOAD, "deny", None)
    assert not any(x["path"] == "/allowed/fronted" for x in root_upstream.seen)


def test_host_header_naming_another_host_is_refused(gateway: Gateway,
                                                    root_upstream: RootUpstream) -> None:
    h, s = root_upstream.http_port, root_upstream.https_port
    r = agent_curl(f"http://{UPSTREAM}:{h}/allowed/fronted-http", "-H", f"Host: front.test:{h}")
    assert_refusal(r.status, r.headers, r.body, 403, "no domain fronting")
    # SNI names the destination, Host another host: the Host must name the SNI's host.
    r = agent_curl(f"https://up.test:{s}/allowed/fronted-host", "--cacert", str(gateway.ca),
                   "--resolve", f"up.test:{s}:{UPSTREAM}", "-H", f"Host: front.test:{s}")
    assert_refusal(r.status, r.headers, r.body, 403, "Host header does not match")
    assert not any(x["path"].startswith("/allowed/fronted") for x in root_upstream.seen)


@pytest.mark.parametrize(("payload", "port_of"), [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "http"),           # another protocol on an HTTP port
    (b"\x00\x1c\x12\x34\x01\x00" + b"\x00" * 22, "dns"),  # DNS over TCP: never resolved
    (b"GET /allowed/x HTTP/1.1 trailing\r\n\r\n", "http"),  # not a request line
])
def test_non_http_traffic_is_refused_and_audited(gateway: Gateway, root_upstream: RootUpstream,
                                                 payload: bytes, port_of: str) -> None:
    port = root_upstream.http_port if port_of == "http" else 53
    before = len(gateway.audit())
    assert agent_socket(port, payload) == b""  # closed, nothing relayed or answered
    time.sleep(0.2)
    found = [r for r in gateway.audit()[before:] if r["port"] == port and r["client"] == AGENT
             and NOT_HTTP in (r.get("reason") or "")]
    assert len(found) == 1, gateway.audit()[before:]
    assert found[0]["workload"] == WORKLOAD and found[0]["decision"] == "deny"
    assert found[0]["host"] == UPSTREAM


def test_non_http_inside_tls_is_refused(gateway: Gateway, root_upstream: RootUpstream) -> None:
    s = root_upstream.https_port
    assert agent_socket(s, b"HELLO raw bytes\r\n", ca=gateway.ca) == b""
    found = [r for r in records(gateway, port=s, client=AGENT, scheme="https")
             if NOT_HTTP in (r.get("reason") or "")]
    assert found and found[-1]["host"] == "up.test"


def test_agent_cannot_reach_anything_around_the_gateway(gateway: Gateway,
                                                        root_upstream: RootUpstream,
                                                        raw_server: RawServer) -> None:
    # A server that speaks first: the agent's connection lands on the gateway, which
    # never connects on (no HTTP request came), so no greeting and no peer.
    assert agent_socket(raw_server.port, b"") == b""
    assert raw_server.peers == []
    # UDP is not redirected but dropped: nothing arrives.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((UPSTREAM, 0))
        udp.settimeout(1)
        subprocess.run(["ip", "netns", "exec", NS, *AGENT_ENV, sys.executable, "-I", "-c",
                        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                        "s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))",
                        UPSTREAM, str(udp.getsockname()[1])], check=True, timeout=10)
        with pytest.raises(TimeoutError):
            udp.recvfrom(16)
    # Every request the upstream ever saw came from the gateway, none from the agent.
    assert root_upstream.seen
    agents = {AGENT, OTHER, STRANGER, REPORTER, NEWCOMER, f"{NET2}.2", f"{NET6}:2"}
    assert not {x["peer"] for x in root_upstream.seen} & agents


def test_iptables_legacy_rules_redirect_too(gateway: Gateway,
                                            root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    r = agent_curl(f"http://up2.test:{h}/allowed/legacy", "--resolve",
                   f"up2.test:{h}:{NET2}.1", source=f"{NET2}.2")
    assert r.status == 200, r
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["client"], rec["rule"], rec["upstream_ip"]) == (
        WORKLOAD, f"{NET2}.2", "t-up2", f"{NET2}.1")
    assert agent_socket(h, b"SSH-2.0-x\r\n", host=f"{NET2}.1", source=f"{NET2}.2") == b""


# -- where transparent mode meets tasks, report mode and reload (issue 14) ------------------------
def _task_rule(port: int) -> dict[str, Any]:
    """A task grant beyond the workload's standing rules (within its ceiling)."""
    return _rule("task-http", "up.test", port, scheme="http", paths=["/task/**"])


def _bound_task(gw: Gateway, up: RootUpstream, address: str, **body: Any) -> dict[str, Any]:
    return create_task(gw, up, [_task_rule(up.http_port)],
                       bind={"client_cidrs": [f"{address}/32"]}, **body)


def test_task_bound_to_the_agent_address_is_judged_on_its_grants(
        gateway: Gateway, root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    resolve = ("--resolve", f"up.test:{h}:{UPSTREAM}")
    r = agent_curl(f"http://up.test:{h}/task/before", *resolve)
    assert_refusal(r.status, r.headers, r.body, 403, "no rule")  # not a standing rule
    assert record_of(gateway, r)["task"] is None
    task = _bound_task(gateway, root_upstream, AGENT)
    try:
        r = agent_curl(f"http://up.test:{h}/task/bound", *resolve)
        assert r.status == 200, r
        assert r.json()["path"] == "/task/bound"
        rec = record_of(gateway, r)
        assert (rec["workload"], rec["task"], rec["client"], rec["decision"], rec["rule"]) == (
            WORKLOAD, task["task_id"], AGENT, "allow", "task-http")
        # The task's grants are all the call gets: the standing rules do not add to them.
        r = agent_curl(f"http://up.test:{h}/allowed/while-bound", *resolve)
        assert_refusal(r.status, r.headers, r.body, 403, "no rule")
        assert record_of(gateway, r)["task"] == task["task_id"]
        # Another address of the same workload is not bound: its standing rules hold.
        r = agent_curl(f"http://up6.test:{h}/task/v6", "-6", "--resolve",
                       f"up6.test:{h}:[{NET6}:1]", source=f"{NET6}:2")
        assert_refusal(r.status, r.headers, r.body, 403, "no rule")
        assert record_of(gateway, r)["task"] is None
        # The token on a transparent call from another address names no one: that
        # address is its own workload, whatever credential it carries.
        r = agent_curl(f"http://up.test:{h}/task/stolen", *resolve, "-H",
                       f"Proxy-Authorization: Basic {_basic(task)}", source=OTHER)
        assert_refusal(r.status, r.headers, r.body, 403, "no rule")
        rec = record_of(gateway, r)
        assert (rec["workload"], rec["task"]) == (OTHER_WORKLOAD, None)
    finally:
        revoke(gateway, task["task_id"])
    r = agent_curl(f"http://up.test:{h}/task/after", *resolve)
    assert_refusal(r.status, r.headers, r.body, 403, "no rule")
    assert record_of(gateway, r)["task"] is None
    assert agent_curl(f"http://up.test:{h}/allowed/after", *resolve).status == 200
    assert not any(x["path"] in ("/task/before", "/task/after", "/task/stolen", "/task/v6")
                   for x in root_upstream.seen)


def test_task_cannot_be_bound_to_another_workloads_address(
        gateway: Gateway, root_upstream: RootUpstream) -> None:
    r = post_task(gateway, [_task_rule(root_upstream.http_port)], up=root_upstream,
                  bind={"client_cidrs": [f"{AGENT}/32", f"{OTHER}/32"]})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "bind.client_cidrs[1]"
    assert f"a source address of workload {OTHER_WORKLOAD!r}" in r.json()["reason"]


def test_bound_task_with_its_budget_spent_refuses_until_it_ends(
        gateway: Gateway, root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    resolve = ("--resolve", f"up.test:{h}:{UPSTREAM}")
    task = _bound_task(gateway, root_upstream, AGENT, max_calls=1)
    try:
        assert agent_curl(f"http://up.test:{h}/task/one", *resolve).status == 200
        for path in ("/task/two", "/allowed/spent"):  # the task's still: no standing rules
            r = agent_curl(f"http://up.test:{h}{path}", *resolve)
            assert_refusal(r.status, r.headers, r.body, 403, "task budget spent")
            rec = record_of(gateway, r)
            assert (rec["task"], rec["decision"]) == (task["task_id"], "deny")
    finally:
        revoke(gateway, task["task_id"])
    assert agent_curl(f"http://up.test:{h}/allowed/ended", *resolve).status == 200
    assert not any(x["path"] in ("/task/two", "/allowed/spent") for x in root_upstream.seen)


def test_bound_report_mode_task_lets_a_refused_transparent_call_through(
        gateway: Gateway, root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    task = _bound_task(gateway, root_upstream, AGENT, mode="report")
    try:
        r = agent_curl(f"http://up.test:{h}/denied/report-task", "--resolve",
                       f"up.test:{h}:{UPSTREAM}")
        assert r.status == 200, r
        rec = record_of(gateway, r)
        assert (rec["task"], rec["decision"], rec["rule"]) == (
            task["task_id"], "would_deny", None)
    finally:
        revoke(gateway, task["task_id"])


def _basic(task: dict[str, Any]) -> str:
    return base64.b64encode(f"{task['task_id']}:{task['token']}".encode()).decode()


def test_bound_task_token_is_refused_on_the_proxy_listener_from_elsewhere(
        gateway: Gateway, root_upstream: RootUpstream) -> None:
    """The seed's stolen credential: the token of a task bound to the agent's sandbox,
    used through the regular proxy listener from another address, is refused."""
    h = root_upstream.http_port
    task = _bound_task(gateway, root_upstream, AGENT)
    try:
        with httpx.Client(proxy=task["proxy_url"], trust_env=False, timeout=10) as c:
            r = c.get(f"http://up.test:{h}/task/stolen-proxy")
        data = assert_refusal(r.status_code, r.headers, r.content, 407,
                              "the task token is bound elsewhere")
        assert f"{AGENT}/32" in data["reason"] and task["token"] not in r.text
        [rec] = records(gateway, request_id=data["request_id"])
        assert (rec["decision"], rec["status"], rec["task"], rec["client"]) == (
            "deny", 407, task["task_id"], "127.0.0.1")
        assert "bound elsewhere" in rec["reason"]
        assert not any(x["path"] == "/task/stolen-proxy" for x in root_upstream.seen)
    finally:
        revoke(gateway, task["task_id"])


def test_report_mode_lets_a_refused_transparent_call_through(
        gateway: Gateway, root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    resolve = ("--resolve", f"up.test:{h}:{UPSTREAM}")
    r = agent_curl(f"http://up.test:{h}/denied/report", *resolve, source=REPORTER)
    assert r.status == 200, r
    assert r.json()["path"] == "/denied/report"
    rec = record_of(gateway, r)
    assert (rec["workload"], rec["client"], rec["decision"], rec["rule"]) == (
        REPORT_WORKLOAD, REPORTER, "would_deny", None)
    assert "no rule" in rec["reason"] and rec["upstream_ip"] == UPSTREAM
    # What the transparent listener itself refuses stays refused: a name that does not
    # lead where the connection was sent, and anything that is not HTTP.
    r = agent_curl(f"http://{UPSTREAM}:{h}/allowed/report-fronted", "-H",
                   f"Host: front.test:{h}", source=REPORTER)
    assert_refusal(r.status, r.headers, r.body, 403, "no domain fronting")
    assert record_of(gateway, r)["decision"] == "deny"
    assert agent_socket(h, b"SSH-2.0-x\r\n", source=REPORTER) == b""
    found = [x for x in records(gateway, client=REPORTER, port=h)
             if NOT_HTTP in (x.get("reason") or "")]
    assert [x["decision"] for x in found] == ["deny"]
    assert not any(x["path"] == "/allowed/report-fronted" for x in root_upstream.seen)


def _reload(gw: Gateway, config: dict[str, Any]) -> dict[str, Any]:
    gw.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    r = httpx.post(f"{gw.control_url}/v1/reload", headers=admin(gw), timeout=30)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_reload_of_sources_applies_to_the_next_transparent_connection(
        gateway: Gateway, root_upstream: RootUpstream) -> None:
    h, s = root_upstream.http_port, root_upstream.https_port
    plain = (f"http://up.test:{h}/allowed/newcomer", "--resolve",
             f"up.test:{h}:{UPSTREAM}")
    tls = (f"https://up.test:{s}/allowed/newcomer-tls", "--cacert", str(gateway.ca),
           "--resolve", f"up.test:{s}:{UPSTREAM}")
    r = agent_curl(*plain, source=NEWCOMER)
    assert_refusal(r.status, r.headers, r.body, 403,
                   f"no workload claims the source address {NEWCOMER}")
    assert agent_curl(*tls, source=NEWCOMER).status == 0  # closed before the handshake
    changed = copy.deepcopy(gateway.config)
    changed["workloads"][WORKLOAD]["sources"].append(f"{NEWCOMER}/32")
    try:
        answer = _reload(gateway, changed)
        assert answer["applied"] is True and answer["restart_needed"] == []
        for args in (plain, tls):
            r = agent_curl(*args, source=NEWCOMER)
            assert r.status == 200, r
            rec = record_of(gateway, r)
            assert (rec["workload"], rec["client"], rec["decision"]) == (
                WORKLOAD, NEWCOMER, "allow")
        # The transparent listener cannot move while the gateway runs: it is reported,
        # and keeps listening where it did.
        moved = copy.deepcopy(changed)
        moved["listen"]["transparent"] = f"[::]:{free_port()}"
        answer = _reload(gateway, moved)
        assert answer["applied"] is True
        assert answer["restart_needed"] == ["listen.transparent"]
        assert agent_curl(*plain, source=NEWCOMER).status == 200
        # A connection open across a reload: its next request is judged on the new config.
        session = AgentSession(UPSTREAM, h, "up.test", NEWCOMER)
        try:
            assert session.get("/allowed/kept-alive") == (200, 1)
        finally:
            _reload(gateway, gateway.config)
        assert session.get("/allowed/kept-alive-after") == (403, 1)  # same connection
        session.close()
    finally:
        _reload(gateway, gateway.config)
    r = agent_curl(*plain, source=NEWCOMER)
    assert_refusal(r.status, r.headers, r.body, 403, "no workload claims")


# -- a pod: the gateway as a sidecar, deploy/transparent/pod.nft in the pod's namespace -----------
@pytest.fixture(scope="module")
def pod_gateway(network: None, tmp_path_factory: pytest.TempPathFactory,
                shared_files: dict[str, Path], root_upstream: RootUpstream,
                gateway_port: int) -> Iterator[Gateway]:
    h = root_upstream.http_port
    config = {
        # As deploy/transparent/README.md says for a pod: the transparent listener on
        # loopback; the control plane on the pod's address, where this test reaches it.
        "listen": {"proxy": "127.0.0.1:0", "control": f"{POD}:0",
                   "transparent": f"127.0.0.1:{gateway_port}"},
        "upstream": {"ca_file": str(shared_files["upstream_ca"])},
        "workloads": {WORKLOAD: {"sources": [f"{POD}/32"],
                                 "standing": [_rule("p-http", "up.test", h, scheme="http")]}},
    }
    gw = NamedGateway(tmp_path_factory.mktemp("gw-pod"), config)
    gw.hosts = f"127.0.0.1 localhost\n{POD_NET}.1 up.test\n"
    gw.netns, gw.control_host = POD_NS, POD
    gw.start()
    yield gw
    gw.stop()


def pod_agent(*cmd: str) -> subprocess.CompletedProcess[str]:
    """A command in the pod as the agent's user (not the gateway's), no proxy variables."""
    return subprocess.run(["ip", "netns", "exec", POD_NS, "setpriv", "--reuid", AGENT_UID,
                           "--regid", AGENT_UID, "--clear-groups", *AGENT_ENV, *cmd],
                          capture_output=True, text=True, timeout=20)


def test_pod_rules_redirect_the_agent_but_not_the_gateway(pod_gateway: Gateway,
                                                          root_upstream: RootUpstream) -> None:
    h = root_upstream.http_port
    base = ["curl", "-sS", "--max-time", "10", "-D", "-", "--resolve",
            f"up.test:{h}:{POD_NET}.1"]
    out = pod_agent(*base, f"http://up.test:{h}/allowed/pod")
    # Answered by the upstream through the gateway: the gateway's own call (root, the
    # gateway's uid) was not redirected back to itself.
    assert out.returncode == 0 and " 200 " in out.stdout.splitlines()[0], out
    rid = next(line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
               if line.lower().startswith("x-taskgate-request-id:"))
    [rec] = records(pod_gateway, request_id=rid)
    assert (rec["workload"], rec["client"], rec["rule"], rec["upstream_ip"]) == (
        WORKLOAD, POD, "p-http", f"{POD_NET}.1")
    refused = pod_agent(*base, f"http://up.test:{h}/denied/pod")
    assert " 403 " in refused.stdout.splitlines()[0], refused
    assert not any(x["path"] == "/denied/pod" for x in root_upstream.seen)
    # Not TCP: dropped on the way out of the pod (only DNS to the resolver passes).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((f"{POD_NET}.1", 0))
        udp.settimeout(1)
        sent = pod_agent("python3", "-I", "-c",
                         "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                         "s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))",
                         f"{POD_NET}.1", str(udp.getsockname()[1]))
        assert "Operation not permitted" in sent.stderr, sent
        with pytest.raises(TimeoutError):
            udp.recvfrom(16)
