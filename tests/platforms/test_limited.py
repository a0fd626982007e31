"""LimitedPlatform and LeasedPermits (coupons/platforms/limited.py) against a permit source
of the test's own: leases batched, permits spent only inside their window, a wait that
ends as a rate-limited error, each call's kind."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from coupons.platforms.base import (
    BatchAction,
    BatchSpec,
    FlowKind,
    PlatformCoupon,
    PlatformCouponStatus,
    PlatformRateLimited,
    SendRequest,
)
from coupons.platforms.limited import OTHERS_EVERY, CallKind, LeasedPermits, LimitedPlatform


@dataclass(frozen=True)
class Granted:
    granted: int
    ends_in_s: float
    asked_at: float


@dataclass
class Source:
    """Grants `per_lease` permits good for `good_for_s`, each lease once `gate` opens;
    remembers every lease as (kind, want, ask), and how many of the asked go first."""

    per_lease: int = 1000
    good_for_s: float = 60.0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    leases: list[tuple[str, int, int]] = field(default_factory=list)
    firsts: list[int] = field(default_factory=list)
    fail: Exception | None = None
    # A wait for a connection before each lease, and windows of this length on the loop's
    # clock (0: every lease good for `good_for_s` from its question).
    pool_wait_s: float = 0.0
    window_s: float = 0.0

    async def lease(self, kind: str, want: int, ask: int, first: int) -> Granted:
        self.leases.append((kind, want, ask))
        self.firsts.append(first)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        await asyncio.sleep(self.pool_wait_s)
        now = asyncio.get_running_loop().time()
        good_for = self.window_s - now % self.window_s if self.window_s else self.good_for_s
        return Granted(min(want, self.per_lease), good_for, now)


async def test_callers_waiting_together_share_one_lease() -> None:
    source = Source()
    permits = LeasedPermits(source, max_wait_s=30)
    calls = [asyncio.create_task(permits.take(CallKind.SEND)) for _ in range(50)]
    await asyncio.sleep(0)  # all of them wait for the first lease
    source.gate.set()
    await asyncio.gather(*calls)
    assert source.leases == [("send", 50, 50)]
    # The next lease takes ahead as many as the last one saw spent, and the calls after it
    # spend them without asking.
    await permits.take(CallKind.SEND)
    assert source.leases[-1] == ("send", 50, 1)
    await asyncio.gather(*(permits.take(CallKind.SEND) for _ in range(49)))
    assert len(source.leases) == 2


async def test_a_kind_spends_only_its_own_permits() -> None:
    source = Source()
    source.gate.set()
    permits = LeasedPermits(source, max_wait_s=30)
    await permits.take(CallKind.SEND)
    await permits.take(CallKind.QUERY)
    assert [kind for kind, _, _ in source.leases] == ["send", "query"]


async def test_permits_are_not_spent_after_their_window() -> None:
    source = Source(good_for_s=0.0)  # every lease's window is over by its answer
    source.gate.set()
    permits = LeasedPermits(source, max_wait_s=0.3)
    with pytest.raises(PlatformRateLimited) as raised:
        await permits.take(CallKind.SEND)
    assert raised.value.code == "PERMIT_WAIT"
    assert len(source.leases) > 1  # asked again in each next window


async def test_a_wait_for_a_connection_does_not_use_up_the_window() -> None:
    """A lease that waited 60 ms for a database connection still hands out its permits: the
    window is counted from when the question left, not from before the wait. Counted from
    before it (as once), every lease from the second on came back stale: no call got a
    permit at all once the wait passed about half a window."""
    source = Source(per_lease=5, pool_wait_s=0.06, window_s=0.1)
    source.gate.set()
    permits = LeasedPermits(source, max_wait_s=3)
    await asyncio.gather(*(permits.take(CallKind.SEND) for _ in range(40)))
    assert len(source.leases) >= 8  # five a window: the 40 needed several windows


async def test_a_call_waits_for_a_permit_at_most_max_wait() -> None:
    source = Source()  # the gate never opens: the shared budget is used up
    permits = LeasedPermits(source, max_wait_s=0.05)
    with pytest.raises(PlatformRateLimited) as raised:
        await permits.take(CallKind.QUERY)
    assert "no query permit within 0.05 s" in str(raised.value)


async def test_a_source_that_fails_fails_the_waiting_calls_as_rate_limited() -> None:
    source = Source(fail=OSError("connection refused"))
    permits = LeasedPermits(source, max_wait_s=30)
    calls = [asyncio.create_task(permits.take(CallKind.SEND)) for _ in range(3)]
    await asyncio.sleep(0)
    source.gate.set()
    for call in calls:
        with pytest.raises(PlatformRateLimited) as raised:
            await call
        assert raised.value.code == "PERMITS_UNAVAILABLE"
    # The next call asks again.
    source.fail = None
    await permits.take(CallKind.SEND)


NOW = datetime(2026, 12, 1, tzinfo=UTC)
COUPON = PlatformCoupon("c1", "b1", "u1", PlatformCouponStatus.SENT, NOW, NOW, None, {})


class Counting:
    """A platform that answers everything and remembers which operation was called."""

    callback_success = None

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        self.calls.append("send_coupon")
        return COUPON

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        self.calls.append("get_coupon")
        return None

    async def get_batch(self, batch_id: str) -> object:
        self.calls.append("get_batch")
        return None

    async def change_batch(self, batch_id: str, action: BatchAction) -> object:
        self.calls.append("change_batch")
        return None

    async def create_batch(self, spec: BatchSpec) -> object:
        self.calls.append("create_batch")
        return None

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[object]:
        self.calls.append("batch_flow")
        return []

    async def refresh_keys(self) -> bool:
        self.calls.append("refresh_keys")
        return False

    def verify_callback(self, headers: object, body: bytes) -> None:
        return None

    async def aclose(self) -> None:
        pass


async def test_sends_take_send_permits_and_every_other_call_a_query_permit() -> None:
    source = Source()
    source.gate.set()
    inner = Counting()
    platform = LimitedPlatform(inner, LeasedPermits(source, max_wait_s=30))  # type: ignore[arg-type]
    await platform.send_coupon(SendRequest("b1", "u1", "k1"))
    assert source.leases[-1][0] == "send"
    await platform.get_coupon("u1", "c1")
    await platform.get_batch("b1")
    await platform.change_batch("b1", BatchAction.PAUSE)
    await platform.batch_flow("b1", FlowKind.USED)
    await platform.refresh_keys()
    # One call at a time: a lease each (what a lease takes ahead follows what was spent).
    assert [kind for kind, _, _ in source.leases] == ["send"] + ["query"] * 5
    assert inner.calls == [
        "send_coupon",
        "get_coupon",
        "get_batch",
        "change_batch",
        "batch_flow",
        "refresh_keys",
    ]
    platform.verify_callback({}, b"")  # local: no permit
    assert len(source.leases) == 6


async def test_no_call_is_made_without_a_permit() -> None:
    inner = Counting()
    platform = LimitedPlatform(inner, LeasedPermits(Source(), max_wait_s=0.05))  # type: ignore[arg-type]
    with pytest.raises(PlatformRateLimited):
        await platform.send_coupon(SendRequest("b1", "u1", "k1"))
    assert inner.calls == []


async def test_the_lookups_after_a_send_go_before_the_other_queries_waiting() -> None:
    """An issue's confirming lookup (a query in the task that sent) is served before the
    polls already waiting; the polls keep their own order."""
    source = Source(per_lease=1, good_for_s=0.01)  # a permit each 10 ms window
    inner = Counting()
    permits = LeasedPermits(source, max_wait_s=30)
    platform = LimitedPlatform(inner, permits)  # type: ignore[arg-type]
    served: list[str] = []

    async def poll(name: str) -> None:
        await platform.get_coupon(name, "c")
        served.append(name)

    async def issue() -> None:
        await platform.send_coupon(SendRequest("b1", "u1", "k1"))
        await platform.get_coupon("confirm", "c")
        served.append("confirm")

    polls = [asyncio.create_task(poll(f"poll-{i}")) for i in range(3)]
    await asyncio.sleep(0)
    source.gate.set()  # one permit a lease from here on
    await issue()
    await asyncio.gather(*polls)
    assert served.index("confirm") <= 1  # at most the poll whose lease was already asked
    assert 1 in source.firsts  # and its lease said so (it does not yield to sends)
    assert [name for name in served if name != "confirm"] == ["poll-0", "poll-1", "poll-2"]


async def test_the_calls_that_go_first_never_take_every_permit() -> None:
    """Under a backlog of confirming lookups, the other queries (redemption polls, syncs,
    reconciliations) still get one permit in OTHERS_EVERY."""
    source = Source(per_lease=1, good_for_s=0.01)  # a permit each 10 ms window
    permits = LeasedPermits(source, max_wait_s=30)
    served: list[str] = []

    async def call(name: str, first: bool) -> None:
        await permits.take(CallKind.QUERY, first=first)
        served.append(name)

    polls = [asyncio.create_task(call(f"poll-{i}", False)) for i in range(3)]
    await asyncio.sleep(0)
    confirming = [asyncio.create_task(call(f"confirm-{i}", True)) for i in range(12)]
    await asyncio.sleep(0)
    source.gate.set()
    await asyncio.gather(*polls, *confirming)
    # Without the share the three polls came last, after all twelve.
    assert served.index("poll-2") < len(served) - 3, served
    assert served.index("poll-0") <= OTHERS_EVERY, served
