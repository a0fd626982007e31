"""Claims (one row per user coupon), their receipts and the append-only event trail."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from coupons.errors import Refused
from coupons.ledger import db
from coupons.lifecycle import FINAL_STATES
from coupons.model import Receipt, Transition, coupon_workflow_id


class ClaimRefused(Refused):
    """A claim the campaign's rules refuse."""


@dataclass
class Claim:
    coupon_id: str
    campaign_id: str
    user_id: str
    seq: int
    state: str
    workflow_id: str
    workflow_started: bool
    claimed_at: datetime
    task_deadline: datetime | None
    batch_id: str
    required_tasks: list[str]
    updated_at: datetime | None = None  # the last state change (None: not read yet)


# A claim `c` with what its workflow needs from its campaign; `batch_id` is the platform's.
_CLAIM_COLUMNS = (
    "c.coupon_id, c.campaign_id, c.user_id, c.seq, c.state, c.workflow_id,"
    " c.workflow_started, c.claimed_at, c.task_deadline, b.platform_batch_id AS batch_id,"
    " k.required_tasks, c.updated_at"
)
_WITH_CAMPAIGN = " JOIN campaigns k ON k.id = c.campaign_id JOIN batches b ON b.id = k.batch_id"
_SELECT_CLAIMS = f"SELECT {_CLAIM_COLUMNS} FROM claims c{_WITH_CAMPAIGN}"
_RECEIPT_COLUMNS = "platform_coupon_id, idempotency_key, sent_at, valid_until, confirmed_at, raw"
_SELECT_RECEIPT = f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE coupon_id = %s"


# The claim in one statement, so the lock it takes on one of the campaign's quota slots
# (migration 006) is held only for the rest of this statement and its commit, not across
# round trips to the client; claims on other slots commit beside it.
# `k`: the campaign as this statement first reads it, with the first rule a new claim breaks
# (NULL: none); `took`: one coupon counted in a slot with room, chosen at random, only if
# no rule is broken and the user is under their limit. The UPDATE re-checks
# `claimed < quota` on the slot it waited for, so two claims never both take a slot's last
# coupon; a claim whose slot filled meanwhile takes nothing and is run again. Two claims of
# one user both reading `held` as n meet on the UNIQUE (campaign_id, user_id, seq) and the
# loser is retried.
_CLAIM = """
WITH k AS (
    SELECT k.id, k.per_user_limit, k.quota, k.required_tasks, k.status,
           k.starts_at, k.ends_at, k.deadline_at, b.id AS batch, b.platform_batch_id,
           CASE WHEN b.status IN ('stopped', 'expired') THEN b.status
                WHEN b.ends_at <= now() THEN 'expired' END AS batch_finished,
           -- No task can count once the batch has ended: its send would be refused.
           CASE WHEN cardinality(k.required_tasks) > 0
                THEN LEAST(now() + k.task_deadline, k.deadline_at, b.ends_at) END
               AS task_deadline,
           CASE WHEN k.status = 'ended' THEN 'campaign_ended'
                WHEN k.status = 'paused' THEN 'campaign_paused'
                WHEN k.starts_at > now() THEN 'campaign_not_open'
                WHEN k.ends_at <= now() THEN 'campaign_closed'
                WHEN cardinality(k.required_tasks) > 0 AND k.deadline_at <= now()
                    THEN 'deadline_passed'
                WHEN b.status IN ('stopped', 'expired') OR b.ends_at <= now()
                    THEN 'batch_finished'
                WHEN NOT EXISTS (SELECT 1 FROM campaign_slots s
                                 WHERE s.campaign_id = k.id AND s.claimed < s.quota)
                    THEN 'sold_out' END AS broken
    FROM campaigns k JOIN batches b ON b.id = k.batch_id
    WHERE k.id = %(campaign)s AND (%(tenant)s::text IS NULL OR k.tenant_id = %(tenant)s)
), held AS (
    SELECT count(*)::int AS n FROM claims
    WHERE campaign_id = %(campaign)s AND user_id = %(user)s
), took AS (
    UPDATE campaign_slots SET claimed = claimed + 1
    WHERE campaign_id = %(campaign)s AND claimed < quota
      AND slot = (SELECT slot FROM campaign_slots
                  WHERE campaign_id = %(campaign)s AND claimed < quota
                  ORDER BY random() LIMIT 1)
      AND (SELECT broken IS NULL AND held.n < k.per_user_limit FROM k, held)
    RETURNING campaign_id
), c AS (
    INSERT INTO claims (coupon_id, campaign_id, user_id, seq, state, workflow_id,
                        task_deadline, claimed_at, start_leased_until)
    SELECT %(campaign)s || ':' || %(user)s || ':' || (held.n + 1), k.id, %(user)s,
           held.n + 1, CASE WHEN cardinality(k.required_tasks) > 0 THEN 'received'
                            ELSE 'usable' END,
           %(workflow_prefix)s || %(campaign)s || ':' || %(user)s || ':' || (held.n + 1),
           k.task_deadline, now(), now() + %(lease)s::interval
    FROM took, k, held
    RETURNING *
), event AS (
    INSERT INTO coupon_events (coupon_id, from_state, to_state, cause, at)
    SELECT coupon_id, NULL, state, 'claimed', claimed_at FROM c
)
SELECT k.broken, held.n AS held, k.per_user_limit, k.starts_at, k.ends_at, k.deadline_at,
       k.batch, k.batch_finished,
       c.coupon_id, c.campaign_id, c.user_id, c.seq, c.state, c.workflow_id,
       c.workflow_started, c.claimed_at, c.task_deadline, c.updated_at,
       k.platform_batch_id AS batch_id, k.required_tasks
FROM k CROSS JOIN held LEFT JOIN c ON true
"""
_CLAIM_FIELDS = [f.name for f in fields(Claim)]
# Two claims of one user at once: the loser of the UNIQUE race tries again, and then sees
# the winner's claim (a retry) or claims the next of their limit.
_CLAIM_ATTEMPTS = 3


