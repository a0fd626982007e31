"""Step 1 of the method: batches created at the platform on demand, synced to our ledger."""

from __future__ import annotations

from datetime import timedelta

from psycopg_pool import AsyncConnectionPool

from coupons.ledger import campaigns
from coupons.ledger.campaigns import Campaign
from coupons.platforms.base import BatchSpec, Platform, PlatformBatch


async def ensure_batch(
    pool: AsyncConnectionPool, platform: Platform, spec: BatchSpec
) -> PlatformBatch:
    """Create the batch at the platform (idempotent by `spec.request_key`) and store it."""
    batch = await platform.create_batch(spec)
    await campaigns.upsert_batch(pool, batch)
    return batch


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
    """A campaign with a batch of its own sized to its quota; safe to call again."""
    batch = await ensure_batch(
        pool,
        platform,
        BatchSpec(
            request_key=f"campaign-{campaign_id}",
            name=f"{campaign_id} coupons",
            face_value_cents=face_value_cents,
            min_spend_cents=min_spend_cents,
            quantity=quota,
            valid_days=valid_days,
            per_user_limit=per_user_limit,
        ),
    )
    campaign = Campaign(
        id=campaign_id,
        batch_id=batch.batch_id,
        required_tasks=required_tasks,
        task_deadline=task_deadline,
        per_user_limit=per_user_limit,
        quota=quota,
        claimed=0,
    )
    await campaigns.upsert_campaign(pool, campaign)
    return campaign
