"""A campaign's funnel as the ledger records it: claims, the states its coupons reached,
the time from claim to `usable`, and claims per day."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool


@dataclass
class Bin:
    """Coupons whose claim-to-task time is at least `from_s` and below `to_s`."""

    label: str
    from_s: float
    to_s: float | None  # None: open-ended
    coupons: int = 0


@dataclass
class TaskTimes:
    """Claim to `usable` (the tasks done) of the coupons that got there."""

    coupons: int
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None
    max_s: float | None
    bins: list[Bin]


@dataclass
class FunnelCounts:
    at: datetime  # the snapshot's time, by the ledger's clock
    claimed: int
    # Coupons that ever entered each state (from the event trail, not the current state).
    reached: dict[str, int]
    # Coupons in each state now.
    states: dict[str, int]
    task_times: TaskTimes
    # Claims per UTC day, days with claims only, oldest first.
    claims_per_day: list[tuple[date, int]]


async def funnel(pool: AsyncConnectionPool, campaign_id: str, bins: Sequence[Bin]) -> FunnelCounts:
    """Every figure of the campaign's funnel, from one snapshot of the ledger.

    `bins` are the claim-to-task histogram's, counted: ascending and back to back, the first
    from 0 s, the last open-ended.
    """
    async with pool.connection() as conn, conn.transaction():
        # One snapshot: claims and moves made while the report reads must not leave it
        # counting more coupons issued than usable.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur = await conn.execute(
            "SELECT now(), count(*) FROM claims WHERE campaign_id = %s", (campaign_id,)
        )
        row = await cur.fetchone()
        assert row is not None  # an aggregate answers one row, even over no rows
        at, claimed = row
        cur = await conn.execute(
            # (coupon_id, to_state) is unique: each row is one coupon entering a state.
            "SELECT e.to_state, count(*) FROM coupon_events e"
            " JOIN claims c ON c.coupon_id = e.coupon_id"
            " WHERE c.campaign_id = %s GROUP BY e.to_state",
            (campaign_id,),
        )
        reached = {state: n for state, n in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT state, count(*) FROM claims WHERE campaign_id = %s GROUP BY state",
            (campaign_id,),
        )
        states = {state: n for state, n in await cur.fetchall()}
        task_times = await _task_times(conn, campaign_id, bins)
        cur = await conn.execute(
            "SELECT (claimed_at AT TIME ZONE 'UTC')::date AS day, count(*) FROM claims"
            " WHERE campaign_id = %s GROUP BY day ORDER BY day",
            (campaign_id,),
        )
        per_day = [(day, n) for day, n in await cur.fetchall()]
    return FunnelCounts(at, claimed, reached, states, task_times, per_day)


# Seconds from the claim to the `usable` event. The event's time is the workflow's clock
# and the claim's PostgreSQL's: a skew between them must not make a duration negative.
# A campaign without tasks makes its coupons usable at the claim: 0 s.
_TASK_SECONDS = (
    "SELECT GREATEST(extract(epoch FROM u.at - c.claimed_at), 0)::float8 AS s"
    " FROM claims c JOIN coupon_events u ON u.coupon_id = c.coupon_id AND u.to_state = 'usable'"
    " WHERE c.campaign_id = %(campaign)s"
)


async def _task_times(
    conn: AsyncConnection[Any], campaign_id: str, bins: Sequence[Bin]
) -> TaskTimes:
    edges_s = [b.from_s for b in bins[1:]]
    params = {"campaign": campaign_id, "edges": edges_s}
    cur = await conn.execute(
        f"WITH d AS ({_TASK_SECONDS}) SELECT count(*),"
        " percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY s), max(s) FROM d",
        params,
    )
    row = await cur.fetchone()
    assert row is not None  # an aggregate answers one row, even over no rows
    coupons, percentiles, longest = row
    p50, p90, p99 = percentiles if percentiles is not None else (None, None, None)
    # width_bucket over an array of edges: 0 below the first, len(edges) at or above the last.
    cur = await conn.execute(
        f"WITH d AS ({_TASK_SECONDS}) SELECT width_bucket(s, %(edges)s::float8[]) AS bin,"
        " count(*) FROM d GROUP BY bin",
        params,
    )
    counted = dict(await cur.fetchall())
    histogram = [replace(b, coupons=counted.get(index, 0)) for index, b in enumerate(bins)]
    return TaskTimes(coupons, p50, p90, p99, longest, histogram)