async def claim(
    pool: AsyncConnectionPool,
    campaign_id: str,
    user_id: str,
    tenant_id: str | None = None,
    lease: timedelta | None = None,
) -> tuple[Claim, bool]:
    """Claim a coupon atomically: (the claim, True) or, at the user's limit, (their latest, False).

    One statement, committed as it ends: the quota and the per-user limit hold whatever the
    concurrency (the campaign row is locked for that statement only). A holder's repeated
    claim gets their coupon back whatever the campaign's state now: it is a retry, not a
    new claim. With `tenant_id`, another tenant's campaign is as unknown as none. With
    `lease`, the new claim is the caller's to start for that long (no starter takes it).
    """
    params = {
        "campaign": campaign_id,
        "user": user_id,
        "tenant": tenant_id,
        "lease": lease,
        "workflow_prefix": coupon_workflow_id(""),
    }
    races = 0
    while True:
        try:
            async with pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(_CLAIM, params)
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation:
            races += 1
            if races == _CLAIM_ATTEMPTS:
                raise
            continue
        if row is None:
            raise ClaimRefused("unknown_campaign", f"no campaign {campaign_id!r}")
        if row["coupon_id"] is not None:
            return Claim(**{name: row[name] for name in _CLAIM_FIELDS}), True
        if row["held"] >= row["per_user_limit"]:
            held = await _claims_of(pool, campaign_id, user_id)
            return held[0], False
        if row["broken"] is not None:
            raise _refusal(campaign_id, row["broken"], row)
        # No rule broken and a slot with room as this claim read them, but that slot's last
        # coupon went to another claim while this one waited: again, from a fresh read.
        # Each time round another claim took a coupon, so this ends by the quota at most.


def _refusal(campaign_id: str, broken: str, campaign: dict[str, Any]) -> ClaimRefused:
    """The refusal of a new claim for the rule it broke (`broken`, as the claim reads it)."""
    quoted = repr(campaign_id)
    if broken == "campaign_ended":
        return ClaimRefused(broken, f"campaign {quoted} has ended")
    if broken == "campaign_paused":
        return ClaimRefused(broken, f"campaign {quoted} is paused")
    if broken == "campaign_not_open":
        return ClaimRefused(
            broken, f"campaign {quoted} opens for claims at {campaign['starts_at'].isoformat()}"
        )
    if broken == "campaign_closed":
        return ClaimRefused(
            broken, f"campaign {quoted} closed for claims at {campaign['ends_at'].isoformat()}"
        )
    if broken == "deadline_passed":
        return ClaimRefused(
            "campaign_closed",
            f"campaign {quoted}: its task deadline {campaign['deadline_at'].isoformat()} "
            "has passed",
        )
    if broken == "batch_finished":
        # As of the last sync: a send from it would be refused and the coupon fail.
        return ClaimRefused(
            broken,
            f"campaign {quoted} hands out batch {campaign['batch']!r}, which is "
            f"{campaign['batch_finished']} at the platform",
        )
    return ClaimRefused("sold_out", f"campaign {quoted} has no coupons left")


