"""Ledger activities: every write idempotent, so retries never double-write."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from temporalio import activity

from coupons import contract as act
from coupons import metrics
from coupons.ledger import claims
from coupons.model import RecordTransitionInput


class LedgerActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @activity.defn(name=act.RECORD_TRANSITION)
    async def record_transition(self, input: RecordTransitionInput) -> bool:
        """Append the transition to the event table and move the claim's state."""
        written = await claims.record(self._pool, input.coupon_id, input.transition)
        if written:
            metrics.transition(input.transition)
        return written
