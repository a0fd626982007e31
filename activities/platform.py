"""Platform activities: the send with its receipt, and redemption lookups."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from coupons import contract as act
from coupons import metrics
from coupons.ledger import claims
from coupons.model import (
    IssueInput,
    LookupInput,
    PlatformView,
    Receipt,
    Transition,
    idempotency_key,
)
from coupons.platforms.base import (
    Platform,
    PlatformBatchUnavailable,
    PlatformCoupon,
    PlatformError,
    PlatformRefused,
    SendRequest,
)

# Lookups right after a send may not show the coupon yet; poll at these gaps (seconds).
CONFIRM_BACKOFF = (0.2, 0.4, 0.8, 1.6, 3.2, 5.0)
# Heartbeats per heartbeat timeout while a ledger write waits: one late still leaves
# another inside the timeout.
BEATS_PER_HEARTBEAT_TIMEOUT = 3


@dataclass
class _LastBeat:
    """When this activity attempt last told the server it lives (loop time)."""

    at: float


# Per attempt: each activity runs in a task of its own, which sets this on its first step.
_last_beat: ContextVar[_LastBeat] = ContextVar("_last_beat")


@contextlib.asynccontextmanager
async def heartbeating(doing: str) -> AsyncIterator[None]:
    """Heartbeat through the block whenever a third of the heartbeat timeout has passed
    since the attempt's last heartbeat (or its first step).

    For each step of an activity with a heartbeat timeout that can wait longer than it: a
    ledger write first waits for a pool connection, up to the pool's timeout (30 s, twice
    the issue activity's 15 s heartbeat timeout) when every connection is busy; a platform
    call first waits for its permit (up to PLATFORM_TIMEOUT_S), and the send and the first
    lookup together could pass 15 s. Silent, the attempt would be timed out as lost and run
    again on another worker while this one still works; heartbeating, it waits, and fails
    only when its own timeout says so.

    Only a step that lasts heartbeats: each heartbeat is a call to the server and a write
    of the workflow's state there, which an issue that takes 20 ms does not need."""
    timeout = activity.info().heartbeat_timeout
    if not timeout:
        yield
        return
    loop = asyncio.get_running_loop()
    last = _last_beat.get(None)
    if last is None:
        last = _LastBeat(loop.time())
        _last_beat.set(last)
    every = timeout.total_seconds() / BEATS_PER_HEARTBEAT_TIMEOUT
    beats = asyncio.create_task(_beat(doing, every, last))
    try:
        yield
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats


async def _beat(doing: str, every: float, last: _LastBeat) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(max(0.0, last.at + every - loop.time()))
        _beat_now(doing)


def _beat_now(doing: str) -> None:
    """Heartbeat, and note when, so the beats of the step it is in count from here."""
    activity.heartbeat(doing)
    last = _last_beat.get(None)
    if last is not None:
        last.at = asyncio.get_running_loop().time()