async def _claims_of(source: db.Source, campaign_id: str, user_id: str) -> list[Claim]:
    return await db.fetch_all(
        source,
        Claim,
        _SELECT_CLAIMS + " WHERE c.campaign_id = %s AND c.user_id = %s ORDER BY c.seq DESC",
        (campaign_id, user_id),
    )


async def get_claim(
    pool: AsyncConnectionPool, coupon_id: str, tenant_id: str | None = None
) -> Claim | None:
    """The claim; with `tenant_id`, only if it is of that tenant's campaign."""
    return await db.fetch_by_id(
        pool, Claim, _SELECT_CLAIMS, "c.coupon_id", coupon_id, tenant_id, "k.tenant_id"
    )


@dataclass(frozen=True)
class ClaimFilter:
    """Which claims a listing wants: each field given narrows it (None: any), then the order
    (by claim time, oldest first unless `newest_first`) and how many at most."""

    tenant_id: str | None = None
    campaign_id: str | None = None
    user_id: str | None = None
    state: str | None = None
    newest_first: bool = False
    limit: int = 100


_FILTERED_CLAIMS = (
    f"{_SELECT_CLAIMS} WHERE {db.given('k.tenant_id', 'c.campaign_id', 'c.user_id', 'c.state')}"
)


async def find_claims(pool: AsyncConnectionPool, where: ClaimFilter) -> list[Claim]:
    """The claims `where` asks for."""
    order = "c.claimed_at DESC" if where.newest_first else "c.claimed_at"
    return await db.fetch_all(
        pool,
        Claim,
        f"{_FILTERED_CLAIMS} ORDER BY {order}, c.coupon_id LIMIT %(limit)s",
        asdict(where),
    )


async def mark_started(pool: AsyncConnectionPool, coupon_ids: list[str]) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE claims SET workflow_started = true"
            " WHERE coupon_id = ANY(%s) AND NOT workflow_started",
            (coupon_ids,),
        )


async def hold_start(pool: AsyncConnectionPool, coupon_id: str, lease: timedelta) -> None:
    """The claim's workflow start held by the caller for `lease`: no starter takes it
    meanwhile. A started claim is left as it is; a starter already starting it is not
    stopped (both starts name one workflow)."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE claims SET start_leased_until = now() + %s"
            " WHERE coupon_id = %s AND NOT workflow_started",
            (lease, coupon_id),
        )


async def release_start(pool: AsyncConnectionPool, coupon_id: str) -> None:
    """The claim's workflow start handed back to the starters at once."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE claims SET start_leased_until = NULL"
            " WHERE coupon_id = %s AND NOT workflow_started",
            (coupon_id,),
        )


async def take_unstarted(pool: AsyncConnectionPool, limit: int, lease: timedelta) -> list[Claim]:
    """Up to `limit` claims whose workflow is not started, oldest first, that no other
    starter holds: each is the caller's to start for `lease`, then anyone's again."""
    return await db.fetch_all(
        pool,
        Claim,
        "WITH c AS (UPDATE claims SET start_leased_until = now() + %(lease)s"
        " WHERE coupon_id IN (SELECT coupon_id FROM claims WHERE NOT workflow_started"
        " AND (start_leased_until IS NULL OR start_leased_until < now())"
        " ORDER BY claimed_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) RETURNING *)"
        f" SELECT {_CLAIM_COLUMNS} FROM c{_WITH_CAMPAIGN} ORDER BY c.claimed_at",
        {"lease": lease, "limit": limit},
    )


