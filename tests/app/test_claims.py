"""Claiming end to end on the real Temporal dev server, with PostgreSQL and the simulator.

Each test proves one invariant of DESIGN.md: no oversell, the per-user limit, exactly
one send (duplicate completions, ambiguous timeouts and 5xx), nothing lost (the claim
repair, claims and workflows in one-to-one correspondence) and the audit trail agreeing
with the workflows. Nothing is mocked but a failed workflow start one test forces: claims
go through `ClaimService`, the worker runs the real activities, the platform is the
simulator over HTTP.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from app import service
from app.claims import ClaimRefused, ClaimResult, ClaimService, StartSignal
from coupons.config import Settings
from coupons.errors import Refused
from coupons.ledger import campaigns
from coupons.ledger import claims as ledger
from coupons.ledger.batches import get_batch
from coupons.model import (
    CancelRequest,
    CouponStatus,
    RedemptionReport,
    TaskCompletion,
    idempotency_key,
)
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    TASK,
    Handle,
    claim_workflow_ids,
    claims_of,
    handle_of,
    ledger_states,
    new_campaign,
    new_id,
    row_count,
    running_workers,
    scalar,
    sim_stats,
    wait_for_stat,
    wait_for_state,
    wait_started,
)
from workflows.user_coupon import UserCouponWorkflow

WAIT_S = 30.0


# ----------------------------------------------------------------- helpers


async def claim_count(pool: AsyncConnectionPool, campaign_id: str) -> int:
    n: int = await scalar(pool, "SELECT count(*) FROM claims WHERE campaign_id = %s", campaign_id)
    return n


async def listed_ids(client: Client, query: str) -> set[str]:
    return {wf.id async for wf in client.list_workflows(query)}


async def wait_listed(
    client: Client, query: str, expected: set[str], timeout_s: float = 15.0
) -> set[str]:
    """Visibility is eventually consistent: list until `expected` shows, bounded."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while True:
        seen = await listed_ids(client, query)
        if seen == expected or loop.time() > give_up:
            return seen
        await asyncio.sleep(0.2)


async def exists(handle: Handle) -> bool:
    try:
        await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


def delta(after: dict[str, int], before: dict[str, int], name: str) -> int:
    return after[name] - before[name]


# ----------------------------------------------------------------- the happy path


