"""Go (``net/http``) and Java (``java.net.http.HttpClient``) through the gateway, set
up as docs/clients.md says: Go from the proxy variables and ``SSL_CERT_FILE``; Java
from ``-Dhttps.proxyHost``/``-Dhttps.proxyPort``, an ``Authenticator`` for the token
and a truststore made with ``keytool``.

Both runtimes leave loopback destinations out of the proxy by default (Go always, for
``localhost`` and loopback addresses; Java through ``http.nonProxyHosts``' default), and
the test upstream is on loopback: Go is pointed at ``localhost.`` (the same host, which
Go does not special-case; the gateway reads it as ``localhost``), Java gets
``-Dhttp.nonProxyHosts=``. A test per runtime shows the default going direct, unseen.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.clients.conftest import REFUSED_REASON, World

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("go") / "client"
    subprocess.run(["go", "build", "-o", str(exe), str(HERE / "go" / "client.go")],
                   check=True, timeout=300, capture_output=True)
    return exe


@pytest.fixture(scope="module")
def java_client(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled client, beside a PKCS12 truststore holding taskgate's CA."""
    home = tmp_path_factory.mktemp("java")
    subprocess.run(["javac", "-d", str(home), str(HERE / "java" / "Client.java")],
                   check=True, timeout=300, capture_output=True)
    subprocess.run(["keytool", "-importcert", "-noprompt", "-alias", "taskgate", "-file",
                    str(world.gw.ca), "-keystore", str(home / "agent.p12"),
                    "-storetype", "PKCS12", "-storepass", "changeit"],
                   check=True, timeout=120, capture_output=True)
    return home


def go(world: World, exe: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), url], capture_output=True, text=True, timeout=60,
                          env=world.env())


def java(world: World, home: Path, url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    port = str(world.gw.proxy_port)
    return subprocess.run(
        ["java", "-Dhttps.proxyHost=127.0.0.1", f"-Dhttps.proxyPort={port}",
         "-Dhttp.proxyHost=127.0.0.1", f"-Dhttp.proxyPort={port}",
         "-Djdk.http.auth.tunneling.disabledSchemes=",
         f"-Djavax.net.ssl.trustStore={home / 'agent.p12'}",
         "-Djavax.net.ssl.trustStorePassword=changeit", *flags, "-cp", str(home), "Client",
         url], capture_output=True, text=True, timeout=120,
        env=world.env(TASKGATE_TOKEN=world.token))


def answer(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert out.returncode == 0 and out.stdout, out.stdout + out.stderr[-2000:]
    doc: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return doc


def allowed(world: World, got: dict[str, Any], path: str) -> None:
    assert got["status"] == 200 and f'"path": "{path}"' in got["body"], got
    rec = world.record(got["id"])
    assert (rec["decision"], rec["rule"], rec["path"]) == ("allow", "api", path)
    assert rec["connect_id"], rec  # through a CONNECT tunnel


def refused(world: World, got: dict[str, Any]) -> None:
    assert got["status"] == 403, got
    body = json.loads(got["body"])
    assert REFUSED_REASON in body["error"]["message"] and got["id"] in body["error"]["message"]
    assert world.record(got["id"])["decision"] == "deny"


def test_go_passes_and_is_recorded(world: World, go_client: Path) -> None:
    got = answer(go(world, go_client, f"https://localhost.:{world.upstream.https_port}"
                                      "/allowed/go"))
    allowed(world, got, "/allowed/go")


def test_go_refusal_body_has_the_reason(world: World, go_client: Path) -> None:
    refused(world, answer(go(world, go_client,
                             f"https://localhost.:{world.upstream.https_port}/elsewhere")))


def test_go_never_proxies_loopback(world: World, go_client: Path) -> None:
    """``http.ProxyFromEnvironment`` returns no proxy for ``localhost``: the call goes
    direct (the upstream's certificate is not one taskgate's CA signed), unseen."""
    before = len(world.gw.audit())
    out = go(world, go_client, f"https://localhost:{world.upstream.https_port}/allowed/d")
    assert out.returncode != 0 and "x509" in out.stdout, out.stdout
    assert len(world.gw.audit()) == before


def test_java_passes_and_is_recorded(world: World, java_client: Path) -> None:
    got = answer(java(world, java_client,
                      f"https://localhost:{world.upstream.https_port}/allowed/java",
                      "-Dhttp.nonProxyHosts="))
    allowed(world, got, "/allowed/java")


def test_java_refusal_body_has_the_reason(world: World, java_client: Path) -> None:
    refused(world, answer(java(world, java_client,
                               f"https://localhost:{world.upstream.https_port}/elsewhere",
                               "-Dhttp.nonProxyHosts=")))


def test_java_leaves_loopback_out_of_the_proxy_by_default(world: World,
                                                          java_client: Path) -> None:
    """``http.nonProxyHosts`` defaults to ``localhost|127.*|[::1]``: the call goes direct
    and fails on the upstream's certificate, unseen."""
    before = len(world.gw.audit())
    out = java(world, java_client, f"https://localhost:{world.upstream.https_port}/allowed/d")
    assert out.returncode != 0 and "certification path" in out.stderr, out.stderr[-2000:]
    assert len(world.gw.audit()) == before
