"""Prometheus metrics, served at ``/metrics`` by the control plane (open, like ``/healthz``).

What is exported, and where it comes from:

- ``taskgate_calls_total{decision,rule}`` and the
  ``taskgate_call_duration_seconds{decision}`` histogram: every audit record,
  through :attr:`Gateway.on_record`;
- ``taskgate_secret_fetches_total{secret,result}``: the secret broker calls
  :meth:`Metrics.secret_fetch`;
- ``taskgate_secret_revocations_total{secret,outcome}`` (outcome: ``revoked``,
  ``failed`` per failed attempt, ``expired``, ``abandoned``), the gauge
  ``taskgate_secret_revocations_pending`` and
  ``taskgate_secret_background_errors_total{job}`` (a broker job that failed and
  was restarted): :meth:`Metrics.secret_revocation`,
  :meth:`Metrics.secret_background_error`, ``track("secret_revocations_pending", …)``;
- ``taskgate_active_tasks``, ``taskgate_pending_approvals``,
  ``taskgate_open_websockets``: gauges read at scrape time from callbacks the tasks,
  approvals and WebSocket features register with :meth:`Metrics.track` (0 without one);
- ``taskgate_calls_in_flight``, ``taskgate_audit_write_errors_total``,
  ``taskgate_audit_healthy``: read from the gateway and its audit log;
- ``taskgate_background_failures_total{worker}``: failures of the background
  threads and tasks (audit writer, audit head/anchor, task store, sweeper),
  each logged and survived (proxy/batching.py :data:`FAILURES`).

The builder (proxy/gateway/_build.py) wires the features to it::

    metrics.track("active_tasks", registry.active_count)        # () -> float
    broker.on_fetch = metrics.secret_fetch

Label sets are bounded: decisions are the audit log's fixed set, secrets the
names in the config, rule ids the first :data:`MAX_RULE_LABELS` well-formed
ones seen (then ``other``). No task id, path, host or token is ever a label.
A callback that fails reads as NaN; it never breaks a scrape.

Workers (``proxy.workers`` > 1): each process keeps its own registry, and the
control plane merges their texts at scrape time (:func:`merge_metrics`): counters
and histograms add up, so do the gauges of one process's own load
(``calls_in_flight``); the gauges read from shared state (:data:`SHARED_GAUGES`)
take the highest value, ``audit_healthy`` the lowest (one worker that cannot write
its log is an unhealthy gateway).
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from proxy.audit import DECISIONS
from proxy.batching import FAILURES
from proxy.gateway._core import Gateway

__all__ = ["GAUGES", "METRICS_CONTENT_TYPE", "MAX_RULE_LABELS", "Metrics", "merge_metrics"]

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series: they double the output and say nothing here

MAX_RULE_LABELS = 200
GAUGES = ("active_tasks", "pending_approvals", "secret_revocations_pending", "open_websockets")
REVOCATION_OUTCOMES = ("revoked", "failed", "expired", "abandoned")
SECRET_JOBS = ("fetch", "revocation", "revocations", "load", "store")
OTHER = "other"
NONE = "none"
_LABEL_OK = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
# From a 1 ms allow to a call held five minutes for approval.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0, 300.0)


class _Bounded:
    """Label values admitted first come, up to a cap; the rest read ``other``."""

    def __init__(self, cap: int, known: tuple[str, ...] = (), closed: bool = False) -> None:
        self._values = set(known)
        self._cap = cap
        self._closed = closed
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        if value is None or value == "":
            return NONE
        text = str(value)
        if text in self._values:
            return text
        if self._closed or not _LABEL_OK.fullmatch(text):
            return OTHER
        with self._lock:
            if len(self._values) >= self._cap:
                return OTHER
            self._values.add(text)
        return text


class _Calls:
    """``taskgate_calls_total`` and ``taskgate_call_duration_seconds``, counted in plain
    ints and made metric families at scrape time.

    Both move on every call, on the event loop that also serves the scrape; a
    prometheus child's ``inc``/``observe`` takes a lock each time and walks the
    buckets in Python. The exposition is the same as the standard metrics'."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        # Per decision: the count in each bucket of its own (not cumulative), +Inf last.
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self._bounds = [*(floatToGoString(b) for b in BUCKETS), "+Inf"]

    def add(self, key: tuple[str, str], seconds: float | None) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        if seconds is None:
            return
        decision = key[0]
        counts = self.buckets.get(decision)
        if counts is None:
            counts = self.buckets[decision] = [0] * (len(BUCKETS) + 1)
            self.sums[decision] = 0.0
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # le: the first bound >= it
        self.sums[decision] += seconds

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily("taskgate_calls", "Calls by decision and matching rule",
                                    labels=("decision", "rule"))
        for key, count in list(self.counts.items()):
            calls.add_metric(list(key), float(count))
        yield calls
        duration = HistogramMetricFamily("taskgate_call_duration_seconds",
                                         "Time from request to audit record, by decision",
                                         labels=("decision",))
        for decision, counts in list(self.buckets.items()):
            cumulative, total = [], 0
            for bound, count in zip(self._bounds, counts, strict=True):
                total += count
                cumulative.append((bound, float(total)))
            duration.add_metric([decision], cumulative, self.sums[decision])
        yield duration


