"""Permits for platform calls, leased from PostgreSQL so that every worker process shares
one budget per kind of call (migration 007 holds the accounting, `lease_platform_permits`).

A process leases a few permits at a time for the current window (WINDOW_MS of the database's
clock) and spends them without asking again; the database sees one write per lease, not
per call. The limits hold over any RING consecutive windows, a ring one window longer than
a second, so no second of calls, wherever it starts, holds more than a limit.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from coupons.ledger import db

WINDOW_MS = 100
# Windows a limit holds over: eleven of 100 ms, so a second that starts inside one window
# ends inside the eleventh. The price: a steady flow gets 10/11 of a limit (455 of 500/s).
RING = 11
_PER_SECOND = 1000 // WINDOW_MS


@dataclass(frozen=True)
class PermitPolicy:
    """Calls per second by kind, the limit on all of them together, and which kind waits
    for which: a kind in `yields_to` leaves room in the total for what the kind it names
    asked for in this window or the last (sends before queries)."""

    limits: Mapping[str, int]
    total: int
    yields_to: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    granted: int
    window_no: int  # the database's window the permits belong to
    # How long the window the permits belong to lasts after the lease was taken: they are
    # spent before then, or not at all.
    ends_in_s: float
    # The loop's clock when the statement was sent, once a connection was in hand.
    asked_at: float


@dataclass
class _Leased:
    granted: int
    window_no: int
    ends_in_ms: float


def window_cap(per_second: int) -> int:
    """A kind's share of one window: a burst from idle spreads over the second instead of
    landing in its first tenth, and the windows of a steady flow stay even."""
    return math.ceil(per_second / _PER_SECOND)


class PermitLeases:
    """Leases permits of a kind from the shared accounting, under `policy`."""

    def __init__(self, pool: AsyncConnectionPool, policy: PermitPolicy) -> None:
        self._pool = pool
        self._policy = policy

    async def lease(self, kind: str, want: int, ask: int, first: int = 0) -> Lease:
        """Up to `want` permits of `kind` for the current window; `ask` of them are for
        calls waiting now (the rest are taken ahead), `first` of those for calls that do not
        yield (they complete what the kind yielded to began)."""
        async with self._pool.connection() as conn:
            asked_at = asyncio.get_running_loop().time()
            leased = await self._leased(conn, kind, want, ask, first)
        return Lease(leased.granted, leased.window_no, leased.ends_in_ms / 1000, asked_at)

    async def _leased(
        self, conn: AsyncConnection[Any], kind: str, want: int, ask: int, first: int
    ) -> _Leased:
        policy = self._policy
        limit = policy.limits[kind]
        return await db.fetch_written(
            conn,
            _Leased,
            "SELECT granted, window_no, ends_in_ms FROM lease_platform_permits("
            "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                kind,
                want,
                min(ask, want),
                min(first, ask, want),
                kind in policy.yields_to.values(),
                limit,
                window_cap(limit),
                policy.total,
                window_cap(policy.total),
                policy.yields_to.get(kind),
                WINDOW_MS,
                RING,
            ),
        )
