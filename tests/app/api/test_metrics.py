"""Prometheus metrics: after a real lifecycle run, the worker's endpoint (the SDK runtime's,
with our metrics beside the SDK's) and the API's `GET /metrics` show each of the service's
metrics with the values the run produced.

The run goes through the API (claims, a repeat, a refusal, task completions, a forged and
an untimely callback) and the worker as `run_worker` builds it: a client on a runtime that
serves Prometheus on a free port, and the metered platform. Along the way the simulator
lags its lookups past the lag window, refuses a restricted user, runs out of budget, and
sees a coupon used that reconciliation then repairs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from temporalio.testing import WorkflowEnvironment

from app.claims import ClaimService
from app.embedded import free_port
from app.workers import build_workers, in_background, start_claims_forever
from coupons import contract as act
from coupons import metrics
from coupons.model import ReconcileInput, ReconcileReport, SyncInput, SyncReport
from coupons.platforms.configured import make_platform
from coupons.platforms.generic.simulator import signed_headers
from coupons.platforms.metered import MeteredPlatform
from coupons.temporal import connect, worker_runtime
from tests.app.api.conftest import (
    CALLBACK_PATH,
    CALLBACK_SECRET,
    Api,
    Tenant,
    claim,
    make_campaign,
)
from tests.conftest import (
    TASK,
    close_workflows,
    current_before_start,
    handle_of,
    run_workflow,
    set_at_platform,
    wait_for_budget,
    wait_for_state,
)

# The simulator's lookups lag longer than the worker's lag window: the first issue attempt
# runs out of window and the retry (same key) finds the coupon.
LAG_WINDOW_S = 1.0
LOOKUP_LAG_S = 1.5


@pytest_asyncio.fixture
async def worker_metrics(api: Api, dev_env: WorkflowEnvironment) -> AsyncIterator[str]:
    """The workers on the API's task queues, built as `run_worker` builds them; yields the
    URL of their runtime's metrics."""
    settings = replace(
        api.settings,
        temporal_address_override=dev_env.client.service_client.config.target_host,
        worker_metrics_port=free_port(),
        lag_window_s=LAG_WINDOW_S,
    )
    runtime = worker_runtime(settings)
    assert runtime is not None
    client = await connect(settings, runtime)
    platform = MeteredPlatform(make_platform(settings), metrics.platform_call)
    await current_before_start(client, settings)
    workers = build_workers(client, api.pool, platform, settings)
    starter = start_claims_forever(ClaimService(api.pool, client, settings))
    try:
        async with workers[0], workers[1], in_background(starter):
            assert settings.worker_metrics_url is not None
            yield settings.worker_metrics_url
    finally:
        await platform.aclose()


