"""Node 20 clients through the gateway: built-in ``fetch`` with undici's
``EnvHttpProxyAgent`` (Node 20's fetch reads no proxy variable), axios with a CONNECT
agent, the openai npm SDK, the official TypeScript MCP client (against the official
Python SDK's server, tests/mcp_server.py); and npm itself, installing from a registry
served through the gateway. The packages come from
tests/clients/node/package.json and its lock, installed once into a cache folder
(``npm ci``) keyed by the lock's digest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import EVENTS, REFUSED_REASON, World, incremental
from tests.mcp_fixtures import TOOL_REFUSED, mcp_gateway, mcp_servers, records
from tests.mcp_server import McpUpstream
from tests.support import Gateway

__all__ = ["mcp_gateway", "mcp_servers"]  # fixtures used by name

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "client.cjs"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "taskgate-tests"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """The suite's npm packages, installed from the lock once per lock version."""
    files = [NODE_DIR / "package.json", NODE_DIR / "package-lock.json"]
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    home = _cache_root() / f"node-{key}"
    if not (home / "node_modules" / ".package-lock.json").exists():
        tmp = home.with_name(f"{home.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copy(f, tmp / f.name)
        # The registry directly: never through a proxy the test run may have set.
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts",
                        "--loglevel=error"], cwd=tmp, env=env, check=True, timeout=300,
                       capture_output=True)
        try:
            tmp.rename(home)
        except OSError:  # another run installed it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    return home / "node_modules"


def node(world: World, modules: Path, mode: str, url: str, **env: str
         ) -> dict[str, object]:
    """``client.cjs MODE URL`` with the agent's environment (``env`` added to it)."""
    out = subprocess.run(["node", str(SCRIPT), mode, url], capture_output=True, text=True,
                         timeout=60, env=world.env(NODE_PATH=str(modules), **env))
    assert out.stdout, out.stderr
    doc: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    assert "error" not in doc, doc
    return doc


def test_fetch_with_env_proxy_agent_passes_and_is_recorded(world: World,
                                                           node_modules: Path) -> None:
    got = node(world, node_modules, "fetch", f"{world.origin}/allowed/node")
    assert got["status"] == 200 and '"/allowed/node"' in str(got["body"]), got
    rec = world.record(str(got["id"]))
    assert (rec["decision"], rec["rule"], rec["path"]) == ("allow", "api", "/allowed/node")


def test_bare_fetch_on_node_20_goes_around_the_gateway(world: World,
                                                      node_modules: Path) -> None:
    """Without the dispatcher Node 20's fetch ignores HTTPS_PROXY: it reaches the
    upstream directly (whose certificate it does not trust here), unseen."""
    before = len(world.gw.audit())
    out = subprocess.run(["node", str(SCRIPT), "bare", f"{world.origin}/allowed/bare"],
                         capture_output=True, text=True, timeout=60,
                         env=world.env(NODE_PATH=str(node_modules)))
    assert "certificate" in out.stdout, out.stdout
    assert len(world.gw.audit()) == before


def test_fetch_streams_events_as_they_come(world: World, node_modules: Path) -> None:
    got = node(world, node_modules, "fetch", f"{world.origin}/sse?n={EVENTS}&gap=0.4")
    stamps = [float(s) for s in got["stamps"]]  # type: ignore[attr-defined]
    assert len(stamps) == EVENTS and incremental(stamps), got


def test_fetch_refusal_body_has_the_reason(world: World, node_modules: Path) -> None:
    got = node(world, node_modules, "fetch", f"{world.origin}/elsewhere")
    body = json.loads(str(got["body"]))
    assert got["status"] == 403 and REFUSED_REASON in body["error"]["message"]
    assert world.record(str(got["id"]))["decision"] == "deny"


def test_axios_passes_and_its_refusal_carries_the_reason(world: World,
                                                         node_modules: Path) -> None:
    got = node(world, node_modules, "axios", f"{world.origin}/allowed/axios")
    rec = world.record(str(got["id"]))
    assert got["status"] == 200 and rec["decision"] == "allow" and rec["connect_id"]
    got = node(world, node_modules, "axios", f"{world.origin}/elsewhere")
    # axios's own message is generic ("Request failed with status code 403"): the
    # reason is in the answer's data, error.message.
    assert got["status"] == 403 and REFUSED_REASON in str(got["detail"]), got
    assert str(got["id"]) in str(got["detail"])


