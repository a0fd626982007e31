"""A Platform that takes a permit before each call it passes on, so the platform's frequency
limits hold over calls, whatever activity makes them and in whichever worker process.

Calls come in two kinds, as WeChat Pay publishes its limits: sends (发放代金券, "频率限制:
500/s", https://pay.weixin.qq.com/docs/merchant/apis/cash-coupons/coupon/send-coupon.html)
and queries (查询代金券详情, "不区分来源 1000/s, 单ip 500/s",
https://pay.weixin.qq.com/docs/merchant/apis/cash-coupons/coupon/query-coupon.html; the
stock query publishes the same). Every call that is not a send counts as a query: the
confirming lookups, the redemption polls, reconciliation's lookups, batch reads, and the
rare catalog calls, whose own limits (per minute) their backoff keeps.

Order: an issue before everything else. Where one limit covers both kinds
(PLATFORM_RATE_LIMIT set under their sum), sends come first (the permit source's policy), and
so do the queries that follow a send in the same task (the issue's confirming lookups: a
coupon is issued only once one sees it); those also go before the other queries waiting in
their process (redemption polls, reconciliation's lookups, batch reads).

Where the permits come from is the caller's choice (`PermitSource`: in the worker, leases
shared through PostgreSQL, coupons/ledger/permits.py); this module knows nothing of the
ledger or Temporal, like the adapters it wraps.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from typing import Protocol, TypeVar

from coupons.platforms.base import (
    BatchAction,
    BatchSpec,
    CouponUsedNotice,
    FlowKind,
    FlowRecord,
    Platform,
    PlatformBatch,
    PlatformCoupon,
    PlatformRateLimited,
    PlatformWrapper,
    SendRequest,
)

T = TypeVar("T")

# Set once a task (an activity's attempt) has sent: its lookups after the send confirm it,
# and a coupon is issued only once one sees it, so they go first: before the other queries
# waiting in this process, and in the total without yielding to sends. Each attempt of an
# activity is its own task, so the mark never outlives the attempt that sent.
_SENT_IN_THIS_TASK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sent_in_this_task", default=False
)


class CallKind(StrEnum):
    SEND = "send"
    QUERY = "query"


class Lease(Protocol):
    @property
    def granted(self) -> int: ...

    # How long the permits stay good after `asked_at`.
    @property
    def ends_in_s(self) -> float: ...

    # The loop's clock when the question left for the database, once it had a connection:
    # a wait for one must not eat into the window.
    @property
    def asked_at(self) -> float: ...


class PermitSource(Protocol):
    async def lease(self, kind: str, want: int, ask: int, first: int) -> Lease:
        """Up to `want` permits of `kind`; `ask` of them for calls waiting now, `first` of
        those for calls that go first (they do not yield to another kind)."""
        ...


# While both lines wait, one permit in this many goes to a call that does not go first.
OTHERS_EVERY = 4


class _Kind:
    """One kind's permits in this process: those leased and not spent yet, and the calls
    waiting for one: those that come first (`first`), then the others, each in order."""

    def __init__(self) -> None:
        self.permits = 0
        self.good_until = 0.0  # the loop's clock
        self.spent = 0  # of the current lease: how many to take ahead next time
        self.first: deque[asyncio.Future[float]] = deque()
        self.others: deque[asyncio.Future[float]] = deque()
        self.leasing: asyncio.Task[None] | None = None
        self.handed = 0  # permits handed out while both lines waited

    def waiting(self) -> int:
        return len(self.first) + len(self.others)

    def next_turn(self) -> asyncio.Future[float]:
        if self.first and self.others:
            # The calls that go first take most permits, never all: under a backlog of
            # sends their confirming lookups alone could use up the query limit, and the
            # redemption polls, syncs and reconciliations behind them would never run.
            self.handed += 1
            if self.handed % OTHERS_EVERY == 0:
                return self.others.popleft()
        return (self.first or self.others).popleft()

    def leave(self, turn: asyncio.Future[float]) -> None:
        for queue in (self.first, self.others):
            with contextlib.suppress(ValueError):
                queue.remove(turn)


class LeasedPermits:
    """Permits taken from `source` a few at a time: one lease for the calls waiting when it
    is asked (and as many as the last lease saw spent, taken ahead), none while permits are
    left. A call waits at most `max_wait_s`, then fails as rate limited (retried with the
    activity's backoff, like the platform's own frequency-limit answer)."""

    def __init__(self, source: PermitSource, max_wait_s: float) -> None:
        self._source = source
        self._max_wait_s = max_wait_s
        self._kinds = {kind: _Kind() for kind in CallKind}

    async def take(self, kind: CallKind, *, first: bool = False) -> None:
        """A permit of `kind`, still good when this returns: the caller makes its call at
        once, inside the permit's window. `first`: before the calls waiting that are not
        `first` themselves."""
        state = self._kinds[kind]
        if not state.waiting() and self._spend(state):
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._max_wait_s):
                while True:
                    good_until = await self._turn(kind, state, first)
                    if loop.time() < good_until:
                        return
                    # Handed a permit, this task only ran after its window ended (a busy
                    # loop): spent now, the call would land in a later window, over that
                    # one's count. It waits for another, ahead of those that came later.
                    first = True
        except TimeoutError:
            raise PlatformRateLimited(
                "PERMIT_WAIT",
                f"no {kind} permit within {self._max_wait_s:g} s: the platform's limit is "
                "used up by other calls",
            ) from None

    async def _turn(self, kind: CallKind, state: _Kind, first: bool) -> float:
        """Wait in line for a permit; when the permit stops being good."""
        turn: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        (state.first if first else state.others).append(turn)
        if state.leasing is None or state.leasing.done():
            state.leasing = asyncio.create_task(self._lease_while_waited(kind, state))
        try:
            return await turn
        finally:
            state.leave(turn)

    def _spend(self, state: _Kind) -> bool:
        if state.permits <= 0 or asyncio.get_running_loop().time() >= state.good_until:
            return False
        state.permits -= 1
        state.spent += 1
        return True

    def _hand_out(self, state: _Kind) -> None:
        while state.waiting() and self._spend(state):
            turn = state.next_turn()
            if not turn.done():
                turn.set_result(state.good_until)

    async def _lease_while_waited(self, kind: CallKind, state: _Kind) -> None:
        loop = asyncio.get_running_loop()
        try:
            while state.waiting():
                self._hand_out(state)
                if not state.waiting():
                    return
                ask = state.waiting()
                lease = await self._source.lease(kind, max(ask, state.spent), ask, len(state.first))
                # Counted from when the question left (not from before a wait for a
                # connection, which once left no time at all): the permits are spent
                # inside the database's window, whatever the answer's way back took.
                good_until = lease.asked_at + lease.ends_in_s
                if loop.time() >= good_until:
                    # The answer came after the window ended: its permits are lost, and the
                    # next question lands in a new window. Ask again at once; sleeping a
                    # window's length here would bring every later question back late.
                    await asyncio.sleep(0)
                    continue
                if lease.granted > 0:
                    state.permits = lease.granted
                    state.good_until = good_until
                    state.spent = 0
                    self._hand_out(state)
                if lease.granted < ask:
                    # This window has no more for us: ask again in the next one (counted
                    # from the answer, so the database's clock is past its end by then).
                    await asyncio.sleep(lease.ends_in_s)
        except Exception as err:
            # The shared accounting cannot answer (PostgreSQL restarting): the calls
            # waiting fail as rate limited and are retried; no call goes unpermitted.
            for turn in (*state.first, *state.others):
                if not turn.done():
                    turn.set_exception(
                        PlatformRateLimited("PERMITS_UNAVAILABLE", f"no permits: {err!r}")
                    )


class LimitedPlatform(PlatformWrapper):
    """`inner`, with a permit of the call's kind taken from `permits` before each call."""

    def __init__(self, inner: Platform, permits: LeasedPermits) -> None:
        super().__init__(inner)
        self._permits = permits

    async def create_batch(self, spec: BatchSpec) -> PlatformBatch:
        return await self._permitted(CallKind.QUERY, lambda: self._inner.create_batch(spec))

    async def get_batch(self, batch_id: str) -> PlatformBatch:
        return await self._permitted(CallKind.QUERY, lambda: self._inner.get_batch(batch_id))

    async def change_batch(self, batch_id: str, action: BatchAction) -> PlatformBatch:
        return await self._permitted(
            CallKind.QUERY, lambda: self._inner.change_batch(batch_id, action)
        )

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[FlowRecord]:
        return await self._permitted(CallKind.QUERY, lambda: self._inner.batch_flow(batch_id, kind))

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        _SENT_IN_THIS_TASK.set(True)
        return await self._permitted(CallKind.SEND, lambda: self._inner.send_coupon(request))

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        return await self._permitted(
            CallKind.QUERY, lambda: self._inner.get_coupon(user_id, coupon_id)
        )

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CouponUsedNotice | None:
        # Not a call to the platform: pure and local.
        return self._inner.verify_callback(headers, body)

    async def refresh_keys(self) -> bool:
        return await self._permitted(CallKind.QUERY, self._inner.refresh_keys)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def _permitted(self, kind: CallKind, call: Callable[[], Awaitable[T]]) -> T:
        # The call is made only once the permit is there: a coroutine made before would be
        # left unawaited when the wait fails.
        await self._permits.take(kind, first=_SENT_IN_THIS_TASK.get())
        return await call()
