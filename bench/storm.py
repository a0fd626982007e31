"""Claim bursts ("storms"): many claims at once against a small quota, by either path
(bench/claimers.py), each on a campaign of its own. Exactly the quota must be granted,
however the claims race; the figures are claims/s and the claims' latency, printed beside
the same run's single-row commit rate (bench/reference.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from bench.claimers import Claimer, tally
from bench.load import progress
from bench.proc import CpuSplit
from bench.stats import summary_ms
from coupons.ledger import claims as ledger
from coupons.ledger import db


async def _burst(claimer: Claimer, campaign: str, claims: int) -> tuple[Counter[str], list[float]]:
    """Every claim at once, each by its own user: what each came to and its latency."""
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []

    async def timed(i: int) -> None:
        began = time.monotonic()
        outcomes[await claimer.claim(campaign, f"storm-{i}")] += 1
        latencies.append(time.monotonic() - began)

    await asyncio.gather(*(timed(i) for i in range(claims)))
    return outcomes, latencies


async def measure_storm(
    claimer: Claimer,
    url: str,
    campaign: str,
    *,
    claims: int,
    quota: int,
    processes: dict[str, int],
) -> dict[str, Any]:
    """`claims` claims at once against `quota`: what was granted (by the answers and in
    the ledger), claims/s over the whole burst, each claim's latency as its client saw it
    (queueing for a connection included)."""
    cpu = CpuSplit(processes)
    cpu.start()
    began = time.monotonic()
    outcomes, latencies = await _burst(claimer, campaign, claims)
    wall_s = time.monotonic() - began
    split = cpu.stop(wall_s)
    async with db.pool(url, max_size=1) as pool:
        in_ledger = sum((await ledger.count_by_state(pool, campaign)).values())
    answers = tally(outcomes)
    per_s = claims / wall_s if wall_s > 0 else 0.0
    progress(
        f"claim storm ({claimer.path})",
        f"{claims} claims in {wall_s:.1f} s ({per_s:.0f}/s): {answers['granted']} granted of "
        f"{quota}",
    )
    return {
        "path": claimer.path,
        "claims": claims,
        "quota": quota,
        **answers,
        "claims_in_ledger": in_ledger,
        "wall_s": round(wall_s, 2),
        "throughput_per_s": round(per_s, 1),
        "claim_latency_ms": summary_ms(latencies),
        "cpu_by_process": split,
        **claimer.figures(),
    }
