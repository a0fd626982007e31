"""Campaigns as our ledger holds them: the definition an operator writes, the batch it
hands out, and its status."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, LiteralString

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from coupons.ledger import batches, db
from coupons.ledger.batches import Batch
from coupons.ledger.tenants import DEFAULT_TENANT

CAMPAIGN_STATUSES = ("active", "paused", "ended")


@dataclass(frozen=True)
class Task:
    key: str
    name: str


@dataclass
class CampaignSpec:
    """What an operator defines; the catalog validates it against its batch."""

    id: str
    batch_id: str
    quota: int
    per_user_limit: int = 1
    tasks: list[Task] = field(default_factory=list)
    name: str | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    task_deadline: timedelta | None = None  # after the claim
    deadline_at: datetime | None = None  # a fixed time; the earlier of the two wins
    tenant_id: str = DEFAULT_TENANT


@dataclass
class Campaign:
    id: str
    tenant_id: str
    batch_id: str
    required_tasks: list[str]
    task_names: list[str]
    task_deadline: timedelta | None
    deadline_at: datetime | None
    per_user_limit: int
    quota: int
    claimed: int
    name: str | None
    starts_at: datetime | None
    ends_at: datetime | None
    status: str
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None

    @property
    def tasks(self) -> list[Task]:
        return [Task(k, n) for k, n in zip(self.required_tasks, self.task_names, strict=True)]

    def spec(self) -> CampaignSpec:
        return CampaignSpec(
            id=self.id,
            batch_id=self.batch_id,
            quota=self.quota,
            per_user_limit=self.per_user_limit,
            tasks=self.tasks,
            name=self.name,
            starts_at=self.starts_at,
            ends_at=self.ends_at,
            task_deadline=self.task_deadline,
            deadline_at=self.deadline_at,
            tenant_id=self.tenant_id,
        )


# What the campaign's quota slots have counted (migration 006), for a query on `campaigns`.
_CLAIMED = (
    "(SELECT COALESCE(sum(s.claimed), 0)::int FROM campaign_slots s"
    " WHERE s.campaign_id = campaigns.id)"
)
_CAMPAIGN_COLUMNS = (
    "id, tenant_id, batch_id, required_tasks, task_names, task_deadline, deadline_at,"
    f" per_user_limit, quota, {_CLAIMED} AS claimed, name, starts_at, ends_at, status,"
    " created_at, updated_at, ended_at"
)
_SELECT_CAMPAIGNS = f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns"


@dataclass
class BatchUse:
    """The batch a campaign definition names, as the writing transaction sees it."""

    batch: Batch | None  # None: no such batch
    # Coupons the batch's other campaigns hold it to: their quota, or what they claimed
    # once ended.
    promised_elsewhere: int


# Checks a definition against its batch and the campaign as stored (None: a new one);
# raises a refusal naming the field. Runs inside the writing transaction.
CampaignCheck = Callable[[CampaignSpec, BatchUse, "Campaign | None"], None]


async def save_campaign(
    pool: AsyncConnectionPool, spec: CampaignSpec, check: CampaignCheck
) -> tuple[Campaign, bool]:
    """Create or update the campaign after `check` passes; (campaign, changed).

    Creating an existing campaign with the same definition changes nothing, so a retried
    create is harmless; `check` decides what a different definition means.
    """
    async with pool.connection() as conn, conn.transaction():
        # Serializes writers of one campaign, including two creating it at once (a row
        # lock cannot: the row does not exist yet), and of one batch's campaigns, whose
        # quotas share the batch.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('campaign-batch:' || %s))", (spec.batch_id,)
        )
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('campaign:' || %s))", (spec.id,))
        # The count the checks read cannot move before the write: claims wait meanwhile.
        await conn.execute(
            "SELECT 1 FROM campaign_slots WHERE campaign_id = %s FOR UPDATE", (spec.id,)
        )
        existing = await _campaign_for_update(conn, spec.id)
        use = BatchUse(
            await batches.batch_for_share(conn, spec.batch_id),
            await _promised_elsewhere(conn, spec.batch_id, spec.id),
        )
        check(spec, use, existing)
        if existing is not None and existing.spec() == spec:
            return existing, False
        values = (
            spec.batch_id,
            [t.key for t in spec.tasks],
            [t.name for t in spec.tasks],
            spec.task_deadline,
            spec.deadline_at,
            spec.per_user_limit,
            spec.quota,
            spec.name,
            spec.starts_at,
            spec.ends_at,
            spec.tenant_id,
            spec.id,
        )
        if existing is None:
            write: LiteralString = (
                "INSERT INTO campaigns (batch_id, required_tasks, task_names, task_deadline,"
                " deadline_at, per_user_limit, quota, name, starts_at, ends_at, tenant_id, id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                f" RETURNING {_CAMPAIGN_COLUMNS}"
            )
        else:
            write = (
                "UPDATE campaigns SET batch_id = %s, required_tasks = %s, task_names = %s,"
                " task_deadline = %s, deadline_at = %s, per_user_limit = %s, quota = %s,"
                " name = %s, starts_at = %s, ends_at = %s, tenant_id = %s, updated_at = now()"
                f" WHERE id = %s RETURNING {_CAMPAIGN_COLUMNS}"
            )
        # The row exists: inserted, or locked above.
        saved = await db.fetch_written(conn, Campaign, write, values)
        if existing is None or existing.quota != spec.quota:
            await conn.execute("SELECT spread_quota(%s, %s)", (spec.id, spec.quota))
        return saved, True


async def _promised_elsewhere(conn: AsyncConnection[Any], batch_id: str, campaign_id: str) -> int:
    cur = await conn.execute(
        f"SELECT COALESCE(sum(CASE WHEN status = 'ended' THEN {_CLAIMED} ELSE quota END), 0)"
        " FROM campaigns WHERE batch_id = %s AND id <> %s",
        (batch_id, campaign_id),
    )
    row = await cur.fetchone()
    assert row is not None  # an aggregate always answers
    return int(row[0])


async def _campaign_for_update(conn: AsyncConnection[Any], campaign_id: str) -> Campaign | None:
    return await db.fetch_one(
        conn, Campaign, _SELECT_CAMPAIGNS + " WHERE id = %s FOR UPDATE", (campaign_id,)
    )


async def set_campaign_status(
    pool: AsyncConnectionPool, campaign_id: str, allowed_from: tuple[str, ...], status: str
) -> tuple[Campaign | None, bool]:
    """Move the campaign to `status` if it is in one of `allowed_from`; (campaign, moved).

    Returns the campaign as it is either way (None when unknown), so the caller can tell
    "already there" from "not allowed".
    """
    async with pool.connection() as conn, conn.transaction():
        current = await _campaign_for_update(conn, campaign_id)
        if current is None or current.status not in allowed_from:
            return current, False
        moved = await db.fetch_written(
            conn,
            Campaign,
            "UPDATE campaigns SET status = %s, updated_at = now(),"
            " ended_at = CASE WHEN %s = 'ended' THEN now() ELSE ended_at END"
            f" WHERE id = %s RETURNING {_CAMPAIGN_COLUMNS}",
            (status, status, campaign_id),
        )
        return moved, True


async def get_campaign(
    pool: AsyncConnectionPool, campaign_id: str, tenant_id: str | None = None
) -> Campaign | None:
    """The campaign; with `tenant_id`, only if that tenant owns it."""
    return await db.fetch_by_id(pool, Campaign, _SELECT_CAMPAIGNS, "id", campaign_id, tenant_id)


@dataclass(frozen=True)
class CampaignFilter:
    """Which campaigns a listing wants: each field given narrows it (None: any)."""

    batch_id: str | None = None
    status: str | None = None
    tenant_id: str | None = None


async def list_campaigns(
    pool: AsyncConnectionPool, where: CampaignFilter = CampaignFilter()
) -> list[Campaign]:
    """The campaigns `where` asks for, oldest first."""
    return await db.fetch_all(
        pool,
        Campaign,
        f"{_SELECT_CAMPAIGNS} WHERE {db.given('batch_id', 'status', 'tenant_id')}"
        " ORDER BY created_at, id",
        asdict(where),
    )
