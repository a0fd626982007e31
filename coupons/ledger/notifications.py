"""The platform's notifications (callbacks) already taken, so each is applied once, and the
coupon a notification speaks of, found by the platform's coupon id in its receipt."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from coupons.ledger import db


@dataclass
class ReceiptHolder:
    """The claim whose receipt names a platform coupon."""

    coupon_id: str
    workflow_id: str
    state: str


async def coupon_of(pool: AsyncConnectionPool, platform_coupon_id: str) -> ReceiptHolder | None:
    """The claim that received platform coupon `platform_coupon_id`; None while no receipt
    names it (not sent by us, or its receipt not recorded yet)."""
    return await db.fetch_one(
        pool,
        ReceiptHolder,
        "SELECT c.coupon_id, c.workflow_id, c.state FROM receipts r"
        " JOIN claims c ON c.coupon_id = r.coupon_id WHERE r.platform_coupon_id = %s",
        (platform_coupon_id,),
    )


async def apply_once(
    pool: AsyncConnectionPool,
    notification_id: str,
    platform_coupon_id: str,
    apply: Callable[[], Awaitable[None]],
) -> bool:
    """Run `apply` for notification `notification_id` unless it was applied before; True
    when it ran now.

    The notification's row stays locked while `apply` runs, so a duplicate delivered at the
    same moment waits and then finds it applied. If `apply` raises, nothing is recorded and
    the platform's retry applies it then.
    """
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO callback_notifications (id, platform_coupon_id) VALUES (%s, %s)"
            " ON CONFLICT (id) DO NOTHING",
            (notification_id, platform_coupon_id),
        )
        cur = await conn.execute(
            "SELECT applied_at FROM callback_notifications WHERE id = %s FOR UPDATE",
            (notification_id,),
        )
        row = await cur.fetchone()
        if row is not None and row[0] is not None:
            return False
        await apply()
        await conn.execute(
            "UPDATE callback_notifications SET applied_at = now() WHERE id = %s",
            (notification_id,),
        )
        return True


async def count_applied(pool: AsyncConnectionPool, platform_coupon_id: str) -> int:
    """How many notifications about a platform coupon were applied."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM callback_notifications"
            " WHERE platform_coupon_id = %s AND applied_at IS NOT NULL",
            (platform_coupon_id,),
        )
        row = await cur.fetchone()
        assert row is not None  # an aggregate always answers
        return int(row[0])