async def test_claim_then_task_completed_issues_with_a_receipt_the_platform_knows(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    async with running_workers(client, pool, settings):
        campaign = await new_campaign(pool, platform, required_tasks=[TASK])
        who = new_id("u")
        result = await claims_of(pool, client, settings).claim(campaign.id, who)
        assert (result.state, result.created) == ("received", True)
        handle = handle_of(client, result.workflow_id)
        answer = await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
        assert answer.tasks_done == [TASK]
        status = await wait_for_state(handle, "issued")

    view = await ledger.coupon_view(pool, result.coupon_id)
    assert view is not None
    receipt = view["receipt"]
    assert receipt is not None
    assert receipt["idempotency_key"] == idempotency_key(result.coupon_id)
    assert status.receipt is not None
    assert status.receipt.platform_coupon_id == receipt["platform_coupon_id"]
    at_platform = await simulator.get(f"/v1/users/{who}/coupons/{receipt['platform_coupon_id']}")
    assert at_platform.status_code == 200
    body = at_platform.json()
    batch = await get_batch(pool, campaign.batch_id)
    assert batch is not None
    assert (body["coupon_id"], body["user_id"], body["batch_id"]) == (
        receipt["platform_coupon_id"],
        who,
        batch.platform_batch_id,
    )
    assert [(e["from_state"], e["to_state"]) for e in view["events"]] == [
        (None, "received"),
        ("received", "usable"),
        ("usable", "issued"),
    ]
    assert view["claim"].state == "issued"
    query = f"CouponState='issued' AND CampaignId='{campaign.id}'"
    assert await wait_listed(client, query, {result.workflow_id}) == {result.workflow_id}


# ----------------------------------------------------------------- no oversell, per-user limit


async def test_200_concurrent_claims_on_quota_50_grant_exactly_50(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    async with running_workers(client, pool, settings):
        campaign = await new_campaign(pool, platform, quota=50)
        service = claims_of(pool, client, settings)
        outcomes = await asyncio.gather(
            *(service.claim(campaign.id, f"user-{i:03d}") for i in range(200)),
            return_exceptions=True,
        )
        granted = [o for o in outcomes if isinstance(o, ClaimResult)]
        refused = [o for o in outcomes if isinstance(o, ClaimRefused)]
        assert len(granted) == 50
        assert len(refused) == 150
        assert {r.code for r in refused} == {"sold_out"}
        assert all(g.created for g in granted)
        assert len({g.user_id for g in granted}) == 50

        stored = await campaigns.get_campaign(pool, campaign.id)
        assert stored is not None and stored.claimed == 50
        assert await claim_count(pool, campaign.id) == 50
        wids = await claim_workflow_ids(pool, campaign.id)
        assert wids == {g.workflow_id for g in granted}
        descriptions = await asyncio.gather(*(handle_of(client, w).describe() for w in wids))
        assert {d.id for d in descriptions} == wids
        query = f"CampaignId='{campaign.id}'"
        assert await wait_listed(client, query, wids) == wids


async def test_per_user_limit_returns_the_existing_claim_instead_of_a_new_one(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    service = claims_of(pool, client, settings)
    async with running_workers(client, pool, settings):
        # Limit 1: ten concurrent requests of one user end in one coupon.
        one = await new_campaign(pool, platform, per_user_limit=1)
        results = await asyncio.gather(*(service.claim(one.id, "same-user") for _ in range(10)))
        assert len({r.coupon_id for r in results}) == 1
        assert sum(r.created for r in results) == 1
        assert await claim_count(pool, one.id) == 1
        stored = await campaigns.get_campaign(pool, one.id)
        assert stored is not None and stored.claimed == 1
        assert await exists(handle_of(client, results[0].workflow_id))

        # Limit 2: two coupons, then the second is returned again.
        two = await new_campaign(pool, platform, per_user_limit=2)
        first = await service.claim(two.id, "same-user")
        second = await service.claim(two.id, "same-user")
        third = await service.claim(two.id, "same-user")
    assert (first.created, second.created, third.created) == (True, True, False)
    assert first.coupon_id != second.coupon_id
    assert third.coupon_id == second.coupon_id
    assert await claim_count(pool, two.id) == 2


# ----------------------------------------------------------------- exactly one send


async def test_20_concurrent_duplicate_completions_send_once(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    before = await sim_stats(simulator)
    async with running_workers(client, pool, settings):
        campaign = await new_campaign(pool, platform)
        result = await claims_of(pool, client, settings).claim(campaign.id, new_id("u"))
        handle = handle_of(client, result.workflow_id)
        done = TaskCompletion(TASK)
        answers = await asyncio.gather(
            *(handle.signal(UserCouponWorkflow.task_done, done) for _ in range(10)),
            *(handle.execute_update(UserCouponWorkflow.complete_task, done) for _ in range(10)),
        )
        updates = [a for a in answers if isinstance(a, CouponStatus)]
        assert len(updates) == 10  # every update answered, none raised
        assert all(u.tasks_done == [TASK] for u in updates)
        status = await wait_for_state(handle, "issued")
        history = await handle.fetch_history()
    after = await sim_stats(simulator)
    assert delta(after, before, "sends_applied") == 1
    assert delta(after, before, "coupons") == 1
    assert await row_count(pool, "receipts") == 1
    view = await ledger.coupon_view(pool, result.coupon_id)
    assert view is not None and view["receipt"] is not None
    assert status.receipt is not None
    assert view["receipt"]["platform_coupon_id"] == status.receipt.platform_coupon_id
    assert not status.ignored_signals
    scheduled = [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "issue_coupon"
    ]
    assert len(scheduled) == 1
    assert await ledger_states(pool, result.coupon_id) == [
        (None, "received"),
        ("received", "usable"),
        ("usable", "issued"),
    ]


@pytest.mark.parametrize("mode", ["hang", "5xx"])
async def test_ambiguous_send_is_resolved_by_resending_the_same_key_one_coupon(
    mode: str,
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    # A hang outlasts our 1 s platform timeout; 5xx answers at once. Both after applying.
    settings = replace(settings, platform_timeout_s=1.0)
    before = await sim_stats(simulator)
    try:
        async with running_workers(client, pool, settings):
            campaign = await new_campaign(pool, platform)
            who = new_id("u")
            result = await claims_of(pool, client, settings).claim(campaign.id, who)
            handle = handle_of(client, result.workflow_id)
            knobs = {"ambiguous_rate": 1.0, "ambiguous_mode": mode, "ambiguous_hang_s": 3.0}
            (await simulator.put("/sim/knobs", json=knobs)).raise_for_status()
            await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
            await wait_for_stat(simulator, "ambiguous_injected", before["ambiguous_injected"] + 1)
            (await simulator.put("/sim/knobs", json={"ambiguous_rate": 0.0})).raise_for_status()
            status = await wait_for_state(handle, "issued")
    finally:
        await simulator.put("/sim/knobs", json={"ambiguous_rate": 0.0, "ambiguous_hang_s": 10.0})
    after = await sim_stats(simulator)
    assert delta(after, before, "ambiguous_injected") >= 1
    assert delta(after, before, "sends_applied") == 1
    assert delta(after, before, "sends_replayed") >= 1
    assert delta(after, before, "coupons") == 1
    view = await ledger.coupon_view(pool, result.coupon_id)
    assert view is not None and view["receipt"] is not None
    platform_coupon_id = view["receipt"]["platform_coupon_id"]
    assert status.receipt is not None and status.receipt.platform_coupon_id == platform_coupon_id
    at_platform = await simulator.get(f"/v1/users/{who}/coupons/{platform_coupon_id}")
    assert at_platform.status_code == 200
    assert view["claim"].state == "issued"
    assert "failed" not in [to for _, to in await ledger_states(pool, result.coupon_id)]


# ----------------------------------------------------------------- nothing lost


async def test_a_claim_is_answered_by_the_ledger_and_its_workflow_started_behind_the_answer(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    campaign = await new_campaign(pool, platform)
    # No worker runs: the answer needs none, and no workflow exists yet.
    answered = await ClaimService(pool, client, settings).claim(campaign.id, "early")
    assert answered.created and answered.state == "received"
    handle = handle_of(client, answered.workflow_id)
    assert not await exists(handle)
    row = await ledger.get_claim(pool, answered.coupon_id)
    assert row is not None and not row.workflow_started
    async with running_workers(client, pool, settings):
        await wait_started(pool, answered.coupon_id)
        assert await exists(handle)
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
        await wait_for_state(handle, "issued")


async def test_a_task_reported_the_instant_after_the_answer_is_neither_lost_nor_refused(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """No starter runs, so no workflow exists when the reports come: each report starts
    the coupon's workflow itself (a signal in the same call as the start)."""
    client = dev_env.client
    b = service.Backends(settings, pool, client, platform)
    campaign = await new_campaign(pool, platform)
    async with running_workers(client, pool, settings, starter=False):
        signalled, updated, cancelled, cancelled_by_signal = [
            await service.claim(b, campaign.id, f"quick-{n}") for n in range(4)
        ]
        await service.report_task(b, service.CouponRef(signalled.coupon_id), TASK)
        status = await service.complete_task(b, service.CouponRef(updated.coupon_id), TASK)
        assert status.tasks_done == [TASK]
        gone = await service.cancel(b, service.CouponRef(cancelled.coupon_id), "changed mind")
        assert gone is not None and gone.state == "cancelled"
        ref = service.CouponRef(cancelled_by_signal.coupon_id)
        assert await service.cancel(b, ref, "changed mind", wait=None) is None
        for answered in (signalled, updated):
            await wait_for_state(handle_of(client, answered.workflow_id), "issued")
        await wait_for_state(handle_of(client, cancelled_by_signal.workflow_id), "cancelled")
        # The signal came with the start: the new workflow took both in its first task.
        history = await handle_of(client, signalled.workflow_id).fetch_history()
        first_task = next(
            i
            for i, e in enumerate(history.events)
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED
        )
        assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED in [
            e.event_type for e in history.events[:first_task]
        ]
    for answered in (signalled, updated, cancelled, cancelled_by_signal):
        row = await ledger.get_claim(pool, answered.coupon_id)
        assert row is not None and row.workflow_started


async def test_a_report_starting_the_workflow_holds_the_claim_from_the_starters(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a report starts the workflow, no starter takes the claim (a second start
    costs the server nearly a start); a start that fails hands the claim back at once."""
    client = dev_env.client
    # A hold far longer than the test, so only a hand-back can free the claim.
    b = service.Backends(replace(settings, claim_repair_after_s=60), pool, client, platform)
    campaign = await new_campaign(pool, platform)
    held, failed = [await service.claim(b, campaign.id, f"held-{n}") for n in range(2)]
    taken_meanwhile: list[str] = []
    real_start = ClaimService._start_new

    async def start_watched(
        self: ClaimService, claim: ledger.Claim, signal: StartSignal | None = None
    ) -> None:
        # Under way: what a starter polling now would take (a lease of 0 holds nothing).
        taken = await ledger.take_unstarted(pool, 10, timedelta(0))
        taken_meanwhile.extend(c.coupon_id for c in taken)
        if claim.coupon_id == failed.coupon_id:
            raise RPCError("Temporal unavailable", RPCStatusCode.UNAVAILABLE, b"")
        await real_start(self, claim, signal)

    monkeypatch.setattr(ClaimService, "_start_new", start_watched)
    await service.report_task(b, service.CouponRef(held.coupon_id), TASK)
    assert held.coupon_id not in taken_meanwhile
    assert failed.coupon_id in taken_meanwhile  # the watch can see a claim not held
    taken_meanwhile.clear()
    with pytest.raises(service.Unavailable):
        await service.report_task(b, service.CouponRef(failed.coupon_id), TASK)
    assert failed.coupon_id not in taken_meanwhile
    monkeypatch.undo()
    [handed_back] = await ledger.take_unstarted(pool, 10, timedelta(seconds=30))
    assert handed_back.coupon_id == failed.coupon_id
    started = await ledger.get_claim(pool, held.coupon_id)
    assert started is not None and started.workflow_started
    assert await exists(handle_of(client, held.workflow_id))


async def test_a_claim_whose_starter_died_is_started_once_when_its_lease_ends(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    campaign = await new_campaign(pool, platform)
    orphan, created = await ledger.claim(pool, campaign.id, "crashed")
    assert created and not orphan.workflow_started
    # A starter took it for 3 s and died before starting it.
    [taken] = await ledger.take_unstarted(pool, 10, timedelta(seconds=3))
    assert taken.coupon_id == orphan.coupon_id
    handle = handle_of(client, orphan.workflow_id)
    async with running_workers(client, pool, settings):
        await asyncio.sleep(1)
        assert not await exists(handle)  # the live starter leaves it to the lease's holder
        await wait_started(pool, orphan.coupon_id)
        assert await exists(handle)
        assert await ClaimService(pool, client, settings).repair() == 0
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
        status = await wait_for_state(handle, "issued")
        assert status.receipt is not None
        # A repeated claim returns the claim, started once.
        again = await ClaimService(pool, client, settings).claim(campaign.id, "crashed")
        assert (again.coupon_id, again.created) == (orphan.coupon_id, False)
    assert await ledger_states(pool, orphan.coupon_id) == [
        (None, "received"),
        ("received", "usable"),
        ("usable", "issued"),
    ]


async def test_campaign_without_task_is_usable_at_claim_then_issued_without_a_signal(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    async with running_workers(client, pool, settings):
        campaign = await new_campaign(pool, platform, required_tasks=[])
        result = await claims_of(pool, client, settings).claim(campaign.id, new_id("u"))
        assert result.state == "usable"
        handle = handle_of(client, result.workflow_id)
        status = await wait_for_state(handle, "issued")
        history = await handle.fetch_history()
    assert status.receipt is not None
    signals = [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        or e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    assert signals == []
    assert await ledger_states(pool, result.coupon_id) == [(None, "usable"), ("usable", "issued")]


async def test_refused_claims_write_nothing(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    service = claims_of(pool, dev_env.client, settings)
    with pytest.raises(ClaimRefused) as unknown:
        await service.claim("no-such-campaign", "u1")
    assert unknown.value.code == "unknown_campaign"

    campaign = await new_campaign(pool, platform)
    for bad in ("bad user!", "x" * 65, "", "u1\n"):
        with pytest.raises(Refused) as invalid:
            await service.claim(campaign.id, bad)
        assert invalid.value.code == "invalid_request"
    with pytest.raises(Refused) as bad_campaign:
        await service.claim("bad campaign!", "u1")
    assert bad_campaign.value.code == "invalid_request"

    assert await row_count(pool, "claims") == 0
    assert await row_count(pool, "coupon_events") == 0
    stored = await campaigns.get_campaign(pool, campaign.id)
    assert stored is not None and stored.claimed == 0


async def test_every_claim_row_has_a_workflow_and_every_workflow_a_claim_row(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    service = claims_of(pool, client, settings)
    async with running_workers(client, pool, settings):
        campaign = await new_campaign(pool, platform, quota=10)
        # One claim answered by the ledger alone: the starter beside the workers starts it.
        orphan, _ = await ledger.claim(pool, campaign.id, "crashed")
        outcomes = await asyncio.gather(
            *(service.claim(campaign.id, f"mixed-{i}") for i in range(11)),
            return_exceptions=True,
        )
        granted = [o for o in outcomes if isinstance(o, ClaimResult)]
        assert len(granted) == 9
        refused = [o for o in outcomes if not isinstance(o, ClaimResult)]
        assert [(type(o), o.code) for o in refused if isinstance(o, ClaimRefused)] == [
            (ClaimRefused, "sold_out")
        ] * 2
        handles = [handle_of(client, g.workflow_id) for g in granted]
        await asyncio.gather(
            handles[0].signal(UserCouponWorkflow.task_done, TaskCompletion(TASK)),
            handles[1].execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK)),
            handles[2].execute_update(UserCouponWorkflow.cancel_coupon, CancelRequest("left")),
            handles[3].signal(UserCouponWorkflow.cancel, CancelRequest("left")),
        )
        await asyncio.gather(
            wait_for_state(handles[0], "issued"),
            wait_for_state(handles[1], "issued"),
            handles[2].result(),
            handles[3].result(),
        )

    in_ledger = await claim_workflow_ids(pool, campaign.id)
    assert len(in_ledger) == 10
    assert orphan.workflow_id in in_ledger
    in_temporal = await wait_listed(client, f"CampaignId='{campaign.id}'", in_ledger)
    assert in_temporal == in_ledger


# ----------------------------------------------------------------- audit


async def test_audit_trail_claim_state_and_workflow_state_agree_after_a_mixed_run(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    service = claims_of(pool, client, settings)
    (await simulator.put("/sim/knobs", json={"restricted_users": ["risky"]})).raise_for_status()
    async with running_workers(client, pool, settings):
        main = await new_campaign(pool, platform, quota=20)
        short = await new_campaign(pool, platform, task_deadline=timedelta(seconds=1))
        free = await new_campaign(pool, platform, required_tasks=[])
        users = ["waits-1", "waits-2", "upd", "sig", "cancel-upd", "cancel-sig", "redeem", "risky"]
        results = await asyncio.gather(*(service.claim(main.id, u) for u in users))
        claimed = dict(zip(users, results, strict=True))
        claimed["expires"] = await service.claim(short.id, "expires")
        claimed["free"] = await service.claim(free.id, "free")
        h = {name: handle_of(client, r.workflow_id) for name, r in claimed.items()}

        done = TaskCompletion(TASK)
        await asyncio.gather(
            h["upd"].execute_update(UserCouponWorkflow.complete_task, done),
            h["sig"].signal(UserCouponWorkflow.task_done, done),
            h["redeem"].signal(UserCouponWorkflow.task_done, done),
            h["risky"].execute_update(UserCouponWorkflow.complete_task, done),
            h["cancel-upd"].execute_update(UserCouponWorkflow.cancel_coupon, CancelRequest()),
            h["cancel-sig"].signal(UserCouponWorkflow.cancel, CancelRequest()),
        )
        await wait_for_state(h["redeem"], "issued")
        await h["redeem"].signal(
            UserCouponWorkflow.report_redemption, RedemptionReport(datetime.now(UTC))
        )

        # Quiescence: closed workflows have recorded everything; an issued coupon's
        # ledger write precedes its workflow's move; received ones wrote at claim.
        expected = {
            "waits-1": "received",
            "waits-2": "received",
            "upd": "issued",
            "sig": "issued",
            "free": "issued",
            "cancel-upd": "cancelled",
            "cancel-sig": "cancelled",
            "redeem": "redeemed",
            "risky": "failed",
            "expires": "expired",
        }
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(
                *(
                    h[name].result()
                    if state not in ("received", "issued")
                    else wait_for_state(h[name], state)
                    for name, state in expected.items()
                )
            )
        statuses = {name: await h[name].query(UserCouponWorkflow.status) for name in expected}

    for name, state in expected.items():
        result = claimed[name]
        events = await ledger_states(pool, result.coupon_id)
        row = await ledger.get_claim(pool, result.coupon_id)
        assert row is not None
        workflow_state = statuses[name].state
        assert (events[-1][1], row.state, workflow_state) == (state, state, state), name
        # The whole trail, not just its end: the claim's state, then each workflow move.
        trail = [result.state] + [t.to_state for t in statuses[name].transitions]
        assert [to for _, to in events] == trail, name
