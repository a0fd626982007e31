"""The shared accounting of platform permits (coupons/ledger/permits.py, migration 007): a
limit holds over any RING consecutive windows and is reached, two processes share one
budget, and a kind that yields takes from the total only what the other leaves."""

from __future__ import annotations

import asyncio
from collections import Counter

from psycopg_pool import AsyncConnectionPool

from app.embedded import EmbeddedPostgres
from coupons.ledger import db
from coupons.ledger.permits import RING, Lease, PermitLeases, PermitPolicy, window_cap

# Windows each test leases through: enough for the ring to fill and turn.
WINDOWS = 3 * RING


def ring_sums(granted: Counter[int]) -> list[int]:
    """The permits granted in every RING consecutive windows the leases saw."""
    first, last = min(granted), max(granted)
    return [sum(granted[w] for w in range(start, start + RING)) for start in range(first, last)]


async def lease_through(leases: PermitLeases, kind: str, want: int) -> Counter[int]:
    """Lease `want` at a time, as fast as the database answers, for WINDOWS windows; the
    permits granted, by window."""
    granted: Counter[int] = Counter()
    first: int | None = None
    while True:
        lease: Lease = await leases.lease(kind, want, want)
        first = lease.window_no if first is None else first
        granted[lease.window_no] += lease.granted
        if lease.window_no - first >= WINDOWS:
            return granted


POLICY = PermitPolicy(limits={"send": 30, "query": 30}, total=60)


async def test_a_limit_holds_over_every_ring_of_windows_and_is_reached(
    pool: AsyncConnectionPool,
) -> None:
    granted = await lease_through(PermitLeases(pool, POLICY), "send", 5)
    # One window never takes more than its share, any ring of them never more than the
    # limit (a second of calls meets at most RING windows), and the limit is used.
    assert max(granted.values()) == window_cap(30) == 3
    assert max(ring_sums(granted)) == 30


async def test_two_processes_share_one_budget(
    postgres: EmbeddedPostgres, schema: str, pool: AsyncConnectionPool
) -> None:
    async with db.pool(postgres.url(), schema=schema, max_size=2) as other:
        first, second = await asyncio.gather(
            lease_through(PermitLeases(pool, POLICY), "send", 2),
            lease_through(PermitLeases(other, POLICY), "send", 2),
        )
    together = first + second
    assert max(together.values()) <= window_cap(30)
    assert max(ring_sums(together)) == 30  # not 30 each
    assert sum(first.values()) > 0 and sum(second.values()) > 0
    # The other kind's budget is its own.
    queries = await lease_through(PermitLeases(pool, POLICY), "query", 5)
    assert max(ring_sums(queries)) == 30


async def test_a_kind_that_yields_takes_what_the_other_leaves(pool: AsyncConnectionPool) -> None:
    """Sends and queries both want every permit; the total (10 a window) cannot give both
    their limits (10 a window each). Queries yield to sends: they get only what is left."""
    policy = PermitPolicy(
        limits={"send": 100, "query": 100}, total=100, yields_to={"query": "send"}
    )
    sends, queries = await asyncio.gather(
        lease_through(PermitLeases(pool, policy), "send", 10),
        lease_through(PermitLeases(pool, policy), "query", 10),
    )
    assert max(ring_sums(sends + queries)) <= 100
    assert sum(sends.values()) >= 3 * sum(queries.values())


async def test_without_yielding_both_kinds_share_the_total(pool: AsyncConnectionPool) -> None:
    """The same contention, queries not yielding: they take their part, which is what the
    previous test's priority takes from them."""
    policy = PermitPolicy(limits={"send": 100, "query": 100}, total=100)
    sends, queries = await asyncio.gather(
        lease_through(PermitLeases(pool, policy), "send", 10),
        lease_through(PermitLeases(pool, policy), "query", 10),
    )
    assert max(ring_sums(sends + queries)) <= 100
    assert sum(queries.values()) * 3 > sum(sends.values())


async def test_what_completes_a_send_does_not_yield_to_sends(pool: AsyncConnectionPool) -> None:
    """Sends asked for the whole total; a query lease that yields gets nothing, but the
    permits it asks for calls that go first (an issue's confirming lookups) it gets."""
    policy = PermitPolicy(
        limits={"send": 100, "query": 100}, total=100, yields_to={"query": "send"}
    )
    leases = PermitLeases(pool, policy)
    while True:
        sends = await leases.lease("send", 20, 20)  # asks more than the window's 10
        await asyncio.sleep(sends.ends_in_s)  # into the next window, which their asks hold
        polls = await leases.lease("query", 5, 5)
        confirms = await leases.lease("query", 5, 5, first=3)
        if sends.window_no + 1 == polls.window_no == confirms.window_no:
            break
    assert polls.granted == 0
    assert confirms.granted == 3
