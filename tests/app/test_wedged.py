"""Wedged coupons, each cause made for real and recovered: found by `find_wedged`, counted in
the `coupons_wedged` gauge by the worker's loop (scraped from a worker runtime's Prometheus
endpoint), recovered by `recover` with the claim row intact and exactly one coupon in the
user's wallet at the simulator.

The causes: a payload no key of the worker's ring decodes (a "shell" with another key ring
started it), a workflow task failing again and again (nondeterminism: a different workflow
under the same name ran its first task), a claim whose start never happened, a claim marked
started whose workflow Temporal lost, and a closed workflow under an open claim.

These run on their own dev server, with Temporal's `TemporalReportedProblems` set after 2
consecutive workflow task problems instead of the default 5, so a failing task is flagged in
about 11 s (the second retry waits out the 10 s workflow task timeout) instead of 50 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from psycopg_pool import AsyncConnectionPool
from temporalio import workflow
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.deployment.v1 import WorkerDeploymentOptions
from temporalio.api.enums.v1 import EventType, WorkerVersioningMode
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DeleteWorkflowExecutionRequest,
    PollWorkflowTaskQueueRequest,
)
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from app.claims import ClaimResult, ClaimService
from app.embedded import free_port
from app.versioning import worker_version
from app.wedged import (
    CAUSES,
    CLOSED,
    MISSING,
    NOT_STARTED,
    TASK_FAILING,
    UNDECODABLE,
    Wedged,
    find_wedged,
    recover,
    recover_all,
)
from app.workers import watch_wedged_forever
from coupons.codec import encrypted_converter, ensure_keys, load_keys
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger.batches import get_batch
from coupons.model import (
    CouponInput,
    RedemptionReport,
    TaskCompletion,
    idempotency_key,
)
from coupons.platforms.base import SendRequest
from coupons.platforms.generic.adapter import RestPlatform
from coupons.temporal import worker_runtime
from tests.conftest import (
    TASK,
    claims_of,
    close_workflows,
    current_before_start,
    execute,
    handle_of,
    ledger_states,
    new_campaign,
    new_id,
    running_workers,
    sim_stats,
    start_dev_server,
    wait_for_state,
)
from workflows.user_coupon import UserCouponWorkflow

PROBLEMS_AFTER = 2
FLAG_WAIT_S = 40.0
ISSUED = [(None, "received"), ("received", "usable"), ("usable", "issued")]


# ----------------------------------------------------------------- fixtures


@pytest_asyncio.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of our own: the shared one keeps Temporal's default threshold."""
    server = await start_dev_server(
        {"system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute": PROBLEMS_AFTER}
    )
    yield server
    await server.shutdown()


@pytest.fixture(scope="module")
def metrics_runtime() -> Iterator[tuple[Runtime, str]]:
    """A worker runtime serving Prometheus on a free port, as `run_worker` builds it."""
    settings = replace(Settings(), worker_metrics_port=free_port())
    runtime = worker_runtime(settings)
    assert runtime is not None
    assert settings.worker_metrics_url is not None
    yield runtime, settings.worker_metrics_url


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "codec-keys.json"
    ensure_keys(path)
    return path


@pytest.fixture
def client(env: WorkflowEnvironment, keys: Path) -> Client:
    """The service's client: payloads encrypted with the worker's key ring."""
    return with_keys(env.client, keys)


@pytest_asyncio.fixture
async def gauge(
    pool: AsyncConnectionPool,
    client: Client,
    settings: Settings,
    metrics_runtime: tuple[Runtime, str],
) -> AsyncIterator[str]:
    """The worker's wedged-coupon loop, every half second; yields its metrics URL."""
    runtime, url = metrics_runtime
    loop = asyncio.create_task(
        watch_wedged_forever(pool, client, settings, runtime.metric_meter, every_s=0.5)
    )
    yield url
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop


# ----------------------------------------------------------------- helpers


