"""A Platform that measures every call it passes on: operation, outcome and latency.

It wraps any adapter and changes nothing of what the adapter answers or raises. Where the
measurements go is the caller's choice (`record`); this module knows nothing of Temporal
or Prometheus, like the adapters it wraps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from typing import Protocol, TypeVar

from coupons.platforms.base import (
    BatchAction,
    BatchSpec,
    CouponUsedNotice,
    FlowKind,
    FlowRecord,
    FlowUnavailable,
    Platform,
    PlatformBatch,
    PlatformBatchUnavailable,
    PlatformBudgetExhausted,
    PlatformCoupon,
    PlatformError,
    PlatformKeyReused,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
    PlatformWrapper,
    SendRequest,
)

T = TypeVar("T")

# Most specific first: a budget exhausted is also a batch unavailable, a reused key also a
# refusal.
OUTCOMES: tuple[tuple[type[PlatformError], str], ...] = (
    (PlatformKeyReused, "key_reused"),
    (PlatformRefused, "refused"),
    (PlatformRateLimited, "rate_limited"),
    (PlatformBudgetExhausted, "budget_exhausted"),
    (PlatformBatchUnavailable, "batch_unavailable"),
    (FlowUnavailable, "flow_unavailable"),
    (PlatformUnavailable, "unavailable"),
)


class CallRecorder(Protocol):
    def __call__(self, operation: str, outcome: str, seconds: float) -> None: ...


def outcome_of(error: PlatformError) -> str:
    return next((name for kind, name in OUTCOMES if isinstance(error, kind)), "error")


class MeteredPlatform(PlatformWrapper):
    """`inner`, with each call reported to `record` as (operation, outcome, seconds).

    Outcomes: `ok`; `not_found` for a lookup that does not show the coupon (yet); the
    error's name from OUTCOMES; `cancelled`; `error` for anything else (a bug).
    """

    def __init__(self, inner: Platform, record: CallRecorder) -> None:
        super().__init__(inner)
        self._record = record

    async def create_batch(self, spec: BatchSpec) -> PlatformBatch:
        return await self._measured("create_batch", self._inner.create_batch(spec))

    async def get_batch(self, batch_id: str) -> PlatformBatch:
        return await self._measured("get_batch", self._inner.get_batch(batch_id))

    async def change_batch(self, batch_id: str, action: BatchAction) -> PlatformBatch:
        return await self._measured("change_batch", self._inner.change_batch(batch_id, action))

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[FlowRecord]:
        return await self._measured("batch_flow", self._inner.batch_flow(batch_id, kind))

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        return await self._measured("send_coupon", self._inner.send_coupon(request))

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        return await self._measured("get_coupon", self._inner.get_coupon(user_id, coupon_id))

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CouponUsedNotice | None:
        # Not a call to the platform: pure, local, measured by the API's callback metrics.
        return self._inner.verify_callback(headers, body)

    async def refresh_keys(self) -> bool:
        return await self._measured("refresh_keys", self._inner.refresh_keys())

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def _measured(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            answer = await call
        except PlatformError as err:
            outcome = outcome_of(err)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        else:
            outcome = "not_found" if answer is None else "ok"
            return answer
        finally:
            self._record(operation, outcome, time.perf_counter() - started)
