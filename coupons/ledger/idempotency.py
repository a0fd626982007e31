"""The answers kept for idempotent API requests, per tenant and `Idempotency-Key`.

A key is taken (a row with no status) before the request runs and filled with its answer
after, so a repeat finds either the answer or the first request still in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from coupons.ledger import db


@dataclass
class KeptRequest:
    """What the first request under a key left: its fingerprint and, once done, its answer."""

    fingerprint: str
    status: int | None  # None while the first request is in flight
    response: Any


async def take(
    pool: AsyncConnectionPool, tenant_id: str, key: str, fingerprint: str, stale_after: timedelta
) -> KeptRequest | None:
    """Take `key` for a new request (None), or what the request that took it first left.

    A key still in flight after `stale_after` belongs to a request whose process died: it
    is taken over, as long as the fingerprint is the same.
    """
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "INSERT INTO idempotency_keys (tenant_id, key, fingerprint) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id, key) DO NOTHING RETURNING 1",
            (tenant_id, key, fingerprint),
        )
        if await cur.fetchone() is not None:
            return None
        cur = await conn.execute(
            "UPDATE idempotency_keys SET created_at = now()"
            " WHERE tenant_id = %s AND key = %s AND fingerprint = %s AND status IS NULL"
            " AND created_at < now() - %s RETURNING 1",
            (tenant_id, key, fingerprint, stale_after),
        )
        if await cur.fetchone() is not None:
            return None
        kept = await db.fetch_one(
            conn,
            KeptRequest,
            "SELECT fingerprint, status, response FROM idempotency_keys"
            " WHERE tenant_id = %s AND key = %s",
            (tenant_id, key),
        )
        # Released since the conflict (its request failed): "in flight" makes the client
        # repeat, and the repeat takes the key.
        return kept or KeptRequest(fingerprint, None, None)


async def keep(
    pool: AsyncConnectionPool, tenant_id: str, key: str, status: int, response: Any
) -> None:
    """Record the answer of the request that took `key`."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE idempotency_keys SET status = %s, response = %s"
            " WHERE tenant_id = %s AND key = %s AND status IS NULL",
            (status, Jsonb(response), tenant_id, key),
        )


async def release(pool: AsyncConnectionPool, tenant_id: str, key: str) -> None:
    """Give `key` back: the request that took it had no answer worth keeping (a failure
    on our side), so a repeat runs again."""
    async with pool.connection() as conn:
        await conn.execute(
            "DELETE FROM idempotency_keys WHERE tenant_id = %s AND key = %s AND status IS NULL",
            (tenant_id, key),
        )


async def prune(pool: AsyncConnectionPool, older_than: timedelta) -> int:
    """Forget answers older than `older_than`; returns how many."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - %s", (older_than,)
        )
        return cur.rowcount
