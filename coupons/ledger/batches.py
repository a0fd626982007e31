"""Batches as our ledger holds them (ours, as synced from the platform), the intents that
change them at the platform, and what the ledger still owes from each."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, LiteralString

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from coupons.ledger import db
from coupons.ledger.tenants import DEFAULT_TENANT
from coupons.platforms.base import BatchAction, BatchSpec, PlatformBatch


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


# A batch whose create is pending has no platform id yet: it reads as "" (its status says
# why), so every reader keeps one type.
_BATCH_COLUMNS = (
    "id, COALESCE(platform_batch_id, '') AS platform_batch_id, tenant_id, name, status,"
    " quantity, remaining, valid_days,"
    " face_value_cents, min_spend_cents, per_user_limit, starts_at, ends_at, created_at,"
    " synced_at, owed, backlog, drift"
)
_SELECT_BATCHES = f"SELECT {_BATCH_COLUMNS} FROM batches"


async def upsert_batch(
    source: db.Source,
    batch_id: str,
    platform: PlatformBatch,
    tenant_id: str = DEFAULT_TENANT,
) -> Batch:
    """Store the platform's view of our batch `batch_id`: one row, refreshed on every sync.

    `tenant_id` counts only when the row is created: a batch never changes hands."""
    return await db.fetch_written(
        source,
        Batch,
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
_SELECT_INTENTS = f"SELECT {_INTENT_COLUMNS} FROM batch_intents"


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
    return await db.fetch_written(
        conn,
        BatchIntent,
        "INSERT INTO batch_intents (batch_id, seq, operation, request_key, request)"
        f" VALUES (%s, %s, %s, %s, %s) RETURNING {_INTENT_COLUMNS}",
        (batch_id, seq, operation, request_key, Jsonb(request)),
    )


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
        pending = await db.fetch_one(
            conn,
            BatchIntent,
            _SELECT_INTENTS + " WHERE batch_id = %s AND operation = %s AND state = 'pending'"
            " ORDER BY seq LIMIT 1",
            (batch_id, action.value),
        )
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
        f"{_SELECT_INTENTS} WHERE state = 'pending' AND {db.given('batch_id')}"
        " ORDER BY batch_id, seq",
        {"batch_id": batch_id},
    )


async def batch_intents(pool: AsyncConnectionPool, batch_id: str) -> list[BatchIntent]:
    """Every intent of the batch, oldest first: its story at the platform."""
    return await db.fetch_all(
        pool, BatchIntent, _SELECT_INTENTS + " WHERE batch_id = %s ORDER BY seq", (batch_id,)
    )


async def complete_intent(
    pool: AsyncConnectionPool, intent: BatchIntent, answer: PlatformBatch, tenant_id: str
) -> Batch:
    """The platform answered `intent` with `answer`: store the batch as it now is and mark
    the intent done, in one transaction. Completing it again changes nothing more."""
    async with pool.connection() as conn, conn.transaction():
        stored = await upsert_batch(conn, intent.batch_id, answer, tenant_id)
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
    return await db.fetch_by_id(pool, Batch, _SELECT_BATCHES, "id", batch_id, tenant_id)


async def list_batches(
    pool: AsyncConnectionPool, *, syncable_only: bool = False, tenant_id: str | None = None
) -> list[Batch]:
    """Every batch (of a tenant), or only those a sync still reads: not stopped or expired,
    or with an intent the platform has not answered yet (the sync finishes it)."""
    return await db.fetch_all(
        pool,
        Batch,
        f"{_SELECT_BATCHES}"
        " WHERE (NOT %(syncable)s OR status NOT IN ('stopped', 'expired') OR EXISTS ("
        "   SELECT 1 FROM batch_intents i WHERE i.batch_id = batches.id"
        "   AND i.state = 'pending'))"
        f" AND {db.given('tenant_id')} ORDER BY created_at, id",
        {"syncable": syncable_only, "tenant_id": tenant_id},
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


async def batch_for_share(conn: AsyncConnection[Any], batch_id: str) -> Batch | None:
    """The batch, locked against change until the transaction ends (None: no such batch)."""
    return await db.fetch_one(
        conn, Batch, _SELECT_BATCHES + " WHERE id = %s FOR SHARE", (batch_id,)
    )


async def pool_execute(
    pool: AsyncConnectionPool, query: LiteralString, params: tuple[object, ...]
) -> None:
    async with pool.connection() as conn:
        await conn.execute(query, params)