class _GatewayCollector:
    """Values read from the gateway at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        audit = self._gateway.audit
        errors = CounterMetricFamily("taskgate_audit_write_errors",
                                     "Audit records that could not be written (calls refused)")
        errors.add_metric([], float(audit.write_errors))
        yield errors
        healthy = GaugeMetricFamily("taskgate_audit_healthy",
                                    "1 if the last audit write succeeded")
        healthy.add_metric([], 1.0 if audit.healthy else 0.0)
        yield healthy
        flight = GaugeMetricFamily("taskgate_calls_in_flight", "Calls not yet recorded")
        flight.add_metric([], float(self._gateway.in_flight))
        yield flight
        failures = CounterMetricFamily("taskgate_background_failures",
                                       "Failures of a background worker (logged, survived)",
                                       labels=("worker",))
        for worker, count in FAILURES.counts().items():
            failures.add_metric([worker], float(count))
        yield failures


SHARED_GAUGES = frozenset(f"taskgate_{g}" for g in GAUGES)
LOWEST_GAUGES = frozenset({"taskgate_audit_healthy"})


class _Merged:
    """A collector of metric families already built (for :func:`generate_latest`)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge_metrics(texts: list[bytes]) -> bytes:
    """Several processes' ``/metrics`` texts as one (see the module docstring); a
    text that does not parse is left out (logged), never a failed scrape."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        try:
            parsed = list(text_string_to_metric_families(text.decode()))
        except (ValueError, UnicodeDecodeError) as e:
            log.error("a worker's metrics could not be read: %s", e)
            continue
        for fam in parsed:
            families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
            merged = values.setdefault(fam.name, {})
            for sample in fam.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                merged[key] = _combine(fam.name, fam.type, merged.get(key), sample.value)
    out = []
    for name, fam in families.items():
        for (sample_name, labels), value in values[name].items():
            fam.add_sample(sample_name, dict(labels), value)
        out.append(fam)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(out))
    return generate_latest(registry)


def _combine(family: str, kind: str, have: float | None, value: float) -> float:
    if have is None:
        return value
    if kind == "gauge" and family in SHARED_GAUGES:
        return max(have, value)
    if kind == "gauge" and family in LOWEST_GAUGES:
        return min(have, value)
    return have + value


def _zero() -> float:
    return 0.0


class Metrics:
    """The gateway's metrics, in a registry of their own (one per gateway)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self.registry = CollectorRegistry()
        self._decision = _Bounded(0, DECISIONS, closed=True)
        self._rule = _Bounded(MAX_RULE_LABELS)
        self._secret = _Bounded(0, tuple(gateway.config.secrets), closed=True)
        self._calls = _Calls()
        self.registry.register(self._calls)
        self.secret_fetches = Counter("taskgate_secret_fetches",
                                      "Secret fetches by secret name and result (ok, error)",
                                      ("secret", "result"), registry=self.registry)
        self._outcome = _Bounded(0, REVOCATION_OUTCOMES, closed=True)
        self._job = _Bounded(0, SECRET_JOBS, closed=True)
        self.secret_revocations = Counter(
            "taskgate_secret_revocations",
            "Revocations of minted credentials by secret name and outcome (revoked, failed "
            "per failed attempt, expired, abandoned)", ("secret", "outcome"),
            registry=self.registry)
        self.secret_background_errors = Counter(
            "taskgate_secret_background_errors",
            "Secret broker jobs that failed unexpectedly (logged, then retried or restarted)",
            ("job",), registry=self.registry)
        self._callbacks: dict[str, Callable[[], float]] = {}
        for name in GAUGES:
            gauge = Gauge(f"taskgate_{name}", f"{name.replace('_', ' ').capitalize()} now",
                          registry=self.registry)
            gauge.set_function(self._reader(name))
        self.registry.register(_GatewayCollector(gateway))

    # -- the API other features call ------------------------------------------
    def observe(self, record: dict[str, Any]) -> None:
        """One audit record (a sync ``Gateway.on_record`` observer, on the event loop)."""
        if record.get("decision") == "held":
            return  # the interim record of a held call; its final record counts it once
        key = (self._decision(record.get("decision")), self._rule(record.get("rule")))
        ms = record.get("duration_ms")
        self._calls.add(key, ms / 1000.0 if isinstance(ms, (int, float)) and ms >= 0 else None)

    def secret_fetch(self, name: str, ok: bool) -> None:
        """Count one fetch of secret ``name`` (a configured name; others read ``other``)."""
        self.secret_fetches.labels(self._secret(name), "ok" if ok else "error").inc()

    def secret_revocation(self, name: str, outcome: str) -> None:
        """Count one revocation outcome of a credential of secret ``name``."""
        self.secret_revocations.labels(self._secret(name), self._outcome(outcome)).inc()

    def secret_background_error(self, job: str) -> None:
        """Count one unexpected failure of a secret broker job."""
        self.secret_background_errors.labels(self._job(job)).inc()

    def track(self, gauge: str, read: Callable[[], float]) -> None:
        """Read gauge ``gauge`` (one of :data:`GAUGES`) from ``read()`` at scrape time."""
        if gauge not in GAUGES:
            raise ValueError(f"unknown gauge {gauge!r}; expected one of {', '.join(GAUGES)}")
        self._callbacks[gauge] = read

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _reader(self, name: str) -> Callable[[], float]:
        def read() -> float:
            fn = self._callbacks.get(name, _zero)
            try:
                return float(fn())
            except Exception:  # noqa: BLE001 - a scrape never fails on a feature's bug
                log.exception("metrics callback for %s failed", name)
                return math.nan

        return read
