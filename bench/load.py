"""Load shapes shared by every part: a closed loop at saturation, a light fixed rate, an
open loop at an offered rate, and the progress lines printed while they run."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

PROGRESS_EVERY_S = 2.0


def progress(phase: str, message: str) -> None:
    """One line for the person watching the run (stdout, unlike the diagnostics log)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {phase}: {message}", flush=True)


class Every:
    """`progress` at most every PROGRESS_EVERY_S, for a wait that polls more often."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self._last = time.monotonic()

    def due(self, force: bool = False) -> bool:
        """Whether to say something now (always when `force`); counts as said if so."""
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            return True
        return False

    def say(self, message: str) -> None:
        if self.due():
            progress(self.phase, message)


@dataclass
class LoadResult:
    n: int
    wall_s: float
    # Per-item latency in seconds, as each item defines it (signal to done, ...).
    latencies_s: list[float] = field(default_factory=list)
    # When each item finished, in seconds from the start of the run.
    finished_s: list[float] = field(default_factory=list)

    @property
    def overall_per_s(self) -> float:
        """Items over the whole wall time, ramp-up and the last stragglers included."""
        return self.n / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def throughput_per_s(self) -> float:
        """The sustained rate: completions between the 10th and the 90th percentile of
        finishing times. A closed loop starts empty and ends with a few stragglers whose
        waits say nothing about the rate the system holds while saturated."""
        done = sorted(self.finished_s)
        if len(done) < 10:
            return self.overall_per_s
        first, last = len(done) // 10, len(done) * 9 // 10
        span = done[last] - done[first]
        return (last - first) / span if span > 0 else self.overall_per_s

    def saturation_figures(self) -> dict[str, Any]:
        """The rate figures every saturation run reports, in one form."""
        return {
            "wall_s": round(self.wall_s, 2),
            "throughput_per_s": round(self.throughput_per_s, 2),
            "throughput_overall_per_s": round(self.overall_per_s, 2),
            "throughput_measure": "completions between the 10th and 90th percentile of "
            "finishing times, per second (overall: all items over the whole wall time)",
        }


class _Ticker:
    """Prints done/total and the rate every few seconds while a load runs (and how many of
    the done were skipped, when an open loop skips some)."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase = phase
        self.total = total
        self.done = 0
        self.skipped = 0
        self.began = time.monotonic()
        self._every = Every(phase)

    def tick(self) -> None:
        self.done += 1
        if self._every.due(force=self.done == self.total):
            rate = self.done / max(time.monotonic() - self.began, 1e-9)
            skipped = f" ({self.skipped} skipped)" if self.skipped else ""
            progress(self.phase, f"{self.done}/{self.total} done{skipped}, {rate:.1f}/s")


async def closed_loop(
    phase: str, n: int, concurrency: int, item: Callable[[int], Awaitable[float]]
) -> LoadResult:
    """Run item(0..n-1) with at most `concurrency` in flight; each returns its latency (s).

    Closed loop: a new item starts only when one finishes, so the rate found is what the
    system sustains, not what the generator offers.
    """
    gate = asyncio.Semaphore(concurrency)
    ticker = _Ticker(phase, n)
    latencies: list[float] = []
    finished: list[float] = []
    began = time.monotonic()

    async def one(i: int) -> None:
        async with gate:
            latencies.append(await item(i))
            finished.append(time.monotonic() - began)
            ticker.tick()

    await asyncio.gather(*(one(i) for i in range(n)))
    return LoadResult(n, time.monotonic() - began, latencies, finished)


async def fixed_rate(
    phase: str, n: int, rate_per_s: float, item: Callable[[int], Awaitable[float]]
) -> LoadResult:
    """Start item(i) at i / rate seconds, whether or not earlier ones finished (open loop)."""
    ticker = _Ticker(phase, n)
    latencies: list[float] = []
    began = time.monotonic()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, began + i / rate_per_s - time.monotonic()))
        latencies.append(await item(i))
        ticker.tick()

    await asyncio.gather(*(one(i) for i in range(n)))
    return LoadResult(n, time.monotonic() - began, latencies)


@dataclass
class OpenLoopResult:
    offered: int
    rate_per_s: float
    # Per answered item: seconds from its planned send time to its answer.
    latencies_s: list[float] = field(default_factory=list)
    # What each answered item came to (the item's own words: "granted", a refusal code...).
    outcomes: Counter[str] = field(default_factory=Counter)
    # Items never sent: the generator could not send them within the late limit.
    skipped: int = 0
    # From the first planned send to the last answer, and that last answer's monotonic time.
    wall_s: float = 0.0
    ended_at: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies_s)

    @property
    def achieved_per_s(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0


async def open_loop(
    phase: str,
    n: int,
    rate_per_s: float,
    item: Callable[[int], Awaitable[str]],
    *,
    max_in_flight: int,
    late_limit_s: float,
) -> OpenLoopResult:
    """Send item(i) at its planned time i / rate, whether or not earlier ones answered
    (open loop), and time each from that planned time, so queueing anywhere (in the
    system, or in this generator when it falls behind) shows in the latency.

    Two bounds keep a system that cannot keep up from running the load forever or drowning
    what it calls: at most `max_in_flight` items are in flight (an item over it waits, and
    the wait counts in its latency), and an item that could not be sent within
    `late_limit_s` of its planned time is skipped and counted, never sent.
    """
    ticker = _Ticker(phase, n)
    gate = asyncio.Semaphore(max_in_flight)
    result = OpenLoopResult(n, rate_per_s)

    async def one(planned: float, i: int) -> None:
        give_up_in = max(0.0, planned + late_limit_s - time.monotonic())
        try:
            await asyncio.wait_for(gate.acquire(), give_up_in)
        except TimeoutError:
            result.skipped += 1
            ticker.skipped += 1
            ticker.tick()
            return
        try:
            outcome = await item(i)
        finally:
            gate.release()
        result.ended_at = time.monotonic()
        result.latencies_s.append(result.ended_at - planned)
        result.outcomes[outcome] += 1
        ticker.tick()

    began = time.monotonic()
    sent: list[asyncio.Task[None]] = []
    for i in range(n):
        planned = began + i / rate_per_s
        # One timer for the schedule, not one sleeping task per item; a late wake-up sends
        # every item already due at once, each still timed from its own planned time.
        await asyncio.sleep(max(0.0, planned - time.monotonic()))
        sent.append(asyncio.create_task(one(planned, i)))
    await asyncio.gather(*sent)
    result.ended_at = result.ended_at or time.monotonic()  # nothing answered: ended now
    result.wall_s = result.ended_at - began
    return result
