"""Batches (ours, as synced from the platform) and campaigns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, LiteralString

from psycopg import AsyncConnection
from psycopg.rows import class_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from coupons.ledger import db
from coupons.ledger.tenants import DEFAULT_TENANT
from coupons.platforms.base import BatchAction, BatchSpec, PlatformBatch

CAMPAIGN_STATUSES = ("active", "paused", "ended")


@dataclass
class Batch:
    """A batch as our ledger holds it: our id, the platform's id and its last sync."""

    id: str
    platform_batch_id: str
    tenant_id: str
    name: str
    status: str
    quantity: int
    remaining: int
    valid_days: int
    face_value_cents: int | None
    min_spend_cents: int | None
    per_user_limit: int | None
    starts_at: datetime | None
    ends_at: datetime | None
    created_at: datetime
    synced_at: datetime
    owed: int
    backlog: int
    drift: list[str]


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


# A batch whose create is pending has no platform id yet: it reads as "" (its status says
# why), so every reader keeps one type.
_BATCH_COLUMNS = (
    "id, COALESCE(platform_batch_id, '') AS platform_batch_id, tenant_id, name, status,"
    " quantity, remaining, valid_days,"
    " face_value_cents, min_spend_cents, per_user_limit, starts_at, ends_at, created_at,"
    " synced_at, owed, backlog, drift"
)
_CAMPAIGN_COLUMNS = (
    "id, tenant_id, batch_id, required_tasks, task_names, task_deadline, deadline_at,"
    " per_user_limit, quota, claimed, name, starts_at, ends_at, status, created_at,"
    " updated_at, ended_at"
)


# ------------------------------------------------------------------ batches


async def upsert_batch(
    pool: AsyncConnectionPool,
    batch_id: str,
    platform: PlatformBatch,
    tenant_id: str = DEFAULT_TENANT,
) -> Batch:
    """Store the platform's view of our batch `batch_id`: one row, refreshed on every sync.

    `tenant_id` counts only when the row is created: a batch never changes hands."""
    async with pool.connection() as conn:
        return await _upsert_batch(conn, batch_id, platform, tenant_id)


async def _upsert_batch(
    conn: AsyncConnection[Any], batch_id: str, platform: PlatformBatch, tenant_id: str
) -> Batch:
    cur = conn.cursor(row_factory=class_row(Batch))
    await cur.execute(
        "INSERT INTO batches (id, platform_batch_id, name, status, quantity, remaining,"
        " valid_days, face_value_cents, min_spend_cents, per_user_limit, starts_at, ends_at,"
        " raw, tenant_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET platform_batch_id = EXCLUDED.platform_batch_id,"
        " name = EXCLUDED.name, status = EXCLUDED.status, quantity = EXCLUDED.quantity,"
        " remaining = EXCLUDED.remaining, valid_days = EXCLUDED.valid_days,"
        " face_value_cents = EXCLUDED.face_value_cents,"
        " min_spend_cents = EXCLUDED.min_spend_cents,"
        " per_user_limit = EXCLUDED.per_user_limit, starts_at = EXCLUDED.starts_at,"
        " ends_at = EXCLUDED.ends_at, raw = EXCLUDED.raw, synced_at = now(),"
        # The line a pending row carried goes with it; a sync's drift stays till the next.
        " drift = CASE WHEN batches.status = 'pending' THEN '{}' ELSE batches.drift END"
        f" RETURNING {_BATCH_COLUMNS}",
        (
            batch_id,
            platform.batch_id,
            platform.name,
            platform.status.value,
            platform.quantity,
            platform.remaining,
            platform.valid_days,
            platform.face_value_cents,
            platform.min_spend_cents,
            platform.per_user_limit,
            platform.starts_at,
            platform.ends_at,
            Jsonb(platform.raw),
            tenant_id,
        ),
    )
    stored = await cur.fetchone()
    assert stored is not None  # INSERT ... RETURNING always yields its row
    return stored


# ------------------------------------------------------------------ batch intents

# The status of a batch whose create the platform has not answered yet.
PENDING = "pending"
PENDING_NOTE = (
    "not created at the platform yet (its answer never reached the ledger): the next catalog "
    "sync, or `batch create` with the same terms, finishes it"
)


@dataclass
class BatchIntent:
    """A change asked of the platform, written before the call; `request` is all of it."""

    id: int
    batch_id: str
    seq: int
    operation: str  # create, or a BatchAction's value
    request_key: str
    request: dict[str, Any]
    state: str  # pending, done, refused
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime


