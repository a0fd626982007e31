"""The issue activity heartbeats while its ledger writes wait for a pool connection, and
while its send and its lookups wait (for a permit, for a slow platform).

A worker whose connections are all busy makes a write wait up to the pool's timeout (30 s),
twice the issue activity's 15 s heartbeat timeout: silent all that time, the attempt was
timed out as lost and run again elsewhere while it still went on here (issue 17, item 5).

On the real dev server, PostgreSQL and simulator, with a one-connection pool the test holds.
The activity runs under a short heartbeat timeout (the workflow's 15 s would make the test
as long), from a workflow that does nothing else and never retries it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio import workflow
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    Interceptor,
    UnsandboxedWorkflowRunner,
    Worker,
)

from activities.platform import PlatformActivities
from app.embedded import EmbeddedPostgres
from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.ledger.batches import get_batch
from coupons.model import IssueInput, Receipt, Transition, idempotency_key
from coupons.platforms.base import PlatformCoupon, SendRequest
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


async def issue_input(pool: AsyncConnectionPool, platform: RestPlatform) -> IssueInput:
    campaign = await new_campaign(pool, platform)
    claim, _ = await ledger.claim(pool, campaign.id, new_id("u"))
    batch = await get_batch(pool, campaign.batch_id)
    assert batch is not None
    usable = Transition("received", "usable", "tasks done", datetime.now(UTC))
    return IssueInput(claim.coupon_id, batch.platform_batch_id, claim.user_id, usable)


def issue_worker(
    client: Client,
    settings: Settings,
    sends: PlatformActivities,
    interceptors: Sequence[Interceptor] = (),
) -> Worker:
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[IssueOnceWorkflow],
        activities=[sends.issue_coupon],
        workflow_runner=UnsandboxedWorkflowRunner(),
        # Heartbeats reach the server as they are made, not at 0.8 x HEARTBEAT: the short
        # timeout then leaves a loaded machine the same room that 15 s leaves.
        max_heartbeat_throttle_interval=timedelta(seconds=0.2),
        interceptors=interceptors,
    )


async def start_issue(
    client: Client, settings: Settings, input: IssueInput
) -> WorkflowHandle[IssueOnceWorkflow, Receipt]:
    return await client.start_workflow(
        IssueOnceWorkflow.run,
        input,
        id=new_id("issue-once"),
        task_queue=settings.task_queue,
        execution_timeout=timedelta(minutes=1),
    )


async def test_a_send_waiting_for_a_busy_pool_heartbeats_and_completes(
    dev_env: WorkflowEnvironment,
    postgres: EmbeddedPostgres,
    schema: str,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    client: Client = dev_env.client
    input = await issue_input(pool, platform)
    async with db.pool(postgres.url(), schema=schema, max_size=1) as busy:
        sends = PlatformActivities(platform, busy, lag_window_s=settings.lag_window_s)
        async with issue_worker(client, settings, sends):
            async with busy.connection():
                handle = await start_issue(client, settings, input)
                await until_started(handle)
                await asyncio.sleep(HELD_S)
            receipt = await handle.result()
    claim_id = input.coupon_id
    assert receipt.idempotency_key == idempotency_key(claim_id)
    assert await ledger_states(pool, claim_id) == [
        (None, "received"),
        ("received", "usable"),
        ("usable", "issued"),
    ]


class SlowPlatform(RestPlatform):
    """The simulator behind calls that each take longer than the heartbeat timeout (a wait
    for a permit, a slow platform), as a send and its first lookup together could take
    longer than the issue activity's 15 s."""

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        await asyncio.sleep(SLOW_CALL_S)
        return await super().send_coupon(request)

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        await asyncio.sleep(SLOW_CALL_S)
        return await super().get_coupon(user_id, coupon_id)


SLOW_CALL_S = 1.5 * HEARTBEAT.total_seconds()


async def test_a_slow_send_and_lookup_heartbeat_and_complete(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    simulator_url: str,
    settings: Settings,
) -> None:
    """Silent from the usable write to the receipt, the attempt was timed out as lost
    after the send, while its lookup still ran (the review of issue 17's permits)."""
    client: Client = dev_env.client
    input = await issue_input(pool, platform)
    slow = SlowPlatform(simulator_url, timeout_s=5.0)
    try:
        sends = PlatformActivities(slow, pool, lag_window_s=settings.lag_window_s)
        async with issue_worker(client, settings, sends):
            receipt = await (await start_issue(client, settings, input)).result()
    finally:
        await slow.aclose()
    assert receipt.idempotency_key == idempotency_key(input.coupon_id)
    assert (await ledger_states(pool, input.coupon_id))[-1] == ("usable", "issued")


class CountedHeartbeats(Interceptor):
    """Counts the heartbeats the activities of a worker make."""

    def __init__(self) -> None:
        self.count = 0

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        counter = self

        class Inbound(ActivityInboundInterceptor):
            def init(self, outbound: ActivityOutboundInterceptor) -> None:
                class Outbound(ActivityOutboundInterceptor):
                    def heartbeat(self, *details: Any) -> None:
                        counter.count += 1
                        super().heartbeat(*details)

                super().init(Outbound(outbound))

        return Inbound(next)


async def test_an_issue_quicker_than_its_heartbeat_interval_sends_no_heartbeat(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    """Each heartbeat is a call to the server and a write of the workflow's state there: an
    issue done in milliseconds makes none (it made one per step, four, before). The slow
    ones above still beat."""
    client: Client = dev_env.client
    input = await issue_input(pool, platform)
    sends = PlatformActivities(platform, pool, lag_window_s=settings.lag_window_s)
    counted = CountedHeartbeats()
    async with issue_worker(client, settings, sends, [counted]):
        receipt = await (await start_issue(client, settings, input)).result()
    assert receipt.idempotency_key == idempotency_key(input.coupon_id)
    assert (await ledger_states(pool, input.coupon_id))[-1] == ("usable", "issued")
    assert counted.count == 0