async def unstarted(
    pool: AsyncConnectionPool, older_than: timedelta, limit: int = 500
) -> list[Claim]:
    """Claims whose workflow start was never confirmed (a crash between the two steps)."""
    return await db.fetch_all(
        pool,
        Claim,
        _SELECT_CLAIMS + " WHERE NOT c.workflow_started AND c.claimed_at < now() - %s"
        " ORDER BY c.claimed_at LIMIT %s",
        (older_than, limit),
    )


# ----------------------------------------------------------------- wedged coupons (wedged.py)


_FINAL_STATES = sorted(FINAL_STATES)


async def count_open(pool: AsyncConnectionPool) -> dict[str, int]:
    """By campaign, the claims whose workflow was started and whose state is not final: each
    should have a running workflow."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT campaign_id, count(*) FROM claims"
            " WHERE workflow_started AND NOT state = ANY(%s) GROUP BY campaign_id",
            (_FINAL_STATES,),
        )
        return {campaign_id: n for campaign_id, n in await cur.fetchall()}


async def open_page(
    pool: AsyncConnectionPool, campaign_id: str, after: str = "", limit: int = 200
) -> list[Claim]:
    """A page of those claims of a campaign, in coupon id order, after `after`."""
    return await db.fetch_all(
        pool,
        Claim,
        _SELECT_CLAIMS + " WHERE c.campaign_id = %s AND c.workflow_started"
        " AND NOT c.state = ANY(%s) AND c.coupon_id > %s ORDER BY c.coupon_id LIMIT %s",
        (campaign_id, _FINAL_STATES, after, limit),
    )


async def claims_by_workflow(pool: AsyncConnectionPool, workflow_ids: list[str]) -> list[Claim]:
    return await db.fetch_all(
        pool, Claim, _SELECT_CLAIMS + " WHERE c.workflow_id = ANY(%s)", (workflow_ids,)
    )


async def receipt_of(pool: AsyncConnectionPool, coupon_id: str) -> Receipt | None:
    return await db.fetch_one(pool, Receipt, _SELECT_RECEIPT, (coupon_id,))


# A transition as data-modifying CTEs: its event appended (a repeat appends nothing) and the
# claim moved to its state only then. One statement is atomic without a transaction around
# it, so recording costs one round trip, not a BEGIN and a COMMIT besides.
_TRANSITION_CTES = (
    "event AS ("
    " INSERT INTO coupon_events (coupon_id, from_state, to_state, cause, at)"
    " VALUES (%(coupon_id)s, %(from_state)s, %(to_state)s, %(cause)s, %(at)s)"
    " ON CONFLICT (coupon_id, to_state) DO NOTHING RETURNING coupon_id),"
    " moved AS ("
    " UPDATE claims SET state = %(to_state)s, updated_at = now()"
    " WHERE coupon_id = (SELECT coupon_id FROM event) RETURNING 1)"
)
_RECORD = f"WITH {_TRANSITION_CTES} SELECT EXISTS (SELECT 1 FROM moved)"
# The receipt and the move to `issued` in one statement: neither is committed without the
# other. Answers the receipt written now or, on a repeat, the one written before; nothing
# when another attempt committed it after this statement's snapshot (`record_receipt`).
_RECORD_RECEIPT = (
    "WITH stored AS ("
    f" INSERT INTO receipts (coupon_id, {_RECEIPT_COLUMNS})"
    " VALUES (%(coupon_id)s, %(platform_coupon_id)s, %(idempotency_key)s, %(sent_at)s,"
    " %(valid_until)s, %(confirmed_at)s, %(raw)s)"
    f" ON CONFLICT (coupon_id) DO NOTHING RETURNING {_RECEIPT_COLUMNS}),"
    f" {_TRANSITION_CTES}"
    " SELECT * FROM stored"
    f" UNION ALL SELECT {_RECEIPT_COLUMNS} FROM receipts"
    " WHERE coupon_id = %(coupon_id)s AND NOT EXISTS (SELECT 1 FROM stored)"
)


def _transition_params(coupon_id: str, t: Transition) -> dict[str, Any]:
    return {"coupon_id": coupon_id, **asdict(t)}


async def record(pool: AsyncConnectionPool, coupon_id: str, transition: Transition) -> bool:
    """Append the event and move the claim's state; False when it was already recorded."""
    async with pool.connection() as conn:
        cur = await conn.execute(_RECORD, _transition_params(coupon_id, transition))
        row = await cur.fetchone()
    return bool(row and row[0])


