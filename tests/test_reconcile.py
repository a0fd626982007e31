"""Reconciliation (对账): the platform's flow files against the ledger.

First `coupons.reconcile.compare` alone, one mismatch kind per test; then end to end on the
dev server: coupons used at the simulator behind the service's back (no callback, and long
before the workflow's first redemption poll) are found by `ReconcileWorkflow`, repaired
to `redeemed` through their workflows, and a second run finds nothing.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from app.claims import ClaimResult
from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger.claims import LedgerCoupon
from coupons.model import Mismatch, ReconcileInput, ReconcileReport, idempotency_key
from coupons.platforms.base import FlowRecord
from coupons.platforms.generic.adapter import RestPlatform
from coupons.reconcile import REDEEM, compare
from tests.conftest import (
    claims_of,
    close_workflows,
    handle_of,
    new_campaign,
    new_id,
    run_workflow,
    running_workers,
    scalar,
    set_at_platform,
    wait_for_state,
)
from workflows.user_coupon import UserCouponWorkflow

AT = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
BATCH = "bat_1"


# ----------------------------------------------------------------- compare, pure


def ours(
    coupon_id: str, state: str, platform_coupon_id: str | None = None, user_id: str = "u1"
) -> LedgerCoupon:
    return LedgerCoupon(
        coupon_id=coupon_id,
        user_id=user_id,
        state=state,
        workflow_id=f"coupon-{coupon_id}",
        idempotency_key=idempotency_key(coupon_id) if platform_coupon_id else None,
        platform_coupon_id=platform_coupon_id,
    )


def sent(platform_coupon_id: str, key: str | None, user_id: str = "u1") -> FlowRecord:
    return FlowRecord(platform_coupon_id, BATCH, user_id, key, AT)


def used(platform_coupon_id: str, user_id: str = "u1") -> FlowRecord:
    return FlowRecord(platform_coupon_id, BATCH, user_id, None, AT + timedelta(hours=1))


def only_one(found: list[Mismatch]) -> Mismatch:
    assert len(found) == 1, found
    return found[0]


def summary(mismatch: Mismatch) -> tuple[str, str | None, str | None, str | None]:
    return (mismatch.kind, mismatch.coupon_id, mismatch.platform_coupon_id, mismatch.repair)


def test_a_consistent_batch_has_no_mismatch() -> None:
    ledger_side = [
        ours("c:u1:1", "issued", "cpn_1"),
        ours("c:u2:1", "redeemed", "cpn_2", user_id="u2"),
        ours("c:u3:1", "received"),
        ours("c:u4:1", "lapsed", "cpn_4", user_id="u4"),
    ]
    flows_sent = [
        sent("cpn_1", idempotency_key("c:u1:1")),
        sent("cpn_2", idempotency_key("c:u2:1"), "u2"),
        sent("cpn_4", idempotency_key("c:u4:1"), "u4"),
    ]
    assert compare(ledger_side, flows_sent, [used("cpn_2", "u2")]) == []


def test_a_coupon_the_platform_sent_with_no_claim_of_ours_is_platform_only() -> None:
    mismatch = only_one(compare([], [sent("cpn_x", "f" * 32, "stranger")], []))
    assert summary(mismatch) == ("platform_only", None, "cpn_x", None)
    assert "stranger" in mismatch.detail


def test_a_coupon_sent_for_our_claim_that_lacks_its_receipt_is_platform_only_with_the_claim() -> (
    None
):
    # Our claim failed (or was cancelled) here, yet the platform did send it.
    claim = ours("c:u1:1", "failed")
    mismatch = only_one(compare([claim], [sent("cpn_1", idempotency_key("c:u1:1"))], []))
    assert summary(mismatch) == ("platform_only", "c:u1:1", "cpn_1", None)
    assert "failed" in mismatch.detail


def test_a_send_in_flight_for_a_usable_claim_is_not_a_mismatch() -> None:
    # The platform has it, our receipt is still being written: not a difference yet.
    claim = ours("c:u1:1", "usable")
    assert compare([claim], [sent("cpn_1", idempotency_key("c:u1:1"))], []) == []


def test_a_receipt_the_platforms_sent_flow_lacks_is_ledger_only() -> None:
    claim = ours("c:u1:1", "issued", "cpn_gone")
    mismatch = only_one(compare([claim], [], []))
    assert summary(mismatch) == ("ledger_only", "c:u1:1", "cpn_gone", None)


def test_used_at_the_platform_but_issued_here_is_repaired_by_a_redemption() -> None:
    claim = ours("c:u1:1", "issued", "cpn_1")
    found = compare([claim], [sent("cpn_1", idempotency_key("c:u1:1"))], [used("cpn_1")])
    assert summary(only_one(found)) == ("state", "c:u1:1", "cpn_1", REDEEM)


def test_used_at_the_platform_but_lapsed_here_is_listed_not_repaired() -> None:
    claim = ours("c:u1:1", "lapsed", "cpn_1")
    found = compare([claim], [sent("cpn_1", idempotency_key("c:u1:1"))], [used("cpn_1")])
    mismatch = only_one(found)
    assert (mismatch.kind, mismatch.coupon_id, mismatch.repair) == ("state", "c:u1:1", None)
    assert "lapsed" in mismatch.detail


def test_redeemed_here_but_not_used_at_the_platform_is_listed_not_repaired() -> None:
    claim = ours("c:u1:1", "redeemed", "cpn_1")
    found = compare([claim], [sent("cpn_1", idempotency_key("c:u1:1"))], [])
    assert summary(only_one(found)) == ("state", "c:u1:1", "cpn_1", None)


def test_every_kind_at_once_is_each_found_once() -> None:
    ledger_side = [
        ours("c:a:1", "issued", "cpn_a", "a"),  # used there: repair
        ours("c:b:1", "issued", "cpn_b", "b"),  # fine
        ours("c:c:1", "issued", "cpn_gone", "c"),  # ledger only
        ours("c:d:1", "usable", None, "d"),  # in flight
        ours("c:e:1", "redeemed", "cpn_e", "e"),  # not used there
    ]
    flows_sent = [
        sent("cpn_a", idempotency_key("c:a:1"), "a"),
        sent("cpn_b", idempotency_key("c:b:1"), "b"),
        sent("cpn_d", idempotency_key("c:d:1"), "d"),
        sent("cpn_e", idempotency_key("c:e:1"), "e"),
        sent("cpn_z", "0" * 32, "z"),  # platform only
    ]
    found = compare(ledger_side, flows_sent, [used("cpn_a", "a")])
    assert sorted((m.kind, m.platform_coupon_id, m.repair) for m in found) == [
        ("ledger_only", "cpn_gone", None),
        ("platform_only", "cpn_z", None),
        ("state", "cpn_a", REDEEM),
        ("state", "cpn_e", None),
    ]


# ----------------------------------------------------------------- end to end


async def reconcile(client: Client, settings: Settings, input: ReconcileInput) -> ReconcileReport:
    return await run_workflow(client, settings, act.RECONCILE_WORKFLOW, input, ReconcileReport)


async def test_uses_behind_our_back_are_found_repaired_to_redeemed_and_then_gone(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    service = claims_of(pool, client, settings)
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    results: list[ClaimResult] = []
    try:
        async with running_workers(client, pool, settings):
            results += [await service.claim(campaign.id, f"shopper-{i}") for i in range(4)]
            handles = [handle_of(client, r.workflow_id) for r in results]
            issued = await asyncio.gather(*(wait_for_state(h, "issued") for h in handles))
            receipts = [s.receipt for s in issued]
            assert all(r is not None for r in receipts)
            platform_ids = [r.platform_coupon_id for r in receipts if r is not None]

            # Two are used at a till: the platform knows, we are not told.
            for pid in platform_ids[:2]:
                answer = await simulator.post(f"/sim/coupons/{pid}/use")
                answer.raise_for_status()
                assert answer.json()["status"] == "used"
            # No callback came and no poll has run yet: the ledger still says issued.
            states = await ledger.states_of(pool, [r.coupon_id for r in results])
            assert set(states.values()) == {"issued"}

            first = await reconcile(client, settings, ReconcileInput(campaign.batch_id))
            assert first.mismatches == 2
            assert first.repaired == 2
            (batch,) = first.batches
            assert (batch.batch_id, batch.platform_sent, batch.platform_used) == (
                campaign.batch_id,
                4,
                2,
            )
            assert batch.ledger_coupons == 4
            assert sorted(batch.repairs_requested) == sorted(r.coupon_id for r in results[:2])
            assert {m.kind for m in batch.mismatches} == {"state"}

            for result, handle in zip(results[:2], handles[:2], strict=True):
                final = await handle.result()
                assert final.state == "redeemed"
                assert "reconciliation" in final.transitions[-1].cause
                view = await ledger.coupon_view(pool, result.coupon_id)
                assert view is not None
                last = view["events"][-1]
                assert (last["from_state"], last["to_state"]) == ("issued", "redeemed")
                assert "reconciliation" in last["cause"]
                assert view["claim"].state == "redeemed"
            for handle in handles[2:]:
                assert (await handle.query(UserCouponWorkflow.status)).state == "issued"
                described = await handle.describe()
                assert described.status == WorkflowExecutionStatus.RUNNING

            second = await reconcile(client, settings, ReconcileInput(campaign.batch_id))
            assert (second.mismatches, second.repaired) == (0, 0)
            assert second.batches[0].repairs_requested == []
    finally:
        await close_workflows(client, [r.workflow_id for r in results])


async def test_without_repair_the_mismatch_is_only_listed(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    campaign = await new_campaign(pool, platform, required_tasks=[], quota=10)
    result = None
    try:
        async with running_workers(client, pool, settings):
            result = await claims_of(pool, client, settings).claim(campaign.id, "shopper")
            handle = handle_of(client, result.workflow_id)
            status = await wait_for_state(handle, "issued")
            assert status.receipt is not None
            pid = status.receipt.platform_coupon_id
            (await simulator.post(f"/sim/coupons/{pid}/use")).raise_for_status()

            report = await reconcile(
                client, settings, ReconcileInput(campaign.batch_id, repair=False)
            )
            assert (report.mismatches, report.repaired) == (1, 0)
            assert report.batches[0].repairs_requested == []
            assert (await handle.query(UserCouponWorkflow.status)).state == "issued"
            assert (await ledger.get_claim(pool, result.coupon_id)).state == "issued"  # type: ignore[union-attr]
    finally:
        if result is not None:
            await close_workflows(client, [result.workflow_id])


async def test_reconcile_of_every_batch_covers_each_of_them(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    one = await new_campaign(pool, platform, quota=5)
    two = await new_campaign(pool, platform, quota=5)
    # A batch stopped at the platform is still reconciled: its coupons live on.
    await set_at_platform(pool, simulator, two.batch_id, status="stopped")
    async with running_workers(client, pool, settings):
        report = await reconcile(client, settings, ReconcileInput())
    assert sorted(b.batch_id for b in report.batches) == sorted([one.batch_id, two.batch_id])
    assert report.mismatches == 0


async def test_a_batch_that_cannot_be_reconciled_is_reported_and_the_others_are_done(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    """Issue 17 item 5: one failing batch failed the whole run, and the batches after it
    were never reconciled. Here the platform no longer knows the first batch's id (its
    flow files answer BATCH_NOT_FOUND): that batch is reported failed, the other one is
    reconciled, and the run completes."""
    client = dev_env.client
    gone = await new_campaign(pool, platform, quota=5)
    kept = await new_campaign(pool, platform, quota=5)
    await scalar(
        pool,
        "UPDATE batches SET platform_batch_id = %s WHERE id = %s RETURNING id",
        new_id("unknown-at-platform"),
        gone.batch_id,
    )
    async with running_workers(client, pool, settings, starter=False):
        report = await reconcile(client, settings, ReconcileInput())
    assert [b.batch_id for b in report.batches] == [kept.batch_id]
    [failed] = report.failed
    assert failed.startswith(f"{gone.batch_id}: ") and "BATCH_NOT_FOUND" in failed
