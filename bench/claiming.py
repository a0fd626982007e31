"""Every claim figure, in one part: the same run's PostgreSQL reference, then bursts, the
same run's Temporal start-rate reference, steady claims and a sweep of offered rates, each
in process and through the HTTP API (bench/claimers.py), each path on campaigns of its own.

Before each burst, steady run and sweep the worker is let settle (the previous run's
workflow starts absorbed), so each starts from rest.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

from temporalio.client import Client

from app.heap import freeze_startup_heap
from bench.claimers import (
    CLAIM_POOL,
    Claimer,
    InProcess,
    ThroughApi,
    api_campaign,
    api_tenant,
    service_campaign,
)
from bench.load import progress
from bench.open_coupons import SETTLE_TIMEOUT_S, settle
from bench.reference import measure_reference
from bench.sizes import Size
from bench.start_reference import measure_start_reference
from bench.steady import measure_steady, measure_sweep, wait_for_workflows
from bench.storm import measure_storm
from coupons.config import Settings

# The burst run first, for no target; its JSON key is claim_warm_up.
WARM_UP = "warm_up"
# Room for every claim of the steady runs and the sweep.
OPEN_QUOTA = 1_000_000


@dataclass(frozen=True)
class ClaimPath:
    name: str  # in the sweep's JSON
    suffix: str  # of its results' JSON keys ("_api") and campaign ids ("-api")
    open: Callable[[], AbstractAsyncContextManager[Claimer]]
    campaign: Callable[[str, int], Awaitable[None]]
    rest: Callable[[], Awaitable[None]]  # until the worker is idle
    started: Callable[[str], Awaitable[None]]  # until the campaign's claims have workflows

    @asynccontextmanager
    async def ready(self, name: str, quota: int) -> AsyncIterator[tuple[Claimer, str]]:
        """The path open on a new campaign of `quota` of its own for `name` ("storm"), the
        worker at rest; the claimer and the campaign's id. Once the caller is done, waits
        for the campaign's workflows to start, which the next part's `rest` cannot see (its
        backlog counts started workflows only)."""
        campaign = f"bench-{name}{self.suffix.replace('_', '-')}"
        await self.campaign(campaign, quota)
        await self.rest()
        # The load generator's own full collections would count in the claims' latency:
        # unfrozen, each stopped this process's sending for 90 to 150 ms, once or twice in
        # 10,000 claims at 500 a second through the API.
        freeze_startup_heap()
        async with self.open() as claimer:
            yield claimer, campaign
        await self.started(campaign)


async def _paths(
    settings: Settings, client: Client, worker_pid: int, in_process: InProcess
) -> tuple[ClaimPath, ClaimPath]:
    """The two paths; `in_process` serves every part, its pool kept open between them as an
    app server's is (and as the API processes' pools are)."""
    tenant_id, key = await api_tenant(settings, "bench claims")

    async def rest() -> None:
        await settle(client, settings.task_queue, worker_pid)

    async def started(campaign: str) -> None:
        await wait_for_workflows(
            settings.database_url, campaign, time.monotonic(), SETTLE_TIMEOUT_S
        )

    return (
        ClaimPath(
            "in_process",
            "",
            lambda: nullcontext(in_process),
            partial(service_campaign, settings),
            rest,
            started,
        ),
        ClaimPath(
            "api",
            "_api",
            lambda: ThroughApi(settings, key),
            partial(api_campaign, settings, tenant_id),
            rest,
            started,
        ),
    )


def _bursts(size: Size) -> list[tuple[str, int, int]]:
    """(name, claims, quota) of each burst this size runs; its JSON key is claim_<name>."""
    bursts = [("storm", size.storm_claims, size.storm_quota)]
    if size.large_storm_claims:
        bursts.append(("storm_large", size.large_storm_claims, size.large_storm_quota))
    return bursts


LARGE_NOT_RUN = (
    "the 10,000-claim burst runs at full and quick size only: its 1,000 workflows, started "
    "behind the answers, keep the machine busy for a minute after it"
)


async def measure_claims(
    settings: Settings, client: Client, size: Size, worker_pid: int, processes: dict[str, int]
) -> dict[str, Any]:
    async with InProcess(settings.database_url, client, settings) as in_process:
        return await _measure(settings, client, size, worker_pid, processes, in_process)


async def _measure(
    settings: Settings,
    client: Client,
    size: Size,
    worker_pid: int,
    processes: dict[str, int],
    in_process: InProcess,
) -> dict[str, Any]:
    url = settings.database_url
    results: dict[str, Any] = {}
    progress("reference", "single-row commit rate and SELECT 1 rate (pgbench, this process)")
    reference = await measure_reference(
        url, settings.data_dir, clients=CLAIM_POOL, seconds=size.reference_s, processes=processes
    )
    results["commit_reference"] = reference
    commits_per_s = reference["single_row_commits_per_s"]
    paths = await _paths(settings, client, worker_pid, in_process)

    # Each path's first burst, run once before the measured ones: a process's first requests
    # and its pool's first statements cost about twice the CPU of later ones (a quick run's
    # first burst through two API processes: 1.48 ms of API CPU a claim, against 0.75 ms in
    # the burst after it). Each path's processes and pools serve every burst after it, as a
    # running service's do. (In process each burst once opened a pool of its own: twenty
    # new PostgreSQL backends, each reading its caches and planning the claim's statements
    # again. Alternated 1,000-claim bursts on one stack: 1,197 to 1,996 claims/s and 0.40
    # to 0.54 ms of PostgreSQL CPU a claim with a new pool, 1,912 to 2,301 and 0.35 to 0.37
    # with the pool kept.) Kept in the results, counted for no target.
    warm_up = (WARM_UP, size.storm_claims, size.storm_quota)
    for name, claims, quota in [warm_up, *_bursts(size)]:
        progress(
            "claim warm-up" if name == WARM_UP else "claim storm",
            f"{claims} claims at once, quota {quota}: in process, then API",
        )
        for path in paths:
            async with path.ready(name.replace("_", "-"), quota) as (claimer, campaign):
                burst = await measure_storm(
                    claimer, url, campaign, claims=claims, quota=quota, processes=processes
                )
            burst["ratio_to_commit_rate"] = (
                round(burst["throughput_per_s"] / commits_per_s, 3) if commits_per_s else None
            )
            results[f"claim_{name}{path.suffix}"] = burst
    if not size.large_storm_claims:
        progress("claim storm", f"10,000 at once: not run ({LARGE_NOT_RUN})")
        for path in paths:
            results[f"claim_storm_large{path.suffix}"] = {"not_run": LARGE_NOT_RUN}

    # Just before the steady claims, the server as old as they find it, and at rest.
    progress("reference", f"the Temporal server's start rate: {size.reference_starts} starts")
    await paths[0].rest()
    results["start_reference"] = await measure_start_reference(
        client, settings, n=size.reference_starts, processes=processes
    )

    progress(
        "steady claims",
        f"{size.steady_rate_per_s:g}/s for {size.steady_s:g} s, open loop: in process, then API",
    )
    for path in paths:
        async with path.ready("steady", OPEN_QUOTA) as (claimer, campaign):
            results[f"steady_claims{path.suffix}"] = await measure_steady(
                claimer,
                url,
                campaign,
                rate=size.steady_rate_per_s,
                seconds=size.steady_s,
                late_s=size.late_limit_s,
                wait_s=size.workflow_wait_s,
                processes=processes,
            )

    rates = ", ".join(f"{r:g}" for r in size.sweep_rates_per_s)
    progress(
        "claim sweep", f"offered {rates}/s, {size.sweep_step_s:g} s each: in process, then API"
    )
    sweep: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        async with path.ready("sweep", OPEN_QUOTA) as (claimer, campaign):
            sweep[path.name] = await measure_sweep(
                claimer,
                url,
                campaign,
                rates=size.sweep_rates_per_s,
                seconds=size.sweep_step_s,
                late_s=size.late_limit_s,
            )
    results["claim_rate_sweep"] = sweep
    return results