_INTENT_COLUMNS = (
    "id, batch_id, seq, operation, request_key, request, state, attempts, last_error,"
    " created_at, updated_at"
)


def spec_json(spec: BatchSpec) -> dict[str, Any]:
    """`spec` as the intent keeps it: every field, times in ISO 8601 with their offset, so
    `spec_of` gives back the very same request."""
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in asdict(spec).items()
    }


def spec_of(intent: BatchIntent) -> BatchSpec:
    """The create request `intent` keeps."""
    fields = dict(intent.request)
    for moment in ("starts_at", "ends_at"):
        if fields[moment] is not None:
            fields[moment] = datetime.fromisoformat(fields[moment])
    return BatchSpec(**fields)


async def _lock_intents(conn: AsyncConnection[Any], batch_id: str) -> int:
    """Serialize writers of one batch's intents; the next intent's seq."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('batch-intent:' || %s))", (batch_id,))
    cur = await conn.execute(
        "SELECT COALESCE(max(seq), 0) + 1 FROM batch_intents WHERE batch_id = %s", (batch_id,)
    )
    row = await cur.fetchone()
    assert row is not None  # an aggregate always answers
    return int(row[0])


async def _insert_intent(
    conn: AsyncConnection[Any],
    batch_id: str,
    seq: int,
    operation: str,
    request_key: str,
    request: dict[str, Any],
) -> BatchIntent:
    cur = conn.cursor(row_factory=class_row(BatchIntent))
    await cur.execute(
        "INSERT INTO batch_intents (batch_id, seq, operation, request_key, request)"
        f" VALUES (%s, %s, %s, %s, %s) RETURNING {_INTENT_COLUMNS}",
        (batch_id, seq, operation, request_key, Jsonb(request)),
    )
    intent = await cur.fetchone()
    assert intent is not None  # INSERT ... RETURNING always yields its row
    return intent


async def begin_create(
    pool: AsyncConnectionPool, batch_id: str, tenant_id: str, spec: BatchSpec
) -> BatchIntent | None:
    """Write the batch as pending and its create intent (under `spec.request_key`), in one
    transaction, before the platform is asked; None when the id is taken already (by a
    create running at the same time, or done): the caller reads that batch instead."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "INSERT INTO batches (id, platform_batch_id, name, status, quantity, remaining,"
            " valid_days, face_value_cents, min_spend_cents, per_user_limit, starts_at, ends_at,"
            " raw, tenant_id, drift)"
            " VALUES (%s, NULL, %s, %s, %s, 0, %s, %s, %s, %s, %s, %s, '{}', %s, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING 1",
            (
                batch_id,
                spec.name,
                PENDING,
                spec.quantity,
                spec.valid_days,
                spec.face_value_cents,
                spec.min_spend_cents,
                spec.per_user_limit,
                spec.starts_at,
                spec.ends_at,
                tenant_id,
                [PENDING_NOTE],
            ),
        )
        if await cur.fetchone() is None:
            return None
        seq = await _lock_intents(conn, batch_id)
        return await _insert_intent(
            conn, batch_id, seq, "create", spec.request_key, spec_json(spec)
        )


async def intend_change(
    pool: AsyncConnectionPool,
    batch_id: str,
    action: BatchAction,
    platform_batch_id: str,
    key_prefix: str,
) -> BatchIntent:
    """The pending intent to `action` the batch: the one written already (asked again, it
    is the same intent under the same key), or a new one keyed `{key_prefix}-{seq}-{action}`."""
    async with pool.connection() as conn, conn.transaction():
        seq = await _lock_intents(conn, batch_id)
        cur = conn.cursor(row_factory=class_row(BatchIntent))
        await cur.execute(
            f"SELECT {_INTENT_COLUMNS} FROM batch_intents"
            " WHERE batch_id = %s AND operation = %s AND state = 'pending' ORDER BY seq LIMIT 1",
            (batch_id, action.value),
        )
        pending = await cur.fetchone()
        if pending is not None:
            return pending
        request = {"platform_batch_id": platform_batch_id, "action": action.value}
        key = f"{key_prefix}-{seq}-{action.value}"
        return await _insert_intent(conn, batch_id, seq, action.value, key, request)


async def pending_intents(
    pool: AsyncConnectionPool, batch_id: str | None = None
) -> list[BatchIntent]:
    """The batch's (None: every batch's) intents the platform has not answered yet, oldest
    first."""
    return await db.fetch_all(
        pool,
        BatchIntent,
        f"SELECT {_INTENT_COLUMNS} FROM batch_intents WHERE state = 'pending'"
        " AND (%(batch)s::text IS NULL OR batch_id = %(batch)s) ORDER BY batch_id, seq",
        {"batch": batch_id},
    )


