"""The catalog (step 1 of the method) on the real stack: batches created at the simulator and
synced to PostgreSQL, campaigns validated against their batch, and the claim rules.

Batches and campaigns are made through `coupons.catalog`, the platform is the simulator
over HTTP, and the simulator's control plane (`PUT /sim/batches/{id}`) changes a batch
behind the service's back. Claims that need no workflow go to the ledger directly; the
claim storm of "done when" 2 runs through `ClaimService` with the real workers.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from app.claims import ClaimRefused, ClaimResult
from coupons import catalog
from coupons.config import Settings
from coupons.errors import InvalidField, Refused
from coupons.ledger import batches, campaigns
from coupons.ledger import claims as ledger
from coupons.ledger.batches import Batch
from coupons.ledger.campaigns import CampaignSpec, Task
from coupons.platforms.base import BatchAction
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    claim_workflow_ids,
    claims_of,
    close_workflows,
    execute,
    handle_of,
    new_batch,
    new_campaign,
    new_id,
    row_count,
    running_workers,
    scalar,
    set_at_platform,
    sim_stats,
)

DAY = timedelta(days=1)


# ----------------------------------------------------------------- helpers


async def warm_up(pool: AsyncConnectionPool, connections: int) -> None:
    """Open `connections` at once, so that as many requests really run concurrently (the
    pool starts with one and grows in the background)."""
    ready = asyncio.Barrier(connections)

    async def hold() -> None:
        async with pool.connection():
            await ready.wait()

    async with asyncio.timeout(30):
        await asyncio.gather(*(hold() for _ in range(connections)))


# ----------------------------------------------------------------- batches


async def test_create_batch_makes_one_batch_at_the_platform_however_often_it_runs(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    before = await sim_stats(simulator)
    batch_id = new_id("b")
    first = await catalog.batches.create_batch(
        pool, platform, batch_id, quantity=100, valid_days=10
    )
    again = await catalog.batches.create_batch(
        pool, platform, batch_id, quantity=100, valid_days=10
    )
    after = await sim_stats(simulator)

    assert after["batches"] - before["batches"] == 1
    assert again.platform_batch_id == first.platform_batch_id
    stored = await batches.get_batch(pool, batch_id)
    assert stored is not None
    assert (stored.platform_batch_id, stored.status, stored.quantity, stored.remaining) == (
        first.platform_batch_id,
        "running",
        100,
        100,
    )
    assert await row_count(pool, "batches") == 1
    at_platform = (await simulator.get(f"/v1/batches/{stored.platform_batch_id}")).json()
    assert (at_platform["status"], at_platform["remaining"]) == ("running", 100)


async def test_same_batch_id_with_other_terms_is_refused_and_changes_nothing(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    batch_id = new_id("b")
    created = await catalog.batches.create_batch(pool, platform, batch_id, quantity=100)
    before = await sim_stats(simulator)

    with pytest.raises(Refused) as refused:
        await catalog.batches.create_batch(pool, platform, batch_id, quantity=200)

    assert refused.value.code == "batch_exists"
    assert batch_id in refused.value.message
    assert (await sim_stats(simulator))["batches"] == before["batches"]
    stored = await batches.get_batch(pool, batch_id)
    assert stored is not None
    assert (stored.platform_batch_id, stored.quantity, stored.remaining) == (
        created.platform_batch_id,
        100,
        100,
    )
    assert await row_count(pool, "batches") == 1


@pytest.mark.parametrize(
    ("field", "terms"),
    [
        ("quantity", {"quantity": 0}),
        ("quantity", {"quantity": -5}),
        ("value", {"quantity": 10, "face_value_cents": 0}),
    ],
)
async def test_a_bad_batch_term_is_refused_naming_the_field_and_writes_nothing_anywhere(
    field: str,
    terms: dict[str, Any],
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    simulator: httpx.AsyncClient,
) -> None:
    before = await sim_stats(simulator)
    with pytest.raises(InvalidField) as invalid:
        await catalog.batches.create_batch(pool, platform, new_id("b"), **terms)
    assert invalid.value.field == field
    assert invalid.value.code == "invalid_request"
    assert field in str(invalid.value)
    assert (await sim_stats(simulator))["batches"] == before["batches"]
    assert await row_count(pool, "batches") == 0


async def test_start_pause_resume_stop_are_reflected_in_the_ledger(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    batch = await new_batch(pool, platform, start=False)
    assert batch.status == "created"
    seen = []
    for action in (BatchAction.START, BatchAction.PAUSE, BatchAction.RESUME, BatchAction.STOP):
        changed = await catalog.batches.change_batch(pool, platform, batch.id, action)
        stored = await batches.get_batch(pool, batch.id)
        assert stored is not None
        at_platform = (await simulator.get(f"/v1/batches/{batch.platform_batch_id}")).json()
        seen.append((changed.status, stored.status, at_platform["status"]))
    assert seen == [
        ("running", "running", "running"),
        ("paused", "paused", "paused"),
        ("running", "running", "running"),
        ("stopped", "stopped", "stopped"),
    ]


async def test_an_invalid_batch_transition_is_refused_wrong_state(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    created = await new_batch(pool, platform, start=False)
    with pytest.raises(Refused) as pause_created:
        await catalog.batches.change_batch(pool, platform, created.id, BatchAction.PAUSE)
    assert pause_created.value.code == "wrong_state"

    stopped = await new_batch(pool, platform)
    await catalog.batches.change_batch(pool, platform, stopped.id, BatchAction.STOP)
    with pytest.raises(Refused) as resume_stopped:
        await catalog.batches.change_batch(pool, platform, stopped.id, BatchAction.RESUME)
    assert resume_stopped.value.code == "wrong_state"

    after = {b.id: b.status for b in await batches.list_batches(pool)}
    assert after == {created.id: "created", stopped.id: "stopped"}


# ----------------------------------------------------------------- sync and drift


async def test_sync_shows_the_platforms_new_remaining_and_a_newer_synced_at(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    batch = await new_batch(pool, platform, quantity=100)
    first = await catalog.batches.sync_batch(pool, platform, batch.id)
    assert (first.remaining, first.status, first.drift) == (100, "running", [])

    await set_at_platform(pool, simulator, batch.id, remaining=37)
    second = await catalog.batches.sync_batch(pool, platform, batch.id)

    assert second.remaining == 37
    assert second.synced_at > first.synced_at
    stored = await batches.get_batch(pool, batch.id)
    assert stored is not None
    assert (stored.remaining, stored.synced_at) == (37, second.synced_at)
    assert await row_count(pool, "batches") == 1


async def test_sync_flags_drift_when_the_platform_has_less_than_we_owe(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    campaign = await new_campaign(pool, platform, quota=10)
    for i in range(3):
        await ledger.claim(pool, campaign.id, f"owed-{i}")  # received, deadline open
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=2)

    synced = await catalog.batches.sync_batch(pool, platform, campaign.batch_id)

    assert (synced.remaining, synced.owed, synced.backlog) == (2, 3, 0)
    assert len(synced.drift) == 1
    assert "2" in synced.drift[0] and "3" in synced.drift[0]
    stored = await batches.get_batch(pool, campaign.batch_id)
    assert stored is not None
    assert (stored.owed, stored.drift) == (3, synced.drift)


@pytest.mark.parametrize("status", ["stopped", "expired"])
async def test_sync_flags_a_batch_finished_at_the_platform_while_a_campaign_uses_it(
    status: str,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    simulator: httpx.AsyncClient,
) -> None:
    campaign = await new_campaign(pool, platform, quota=10)
    await set_at_platform(pool, simulator, campaign.batch_id, status=status)

    synced = await catalog.batches.sync_batch(pool, platform, campaign.batch_id)

    assert synced.status == status
    assert len(synced.drift) == 1
    assert status in synced.drift[0] and campaign.id in synced.drift[0]
    stored = await batches.get_batch(pool, campaign.batch_id)
    assert stored is not None
    assert (stored.status, stored.drift) == (status, synced.drift)


async def test_only_usable_and_received_coupons_within_their_deadline_are_owed(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    batch = await new_batch(pool, platform, quantity=15)
    open_, _ = await catalog.campaigns.create_campaign(pool, spec_on(batch, quota=5))
    lapsed, _ = await catalog.campaigns.create_campaign(pool, spec_on(batch, quota=5))
    free, _ = await catalog.campaigns.create_campaign(pool, spec_on(batch, quota=5, tasks=[]))
    await ledger.claim(pool, open_.id, "u1")  # received, deadline open: owed
    past, _ = await ledger.claim(pool, lapsed.id, "u1")  # received, deadline passed: not owed
    # Its deadline passed (the workflow that would expire it is not running here).
    await execute(
        pool,
        "UPDATE claims SET task_deadline = now() - interval '1 minute' WHERE coupon_id = %s",
        past.coupon_id,
    )
    await ledger.claim(pool, free.id, "u1")  # usable: owed, and waiting to be sent
    await ledger.claim(pool, free.id, "u2")
    await set_at_platform(pool, simulator, batch.id, remaining=3)

    synced = await catalog.batches.sync_batch(pool, platform, batch.id)

    assert (synced.owed, synced.backlog, synced.drift) == (3, 2, [])
    await set_at_platform(pool, simulator, batch.id, remaining=2)
    assert (await catalog.batches.sync_batch(pool, platform, batch.id)).drift != []


async def test_sync_flags_no_drift_when_all_is_fine(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    campaign = await new_campaign(pool, platform, quota=10)
    for i in range(3):
        await ledger.claim(pool, campaign.id, f"fine-{i}")
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=3)

    synced = await catalog.batches.sync_batch(pool, platform, campaign.batch_id)

    assert (synced.remaining, synced.owed, synced.drift) == (3, 3, [])
    stored = await batches.get_batch(pool, campaign.batch_id)
    assert stored is not None and stored.drift == []


async def test_an_ended_campaign_on_a_stopped_batch_is_no_drift(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    campaign = await new_campaign(pool, platform, quota=10)
    await catalog.campaigns.change_campaign_status(pool, campaign.id, "end")
    await set_at_platform(pool, simulator, campaign.batch_id, status="stopped")

    synced = await catalog.batches.sync_batch(pool, platform, campaign.batch_id)

    assert (synced.status, synced.drift) == ("stopped", [])


# ----------------------------------------------------------------- campaign definitions


def spec_on(batch: Batch, **fields: Any) -> CampaignSpec:
    fields.setdefault("quota", 10)
    fields.setdefault("tasks", [Task("first-order", "First order")])
    return CampaignSpec(id=new_id("c"), batch_id=batch.id, **fields)


async def test_each_invalid_campaign_is_refused_with_its_own_message_naming_the_field(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    # A batch of 20 coupons, 2 per user, valid for 10 days from now.
    batch = await new_batch(pool, platform, quantity=20, per_user_limit=2, valid_days=10)
    assert batch.ends_at is not None
    stopped = await new_batch(pool, platform)
    await catalog.batches.change_batch(pool, platform, stopped.id, BatchAction.STOP)
    now = datetime.now(UTC)
    cases = {
        "quota above the batch": ("quota", spec_on(batch, quota=21)),
        "window ending before it starts": (
            "ends_at",
            spec_on(batch, starts_at=now + 2 * DAY, ends_at=now + DAY),
        ),
        "unknown batch": (
            "batch",
            CampaignSpec(id=new_id("c"), batch_id="no-such-batch", quota=1),
        ),
        "duplicate task keys": (
            "tasks",
            spec_on(batch, tasks=[Task("share", "Share"), Task("share", "Share again")]),
        ),
        "fixed deadline after the batch ends": (
            "deadline_at",
            spec_on(batch, deadline_at=batch.ends_at + DAY),
        ),
        "task deadline running past the batch": (
            "task_deadline",
            spec_on(batch, ends_at=now + 5 * DAY, task_deadline=7 * DAY),
        ),
        "per-user limit above the batch's": ("per_user_limit", spec_on(batch, per_user_limit=3)),
        "claim window ending after the batch": (
            "ends_at",
            spec_on(batch, ends_at=batch.ends_at + DAY),
        ),
        "batch stopped": ("batch", CampaignSpec(id=new_id("c"), batch_id=stopped.id, quota=1)),
    }
    messages = {}
    for case, (field, spec) in cases.items():
        with pytest.raises(InvalidField) as invalid:
            await catalog.campaigns.create_campaign(pool, spec)
        assert invalid.value.field == field, case
        assert invalid.value.code == "invalid_request", case
        assert str(invalid.value.message).startswith(f"{field}: "), case
        messages[case] = invalid.value.message

    assert len(set(messages.values())) == len(cases), messages
    assert await row_count(pool, "campaigns") == 0
    # The batches are untouched by all of it.
    stored = await batches.get_batch(pool, batch.id)
    assert stored is not None and (stored.quantity, stored.remaining) == (20, 20)


async def test_valid_edges_of_each_rule_are_accepted(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    batch = await new_batch(pool, platform, quantity=20, per_user_limit=2, valid_days=10)
    assert batch.ends_at is not None
    now = datetime.now(UTC)
    spec = spec_on(
        batch,
        quota=20,
        per_user_limit=2,
        starts_at=now,
        ends_at=now + 5 * DAY,
        task_deadline=4 * DAY,
        deadline_at=batch.ends_at,
    )
    campaign, created = await catalog.campaigns.create_campaign(pool, spec)
    assert created
    assert campaign.spec() == spec
    assert await row_count(pool, "campaigns") == 1


async def test_update_below_what_is_claimed_is_refused_and_changes_nothing(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    campaign = await new_campaign(pool, platform, quota=5)
    for i in range(3):
        await ledger.claim(pool, campaign.id, f"holder-{i}")

    with pytest.raises(InvalidField) as invalid:
        await catalog.campaigns.update_campaign(pool, campaign.id, quota=2)

    assert invalid.value.field == "quota"
    assert "3" in invalid.value.message
    stored = await campaigns.get_campaign(pool, campaign.id)
    assert stored is not None
    assert (stored.quota, stored.claimed, stored.updated_at) == (5, 3, campaign.updated_at)
    # Down to exactly what is claimed is allowed.
    lowered = await catalog.campaigns.update_campaign(pool, campaign.id, quota=3)
    assert (lowered.quota, lowered.claimed) == (3, 3)


async def test_create_again_with_the_same_spec_is_a_no_op_and_with_another_is_refused(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    batch = await new_batch(pool, platform)
    spec = spec_on(batch, quota=10, task_deadline=3 * DAY, name="spring")
    first, created = await catalog.campaigns.create_campaign(pool, spec)
    again, created_again = await catalog.campaigns.create_campaign(pool, spec_copy(spec))

    assert (created, created_again) == (True, False)
    assert again.updated_at == first.updated_at
    assert again == first
    assert await row_count(pool, "campaigns") == 1

    with pytest.raises(Refused) as exists:
        await catalog.campaigns.create_campaign(pool, spec_copy(spec, quota=11))
    assert exists.value.code == "campaign_exists"
    stored = await campaigns.get_campaign(pool, spec.id)
    assert stored == first


async def test_concurrent_creates_of_one_campaign_make_one_and_answer_all(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    """A create retried while the first is still running (a CLI retry, two operators) is
    as harmless as one retried after it: one campaign, every caller answered."""
    batch = await new_batch(pool, platform)
    spec = spec_on(batch, quota=10)
    await warm_up(pool, 5)
    outcomes = await asyncio.gather(
        *(catalog.campaigns.create_campaign(pool, spec_copy(spec)) for _ in range(5)),
        return_exceptions=True,
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert failures == []
    assert sorted(created for _, created in outcomes) == [False] * 4 + [True]  # type: ignore[misc]
    assert await row_count(pool, "campaigns") == 1


async def test_an_ended_campaign_can_no_longer_change(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    campaign = await new_campaign(pool, platform, quota=5)
    ended = await catalog.campaigns.change_campaign_status(pool, campaign.id, "end")
    assert ended.status == "ended" and ended.ended_at is not None
    with pytest.raises(Refused) as refused:
        await catalog.campaigns.update_campaign(pool, campaign.id, quota=4)
    assert refused.value.code == "wrong_state"
    # Ending again is a no-op, not an error.
    again = await catalog.campaigns.change_campaign_status(pool, campaign.id, "end")
    assert (again.status, again.ended_at) == ("ended", ended.ended_at)
    stored = await campaigns.get_campaign(pool, campaign.id)
    assert stored == ended


def spec_copy(spec: CampaignSpec, **changes: Any) -> CampaignSpec:
    fields = {**spec.__dict__, "tasks": list(spec.tasks), **changes}
    return CampaignSpec(**fields)


# ----------------------------------------------------------------- claim rules


async def refusal(pool: AsyncConnectionPool, campaign_id: str, user_id: str) -> str:
    with pytest.raises(ClaimRefused) as refused:
        await ledger.claim(pool, campaign_id, user_id)
    return refused.value.code


async def test_claims_outside_the_window_are_refused_not_open_and_closed(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    batch = await new_batch(pool, platform)
    now = datetime.now(UTC)
    early, _ = await catalog.campaigns.create_campaign(
        pool, spec_on(batch, starts_at=now + timedelta(hours=1), ends_at=now + DAY)
    )
    late, _ = await catalog.campaigns.create_campaign(
        pool, spec_on(batch, starts_at=now - DAY, ends_at=now - timedelta(hours=1))
    )

    assert await refusal(pool, early.id, "u1") == "campaign_not_open"
    assert await refusal(pool, late.id, "u1") == "campaign_closed"
    assert await row_count(pool, "claims") == 0
    assert await row_count(pool, "coupon_events") == 0


async def test_claims_on_a_paused_or_ended_campaign_are_refused_with_distinct_codes(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    paused = await new_campaign(pool, platform)
    ended = await new_campaign(pool, platform)
    await catalog.campaigns.change_campaign_status(pool, paused.id, "pause")
    await catalog.campaigns.change_campaign_status(pool, ended.id, "end")

    assert await refusal(pool, paused.id, "u1") == "campaign_paused"
    assert await refusal(pool, ended.id, "u1") == "campaign_ended"
    assert await row_count(pool, "claims") == 0

    # Resumed, the paused one takes claims again; the ended one never does.
    await catalog.campaigns.change_campaign_status(pool, paused.id, "resume")
    claim, created = await ledger.claim(pool, paused.id, "u1")
    assert created and claim.state == "received"
    with pytest.raises(Refused) as resume_ended:
        await catalog.campaigns.change_campaign_status(pool, ended.id, "resume")
    assert resume_ended.value.code == "wrong_state"


async def test_a_sold_out_campaign_refuses_sold_out(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    campaign = await new_campaign(pool, platform, quota=1)
    await ledger.claim(pool, campaign.id, "first")
    assert await refusal(pool, campaign.id, "second") == "sold_out"
    stored = await campaigns.get_campaign(pool, campaign.id)
    assert stored is not None and stored.claimed == 1
    assert await row_count(pool, "claims") == 1


async def test_a_holders_repeated_claim_returns_their_coupon_when_paused_or_sold_out(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    campaign = await new_campaign(pool, platform, quota=1)
    held, created = await ledger.claim(pool, campaign.id, "holder")
    assert created

    # Sold out: another user is refused, the holder gets theirs back.
    assert await refusal(pool, campaign.id, "other") == "sold_out"
    again, created_again = await ledger.claim(pool, campaign.id, "holder")
    assert (again.coupon_id, created_again) == (held.coupon_id, False)

    # Paused: the same.
    await catalog.campaigns.change_campaign_status(pool, campaign.id, "pause")
    assert await refusal(pool, campaign.id, "other") == "campaign_paused"
    paused_again, created_paused = await ledger.claim(pool, campaign.id, "holder")
    assert (paused_again.coupon_id, created_paused) == (held.coupon_id, False)

    assert await row_count(pool, "claims") == 1


@pytest.mark.parametrize("finish", ["stopped by us", "expired at the platform", "past its end"])
async def test_a_finished_batch_refuses_batch_finished_and_a_holder_gets_their_coupon_back(
    finish: str, pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    """What the ledger knows of the batch as of the last sync decides: a coupon claimed
    now would have nothing left to be sent from."""
    campaign = await new_campaign(pool, platform, quota=5)
    held, created = await ledger.claim(pool, campaign.id, "holder")
    assert created
    if finish == "stopped by us":
        await catalog.batches.change_batch(pool, platform, campaign.batch_id, BatchAction.STOP)
    elif finish == "expired at the platform":
        await set_at_platform(pool, simulator, campaign.batch_id, status="expired")
        await catalog.batches.sync_batch(pool, platform, campaign.batch_id)
    else:
        # Its window ended since the last sync, which still saw it running.
        await execute(
            pool,
            "UPDATE batches SET ends_at = now() - interval '1 minute' WHERE id = %s",
            campaign.batch_id,
        )
    stored = await batches.get_batch(pool, campaign.batch_id)
    assert stored is not None
    expected_status = {"stopped by us": "stopped", "expired at the platform": "expired"}
    assert stored.status == expected_status.get(finish, "running")

    assert await refusal(pool, campaign.id, "newcomer") == "batch_finished"
    again, created_again = await ledger.claim(pool, campaign.id, "holder")
    assert (again.coupon_id, created_again) == (held.coupon_id, False)
    assert await row_count(pool, "claims") == 1
    stored_campaign = await campaigns.get_campaign(pool, campaign.id)
    assert stored_campaign is not None and stored_campaign.claimed == 1


async def test_claims_after_the_fixed_task_deadline_are_refused_campaign_closed(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    batch = await new_batch(pool, platform)
    deadline_at = datetime.now(UTC) + DAY
    with_task, _ = await catalog.campaigns.create_campaign(
        pool, spec_on(batch, deadline_at=deadline_at)
    )
    no_task, _ = await catalog.campaigns.create_campaign(
        pool, spec_on(batch, tasks=[], deadline_at=deadline_at)
    )
    held, created = await ledger.claim(pool, with_task.id, "holder")
    assert created
    # The deadline passes (moved, rather than waited for).
    await execute(
        pool,
        "UPDATE campaigns SET deadline_at = now() - interval '1 minute' WHERE id = ANY(%s)",
        [with_task.id, no_task.id],
    )

    assert await refusal(pool, with_task.id, "latecomer") == "campaign_closed"
    again, created_again = await ledger.claim(pool, with_task.id, "holder")
    assert (again.coupon_id, created_again) == (held.coupon_id, False)
    # Without a task to do the deadline binds nothing: the coupon is usable at once.
    usable, created_usable = await ledger.claim(pool, no_task.id, "latecomer")
    assert (usable.state, created_usable) == ("usable", True)
    assert await row_count(pool, "claims") == 2


async def test_the_task_deadline_is_the_earlier_of_claim_plus_duration_and_the_fixed_one(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    batch = await new_batch(pool, platform, quantity=50, valid_days=30)
    fixed = datetime.now(UTC) + 2 * DAY
    duration_first, _ = await catalog.campaigns.create_campaign(
        pool, spec_on(batch, task_deadline=DAY, deadline_at=fixed)
    )
    fixed_first, _ = await catalog.campaigns.create_campaign(
        pool, spec_on(batch, task_deadline=3 * DAY, deadline_at=fixed)
    )
    fixed_only, _ = await catalog.campaigns.create_campaign(pool, spec_on(batch, deadline_at=fixed))
    duration_only, _ = await catalog.campaigns.create_campaign(
        pool, spec_on(batch, task_deadline=DAY)
    )
    neither, _ = await catalog.campaigns.create_campaign(pool, spec_on(batch))

    a, _ = await ledger.claim(pool, duration_first.id, "u1")
    b, _ = await ledger.claim(pool, fixed_first.id, "u1")
    c, _ = await ledger.claim(pool, fixed_only.id, "u1")
    d, _ = await ledger.claim(pool, duration_only.id, "u1")
    e, _ = await ledger.claim(pool, neither.id, "u1")

    assert a.task_deadline == a.claimed_at + DAY
    assert b.task_deadline == fixed
    assert c.task_deadline == fixed
    assert d.task_deadline == d.claimed_at + DAY
    # No deadline of its own: the batch's end, after which no task can count.
    assert e.task_deadline == batch.ends_at
    # As stored, not just as answered.
    stored = await ledger.get_claim(pool, b.coupon_id)
    assert stored is not None and stored.task_deadline == fixed


# ----------------------------------------------------------------- done when 2


async def test_300_concurrent_claims_on_quota_50_give_50_coupons_and_250_sold_out(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    client = dev_env.client
    service = claims_of(pool, client, settings)
    campaign = await new_campaign(pool, platform, quota=50, per_user_limit=1)
    gate = asyncio.Semaphore(100)  # the dev server's store wants bounded concurrency

    async def claim(user_id: str) -> ClaimResult:
        async with gate:
            return await service.claim(campaign.id, user_id)

    try:
        async with running_workers(client, pool, settings):
            outcomes = await asyncio.gather(
                *(claim(f"storm-{i:03d}") for i in range(300)), return_exceptions=True
            )
            granted = [o for o in outcomes if isinstance(o, ClaimResult)]
            refused = [o for o in outcomes if isinstance(o, ClaimRefused)]
            assert len(granted) == 50
            assert len(refused) == 250
            assert {r.code for r in refused} == {"sold_out"}
            assert len({g.coupon_id for g in granted}) == 50
            assert len({g.user_id for g in granted}) == 50

            holder = granted[7]
            again = await service.claim(campaign.id, holder.user_id)
            assert (again.coupon_id, again.created) == (holder.coupon_id, False)

        stored = await campaigns.get_campaign(pool, campaign.id)
        assert stored is not None and stored.claimed == 50
        assert await row_count(pool, "claims") == 50
        assert await scalar(pool, "SELECT count(*) FROM claims WHERE workflow_started") == 50
    finally:
        await close_workflows(client, await claim_workflow_ids(pool, campaign.id))


# ----------------------------------------------------------------- a batch not sending yet


@pytest.mark.parametrize("not_yet", ["never started", "window opens tomorrow"])
async def test_a_coupon_never_fails_because_its_batch_has_not_begun_sending(
    not_yet: str,
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    """A campaign open for claims on a batch that does not send yet (created but not
    started, or its window not begun): either the definition is refused, or its coupons
    wait for the batch. What must not happen is a claimed, entitled coupon ending `failed`
    because the operator started the campaign a little before the batch."""
    client = dev_env.client
    now = datetime.now(UTC)
    if not_yet == "never started":
        batch = await new_batch(pool, platform, start=False)
    else:
        batch = await new_batch(pool, platform, starts_at=now + DAY, ends_at=now + 10 * DAY)
    spec = spec_on(batch, quota=5, tasks=[])  # entitled at claim: sent at once
    try:
        await catalog.campaigns.create_campaign(pool, spec)
    except InvalidField as refused:
        assert refused.field in ("batch", "starts_at"), refused
        assert await row_count(pool, "campaigns") == 0
        return
    result: ClaimResult | None = None
    try:
        async with running_workers(client, pool, settings):
            result = await claims_of(pool, client, settings).claim(spec.id, "early-bird")
            handle = handle_of(client, result.workflow_id)
            # A send and its answer take milliseconds here: 3 s is plenty to see it fail.
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 3.0
            state = "received"
            while loop.time() < give_up and state != "failed":
                await asyncio.sleep(0.1)
                row = await ledger.get_claim(pool, result.coupon_id)
                assert row is not None
                state = row.state
            described = await handle.describe()
        assert state != "failed", f"{not_yet}: the coupon failed"
        assert described.status != WorkflowExecutionStatus.COMPLETED
    finally:
        if result is not None:
            await close_workflows(client, [result.workflow_id])
