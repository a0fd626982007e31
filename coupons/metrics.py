"""The service's own Prometheus metrics: their names, labels and where they are exported.

Two processes, two exporters:

- The worker records through the Temporal SDK's meter (`activity.metric_meter()`), so its
  metrics sit beside the SDK's own (`temporal_*`) on the worker runtime's endpoint
  (`coupons.temporal.worker_runtime`, WORKER_METRICS_PORT). The SDK adds `namespace`,
  `task_queue` and `activity_type` to every series.
- The API records with prometheus_client into `REGISTRY`, served at its `GET /metrics`.
  The command line counts its claims there too, harmlessly: nothing serves them. Several
  API processes on one port (API_PROCESSES) record into files of prometheus_client's
  multiprocess mode instead, and each serves the sum (`api_registry`).

Labels hold bounded sets only (states, operations, outcomes, refusal codes, our batch ids);
never a user, coupon or notification id.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from temporalio import activity
from temporalio.common import MetricMeter

from coupons.config import PROMETHEUS_MULTIPROC_DIR
from coupons.model import BatchReconciliation, BatchSync, Transition

# ----------------------------------------------------------------- the worker (SDK meter)

TRANSITIONS = "coupons_transitions_total"
PLATFORM_CALLS = "coupons_platform_calls_total"
PLATFORM_CALL_DURATION = "coupons_platform_call_duration_seconds"
LAG_RETRIES = "coupons_lag_retries_total"
BATCH_SYNCS = "coupons_batch_syncs_total"
BATCH_DRIFT = "coupons_batch_drift"
BATCH_BACKLOG = "coupons_batch_backlog"
RECONCILE_MISMATCHES = "coupons_reconcile_mismatches"
RECONCILE_REPAIRS = "coupons_reconcile_repairs_requested_total"
WEDGED = "coupons_wedged"
GC_PAUSE = "coupons_worker_gc_pause_seconds"

# The SDK's exporter gives a histogram it does not know millisecond buckets (50 ms to 10 s);
# ours measure seconds. For PrometheusConfig(histogram_bucket_overrides=...). One HTTP
# request lasts at most PLATFORM_TIMEOUT_S (under 7.5 s); an adapter call may make two or
# three (a flow file's descriptor and download), hence the buckets above it.
HISTOGRAM_BUCKETS: dict[str, list[float]] = {
    PLATFORM_CALL_DURATION: [
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        7.5,
        15.0,
        30.0,
    ],
    # A young collection takes well under a millisecond; a full one walks every cached
    # workflow, 0.15 to 0.43 s at a thousand of them (bench/results/2026-12-07-profile.md).
    GC_PAUSE: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
}

# Mismatch kinds reconciliation reports (`coupons.reconcile`); each is set on every run, so
# a kind that went away reads 0 instead of its last count.
MISMATCH_KINDS = ("platform_only", "ledger_only", "state")


def _meter() -> MetricMeter:
    # Outside an activity (a script, a test driving an adapter) there is no worker runtime
    # to export through: record nothing rather than fail the call being measured.
    return activity.metric_meter() if activity.in_activity() else MetricMeter.noop


def transition(moved: Transition) -> None:
    """A transition the ledger wrote for the first time (retries that find it written are
    not counted)."""
    _meter().create_counter(
        TRANSITIONS, "Coupon state transitions written to the ledger, by from and to state"
    ).add(1, {"from_state": moved.from_state or "none", "to_state": moved.to_state})


def platform_call(operation: str, outcome: str, seconds: float) -> None:
    """One call to the platform: `coupons.platforms.metered.MeteredPlatform` reports each."""
    meter = _meter()
    meter.create_counter(
        PLATFORM_CALLS,
        "Calls to the coupon platform, by operation and outcome (ok, not_found, refused, "
        "unavailable, rate_limited, batch_unavailable, budget_exhausted, ...)",
    ).add(1, {"operation": operation, "outcome": outcome})
    meter.create_histogram_float(
        PLATFORM_CALL_DURATION, "Latency of calls to the coupon platform, by operation", "s"
    ).record(seconds, {"operation": operation})


def lag_retry(stage: str) -> None:
    """The platform's lookup did not show a sent coupon yet. `lookup`: looked again within
    the lag window; `send`: the window ran out and the issue activity retries, resending the
    same key."""
    _meter().create_counter(
        LAG_RETRIES,
        "Lookups after a send that did not show the coupon yet and were retried: within the "
        "lag window (stage=lookup), or past it by retrying the send (stage=send)",
    ).add(1, {"stage": stage})


def batch_synced(synced: BatchSync) -> None:
    """The catalog sync's view of one batch: whether it drifted, and the coupons waiting."""
    meter = _meter()
    meter.create_counter(
        BATCH_SYNCS, "Batches synced from the platform, by whether they drifted from the ledger"
    ).add(1, {"drifted": "true" if synced.drift else "false"})
    labels = {"batch_id": synced.batch_id}
    meter.create_gauge(
        BATCH_DRIFT,
        "Drift findings of the batch at its last sync (0: the platform covers what we owe)",
    ).set(len(synced.drift), labels)
    meter.create_gauge(
        BATCH_BACKLOG, "Usable coupons of the batch waiting for budget at its last sync"
    ).set(synced.backlog, labels)