class PlatformActivities:
    def __init__(
        self, platform: Platform, pool: AsyncConnectionPool, lag_window_s: float = 30.0
    ) -> None:
        self._platform = platform
        self._pool = pool
        self._lag_window_s = lag_window_s

    @activity.defn(name=act.ISSUE_COUPON)
    async def issue_coupon(self, input: IssueInput) -> Receipt:
        """Send the coupon to the user's wallet and record the receipt.

        Safe to retry from any point: the usable event and the receipt are unique in the
        ledger, and the send always carries the coupon's own idempotency key, so an
        ambiguous answer (timeout, 5xx) is resolved by sending the same key again.
        """
        if input.became_usable is not None:
            async with heartbeating("recording usable"):
                recorded = await claims.record(self._pool, input.coupon_id, input.became_usable)
            if recorded:
                metrics.transition(input.became_usable)
        key = idempotency_key(input.coupon_id)
        try:
            async with heartbeating("sending"):
                request = SendRequest(input.batch_id, input.user_id, key)
                sent = await self._platform.send_coupon(request)
        except PlatformRefused as err:
            raise ApplicationError(
                f"{err.code}: {err.message}",
                err.code,
                type=act.SEND_REFUSED,
                non_retryable=True,
            ) from err
        except PlatformBatchUnavailable as err:
            if not input.wait_for_budget:
                raise  # retried with the send's backoff, as before waiting existed
            raise ApplicationError(
                f"{err.code}: {err.message}",
                err.code,
                type=act.BATCH_UNAVAILABLE,
                non_retryable=True,
            ) from err
        try:
            async with heartbeating("looking the sent coupon up"):
                seen = await self._visible(sent)
        except PlatformError as err:
            # The send went through; a failing lookup says nothing against it. Retry
            # (same key), never a refusal.
            raise ApplicationError(
                f"lookup after the send failed: {err}", type=act.LOOKUP_FAILED
            ) from err
        if seen is None:
            # Lag is not failure: retrying resends the same key and looks again.
            metrics.lag_retry("send")
            raise ApplicationError(
                f"coupon {sent.coupon_id} not visible after {self._lag_window_s:.0f}s of lookups",
                type=act.RECEIPT_NOT_VISIBLE,
                category=ApplicationErrorCategory.BENIGN,
            )
        confirmed_at = datetime.now(UTC)
        # The times as the platform's own lookup shows them: some sends answer only an id
        # (WeChat Pay, Alipay), and their adapters can only bound the validity from the batch.
        receipt = Receipt(
            platform_coupon_id=sent.coupon_id,
            idempotency_key=key,
            sent_at=seen.sent_at,
            valid_until=seen.valid_until,
            confirmed_at=confirmed_at,
            raw=sent.raw,
        )
        issued = Transition("usable", "issued", "platform confirmed the send", confirmed_at)
        # A retry after the receipt was written gets the first one back, so the workflow
        # and the ledger agree on it.
        async with heartbeating("recording the receipt"):
            stored = await claims.record_receipt(self._pool, input.coupon_id, receipt, issued)
        if stored.confirmed_at == confirmed_at:
            metrics.transition(issued)  # this attempt wrote it, with the move to issued
        return stored

    async def _visible(self, sent: PlatformCoupon) -> PlatformCoupon | None:
        """The sent coupon as the platform's lookup shows it, once it does; None if it stays
        invisible for the whole lag window."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._lag_window_s
        attempt = 0
        while True:
            seen = await self._platform.get_coupon(sent.user_id, sent.coupon_id)
            if seen is not None:
                return seen
            delay = CONFIRM_BACKOFF[min(attempt, len(CONFIRM_BACKOFF) - 1)]
            if loop.time() + delay > give_up:
                return None
            _beat_now(f"lookup {attempt + 1}: not visible yet")
            metrics.lag_retry("lookup")
            await asyncio.sleep(delay)
            attempt += 1

    @activity.defn(name=act.LOOKUP_COUPON)
    async def lookup_coupon(self, input: LookupInput) -> PlatformView:
        coupon = await self._platform.get_coupon(input.user_id, input.platform_coupon_id)
        if coupon is None:
            return PlatformView("missing")
        return PlatformView(coupon.status.value, coupon.used_at)

    @activity.defn(name=act.WAIT_FOR_REDEMPTION)
    async def wait_for_redemption(self, input: LookupInput) -> PlatformView:
        """Completes once the platform shows the coupon used or expired.

        Until then it fails benignly and Temporal's retry backoff is the polling loop.
        """
        view = await self.lookup_coupon(input)
        if view.status in ("used", "expired"):
            return view
        raise ApplicationError(
            f"not redeemed yet (platform says {view.status}); polling again after the retry "
            "backoff, as designed",
            type=act.NOT_YET_REDEEMED,
            category=ApplicationErrorCategory.BENIGN,
        )