async def batch_intents(pool: AsyncConnectionPool, batch_id: str) -> list[BatchIntent]:
    """Every intent of the batch, oldest first: its story at the platform."""
    return await db.fetch_all(
        pool,
        BatchIntent,
        f"SELECT {_INTENT_COLUMNS} FROM batch_intents WHERE batch_id = %s ORDER BY seq",
        (batch_id,),
    )


async def complete_intent(
    pool: AsyncConnectionPool, intent: BatchIntent, answer: PlatformBatch, tenant_id: str
) -> Batch:
    """The platform answered `intent` with `answer`: store the batch as it now is and mark
    the intent done, in one transaction. Completing it again changes nothing more."""
    async with pool.connection() as conn, conn.transaction():
        stored = await _upsert_batch(conn, intent.batch_id, answer, tenant_id)
        await conn.execute(
            "UPDATE batch_intents SET state = 'done', answer = %s, attempts = attempts + 1,"
            " last_error = NULL, updated_at = now(), finished_at = now()"
            " WHERE id = %s AND state = 'pending'",
            (Jsonb(answer.raw), intent.id),
        )
        return stored


async def refuse_intent(pool: AsyncConnectionPool, intent: BatchIntent, error: str) -> None:
    """The platform refused `intent` for good: mark it so, and change nothing else (a
    refused create takes its pending batch row with it: the id is free again)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "UPDATE batch_intents SET state = 'refused', last_error = %s,"
            " attempts = attempts + 1, updated_at = now(), finished_at = now()"
            " WHERE id = %s AND state = 'pending'",
            (error, intent.id),
        )
        if intent.operation == "create":
            await conn.execute(
                "DELETE FROM batches WHERE id = %s AND status = %s", (intent.batch_id, PENDING)
            )


async def intent_unanswered(pool: AsyncConnectionPool, intent: BatchIntent, error: str) -> None:
    """Asked, with no answer that settles it (a timeout, 5xx, not ready yet): it stays
    pending, to be asked again under the same key."""
    await pool_execute(
        pool,
        "UPDATE batch_intents SET attempts = attempts + 1, last_error = %s, updated_at = now()"
        " WHERE id = %s AND state = 'pending'",
        (error, intent.id),
    )


async def get_batch(
    pool: AsyncConnectionPool, batch_id: str, tenant_id: str | None = None
) -> Batch | None:
    """The batch; with `tenant_id`, only if that tenant owns it."""
    return await db.fetch_one(
        pool,
        Batch,
        f"SELECT {_BATCH_COLUMNS} FROM batches"
        " WHERE id = %s AND (%s::text IS NULL OR tenant_id = %s)",
        (batch_id, tenant_id, tenant_id),
    )


async def list_batches(
    pool: AsyncConnectionPool, *, syncable_only: bool = False, tenant_id: str | None = None
) -> list[Batch]:
    """Every batch (of a tenant), or only those a sync still reads: not stopped or expired,
    or with an intent the platform has not answered yet (the sync finishes it)."""
    return await db.fetch_all(
        pool,
        Batch,
        f"SELECT {_BATCH_COLUMNS} FROM batches"
        " WHERE (NOT %(syncable)s OR status NOT IN ('stopped', 'expired') OR EXISTS ("
        "   SELECT 1 FROM batch_intents i WHERE i.batch_id = batches.id"
        "   AND i.state = 'pending'))"
        " AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s) ORDER BY created_at, id",
        {"syncable": syncable_only, "tenant": tenant_id},
    )


@dataclass
class Obligations:
    """What the ledger still owes from a batch."""

    owed: int  # `usable`, plus `received` whose task deadline has not passed
    backlog: int  # `usable`: entitled, waiting to be sent
    active_campaigns: list[str]


async def obligations(pool: AsyncConnectionPool, batch_id: str) -> Obligations:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE c.state = 'usable' OR (c.state = 'received'"
            "   AND (c.task_deadline IS NULL OR c.task_deadline > now()))),"
            " count(*) FILTER (WHERE c.state = 'usable')"
            " FROM claims c JOIN campaigns k ON k.id = c.campaign_id"
            " WHERE k.batch_id = %s AND c.state IN ('received', 'usable')",
            (batch_id,),
        )
        row = await cur.fetchone()
        assert row is not None  # an aggregate always answers
        cur = await conn.execute(
            "SELECT id FROM campaigns WHERE batch_id = %s AND status <> 'ended' ORDER BY id",
            (batch_id,),
        )
        active = [campaign_id for (campaign_id,) in await cur.fetchall()]
    return Obligations(owed=row[0], backlog=row[1], active_campaigns=active)


async def record_sync(
    pool: AsyncConnectionPool, batch_id: str, owed: int, backlog: int, drift: list[str]
) -> None:
    await pool_execute(
        pool,
        "UPDATE batches SET owed = %s, backlog = %s, drift = %s WHERE id = %s",
        (owed, backlog, drift, batch_id),
    )


# ------------------------------------------------------------------ campaigns


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
        existing = await _campaign_for_update(conn, spec.id)
        use = BatchUse(
            await _batch_for_share(conn, spec.batch_id),
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
        cur = conn.cursor(row_factory=class_row(Campaign))
        if existing is None:
            await cur.execute(
                "INSERT INTO campaigns (batch_id, required_tasks, task_names, task_deadline,"
                " deadline_at, per_user_limit, quota, name, starts_at, ends_at, tenant_id, id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                f" RETURNING {_CAMPAIGN_COLUMNS}",
                values,
            )
        else:
            await cur.execute(
                "UPDATE campaigns SET batch_id = %s, required_tasks = %s, task_names = %s,"
                " task_deadline = %s, deadline_at = %s, per_user_limit = %s, quota = %s,"
                " name = %s, starts_at = %s, ends_at = %s, tenant_id = %s, updated_at = now()"
                f" WHERE id = %s RETURNING {_CAMPAIGN_COLUMNS}",
                values,
            )
        saved = await cur.fetchone()
        assert saved is not None  # the row exists: inserted or locked above
        return saved, True


async def _batch_for_share(conn: AsyncConnection[Any], batch_id: str) -> Batch | None:
    cur = conn.cursor(row_factory=class_row(Batch))
    await cur.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = %s FOR SHARE", (batch_id,))
    return await cur.fetchone()


async def _promised_elsewhere(conn: AsyncConnection[Any], batch_id: str, campaign_id: str) -> int:
    cur = await conn.execute(
        "SELECT COALESCE(sum(CASE WHEN status = 'ended' THEN claimed ELSE quota END), 0)"
        " FROM campaigns WHERE batch_id = %s AND id <> %s",
        (batch_id, campaign_id),
    )
    row = await cur.fetchone()
    assert row is not None  # an aggregate always answers
    return int(row[0])


async def _campaign_for_update(conn: AsyncConnection[Any], campaign_id: str) -> Campaign | None:
    cur = conn.cursor(row_factory=class_row(Campaign))
    await cur.execute(
        f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns WHERE id = %s FOR UPDATE", (campaign_id,)
    )
    return await cur.fetchone()


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
        cur = conn.cursor(row_factory=class_row(Campaign))
        await cur.execute(
            "UPDATE campaigns SET status = %s, updated_at = now(),"
            " ended_at = CASE WHEN %s = 'ended' THEN now() ELSE ended_at END"
            f" WHERE id = %s RETURNING {_CAMPAIGN_COLUMNS}",
            (status, status, campaign_id),
        )
        return await cur.fetchone(), True


async def get_campaign(
    pool: AsyncConnectionPool, campaign_id: str, tenant_id: str | None = None
) -> Campaign | None:
    """The campaign; with `tenant_id`, only if that tenant owns it."""
    return await db.fetch_one(
        pool,
        Campaign,
        f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns"
        " WHERE id = %s AND (%s::text IS NULL OR tenant_id = %s)",
        (campaign_id, tenant_id, tenant_id),
    )


async def list_campaigns(
    pool: AsyncConnectionPool,
    *,
    batch_id: str | None = None,
    status: str | None = None,
    tenant_id: str | None = None,
) -> list[Campaign]:
    return await db.fetch_all(
        pool,
        Campaign,
        f"SELECT {_CAMPAIGN_COLUMNS} FROM campaigns"
        " WHERE (%(batch)s::text IS NULL OR batch_id = %(batch)s)"
        " AND (%(status)s::text IS NULL OR status = %(status)s)"
        " AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)"
        " ORDER BY created_at, id",
        {"batch": batch_id, "status": status, "tenant": tenant_id},
    )


async def pool_execute(
    pool: AsyncConnectionPool, query: LiteralString, params: tuple[object, ...]
) -> None:
    async with pool.connection() as conn:
        await conn.execute(query, params)
