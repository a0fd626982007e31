"""The duplicates family: no part at fault; every claim made twice at once and every
completion reported several times at once (signals and updates mixed), then again after
the coupon is issued (`Scenario.late_duplicates`, run by `chaos.drive`)."""

from __future__ import annotations

import asyncio
import time

from chaos.frame import Run, Scenario
from chaos.harness import Via
from chaos.sizes import Size


async def no_fault(run: Run, load: asyncio.Task[None]) -> float:
    # The duplicates are the fault: they flow with the load.
    await load
    return time.monotonic()


def _mixed(size: Size, index: int) -> list[Via]:
    # Signals and updates interleaved, starting with either, all sent at once.
    first: list[Via] = ["signal", "update"] if index % 2 else ["update", "signal"]
    return [first[i % 2] for i in range(size.duplicates)]


DUPLICATE_REPORTS = Scenario(
    name="duplicate_reports",
    description="Every claim made twice at once, every completion reported several "
    "times at once, signals and updates mixed, and again after the coupon is issued.",
    fault=no_fault,
    reports=_mixed,
    latency_ms=300,
    claim_twice=True,
    late_duplicates=True,
)
