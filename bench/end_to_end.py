"""The coupon lifecycle measured end to end: claim, task completion (signal), `issued`
with its receipt in the ledger, through the real worker process. Claims and reports go the
way the app's do (`app.service`): a claim is answered by the ledger and its workflow started
by the worker's starter, or by the report if that comes first."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from app import service
from app.service import Backends
from bench.load import LoadResult, closed_loop, fixed_rate, progress
from bench.probes import (
    IssuedWatcher,
    WorkerHistograms,
    per_item,
    statement_counts,
    worker_histograms,
)
from bench.proc import CpuSplit, cpu_seconds
from bench.stats import summary_ms

log = logging.getLogger(__name__)

TASK = "first-order"
ISSUED_TIMEOUT_S = 180.0


@dataclass
class LifecycleDriver:
    client: Client
    backends: Backends
    watcher: IssuedWatcher
    campaign: str

    async def claim(self, user: str) -> tuple[str, str]:
        result = await service.claim(self.backends, self.campaign, user)
        return result.coupon_id, result.workflow_id

    async def unlock_and_wait(self, coupon_id: str) -> float:
        """Signal the task done (the unlock); seconds until the ledger shows `issued`."""
        sent = time.time()
        await service.report_task(self.backends, service.CouponRef(coupon_id), TASK)
        issued = await self.watcher.issued_at(coupon_id, ISSUED_TIMEOUT_S)
        return issued.timestamp() - sent

    async def whole(self, user: str) -> float:
        coupon_id, _ = await self.claim(user)
        return await self.unlock_and_wait(coupon_id)


async def history_events(client: Client, workflow_ids: list[str]) -> dict[str, Any]:
    counts = []
    for workflow_id in workflow_ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        counts.append(len(history.events))
    return {
        "sampled": len(counts),
        "mean": round(sum(counts) / len(counts), 1) if counts else None,
        "min": min(counts, default=None),
        "max": max(counts, default=None),
        "note": "history of an issued coupon so far: the workflow stays open, polling for "
        "redemption (that pending activity adds no events until it ends)",
    }


async def lifecycle_saturation(
    driver: LifecycleDriver,
    n: int,
    concurrency: int,
    *,
    users: str = "sat",
    phase: str = "lifecycle saturation",
) -> LoadResult:
    """`n` whole lifecycles with `concurrency` in flight, for users `users`-0, `users`-1, ..."""
    return await closed_loop(phase, n, concurrency, lambda i: driver.whole(f"{users}-{i}"))


async def measure_lifecycle(
    driver: LifecycleDriver,
    pool: AsyncConnectionPool,
    worker_pid: int,
    *,
    n: int,
    concurrency: int,
    light_n: int,
    light_rate: float,
    history_sample: int,
    statements_enabled: bool,
    processes: dict[str, int],
) -> dict[str, Any]:
    await lifecycle_saturation(driver, 10, 10, users="warm", phase="lifecycle warm-up")

    # Light rate: claimed first (their first workflow task done), then unlocked evenly.
    light_claims = [await driver.claim(f"light-{i}") for i in range(light_n)]
    await asyncio.sleep(1.0)
    light = await fixed_rate(
        "lifecycle light rate",
        light_n,
        light_rate,
        lambda i: driver.unlock_and_wait(light_claims[i][0]),
    )

    cpu_before = cpu_seconds(worker_pid)
    sql_before = await statement_counts(pool, statements_enabled)
    worker_before = await worker_histograms(driver.backends.settings)
    split = CpuSplit(processes)
    split.start()
    saturated = await lifecycle_saturation(driver, n, concurrency)
    cpu_split = split.stop(saturated.wall_s)
    worker_after = await worker_histograms(driver.backends.settings)
    sql_after = await statement_counts(pool, statements_enabled)
    cpu = cpu_seconds(worker_pid) - cpu_before
    progress("lifecycle", f"{saturated.throughput_per_s:.1f} lifecycles/s at saturation")

    sample = [f"coupon:{driver.campaign}:sat-{i}:1" for i in range(min(history_sample, n))]
    return {
        "lifecycles": n,
        "concurrency": concurrency,
        **saturated.saturation_figures(),
        "unlock_to_issued_ms": summary_ms(saturated.latencies_s),
        "light_rate": {
            "rate_per_s": light_rate,
            "unlock_to_issued_ms": summary_ms(light.latencies_s),
        },
        "worker_cpu_s_per_1000": round(cpu / n * 1000, 2),
        "workflow_task_wait_ms": _task_waits(worker_before, worker_after, n),
        "worker_gc": _collections(worker_before, worker_after, n),
        "cpu_by_process": cpu_split,
        "history_events_per_coupon": await history_events(driver.client, sample),
        "sql_per_coupon": {
            **per_item(sql_before, sql_after, n),
            "measure": (
                "pg_stat_statements calls in the ledger database during the saturation run "
                "(claims by the bench client, worker activities and its repair loop; "
                "BEGIN/COMMIT included, also shown apart), minus the benchmark's own reads"
                if statements_enabled
                else "transactions from pg_stat_database only (pg_stat_statements unavailable)"
            ),
        },
        "issued_at": "the `issued` row's recorded_at in coupon_events (PostgreSQL's clock, "
        "same machine as the signal's)",
    }


def _collections(
    before: WorkerHistograms | None, after: WorkerHistograms | None, n: int
) -> dict[str, Any] | None:
    """The worker's garbage collections during the saturation run: ms per lifecycle in all,
    and the full ones (each stops the worker meanwhile) per 1,000 lifecycles and their mean."""
    if before is None or after is None:
        return None

    def spent(generation: str) -> tuple[float, float]:
        total, count = after.gc_pauses.get(generation, (0.0, 0.0))
        total_before, count_before = before.gc_pauses.get(generation, (0.0, 0.0))
        return total - total_before, count - count_before

    seconds = sum(spent(generation)[0] for generation in after.gc_pauses)
    full_s, full = spent("2")
    return {
        "ms_per_lifecycle": round(seconds * 1000 / n, 2),
        "full_ms_per_lifecycle": round(full_s * 1000 / n, 2),
        "full_per_1000": round(full * 1000 / n, 1),
        "full_mean_ms": round(full_s * 1000 / full, 1) if full else None,
        "measure": "the worker's coupons_worker_gc_pause_seconds (each collection's time, "
        "by generation; 2 is a full one), read before and after the run",
    }


def _task_waits(
    before: WorkerHistograms | None, after: WorkerHistograms | None, n: int
) -> dict[str, Any] | None:
    """The worker's workflow tasks of the saturation run: their mean wait from scheduled to
    started, and how many per lifecycle (the last ones of a run may fall after it)."""
    if before is None or after is None:
        return None
    (waited_before, tasks_before), (waited, tasks_after) = before.task_waits, after.task_waits
    tasks = tasks_after - tasks_before
    if tasks <= 0:
        return None
    return {
        "mean": round((waited - waited_before) / tasks, 1),
        "tasks_per_lifecycle": round(tasks / n, 2),
        "measure": "the SDK's temporal_workflow_task_schedule_to_start_latency on the "
        "worker's metrics, shared and sticky queue, read before and after the run",
    }
