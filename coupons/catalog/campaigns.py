"""Step 1 of the method, its campaigns: the definitions that hand a batch's coupons out,
checked against the batch (and the batch's other campaigns) inside the transaction that
writes them, and their status.

Everything here validates first and writes after, so a refused request changes nothing.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool

from coupons import validation as rules
from coupons.catalog.batches import check_texts_and_times, create_batch
from coupons.errors import InvalidField, Refused
from coupons.ledger import batches, campaigns
from coupons.ledger.batches import Batch
from coupons.ledger.campaigns import BatchUse, Campaign, CampaignSpec, Task
from coupons.platforms.base import FINISHED_BATCH, BatchStatus, Platform
from coupons.validation import validate_id


def validate_campaign(
    spec: CampaignSpec,
    batch: Batch | None,
    existing: Campaign | None,
    *,
    promised_elsewhere: int = 0,
    now: datetime | None = None,
) -> None:
    """Refuse a definition that cannot work, naming the field; pure, writes nothing.

    `promised_elsewhere`: coupons of the batch that its other campaigns hold.
    """
    now = now or datetime.now(UTC)
    validate_id("campaign", spec.id)
    if batch is None or batch.tenant_id != spec.tenant_id:
        raise InvalidField("batch", f"unknown batch {spec.batch_id!r}")
    if existing is not None and existing.status == "ended":
        raise Refused("wrong_state", f"campaign {spec.id!r} has ended; it can no longer change")
    new_batch = existing is None or existing.batch_id != batch.id
    if new_batch and batch.status in FINISHED_BATCH:
        raise InvalidField("batch", f"batch {batch.id!r} is {batch.status} at the platform")
    if new_batch and batch.ends_at is not None and batch.ends_at <= now:
        raise InvalidField("batch", f"batch {batch.id!r} ended at {batch.ends_at.isoformat()}")
    if batch.status == BatchStatus.CREATED:
        # Its sends would be refused for good, failing every coupon claimed meanwhile.
        raise InvalidField(
            "batch", f"batch {batch.id!r} has not been started at the platform: start it first"
        )
    if existing is not None and existing.batch_id != spec.batch_id and existing.claimed:
        raise InvalidField(
            "batch", f"campaign {spec.id!r} has {existing.claimed} claims on {existing.batch_id!r}"
        )
    rules.QUOTA.check("quota", spec.quota)
    if spec.quota > batch.quantity:
        raise InvalidField(
            "quota", f"{spec.quota} is more than batch {batch.id!r} holds ({batch.quantity})"
        )
    if spec.quota + promised_elsewhere > batch.quantity:
        raise InvalidField(
            "quota",
            f"{spec.quota} is more than batch {batch.id!r} has left for this campaign "
            f"({batch.quantity} minus {promised_elsewhere} held by its other campaigns)",
        )
    if existing is not None and spec.quota < existing.claimed:
        raise InvalidField("quota", f"{spec.quota} is below the {existing.claimed} already claimed")
    rules.PER_USER_LIMIT.check("per_user_limit", spec.per_user_limit)
    if batch.per_user_limit is not None and spec.per_user_limit > batch.per_user_limit:
        raise InvalidField(
            "per_user_limit",
            f"{spec.per_user_limit} is more than batch {batch.id!r} gives one user at the "
            f"platform ({batch.per_user_limit})",
        )
    _check_tasks(spec.tasks)
    check_texts_and_times(
        name=spec.name,
        starts_at=spec.starts_at,
        ends_at=spec.ends_at,
        deadline_at=spec.deadline_at,
    )
    if spec.starts_at and spec.ends_at and spec.ends_at <= spec.starts_at:
        raise InvalidField("ends_at", "the claim window ends before it starts")
    if spec.ends_at and batch.ends_at and spec.ends_at > batch.ends_at:
        raise InvalidField(
            "ends_at",
            f"the claim window ends after batch {batch.id!r} does ({batch.ends_at.isoformat()})",
        )
    _check_deadline(spec, batch, existing, now)


def _check_tasks(tasks: list[Task]) -> None:
    rules.TASKS.check("tasks", len(tasks))
    seen: set[str] = set()
    for task in tasks:
        validate_id("task", task.key)
        if task.key in seen:
            raise InvalidField("tasks", f"task key {task.key!r} appears twice")
        if not task.name.strip():
            raise InvalidField("tasks", f"task {task.key!r} needs a display name")
        rules.NAME.check("tasks", task.name)
        seen.add(task.key)


def _check_deadline(
    spec: CampaignSpec, batch: Batch, existing: Campaign | None, now: datetime
) -> None:
    if spec.task_deadline is not None and spec.task_deadline <= timedelta(0):
        raise InvalidField("task_deadline", "must be a positive duration")
    changed = existing is None or existing.deadline_at != spec.deadline_at
    if spec.tasks and spec.deadline_at is not None and changed and spec.deadline_at <= now:
        raise InvalidField("deadline_at", f"{spec.deadline_at.isoformat()} has already passed")
    if spec.deadline_at is not None and spec.starts_at and spec.deadline_at <= spec.starts_at:
        raise InvalidField("deadline_at", "the task deadline is before the claim window opens")
    if batch.ends_at is None:
        return
    if spec.deadline_at is not None and spec.deadline_at > batch.ends_at:
        raise InvalidField(
            "deadline_at",
            f"the task deadline is after batch {batch.id!r} ends ({batch.ends_at.isoformat()})",
        )
    if spec.task_deadline is not None and spec.deadline_at is None:
        # The last claim the window allows must still be able to finish inside the batch.
        last_claim = spec.ends_at or now
        if last_claim + spec.task_deadline > batch.ends_at:
            raise InvalidField(
                "task_deadline",
                f"a claim at {last_claim.isoformat()} would have until "
                f"{(last_claim + spec.task_deadline).isoformat()}, after batch {batch.id!r} "
                f"ends ({batch.ends_at.isoformat()})",
            )


def _check_create(spec: CampaignSpec, use: BatchUse, existing: Campaign | None) -> None:
    if existing is not None and existing.spec() != spec:
        raise Refused(
            "campaign_exists",
            f"campaign {spec.id!r} exists with another definition; use `campaign update`",
        )
    if existing is None:
        _check_created(spec, use.batch)
        validate_campaign(spec, use.batch, existing, promised_elsewhere=use.promised_elsewhere)


def _check_created(spec: CampaignSpec, batch: Batch | None) -> None:
    """A batch whose create the platform has not answered yet sends nothing: a campaign on
    it would fail every coupon claimed meanwhile."""
    if batch is not None and batch.tenant_id == spec.tenant_id and batch.status == batches.PENDING:
        raise InvalidField(
            "batch",
            f"batch {batch.id!r} is not created at the platform yet: {batches.PENDING_NOTE}",
        )


async def create_campaign(pool: AsyncConnectionPool, spec: CampaignSpec) -> tuple[Campaign, bool]:
    """Create the campaign; the same definition again returns it (created False)."""
    return await campaigns.save_campaign(pool, spec, _check_create)


def _check_update(spec: CampaignSpec, use: BatchUse, existing: Campaign | None) -> None:
    if existing is None or existing.tenant_id != spec.tenant_id:
        raise Refused("unknown_campaign", f"no campaign {spec.id!r}")
    _check_created(spec, use.batch)
    validate_campaign(spec, use.batch, existing, promised_elsewhere=use.promised_elsewhere)


async def update_campaign(pool: AsyncConnectionPool, campaign_id: str, **changes: Any) -> Campaign:
    """Change some fields of a campaign's definition; claims already made keep theirs."""
    current = await get_campaign(pool, campaign_id)
    try:
        spec = replace(current.spec(), **changes)
    except TypeError as err:
        raise Refused("invalid_request", f"cannot change that: {err}") from None
    campaign, _ = await campaigns.save_campaign(pool, spec, _check_update)
    return campaign