def with_keys(client: Client, keys: Path) -> Client:
    config = client.config()
    config["data_converter"] = encrypted_converter(keys)
    return Client(**config)


async def wedged_gauge(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url)).text
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.labels["cause"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "coupons_wedged"
    }


async def wait_for_gauge(url: str, **expected: int) -> None:
    """Until the gauge reads `expected` for the named causes and 0 for the others."""
    want = {cause: float(expected.get(cause, 0)) for cause in CAUSES}
    seen: dict[str, float] = {}
    try:
        async with asyncio.timeout(FLAG_WAIT_S):
            while seen != want:
                seen = await wedged_gauge(url)
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"coupons_wedged reads {seen}, expected {want}")


async def wait_wedged(
    pool: AsyncConnectionPool, client: Client, settings: Settings, coupon_id: str
) -> Wedged:
    """Until `find_wedged` lists the coupon (Temporal flags a failing task after a while)."""
    try:
        async with asyncio.timeout(FLAG_WAIT_S):
            while True:
                for found in await find_wedged(pool, client, settings):
                    if found.coupon_id == coupon_id:
                        return found
                await asyncio.sleep(0.5)
    except TimeoutError:
        pytest.fail(f"{coupon_id} never listed as wedged")


async def wallet(
    simulator: httpx.AsyncClient, pool: AsyncConnectionPool, batch_id: str, user: str
) -> list[str]:
    """The platform coupon ids the simulator holds for `user` in our batch."""
    batch = await get_batch(pool, batch_id)
    assert batch is not None
    answer = await simulator.get(f"/sim/batches/{batch.platform_batch_id}/coupons")
    answer.raise_for_status()
    return [c["coupon_id"] for c in answer.json()["coupons"] if c["user_id"] == user]


async def claim_row_intact(
    pool: AsyncConnectionPool, claimed: ClaimResult, state: str
) -> ledger.Claim:
    row = await ledger.get_claim(pool, claimed.coupon_id)
    assert row is not None
    assert (row.workflow_id, row.claimed_at, row.user_id, row.seq) == (
        claimed.workflow_id,
        claimed.claimed_at,
        claimed.user_id,
        1,
    )
    assert (row.state, row.workflow_started) == (state, True)
    return row


async def gone(client: Client, workflow_id: str) -> None:
    """Until Temporal no longer knows the workflow (deletion is asynchronous)."""
    async with asyncio.timeout(15):
        while True:
            try:
                await client.get_workflow_handle(workflow_id).describe()
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return
                raise
            await asyncio.sleep(0.2)


# ----------------------------------------------------------------- (a) a payload no key decodes


async def test_a_start_encrypted_with_another_key_ring_is_found_and_recovered(
    env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
    client: Client,
    gauge: str,
    tmp_path: Path,
) -> None:
    foreign_keys = tmp_path / "shell-keys.json"
    ensure_keys(foreign_keys)
    shell = with_keys(env.client, foreign_keys)
    before = await sim_stats(simulator)
    campaign = await new_campaign(pool, platform)
    user = new_id("u")
    try:
        async with running_workers(client, pool, settings, starter=False):
            shells = ClaimService(pool, shell, settings)
            claimed = await shells.claim_started(campaign.id, user)
            found = await wait_wedged(pool, client, settings, claimed.coupon_id)
            assert (found.cause, found.ledger_state, found.campaign_id) == (
                UNDECODABLE,
                "received",
                campaign.id,
            )
            assert load_keys(foreign_keys).current in found.detail, found.detail
            assert found.since is not None and found.attempts and found.attempts >= 2
            await wait_for_gauge(gauge, undecodable=1)

            # A process that reads the run's payloads while the worker does not (the shell's
            # ring) leaves it alone: the worker lacks a key, a new run would fail there too.
            refused = await recover(pool, shell, settings, claimed.coupon_id)
            assert (refused.action, refused.stopped_run_id) == ("none", None)
            assert "CODEC_KEYS_FILE" in refused.detail

            recovery = await recover(pool, client, settings, claimed.coupon_id)
            assert (recovery.action, recovery.cause) == ("restarted", UNDECODABLE)
            assert recovery.stopped_run_id == found.run_id and recovery.new_run_id
            handle = handle_of(client, claimed.workflow_id)
            await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
            status = await wait_for_state(handle, "issued")
            await wait_for_gauge(gauge)
        stopped = client.get_workflow_handle(claimed.workflow_id, run_id=found.run_id)
        assert (await stopped.describe()).status == WorkflowExecutionStatus.TERMINATED
        after = await sim_stats(simulator)
        assert after["sends_applied"] - before["sends_applied"] == 1
        assert status.receipt is not None
        assert await wallet(simulator, pool, campaign.batch_id, user) == [
            status.receipt.platform_coupon_id
        ]
        await claim_row_intact(pool, claimed, "issued")
        assert await ledger_states(pool, claimed.coupon_id) == ISSUED
    finally:
        await close_workflows(env.client, [claimed.workflow_id])


