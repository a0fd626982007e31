"""The HTTP API's answers kept under an `Idempotency-Key`
(`coupons.ledger.idempotency`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from app.service.backends import Backends
from coupons.ledger import idempotency
from coupons.ledger.idempotency import KeptRequest


async def take_answer(
    b: Backends, tenant_id: str, key: str, fingerprint: str, stale_after: timedelta
) -> KeptRequest | None:
    """Take an `Idempotency-Key` for a new request (None), or what its first request left."""
    return await idempotency.take(b.pool, tenant_id, key, fingerprint, stale_after)


async def keep_answer(
    b: Backends, tenant_id: str, key: str, status: int, response: dict[str, Any]
) -> None:
    await idempotency.keep(b.pool, tenant_id, key, status, response)


async def release_answer(b: Backends, tenant_id: str, key: str) -> None:
    """Forget a key whose request failed: a repeat runs it again."""
    await idempotency.release(b.pool, tenant_id, key)


async def prune_answers(b: Backends, older_than: timedelta) -> int:
    return await idempotency.prune(b.pool, older_than)