def reconciled(result: BatchReconciliation) -> None:
    """One batch's reconciliation: its mismatches by kind, and the repairs it asked for."""
    meter = _meter()
    found = meter.create_gauge(
        RECONCILE_MISMATCHES, "Mismatches the last reconciliation of the batch found, by kind"
    )
    for kind in MISMATCH_KINDS:
        count = sum(1 for m in result.mismatches if m.kind == kind)
        found.set(count, {"batch_id": result.batch_id, "kind": kind})
    meter.create_counter(
        RECONCILE_REPAIRS,
        "Redemptions reconciliation asked coupon workflows to record (used at the platform, "
        "issued in the ledger)",
    ).add(len(result.repairs_requested))


def wedged(meter: MetricMeter, by_cause: Mapping[str, int]) -> None:
    """The worker's last count of wedged coupons (`app.wedged`), for every cause (0 when
    none, so a recovered cause reads 0). Outside an activity: the caller passes the worker
    runtime's meter. Every worker counts the same coupons: aggregate with max, not sum."""
    gauge = meter.create_gauge(
        WEDGED,
        "Coupons whose workflow cannot make progress, by cause (undecodable, task_failing, "
        "not_started, missing, closed): `starter.py coupon wedged` lists them",
    )
    for cause, count in by_cause.items():
        gauge.set(count, {"cause": cause})


def gc_pause_recorder(meter: MetricMeter) -> Callable[[int, float], None]:
    """What records each of the worker's garbage collections (`app.heap.time_collections`),
    by generation (2 is a full collection): the worker's event loop stops meanwhile."""
    histogram = meter.create_histogram_float(
        GC_PAUSE,
        "Garbage collections in the worker process and how long each took (every thread "
        "waits meanwhile), by generation: 2 is a full collection",
        "s",
    )

    def record(generation: int, seconds: float) -> None:
        histogram.record(seconds, {"generation": str(generation)})

    return record


# ----------------------------------------------------------------- the API (prometheus_client)

# Its own registry, not the library's global one: exactly what /metrics should show, with
# the process, platform and garbage-collector metrics operators expect of a Python service.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)


def api_registry() -> CollectorRegistry:
    """What the API's /metrics serves: `REGISTRY`, or with several API processes the sum of
    all their counters (the processes' own CPU, memory and collections are left out there:
    they are each one process's, and a scrape reaches any one of them)."""
    if PROMETHEUS_MULTIPROC_DIR not in os.environ:
        return REGISTRY
    summed = CollectorRegistry()
    MultiProcessCollector(summed)  # type: ignore[no-untyped-call]  # its __init__ is unannotated
    return summed


CLAIMS = Counter(
    "coupons_claims",
    "Claims answered, by outcome: created, existing (the coupon the user holds), a refusal's "
    "code (sold_out, campaign_paused, ...) or error",
    ["outcome"],
    registry=REGISTRY,
)
CALLBACKS = Counter(
    "coupons_callbacks",
    "The platform's redemption notifications, by outcome: applied, duplicate, finished, "
    "rejected (did not verify), unknown_platform_coupon or unavailable (delivered again)",
    ["outcome"],
    registry=REGISTRY,
)
CALLBACK_VERIFICATION_FAILURES = Counter(
    "coupons_callback_verification_failures",
    "Redemption notifications whose signature, freshness or body did not verify",
    registry=REGISTRY,
)