async def record_receipt(
    pool: AsyncConnectionPool, coupon_id: str, receipt: Receipt, issued: Transition
) -> Receipt:
    """The receipt and the move to `issued`, in one statement: neither is committed without
    the other.

    Returns the receipt as stored: the first one written, however often this runs.
    """
    params = {
        **_transition_params(coupon_id, issued),
        "platform_coupon_id": receipt.platform_coupon_id,
        "idempotency_key": receipt.idempotency_key,
        "sent_at": receipt.sent_at,
        "valid_until": receipt.valid_until,
        "confirmed_at": receipt.confirmed_at,
        "raw": Jsonb(receipt.raw),
    }
    stored = await db.fetch_one(pool, Receipt, _RECORD_RECEIPT, params)
    if stored is None:
        # Another attempt wrote it while this statement waited on its row: committed after
        # this statement's snapshot, so only a new statement reads it.
        stored = await db.fetch_written(pool, Receipt, _SELECT_RECEIPT, (coupon_id,))
    return stored


async def coupon_view(
    pool: AsyncConnectionPool, coupon_id: str, tenant_id: str | None = None
) -> dict[str, Any] | None:
    """The ledger's whole record of one coupon (of `tenant_id`'s campaigns, when given):
    claim, receipt and events."""
    claim_row = await get_claim(pool, coupon_id, tenant_id)
    if claim_row is None:
        return None
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(_SELECT_RECEIPT, (coupon_id,))
        receipt = await cur.fetchone()
        await cur.execute(
            "SELECT from_state, to_state, cause, at FROM coupon_events"
            " WHERE coupon_id = %s ORDER BY id",
            (coupon_id,),
        )
        events = await cur.fetchall()
    return {"claim": claim_row, "receipt": receipt, "events": events}


async def count_by_state(pool: AsyncConnectionPool, campaign_id: str) -> dict[str, int]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT state, count(*) FROM claims WHERE campaign_id = %s GROUP BY state",
            (campaign_id,),
        )
        return {state: n for state, n in await cur.fetchall()}


@dataclass
class LedgerCoupon:
    """One claim of a batch as reconciliation compares it with the platform's flows."""

    coupon_id: str
    user_id: str
    state: str
    workflow_id: str
    idempotency_key: str | None
    platform_coupon_id: str | None


async def batch_coupons(pool: AsyncConnectionPool, batch_id: str) -> list[LedgerCoupon]:
    """Every claim of every campaign on our batch `batch_id`, with its receipt if any."""
    return await db.fetch_all(
        pool,
        LedgerCoupon,
        "SELECT c.coupon_id, c.user_id, c.state, c.workflow_id, r.idempotency_key,"
        " r.platform_coupon_id FROM claims c JOIN campaigns k ON k.id = c.campaign_id"
        " LEFT JOIN receipts r ON r.coupon_id = c.coupon_id"
        " WHERE k.batch_id = %s ORDER BY c.coupon_id",
        (batch_id,),
    )


async def coupons_in_state(
    pool: AsyncConnectionPool,
    state: str,
    *,
    campaign_id: str | None = None,
    batch_id: str | None = None,
    after: str = "",
    limit: int = 200,
) -> list[Claim]:
    """A page of claims in `state` (of a campaign, or of our batch), in coupon id order."""
    return await db.fetch_all(
        pool,
        Claim,
        _SELECT_CLAIMS + " WHERE c.state = %(state)s AND c.coupon_id > %(after)s"
        f" AND {db.given('c.campaign_id', 'k.batch_id')} ORDER BY c.coupon_id LIMIT %(limit)s",
        {
            "state": state,
            "after": after,
            "campaign_id": campaign_id,
            "batch_id": batch_id,
            "limit": limit,
        },
    )


async def states_of(pool: AsyncConnectionPool, coupon_ids: list[str]) -> dict[str, str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT coupon_id, state FROM claims WHERE coupon_id = ANY(%s)", (coupon_ids,)
        )
        return {coupon_id: state for coupon_id, state in await cur.fetchall()}
