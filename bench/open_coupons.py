"""Open coupons: many coupons waiting in `received`, what they cost the worker, whether
claims slow down, and whether coupons evicted from the worker's cache resume."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from bench.end_to_end import LifecycleDriver
from bench.load import Every, closed_loop, progress
from bench.proc import cpu_seconds, rss_mib
from bench.stats import summary_ms
from bench.steady import wait_for_workflows

log = logging.getLogger(__name__)

FILL_CONCURRENCY = 100  # well under the dev server's SQLite limit of ~1,000 in flight
BASELINE_OPEN = 100
# 20,000 coupons claimed in 21 s leave their workflows to start and run their first task
# behind the claims for minutes: 240 s after such a fill, 15,232 first tasks were still
# queued and the worker busy (0.7 of a core), so the "at rest" figures were taken under load.
SETTLE_TIMEOUT_S = 900.0
# Idle enough: the earlier runs' issued coupons keep polling for redemption (their first
# retry falls five minutes after the send) and the repair loop never stops.
IDLE_CORES = 0.5


async def backlog(client: Client, task_queue: str) -> int:
    """Workflow tasks waiting on the queue: first tasks of coupons the worker has not run."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            report_stats=True,
        )
    )
    return int(response.stats.approximate_backlog_count)


async def settle(
    client: Client,
    task_queue: str,
    pid: int,
    timeout_s: float = SETTLE_TIMEOUT_S,
    idle_seconds: int = 1,
) -> dict[str, float]:
    """Wait until every started coupon has had its first workflow task and the worker is
    idle for `idle_seconds` seconds in a row: the figures are about open coupons at rest,
    not about absorbing their starts.

    Returns the seconds waited and what was last seen (backlog, worker cores busy)."""
    began = time.monotonic()
    every = Every("settle")
    waiting = -1
    cores = 0.0
    idle_for = 0
    while time.monotonic() - began < timeout_s:
        before = cpu_seconds(pid)
        await asyncio.sleep(1.0)
        cores = cpu_seconds(pid) - before
        try:
            waiting = await backlog(client, task_queue)
        except RPCError:
            log.warning("task queue stats unavailable; judging by worker CPU alone")
            waiting = 0
        idle_for = idle_for + 1 if waiting == 0 and cores < IDLE_CORES else 0
        if idle_for >= idle_seconds:
            break
        every.say(
            f"{waiting} workflow tasks queued, worker at {cores:.2f} cores "
            f"({time.monotonic() - began:.0f} s of at most {timeout_s:.0f})"
        )
    return {
        "settle_s": round(time.monotonic() - began, 1),
        "idle": idle_for >= idle_seconds,
        "backlog_left": waiting,
        "worker_cores": round(cores, 2),
    }


async def claim_latencies(driver: LifecycleDriver, prefix: str, count: int) -> list[float]:
    """Claims one after another, so each figure is a claim alone, not a queue.

    The pool hands out its idle connections in turn (psycopg_pool takes the oldest), so
    these visit every connection of it, one after another: `count` several times the
    pool's size keeps the p50 off each connection's first claim (see measure_open)."""
    latencies = []
    for i in range(count):
        began = time.monotonic()
        await driver.claim(f"{prefix}-{i}")
        latencies.append(time.monotonic() - began)
    return latencies


def pool_connections(driver: LifecycleDriver) -> int:
    """The connections the driver's pool holds now: one pass of claims visits each."""
    return int(driver.backends.pool.get_stats().get("pool_size", 1))