def value(exposition: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` whose labels include `labels` (the SDK adds
    its own: namespace, task_queue, activity_type)."""
    return sum(
        s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(url)
    assert answer.status_code == 200, answer.text
    return answer.text


def _notice(platform_coupon_id: str) -> bytes:
    """A COUPON.USED notification as the generic platform sends it."""
    return json.dumps(
        {
            "id": f"ntf_{uuid.uuid4().hex}",
            "event_type": "COUPON.USED",
            "create_time": datetime.now(UTC).isoformat(),
            "coupon": {
                "coupon_id": platform_coupon_id,
                "batch_id": "any",
                "user_id": "anyone",
                "used_at": datetime.now(UTC).isoformat(),
            },
        }
    ).encode()


async def test_both_endpoints_show_what_a_lifecycle_run_did(
    api: Api, tenant_a: Tenant, worker_metrics: str, simulator: httpx.AsyncClient
) -> None:
    api_before = (await api.http.get("/metrics")).text
    campaign = await make_campaign(api, tenant_a, quota=4)
    batch_id = campaign["batch_id"]

    async def complete(coupon: dict[str, Any]) -> None:
        done = await api.http.post(
            f"/v1/coupons/{coupon['coupon_id']}/tasks/{TASK}/complete",
            json={"user_id": coupon["user_id"]},
            headers=tenant_a.app,
        )
        assert done.status_code == 200, done.text

    knobs = {"lookup_lag_s": LOOKUP_LAG_S, "restricted_users": ["rex"]}
    (await simulator.put("/sim/knobs", json=knobs)).raise_for_status()
    alice, rex, bob, carol = [
        await claim(api, tenant_a, campaign["id"], user)
        for user in ("alice", "rex", "bob", "carol")
    ]
    coupons = [alice, rex, bob, carol]
    try:
        assert (await claim(api, tenant_a, campaign["id"], "alice"))["created"] is False
        sold_out = await api.http.post(
            f"/v1/campaigns/{campaign['id']}/claims", json={"user_id": "dave"}, headers=tenant_a.app
        )
        assert sold_out.json()["code"] == "sold_out", sold_out.text

        # alice: issued once the lag passes; rex: refused by the platform.
        await complete(alice)
        await complete(rex)
        issued = await wait_for_state(handle_of(api.client, alice["workflow_id"]), "issued")
        await wait_for_state(handle_of(api.client, rex["workflow_id"]), "failed")
        assert issued.receipt is not None
        (await simulator.put("/sim/knobs", json={"lookup_lag_s": 0.0})).raise_for_status()

        # bob waits for budget; carol's task is still pending: the batch owes both.
        await set_at_platform(api.pool, simulator, batch_id, remaining=0)
        await complete(bob)
        await wait_for_budget(handle_of(api.client, bob["workflow_id"]))
        sync = await run_workflow(
            api.client, api.settings, act.CATALOG_SYNC_WORKFLOW, SyncInput([batch_id]), SyncReport
        )
        assert sync.batches[0].backlog == 1

        # alice's coupon used at a till, no callback: reconciliation repairs it.
        used = await simulator.post(f"/sim/coupons/{issued.receipt.platform_coupon_id}/use")
        used.raise_for_status()
        report = await run_workflow(
            api.client,
            api.settings,
            act.RECONCILE_WORKFLOW,
            ReconcileInput(batch_id),
            ReconcileReport,
        )
        assert (report.mismatches, report.repaired) == (1, 1)
        assert (await handle_of(api.client, alice["workflow_id"]).result()).state == "redeemed"

        forged = _notice(issued.receipt.platform_coupon_id)
        headers = signed_headers("not-the-platform-secret-at-all", forged)
        assert (
            await api.http.post(CALLBACK_PATH, content=forged, headers=headers)
        ).status_code == 401
        early = _notice("cpn_no_receipt_names_it")
        answer = await api.http.post(
            CALLBACK_PATH, content=early, headers=signed_headers(CALLBACK_SECRET, early)
        )
        assert answer.status_code == 409, answer.text

        worker = await scrape(worker_metrics)
        served = await api.http.get("/metrics")
    finally:
        await close_workflows(api.client, [c["workflow_id"] for c in coupons])

    # The worker: the SDK's own metrics, and ours beside them.
    assert (
        value(worker, "temporal_activity_execution_latency_count", activity_type=act.ISSUE_COUPON)
        >= 2
    )
    moves = {
        (a, b): value(worker, metrics.TRANSITIONS, from_state=a, to_state=b)
        for a, b in [
            ("received", "usable"),
            ("usable", "issued"),
            ("usable", "failed"),
            ("issued", "redeemed"),
        ]
    }
    assert moves == {
        ("received", "usable"): 3,
        ("usable", "issued"): 1,
        ("usable", "failed"): 1,
        ("issued", "redeemed"): 1,
    }
    calls = metrics.PLATFORM_CALLS
    assert value(worker, calls, operation="send_coupon", outcome="ok") >= 2  # alice, twice
    assert value(worker, calls, operation="send_coupon", outcome="refused") == 1  # rex
    assert value(worker, calls, operation="send_coupon", outcome="budget_exhausted") >= 1
    assert value(worker, calls, operation="get_coupon", outcome="not_found") >= 1
    assert value(worker, calls, operation="get_coupon", outcome="ok") >= 1
    assert value(worker, calls, operation="get_batch", outcome="ok") == 1
    assert value(worker, calls, operation="batch_flow", outcome="ok") == 2  # sent, used
    sends = value(worker, calls, operation="send_coupon")
    latency = metrics.PLATFORM_CALL_DURATION
    assert value(worker, f"{latency}_count", operation="send_coupon") == sends
    assert value(worker, f"{latency}_sum", operation="send_coupon") > 0
    # Seconds buckets (the runtime's override), not the exporter's default milliseconds.
    assert value(worker, f"{latency}_bucket", operation="send_coupon", le="7.5") == sends
    assert value(worker, metrics.LAG_RETRIES, stage="lookup") >= 1
    assert value(worker, metrics.LAG_RETRIES, stage="send") >= 1
    assert value(worker, metrics.BATCH_SYNCS, drifted="true") == 1
    # Below what it owes (bob and carol), and budget exhausted with bob waiting.
    assert value(worker, metrics.BATCH_DRIFT, batch_id=batch_id) == 2
    assert value(worker, metrics.BATCH_BACKLOG, batch_id=batch_id) == 1
    mismatches = metrics.RECONCILE_MISMATCHES
    assert value(worker, mismatches, batch_id=batch_id, kind="state") == 1
    assert value(worker, mismatches, batch_id=batch_id, kind="platform_only") == 0
    assert value(worker, metrics.RECONCILE_REPAIRS) == 1

    # The API: what this run added to its counters.
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/plain")

    def added(sample: str, **labels: str) -> float:
        return value(served.text, sample, **labels) - value(api_before, sample, **labels)

    assert added("coupons_claims_total", outcome="created") == 4
    assert added("coupons_claims_total", outcome="existing") == 1
    assert added("coupons_claims_total", outcome="sold_out") == 1
    assert added("coupons_callbacks_total", outcome="rejected") == 1
    assert added("coupons_callbacks_total", outcome="unknown_platform_coupon") == 1
    assert added("coupons_callback_verification_failures_total") == 1
    assert value(served.text, "process_cpu_seconds_total") > 0


async def test_the_api_endpoint_takes_no_key_speaks_openmetrics_and_stays_out_of_the_schema(
    api: Api,
) -> None:
    plain = await api.http.get("/metrics")
    assert plain.status_code == 200
    assert "# TYPE coupons_claims_total counter" in plain.text
    openmetrics = await api.http.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    schema = (await api.http.get("/openapi.json")).json()
    assert "/metrics" not in schema["paths"]