async def test_an_undecodable_start_whose_first_task_timed_out_is_still_undecodable(
    env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    client: Client,
    tmp_path: Path,
) -> None:
    """The first attempt of the coupon's task is polled and never answered (a worker killed
    mid-task; in a chaos run, a poll's answer the loaded dev server lost), so the only problem
    Temporal records is a timeout: the SDK reports a failure on a task's first attempt only,
    and the worker's codec failures on the retries leave no event. The run is still listed as
    undecodable, from its input, and recovered."""
    foreign_keys = tmp_path / "shell-keys.json"
    ensure_keys(foreign_keys)
    shell = with_keys(env.client, foreign_keys)
    campaign = await new_campaign(pool, platform)
    claimed = await ClaimService(pool, shell, settings).claim_started(campaign.id, new_id("u"))
    try:
        await current_before_start(client, settings)
        version = worker_version(settings)
        polled = await client.workflow_service.poll_workflow_task_queue(
            PollWorkflowTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=settings.task_queue),
                identity="a worker killed mid-task",
                deployment_options=WorkerDeploymentOptions(
                    deployment_name=version.deployment_name,
                    build_id=version.build_id,
                    worker_versioning_mode=WorkerVersioningMode.WORKER_VERSIONING_MODE_VERSIONED,
                ),
            )
        )
        assert polled.workflow_execution.workflow_id == claimed.workflow_id
        async with running_workers(client, pool, settings, starter=False):
            found = await wait_wedged(pool, client, settings, claimed.coupon_id)
            handle = handle_of(client, claimed.workflow_id)
            problems = [
                e.event_type
                async for e in handle.fetch_history_events()
                if e.event_type
                in (
                    EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
                    EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
                )
            ]
            assert problems == [EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT]
            assert found.cause == UNDECODABLE, found.detail
            assert load_keys(foreign_keys).current in found.detail, found.detail
            recovery = await recover(pool, client, settings, claimed.coupon_id)
            assert (recovery.action, recovery.cause) == ("restarted", UNDECODABLE)
            await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
            await wait_for_state(handle, "issued")
        await claim_row_intact(pool, claimed, "issued")
    finally:
        await close_workflows(env.client, [claimed.workflow_id])


# ----------------------------------------------------------------- (b) a task failing, again


@workflow.defn(name="UserCouponWorkflow", sandboxed=False)
class AnotherCouponWorkflow:
    """What a bad deploy ran under the coupon workflow's name: its first task schedules an
    activity where today's code starts the task deadline timer, so today's code cannot
    replay it (nondeterminism) and fails every task from then on."""

    @workflow.run
    async def run(self, input: CouponInput) -> None:
        workflow.start_activity(
            "not-ours", start_to_close_timeout=timedelta(hours=1), task_queue="nobody-polls"
        )
        await workflow.wait_condition(lambda: False)


