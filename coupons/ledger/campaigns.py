"""Batches (as synced from the platform) and campaigns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import LiteralString

from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from coupons.platforms.base import PlatformBatch


@dataclass
class Campaign:
    id: str
    batch_id: str
    required_tasks: list[str]
    task_deadline: timedelta | None
    per_user_limit: int
    quota: int
    claimed: int


async def upsert_batch(pool: AsyncConnectionPool, batch: PlatformBatch) -> None:
    """Store the platform's view of a batch: one row per batch, refreshed on every sync."""
    await pool_execute(
        pool,
        "INSERT INTO batches (id, name, status, quantity, remaining, valid_days, raw)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, status = EXCLUDED.status,"
        " quantity = EXCLUDED.quantity, remaining = EXCLUDED.remaining,"
        " valid_days = EXCLUDED.valid_days, raw = EXCLUDED.raw, synced_at = now()",
        (
            batch.batch_id,
            batch.name,
            batch.status,
            batch.quantity,
            batch.remaining,
            batch.valid_days,
            Jsonb(batch.raw),
        ),
    )


async def upsert_campaign(pool: AsyncConnectionPool, campaign: Campaign) -> None:
    """Create the campaign or update its definition; `claimed` is never overwritten."""
    await pool_execute(
        pool,
        "INSERT INTO campaigns (id, batch_id, required_tasks, task_deadline, per_user_limit, quota)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET batch_id = EXCLUDED.batch_id,"
        " required_tasks = EXCLUDED.required_tasks, task_deadline = EXCLUDED.task_deadline,"
        " per_user_limit = EXCLUDED.per_user_limit, quota = EXCLUDED.quota",
        (
            campaign.id,
            campaign.batch_id,
            campaign.required_tasks,
            campaign.task_deadline,
            campaign.per_user_limit,
            campaign.quota,
        ),
    )


async def get_campaign(pool: AsyncConnectionPool, campaign_id: str) -> Campaign | None:
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=class_row(Campaign))
        await cur.execute(
            "SELECT id, batch_id, required_tasks, task_deadline, per_user_limit, quota, claimed"
            " FROM campaigns WHERE id = %s",
            (campaign_id,),
        )
        return await cur.fetchone()


async def pool_execute(
    pool: AsyncConnectionPool, query: LiteralString, params: tuple[object, ...]
) -> None:
    async with pool.connection() as conn:
        await conn.execute(query, params)