async def get_campaign(
    pool: AsyncConnectionPool, campaign_id: str, tenant_id: str | None = None
) -> Campaign:
    """The campaign (of `tenant_id`, when given: another tenant's is as unknown as none)."""
    validate_id("campaign", campaign_id)
    campaign = await campaigns.get_campaign(pool, campaign_id, tenant_id)
    if campaign is None:
        raise Refused("unknown_campaign", f"no campaign {campaign_id!r}")
    return campaign


# Which statuses each operator action moves a campaign from, and to.
_STATUS_ACTIONS = {
    "pause": (("active",), "paused"),
    "resume": (("paused",), "active"),
    "end": (("active", "paused"), "ended"),
}


async def change_campaign_status(
    pool: AsyncConnectionPool, campaign_id: str, action: str, tenant_id: str | None = None
) -> Campaign:
    """Pause, resume or end a campaign; repeating an action already done is a no-op."""
    allowed_from, target = _STATUS_ACTIONS[action]
    await get_campaign(pool, campaign_id, tenant_id)  # another tenant's is unknown
    campaign, moved = await campaigns.set_campaign_status(pool, campaign_id, allowed_from, target)
    if campaign is None:
        raise Refused("unknown_campaign", f"no campaign {campaign_id!r}")
    if not moved and campaign.status != target:
        raise Refused(
            "wrong_state", f"campaign {campaign_id!r} is {campaign.status}; cannot {action}"
        )
    return campaign


async def ensure_campaign(
    pool: AsyncConnectionPool,
    platform: Platform,
    campaign_id: str,
    *,
    required_tasks: list[str],
    quota: int,
    per_user_limit: int = 1,
    task_deadline: timedelta | None = None,
    face_value_cents: int = 500,
    min_spend_cents: int = 0,
    valid_days: int = 30,
) -> Campaign:
    """A campaign with a running batch of its own (same id) sized to its quota; safe to call
    again. The demo, tests and benchmarks use it."""
    await create_batch(
        pool,
        platform,
        campaign_id,
        quantity=quota,
        face_value_cents=face_value_cents,
        min_spend_cents=min_spend_cents,
        valid_days=valid_days,
        per_user_limit=per_user_limit,
        name=f"{campaign_id} coupons",
    )
    spec = CampaignSpec(
        id=campaign_id,
        batch_id=campaign_id,
        quota=quota,
        per_user_limit=per_user_limit,
        tasks=[Task(key, key) for key in required_tasks],
        task_deadline=task_deadline,
    )
    campaign, _ = await create_campaign(pool, spec)
    return campaign