async def test_a_task_failing_on_nondeterminism_is_found_and_recovered_with_its_task_report(
    env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
    client: Client,
    gauge: str,
) -> None:
    before = await sim_stats(simulator)
    campaign = await new_campaign(pool, platform)
    user = new_id("u")
    bad_deploy = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[AnotherCouponWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    async with bad_deploy:
        claimed = await ClaimService(pool, client, settings).claim_started(campaign.id, user)
        handle = handle_of(client, claimed.workflow_id)
        async with asyncio.timeout(15):
            while True:
                events = (await handle.fetch_history()).events
                if EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED in [e.event_type for e in events]:
                    break  # its first task is done: the history holds what it did
                await asyncio.sleep(0.2)
    try:
        # The user's task report reaches the stuck run: its signal is in the history.
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
        async with running_workers(client, pool, settings):
            found = await wait_wedged(pool, client, settings, claimed.coupon_id)
            assert (found.cause, found.ledger_state) == (TASK_FAILING, "received")
            assert "NON_DETERMINISTIC" in found.detail, found.detail
            await wait_for_gauge(gauge, task_failing=1)

            [recovery] = await recover_all(pool, client, settings)
            assert (recovery.coupon_id, recovery.action) == (claimed.coupon_id, "restarted")
            assert TASK in recovery.detail  # the report the stuck run was given, taken
            status = await wait_for_state(handle, "issued")
            await wait_for_gauge(gauge)
        after = await sim_stats(simulator)
        assert after["sends_applied"] - before["sends_applied"] == 1
        assert status.receipt is not None
        assert await wallet(simulator, pool, campaign.batch_id, user) == [
            status.receipt.platform_coupon_id
        ]
        await claim_row_intact(pool, claimed, "issued")
        assert await ledger_states(pool, claimed.coupon_id) == ISSUED
    finally:
        await close_workflows(env.client, [claimed.workflow_id])


# ----------------------------------------------------------------- (c) a start that never happened


async def test_a_claim_whose_start_never_happened_is_found_and_started(
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    client: Client,
    gauge: str,
) -> None:
    campaign = await new_campaign(pool, platform)
    orphan, _ = await ledger.claim(pool, campaign.id, new_id("u"))
    # Long past the repair's time: no worker ran to repair it.
    await execute(
        pool,
        "UPDATE claims SET claimed_at = now() - interval '1 hour' WHERE coupon_id = %s",
        orphan.coupon_id,
    )
    try:
        [found] = await find_wedged(pool, client, settings)
        assert (found.coupon_id, found.cause, found.run_id) == (orphan.coupon_id, NOT_STARTED, None)
        await wait_for_gauge(gauge, not_started=1)
        recovery = await recover(pool, client, settings, orphan.coupon_id)
        assert recovery.action == "started"
        description = await client.get_workflow_handle(orphan.workflow_id).describe()
        assert description.status == WorkflowExecutionStatus.RUNNING
        row = await ledger.get_claim(pool, orphan.coupon_id)
        assert row is not None and row.workflow_started
        await wait_for_gauge(gauge)
    finally:
        await close_workflows(client, [orphan.workflow_id])


async def test_an_issued_coupon_whose_workflow_temporal_lost_resumes_from_the_ledger(
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
    client: Client,
    gauge: str,
) -> None:
    before = await sim_stats(simulator)
    campaign = await new_campaign(pool, platform)
    user = new_id("u")
    async with running_workers(client, pool, settings):
        claimed = await claims_of(pool, client, settings).claim(campaign.id, user)
        handle = handle_of(client, claimed.workflow_id)
        await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
        issued = await wait_for_state(handle, "issued")
        assert issued.receipt is not None
        # Temporal's data lost: the workflow is gone, the ledger says started and issued.
        await client.workflow_service.delete_workflow_execution(
            DeleteWorkflowExecutionRequest(
                namespace=client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=claimed.workflow_id),
            )
        )
        await gone(client, claimed.workflow_id)
        try:
            found = await wait_wedged(pool, client, settings, claimed.coupon_id)
            assert (found.cause, found.ledger_state, found.run_id) == (MISSING, "issued", None)
            await wait_for_gauge(gauge, missing=1)

            recovery = await recover(pool, client, settings, claimed.coupon_id)
            assert recovery.action == "restarted"
            resumed = await wait_for_state(handle, "issued")
            assert resumed.receipt == issued.receipt
            assert resumed.waiting_for.startswith("redemption until")
            await wait_for_gauge(gauge)
            # The resumed run finishes the story: a redemption reaches ledger and workflow.
            await handle.signal(
                UserCouponWorkflow.report_redemption, RedemptionReport(datetime.now(UTC))
            )
            await wait_for_state(handle, "redeemed")
        finally:
            await close_workflows(client, [claimed.workflow_id])
    after = await sim_stats(simulator)
    assert after["sends_applied"] - before["sends_applied"] == 1
    assert await wallet(simulator, pool, campaign.batch_id, user) == [
        issued.receipt.platform_coupon_id
    ]
    await claim_row_intact(pool, claimed, "redeemed")
    assert await ledger_states(pool, claimed.coupon_id) == [*ISSUED, ("issued", "redeemed")]


