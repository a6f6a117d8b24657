"""Workers' /metrics merged by the control plane (proxy/gateway/_metrics.py merge_metrics)."""

from __future__ import annotations

import warnings

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.gateway import merge_metrics


def worker(allowed: float, in_flight: float, active: float, healthy: float) -> bytes:
    return f"""# HELP taskgate_calls_total Calls by decision and matching rule
# TYPE taskgate_calls_total counter
taskgate_calls_total{{decision="allow",rule="r1"}} {allowed}
# HELP taskgate_call_duration_seconds Time
# TYPE taskgate_call_duration_seconds histogram
taskgate_call_duration_seconds_bucket{{decision="allow",le="0.001"}} 1.0
taskgate_call_duration_seconds_bucket{{decision="allow",le="+Inf"}} {allowed}
taskgate_call_duration_seconds_count{{decision="allow"}} {allowed}
taskgate_call_duration_seconds_sum{{decision="allow"}} 0.25
# HELP taskgate_calls_in_flight In flight
# TYPE taskgate_calls_in_flight gauge
taskgate_calls_in_flight {in_flight}
# HELP taskgate_active_tasks Active tasks now
# TYPE taskgate_active_tasks gauge
taskgate_active_tasks {active}
# HELP taskgate_audit_healthy Healthy
# TYPE taskgate_audit_healthy gauge
taskgate_audit_healthy {healthy}
""".encode()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_counters_and_histograms_add_up_shared_gauges_do_not() -> None:
    got = samples(merge_metrics([worker(3, 1, 5, 1), worker(4, 2, 5, 0)]))
    assert got[("taskgate_calls_total", (("decision", "allow"), ("rule", "r1")))] == 7
    assert got[("taskgate_call_duration_seconds_bucket",
                (("decision", "allow"), ("le", "0.001")))] == 2
    assert got[("taskgate_call_duration_seconds_sum", (("decision", "allow"),))] == 0.5
    assert got[("taskgate_calls_in_flight", ())] == 3  # each process's own load
    assert got[("taskgate_active_tasks", ())] == 5  # the same shared state, read twice
    assert got[("taskgate_audit_healthy", ())] == 0  # one worker cannot write its log


def test_a_text_that_does_not_parse_is_left_out() -> None:
    got = samples(merge_metrics([worker(3, 0, 0, 1), b"taskgate_calls_total{ 1\n"]))
    assert got[("taskgate_calls_total", (("decision", "allow"), ("rule", "r1")))] == 3


@pytest.mark.parametrize(("failures", "delay"), [(1, 0.5), (2, 1.0), (4, 4.0), (99, 30.0)])
def test_restart_backoff_doubles_to_a_cap(failures: int, delay: float) -> None:
    with warnings.catch_warnings():
        # Here, not at the top: proxy.supervisor pulls in mitmproxy, whose ldap3 import
        # warns (the suite turns warnings into errors).
        warnings.simplefilter("ignore", DeprecationWarning)
        from proxy.supervisor import backoff
    assert backoff(failures) == delay
