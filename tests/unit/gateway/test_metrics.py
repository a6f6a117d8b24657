"""/metrics: counters move as real calls go through the real gateway; labels stay bounded."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.audit import AuditLog
from proxy.config import Config
from proxy.gateway import Gateway as CoreGateway
from proxy.gateway._metrics import MAX_RULE_LABELS, Metrics
from proxy.identity import Identity
from proxy.tasks._policy import StandingPolicy
from tests.conftest import base_config
from tests.support import Gateway, Keys, Upstream

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(gw: Gateway) -> tuple[Samples, str]:
    r = httpx.get(f"{gw.control_url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, r.text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, shared_files: dict[str, Path],
       upstream: Upstream) -> Iterator[Gateway]:
    g = Gateway(tmp_path_factory.mktemp("metrics"), base_config(shared_files, upstream)).start()
    yield g
    g.stop()


def test_calls_move_the_counters(gw: Gateway, upstream: Upstream, keys: Keys) -> None:
    token = keys.token()
    before, _ = scrape(gw)
    base = f"http://127.0.0.1:{upstream.http_port}"
    with gw.client(token) as c:
        for i in range(3):
            assert c.get(f"{base}/allowed/{i}?api_key=sekrit").status_code == 200
        assert c.get(f"https://localhost:{upstream.https_port}/allowed/x").status_code == 200
        assert c.get(f"{base}/denied/1").status_code == 403
        assert c.get(f"{base}/allowed/1", headers={"X": "y"}).status_code == 200
    with gw.client(None) as c:
        assert c.get(f"{base}/allowed/1").status_code == 407
    after, text = scrape(gw)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("taskgate_calls_total", decision="allow", rule="plain-read") == 4
    assert delta("taskgate_calls_total", decision="allow", rule="tls-read") == 1
    assert delta("taskgate_calls_total", decision="deny", rule="none") == 1
    assert delta("taskgate_calls_total", decision="challenge", rule="none") == 1  # no token
    assert delta("taskgate_call_duration_seconds_count", decision="allow") == 5
    assert delta("taskgate_call_duration_seconds_count", decision="deny") == 1
    assert delta("taskgate_call_duration_seconds_bucket", decision="deny", le="+Inf") == 1
    assert delta("taskgate_call_duration_seconds_sum", decision="allow") > 0
    assert value(after, "taskgate_calls_in_flight") == 0
    assert value(after, "taskgate_audit_write_errors_total") == 0
    assert value(after, "taskgate_audit_healthy") == 1
    assert ("taskgate_active_tasks", ()) in after and ("taskgate_pending_approvals", ()) in after
    # Nothing call-specific or secret in the exposition: no paths, hosts, tokens, query values.
    for needle in ("/allowed", "sekrit", "api_key", token, "127.0.0.1", "localhost",
                   "spiffe://"):
        assert needle not in text, needle
    labels = {k for (_, pairs) in after for k, _ in pairs}
    assert labels <= {"decision", "rule", "le", "secret", "result", "worker"}, labels


def test_metrics_is_open_and_v1_is_not(gw: Gateway) -> None:
    assert httpx.get(f"{gw.control_url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{gw.control_url}/v1/audit", timeout=10).status_code == 401


def test_audit_write_errors_are_counted(tmp_path: Path, shared_files: dict[str, Path],
                                       upstream: Upstream, keys: Keys) -> None:
    """A log on a full disk (/dev/full): calls are refused, and the metric says why."""
    cfg = base_config(shared_files, upstream, audit={"path": "/dev/full"})
    g = Gateway(tmp_path, cfg).start()
    try:
        with g.client(keys.token()) as c:
            r = c.get(f"http://127.0.0.1:{upstream.http_port}/allowed/x")
        assert r.status_code == 503, r.text
        samples, _ = scrape(g)
        assert value(samples, "taskgate_audit_write_errors_total") >= 1
        assert value(samples, "taskgate_audit_healthy") == 0
        assert value(samples, "taskgate_calls_total", decision="allow", rule="plain-read") == 0
    finally:
        g.stop()


# -- the API other features call ------------------------------------------------
def core_gateway(tmp_path: Path, **config: Any) -> CoreGateway:
    cfg = Config(**config)
    return CoreGateway(cfg, Identity([]), StandingPolicy(cfg), AuditLog(str(tmp_path / "a")))


def parsed(metrics: Metrics) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_secret_fetches_by_configured_name_only(tmp_path: Path) -> None:
    m = Metrics(core_gateway(tmp_path, secrets={"github-read": {"provider": "env"}}))
    m.secret_fetch("github-read", ok=True)
    m.secret_fetch("github-read", ok=True)
    m.secret_fetch("github-read", ok=False)
    m.secret_fetch("ghp_16C7e42F292c6912E7710c838347Ae178B4a", ok=False)  # never a label
    s = parsed(m)
    assert value(s, "taskgate_secret_fetches_total", secret="github-read", result="ok") == 2
    assert value(s, "taskgate_secret_fetches_total", secret="github-read", result="error") == 1
    assert value(s, "taskgate_secret_fetches_total", secret="other", result="error") == 1
    assert "ghp_" not in m.render().decode()


def test_gauges_from_callbacks(tmp_path: Path) -> None:
    gateway = core_gateway(tmp_path)
    m = Metrics(gateway)
    assert value(parsed(m), "taskgate_active_tasks") == 0
    tasks = [1, 2, 3]
    m.track("active_tasks", lambda: len(tasks))
    assert value(parsed(m), "taskgate_active_tasks") == 3
    tasks.append(4)
    assert value(parsed(m), "taskgate_active_tasks") == 4

    assert value(parsed(m), "taskgate_pending_approvals") == 0  # nothing tracked: 0
    m.track("pending_approvals", lambda: 2)
    assert value(parsed(m), "taskgate_pending_approvals") == 2

    def broken() -> float:
        raise RuntimeError("store down")

    m.track("pending_approvals", broken)
    assert math.isnan(value(parsed(m), "taskgate_pending_approvals"))
    with pytest.raises(ValueError, match="unknown gauge 'tasks'"):
        m.track("tasks", lambda: 1)


def test_label_sets_stay_bounded(tmp_path: Path) -> None:
    m = Metrics(core_gateway(tmp_path))
    for i in range(MAX_RULE_LABELS + 50):
        m.observe({"decision": "allow", "rule": f"rule-{i}", "duration_ms": 1.0})
    m.observe({"decision": "allow", "rule": "/repos/acme/widgets?token=abc", "duration_ms": 1})
    m.observe({"decision": "made-up", "rule": None, "duration_ms": -5})
    s = parsed(m)
    rules = {dict(labels)["rule"] for (name, labels) in s if name == "taskgate_calls_total"}
    assert len(rules) == MAX_RULE_LABELS + 2  # the first ones seen, "other", "none"
    assert value(s, "taskgate_calls_total", decision="allow", rule="other") == 51
    assert value(s, "taskgate_calls_total", decision="other", rule="none") == 1
    assert value(s, "taskgate_call_duration_seconds_count", decision="allow") == 251


def test_a_held_call_counts_once_by_its_final_decision(tmp_path: Path) -> None:
    m = Metrics(core_gateway(tmp_path))
    m.observe({"decision": "held", "rule": "open-pr", "duration_ms": 0.1})
    m.observe({"decision": "approved", "rule": "open-pr", "duration_ms": 1500.0})
    s = parsed(m)
    calls = {dict(labels)["decision"]: v for (name, labels), v in s.items()
             if name == "taskgate_calls_total"}
    assert calls == {"approved": 1}
    assert value(s, "taskgate_call_duration_seconds_count", decision="approved") == 1


def test_calls_read_as_the_standard_counter_and_histogram(tmp_path: Path) -> None:
    """The per-call metrics are counted in plain ints; their text is what prometheus's
    own Counter and Histogram, fed the same records, would print (bounds included:
    a duration equal to a bucket's bound is in that bucket)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from proxy.gateway._metrics import BUCKETS

    m = Metrics(core_gateway(tmp_path))
    reference = CollectorRegistry()
    calls = Counter("taskgate_calls", "Calls by decision and matching rule",
                    ("decision", "rule"), registry=reference)
    duration = Histogram("taskgate_call_duration_seconds",
                         "Time from request to audit record, by decision", ("decision",),
                         buckets=BUCKETS, registry=reference)
    durations = [0.0, 0.3, *(b * 1000 for b in BUCKETS), 0.99, 1.0001, 299_999.0, 400_000.0,
                 math.inf]
    for i, ms in enumerate(durations):
        decision, rule = ("allow", "read") if i % 3 else ("deny", None)
        m.observe({"decision": decision, "rule": rule, "duration_ms": ms})
        calls.labels(decision, rule or "none").inc()
        duration.labels(decision).observe(ms / 1000.0)
    m.observe({"decision": "deny", "rule": None, "duration_ms": None})  # counted, not timed
    calls.labels("deny", "none").inc()

    def families(text: bytes) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
        out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for family in text_string_to_metric_families(text.decode()):
            if family.name in ("taskgate_calls", "taskgate_call_duration_seconds"):
                out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value
                                    for s in family.samples}
        return out

    assert families(m.render()) == families(generate_latest(reference))
    assert value(parsed(m), "taskgate_call_duration_seconds_bucket", decision="allow",
                 le="0.001") == 2  # 0.3 ms, and 1 ms exactly: the first bucket