async def measure_open(
    driver: LifecycleDriver,
    worker_pid: int,
    task_queue: str,
    *,
    count: int,
    probes: int,
    evicted_sample: int,
    cache_size: int,
) -> dict[str, Any]:
    fill = max(count - BASELINE_OPEN - 2 * probes, 0)
    # The oldest coupons: claimed first, completed last.
    url = driver.backends.settings.database_url

    async def at_rest() -> dict[str, Any]:
        """Every claim's workflow started, which `settle` cannot see (its backlog counts
        started workflows only), then two quiet seconds: right after the starts the backlog
        is empty while the worker still runs their first tasks."""
        started = await wait_for_workflows(url, driver.campaign, time.monotonic(), SETTLE_TIMEOUT_S)
        settled = await settle(driver.client, task_queue, worker_pid, idle_seconds=2)
        return {**settled, "workflows": started}

    await closed_loop("open coupons (first 100)", BASELINE_OPEN, 20, lambda i: _claim(driver, i))
    await at_rest()
    rss_at_100 = rss_mib(worker_pid)
    pass_100 = pool_connections(driver)
    at_100 = await claim_latencies(driver, "probe-a", probes)

    began = time.monotonic()
    await closed_loop(
        "open coupons (fill)",
        fill,
        FILL_CONCURRENCY,
        lambda i: _claim(driver, BASELINE_OPEN + i),
    )
    fill_s = time.monotonic() - began
    # Without waiting for the starts, a quick run timed the probes below beside 250 of them
    # (p50 2.4 ms against 1.1 ms at 100 open, its settle over in 2 s with the worker still
    # at a quarter of a core); with one quiet second instead of two, another read the worker
    # at 0.49 of a core, just under IDLE_CORES, and gave p90 3.3 ms against 1.1.
    settled = await at_rest()
    open_now = BASELINE_OPEN + probes + fill
    rss_at_all = rss_mib(worker_pid)
    pass_all = pool_connections(driver)
    at_all = await claim_latencies(driver, "probe-b", probes)
    open_now += probes
    progress("open coupons", f"{open_now} open, worker RSS {rss_at_all} MiB")

    # The oldest coupons have long left the worker's cache (an LRU of `cache_size`):
    # completing their task makes the worker replay their history from the server.
    oldest = [f"{driver.campaign}:open-{i}:1" for i in range(min(evicted_sample, BASELINE_OPEN))]
    results = await asyncio.gather(
        *(driver.unlock_and_wait(coupon) for coupon in oldest),
        return_exceptions=True,
    )
    resumed = [r for r in results if isinstance(r, float)]
    failures = [repr(r) for r in results if not isinstance(r, float)]
    progress("open coupons", f"{len(resumed)}/{len(oldest)} of the oldest coupons issued")
    p50_100 = summary_ms(at_100)
    p50_all = summary_ms(at_all)
    # A connection's first claim after an ANALYZE of `claims` plans the statement again:
    # autovacuum analyzes it during a fill of thousands, so the first pass over the pool
    # after the fill paid 1.5 ms more a claim (2026-12-07, 50 connections: p50 2.75 ms on
    # the pass after an ANALYZE, 0.97 to 1.14 ms on the passes before and after it, at
    # 1,000 claims as at 20,000). Timed apart, so both are seen and neither hides the other.
    return {
        "count": open_now,
        "fill_s": round(fill_s, 1),
        "fill_rate_per_s": round(fill / fill_s, 1) if fill_s > 0 else None,
        "settle": settled,
        "settle_note": "after the fill, waited for every claim's workflow to start, the workflow "
        "task backlog to drain and the worker to go idle before measuring RSS and claim latency "
        "(open coupons at rest)",
        "worker_rss_mib": rss_at_all,
        "worker_rss_mib_at_100": rss_at_100,
        "claim_latency_ms_at_100": p50_100,
        "claim_latency_ms_at_all": p50_all,
        "claim_latency_ratio_p50": round(p50_all["p50"] / p50_100["p50"], 2),
        "claim_latency_first_pass_ms_at_100": summary_ms(at_100[:pass_100]),
        "claim_latency_first_pass_ms_at_all": summary_ms(at_all[:pass_all]),
        "claim_latency_note": f"{probes} claims one after another at each point, over a pool "
        f"of {pass_100} then {pass_all} connections taken in turn; the first pass over the "
        "pool (one claim per connection) also apart: a connection's first claim after an "
        "ANALYZE of the claims table plans the statement again",
        "worker_cache_size": cache_size,
        "worker_cache_note": "WORKER_CACHE_SIZE; coupons beyond it are evicted and replayed "
        "from history on their next task",
        "evicted_expected": open_now > cache_size,
        "evicted_sample": len(oldest),
        "evicted_resumed": len(resumed),
        "evicted_resumed_ok": len(resumed) == len(oldest),
        "evicted_unlock_to_issued_ms": summary_ms(resumed),
        "evicted_failures": failures[:5],
    }


async def _claim(driver: LifecycleDriver, i: int) -> float:
    began = time.monotonic()
    await driver.claim(f"open-{i}")
    return time.monotonic() - began