def test_openai_npm_call_stream_and_refusal(world: World, node_modules: Path) -> None:
    base = f"{world.origin}/v1"
    got = node(world, node_modules, "openai", base)
    assert got["body"] == "hello" and world.record(str(got["id"]))["decision"] == "allow"
    got = node(world, node_modules, "openai-stream", base)
    stamps = [float(s) for s in got["stamps"]]  # type: ignore[attr-defined]
    assert len(stamps) == EVENTS and incremental(stamps), got
    got = node(world, node_modules, "openai-refused", base)
    assert got["status"] == 403 and got["name"] == "PermissionDeniedError", got
    assert REFUSED_REASON in str(got["message"]) and str(got["id"]) in str(got["message"])


@pytest.mark.parametrize("kind", ["sse", "tls"])
def test_typescript_mcp_client_allowed_and_refused(
        world: World, node_modules: Path, mcp_gateway: Gateway,
        mcp_servers: dict[str, McpUpstream], token: str, kind: str) -> None:
    """The official TypeScript MCP client (streamable HTTP, an SSE-answering server over
    HTTP, a JSON-answering one over HTTPS): granted tools run, a tool not granted and an
    argument over its maximum come back as JSON-RPC errors the SDK raises with the
    reason, and the session goes on after them."""
    up = mcp_servers[kind]
    up.ran.clear()
    proxy = mcp_gateway.proxy_url_with(token)
    got: dict[str, Any] = node(world, node_modules, "mcp", up.url, HTTPS_PROXY=proxy,
                               https_proxy=proxy, HTTP_PROXY=proxy, http_proxy=proxy,
                               NODE_EXTRA_CA_CERTS=str(mcp_gateway.ca))
    assert got["tools"] == ["add", "notify", "search"], got
    assert got["added"] == {"result": {"result": 5}, "isError": False}, got
    assert got["danger"]["code"] == TOOL_REFUSED, got
    assert "'danger' is not granted" in got["danger"]["message"], got
    assert "above the maximum 50" in got["over"]["message"], got
    assert got["after"] == {"result": {"result": 2}, "isError": False}, got
    assert up.names() == ["add", "add"]  # the refused calls never ran
    danger = [r for r in records(mcp_gateway, decision="deny", port=up.port)
              if (r["tool"] or {}).get("name") == "danger"]
    assert danger and danger[-1]["tool"]["protocol"] == "mcp"


def test_npm_installs_from_a_registry_through_the_gateway(world: World, tmp_path: Path
                                                           ) -> None:
    """npm reads ``HTTPS_PROXY`` (its ``https-proxy`` default) and ``npm_config_cafile``:
    a package from a registry served under /packages/npm/ (its packument and tarball, as
    the registry API has them) is installed, every request recorded."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "package.json").write_text(json.dumps({"name": "tgprobe", "version": "1.0.0"}))
    (src / "index.js").write_text("module.exports = 'through the gateway';\n")
    packed = subprocess.run(["npm", "pack", "--json", "--pack-destination", str(tmp_path)],
                            cwd=src, check=True, capture_output=True, text=True, timeout=120)
    (info,) = json.loads(packed.stdout)
    registry = world.upstream.files / "packages" / "npm"
    registry.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / info["filename"], registry / info["filename"])
    base = f"{world.origin}/packages/npm"
    (registry / "tgprobe").write_text(json.dumps({
        "name": "tgprobe", "dist-tags": {"latest": "1.0.0"},
        "versions": {"1.0.0": {"name": "tgprobe", "version": "1.0.0", "dist": {
            "tarball": f"{base}/{info['filename']}", "integrity": info["integrity"],
            "shasum": info["shasum"]}}}}))
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "p", "private": True}))
    before = len(world.gw.audit())
    env = world.env(npm_config_cafile=str(world.gw.ca),
                    npm_config_cache=str(tmp_path / "cache"))
    out = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--registry",
                          f"{base}/", "tgprobe"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    installed = project / "node_modules" / "tgprobe" / "index.js"
    assert installed.read_text() == "module.exports = 'through the gateway';\n"
    recs = world.gw.audit()[before:]
    paths = {str(r["path"]) for r in recs if r["decision"] == "allow"}
    assert {"/packages/npm/tgprobe", f"/packages/npm/{info['filename']}"} <= paths, recs