# ----------------------------------------------------------------- (d) closed under an open claim


async def test_a_send_the_ledger_never_recorded_gives_one_coupon_after_recovery(
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
    client: Client,
    gauge: str,
) -> None:
    """The stuck run's send reached the platform, its receipt never reached the ledger; the
    run is closed (terminated). The resumed `usable` run sends the same key: one coupon."""
    before = await sim_stats(simulator)
    campaign = await new_campaign(pool, platform, required_tasks=[])
    user = new_id("u")
    # No worker yet: nothing sends but the "stuck run" below.
    claimed = await ClaimService(pool, client, settings).claim_started(campaign.id, user)
    assert claimed.state == "usable"
    try:
        await client.get_workflow_handle(claimed.workflow_id).terminate("stuck mid-send")
        sent = await platform.send_coupon(
            SendRequest(
                (await ledger.get_claim(pool, claimed.coupon_id)).batch_id,  # type: ignore[union-attr]
                user,
                idempotency_key(claimed.coupon_id),
            )
        )
        found = await wait_wedged(pool, client, settings, claimed.coupon_id)
        assert (found.cause, found.status, found.ledger_state) == (CLOSED, "terminated", "usable")
        await wait_for_gauge(gauge, closed=1)
        async with running_workers(client, pool, settings):
            healthy = await claims_of(pool, client, settings).claim(campaign.id, new_id("u"))
            recovery = await recover(pool, client, settings, claimed.coupon_id)
            assert (recovery.action, recovery.stopped_run_id) == ("restarted", None)
            status = await wait_for_state(handle_of(client, claimed.workflow_id), "issued")
            # A coupon making progress is left alone.
            assert (await recover(pool, client, settings, healthy.coupon_id)).action == "none"
            await wait_for_state(handle_of(client, healthy.workflow_id), "issued")
            await wait_for_gauge(gauge)
    finally:
        await close_workflows(client, [claimed.workflow_id])
    assert status.receipt is not None and status.receipt.platform_coupon_id == sent.coupon_id
    assert await wallet(simulator, pool, campaign.batch_id, user) == [sent.coupon_id]
    after = await sim_stats(simulator)
    assert after["sends_applied"] - before["sends_applied"] == 2  # this coupon's and healthy's
    assert after["sends_replayed"] - before["sends_replayed"] >= 1
    await claim_row_intact(pool, claimed, "issued")
    assert await ledger_states(pool, claimed.coupon_id) == [(None, "usable"), ("usable", "issued")]
