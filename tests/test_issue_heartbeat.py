"""The issue activity heartbeats while its ledger writes wait for a pool connection.

A worker whose connections are all busy makes a write wait up to the pool's timeout (30 s),
twice the issue activity's 15 s heartbeat timeout: silent all that time, the attempt was
timed out as lost and run again elsewhere while it still went on here (issue 17, item 5).

On the real dev server, PostgreSQL and simulator, with a one-connection pool the test holds.
The activity runs under a short heartbeat timeout (the workflow's 15 s would make the test
as long), from a workflow that does nothing else and never retries it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from psycopg_pool import AsyncConnectionPool
from temporalio import workflow
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.platform import PlatformActivities
from app.embedded import EmbeddedPostgres
from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.ledger.batches import get_batch
from coupons.model import IssueInput, Receipt, Transition, idempotency_key
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import ledger_states, new_campaign, new_id

HEARTBEAT = timedelta(seconds=1.5)
# Long past the heartbeat timeout: the write waits for the connection all this time.
HELD_S = 3 * HEARTBEAT.total_seconds()


@workflow.defn(sandboxed=False)
class IssueOnceWorkflow:
    """One attempt of the issue activity, under HEARTBEAT."""

    @workflow.run
    async def run(self, input: IssueInput) -> Receipt:
        receipt: Receipt = await workflow.execute_activity(
            act.ISSUE_COUPON,
            input,
            result_type=Receipt,
            start_to_close_timeout=timedelta(minutes=1),
            heartbeat_timeout=HEARTBEAT,
            retry_policy=RetryPolicy(maximum_attempts=1),
        )
        return receipt


async def until_started(handle: WorkflowHandle[IssueOnceWorkflow, Receipt]) -> None:
    """Until a worker runs the activity (and so waits for the connection the test holds)."""
    async with asyncio.timeout(15):
        while True:
            pending = (await handle.describe()).raw_description.pending_activities
            if pending and pending[0].state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
                return
            await asyncio.sleep(0.05)


async def test_a_send_waiting_for_a_busy_pool_heartbeats_and_completes(
    dev_env: WorkflowEnvironment,
    postgres: EmbeddedPostgres,
    schema: str,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    client: Client = dev_env.client
    campaign = await new_campaign(pool, platform)
    claim, _ = await ledger.claim(pool, campaign.id, new_id("u"))
    batch = await get_batch(pool, campaign.batch_id)
    assert batch is not None
    usable = Transition("received", "usable", "tasks done", datetime.now(UTC))
    input = IssueInput(claim.coupon_id, batch.platform_batch_id, claim.user_id, usable)
    async with db.pool(postgres.url(), schema=schema, max_size=1) as busy:
        sends = PlatformActivities(platform, busy, lag_window_s=settings.lag_window_s)
        worker = Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[IssueOnceWorkflow],
            activities=[sends.issue_coupon],
            workflow_runner=UnsandboxedWorkflowRunner(),
            # Heartbeats reach the server as they are made, not at 0.8 x HEARTBEAT: the
            # short timeout then leaves a loaded machine the same room that 15 s leaves.
            max_heartbeat_throttle_interval=timedelta(seconds=0.2),
        )
        async with worker:
            async with busy.connection():
                handle = await client.start_workflow(
                    IssueOnceWorkflow.run,
                    input,
                    id=new_id("issue-once"),
                    task_queue=settings.task_queue,
                    execution_timeout=timedelta(minutes=1),
                )
                await until_started(handle)
                await asyncio.sleep(HELD_S)
            receipt = await handle.result()
    assert receipt.idempotency_key == idempotency_key(claim.coupon_id)
    assert await ledger_states(pool, claim.coupon_id) == [
        (None, "received"),
        ("received", "usable"),
        ("usable", "issued"),
    ]
