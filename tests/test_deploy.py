"""deploy/kubernetes/ and docker-compose.yaml: valid, and saying what the spec promises.

The manifests are checked against the Kubernetes API schemas that kubernetes-validate
ships (no network: a connection attempt fails the test); docker cannot run here, so
the compose file is checked for its structure.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config import load_config

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deploy" / "kubernetes"
KUBE_VERSION = "1.30.0"  # the oldest version the manifests are meant for


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("version", [KUBE_VERSION, "1.37.0"])
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "NetworkPolicy",
                                         "StatefulSet", "Namespace"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.usefixtures("offline")
def test_the_validator_rejects_what_kubernetes_would() -> None:
    """Not a check that cannot fail: a misspelt field and a wrong type are refused."""
    bad = one("Deployment", "taskgate")
    bad["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)
    bad = one("Deployment", "taskgate")
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_kustomization_lists_every_gateway_manifest() -> None:
    listed = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml",
                                                       "agents-networkpolicy.yaml"}
    assert set(listed) == on_disk


def test_the_deployment_is_two_hardened_replicas_ready_on_readyz() -> None:
    dep = one("Deployment", "taskgate")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    (gw,) = pod["containers"]
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "control"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in gw["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/var/lib/taskgate"]]  # home and the audit logs
    # The pod's config is a valid taskgate config, sharing state as workers need.
    assert mounts["/etc/taskgate/taskgate.yaml"] == "config"


def test_the_configmap_holds_a_valid_config_for_replicas(tmp_path: Path) -> None:
    cm = one("ConfigMap", "taskgate-config")
    path = tmp_path / "taskgate.yaml"
    path.write_text(cm["data"]["taskgate.yaml"])
    config = load_config(str(path))
    assert (config.state_backend, config.workers) == ("redis", 2)
    assert config.home == "/var/lib/taskgate" and config.audit_path.startswith(config.home)
    assert config.replica_id is None  # each pod is <pod name>-<pid>
    assert config.control_listen[0] == "0.0.0.0"  # the kubelet's probe reaches it


def test_agent_pods_reach_only_the_gateway_and_dns() -> None:
    pol = one("NetworkPolicy", "agents-egress-only-through-taskgate")
    assert pol["spec"]["policyTypes"] == ["Egress"]
    rules = pol["spec"]["egress"]
    gateway = one("Deployment", "taskgate")["spec"]["selector"]["matchLabels"]
    assert rules[0]["to"][0]["podSelector"]["matchLabels"] == gateway
    assert rules[0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert {p["port"] for p in rules[1]["ports"]} == {53}
    assert len(rules) == 2 and all(r.get("to") for r in rules)  # no rule open to all


def test_redis_never_evicts_and_keeps_an_append_only_file() -> None:
    (redis,) = one("StatefulSet", "taskgate-redis")["spec"]["template"]["spec"]["containers"]
    cmd = " ".join(redis["args"])
    assert "--maxmemory-policy noeviction" in cmd and "--appendonly yes" in cmd


def test_compose_runs_two_gateways_and_redis_with_healthchecks(tmp_path: Path) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"gateway-1", "gateway-2", "redis"} <= set(services)
    for name in ("gateway-1", "gateway-2", "redis"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("gateway-1", "gateway-2"):
        gw = services[name]
        assert "readyz" in " ".join(gw["healthcheck"]["test"])
        assert gw["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert gw["read_only"] is True and gw["user"] != "0"
        mounts = {m.split(":")[1]: m.split(":")[0] for m in gw["volumes"]}
        config = load_config(str(REPO / mounts["/etc/taskgate/taskgate.yaml"]))
        assert config.state_backend == "redis"
        assert config.redis_url is not None and "//redis:6379" in config.redis_url
    assert services["gateway-1"]["ports"] != services["gateway-2"]["ports"]
    assert set(compose["volumes"]) >= {"gateway-1", "gateway-2", "redis"}


def test_the_image_runs_as_a_user() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
