"""Steady claims, open loop: claims offered at a fixed rate by either path
(bench/claimers.py), each timed from its planned send time (bench/load.open_loop), then
the wait until every granted claim's workflow is started; and the same over a sweep of
offered rates, for claim latency against offered rate.

The workflow wait reads the ledger's `claims.workflow_started`: a claim answered before
its workflow starts (an outbox drained behind the answer) is only done when that flag is.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.claimers import Claimer, tally
from bench.load import Every, OpenLoopResult, open_loop, progress
from bench.probes import unstarted_claims
from bench.proc import CpuSplit
from bench.stats import summary_ms
from coupons.ledger import db

# Claims in flight at once, at most: far above what a system meeting the targets needs
# (1,000/s x 100 ms = 100), well under the dev server's SQLite limit of ~1,000 operations,
# and few enough that a system far behind drains them in seconds once the late limit
# stops the sending.
MAX_IN_FLIGHT = 200
POLL_EVERY_S = 0.2


async def wait_for_workflows(
    url: str, campaign: str, load_ended: float, timeout_s: float
) -> dict[str, Any]:
    """Poll until no granted claim of `campaign` is without its workflow, for at most
    `timeout_s`; seconds from `load_ended` (monotonic) until then, or None."""
    deadline = time.monotonic() + timeout_s
    every = Every("workflows")
    async with db.pool(url, max_size=1) as pool:
        while True:
            left = await unstarted_claims(pool, campaign)
            now = time.monotonic()
            if left == 0 or now >= deadline:
                break
            every.say(f"{left} granted claims of {campaign} without one yet")
            await asyncio.sleep(POLL_EVERY_S)
    return {
        "all_started_after_s": round(max(now - load_ended, 0.0), 2) if left == 0 else None,
        "unstarted_left": left,
        "waited_up_to_s": timeout_s,
    }


def _figures(run: OpenLoopResult) -> dict[str, Any]:
    return {
        "offered_rate_per_s": run.rate_per_s,
        "offered": run.offered,
        "answered": run.answered,
        "skipped_late": run.skipped,
        **tally(run.outcomes),
        "achieved_per_s": round(run.achieved_per_s, 1),
        "claim_latency_ms": summary_ms(run.latencies_s),
    }


async def _offer(
    claimer: Claimer, campaign: str, users: str, *, rate: float, seconds: float, late_s: float
) -> OpenLoopResult:
    return await open_loop(
        f"claims at {rate:g}/s ({claimer.path})",
        round(rate * seconds),
        rate,
        lambda i: claimer.claim(campaign, f"{users}-{i}"),
        max_in_flight=MAX_IN_FLIGHT,
        late_limit_s=late_s,
    )


async def measure_steady(
    claimer: Claimer,
    url: str,
    campaign: str,
    *,
    rate: float,
    seconds: float,
    late_s: float,
    wait_s: float,
    processes: dict[str, int],
) -> dict[str, Any]:
    """Claims at `rate` for `seconds` (a campaign with room for them all), then the wait for
    their workflows."""
    cpu = CpuSplit(processes)
    cpu.start()
    run = await _offer(claimer, campaign, "steady", rate=rate, seconds=seconds, late_s=late_s)
    split = cpu.stop(run.wall_s or seconds)
    workflows = await wait_for_workflows(url, campaign, run.ended_at, wait_s)
    latency = summary_ms(run.latencies_s)
    after = workflows["all_started_after_s"]
    progress(
        f"steady claims ({claimer.path})",
        f"{run.answered} of {run.offered} answered at {run.achieved_per_s:.0f}/s "
        f"({run.skipped} never sent: over {late_s:g} s late), "
        f"p50 {latency['p50']:.0f} ms, p99 {latency['p99']:.0f} ms; all workflows started "
        + (
            f"{after} s after the load ended"
            if after is not None
            else f"NOT within {wait_s:g} s ({workflows['unstarted_left']} left)"
        ),
    )
    return {
        "path": claimer.path,
        "duration_s": seconds,
        **_figures(run),
        "wall_s": round(run.wall_s, 2),
        "latency_from": "each claim's planned send time (open loop: queueing shows)",
        "late_limit_s": late_s,
        "max_in_flight": MAX_IN_FLIGHT,
        "workflows": workflows,
        "workflows_measure": "the ledger polled until no granted claim of the campaign has "
        "NOT claims.workflow_started; seconds from the last answer",
        "cpu_by_process": split,
        **claimer.figures(),
    }


async def measure_sweep(
    claimer: Claimer,
    url: str,
    campaign: str,
    *,
    rates: tuple[float, ...],
    seconds: float,
    late_s: float,
) -> list[dict[str, Any]]:
    """Claims at each offered rate for `seconds`; between rates, the wait for the last
    rate's workflows (at most `late_s`), so each starts from rest."""
    points = []
    for rate in rates:
        run = await _offer(
            claimer, campaign, f"sweep-{rate:g}", rate=rate, seconds=seconds, late_s=late_s
        )
        workflows = await wait_for_workflows(url, campaign, run.ended_at, late_s)
        point = {**_figures(run), "workflows_started_after_s": workflows["all_started_after_s"]}
        points.append(point)
        progress(
            f"claim sweep ({claimer.path})",
            f"offered {rate:g}/s: achieved {point['achieved_per_s']:.0f}/s, p50 "
            f"{point['claim_latency_ms']['p50']:.0f} ms, p99 "
            f"{point['claim_latency_ms']['p99']:.0f} ms, {run.skipped} skipped",
        )
    return points
