"""The floor's worker process (`python -m bench.floor`, settings from the environment)
and the driver that measures it.

The worker is built like the coupon worker (app/workers.py): the same sandboxed
workflow runner, workflow task pollers and workflow cache size, the activity on a
`-platform` queue with the same rate limit; only the workflow and the activity are
trivial.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from app.embedded import BACKGROUND_NICE, ManagedProcess
from app.heap import freeze_startup_heap
from app.workers import WORKFLOW_TASK_POLLERS, workflow_runner
from bench.floor_workflow import FLOOR_ACTIVITY, FLOOR_SIGNAL, FLOOR_WORKFLOW, FloorWorkflow
from bench.load import LoadResult, closed_loop, fixed_rate, progress
from bench.proc import CpuSplit
from bench.stats import summary_ms
from coupons.config import Settings
from coupons.contract import platform_task_queue
from coupons.temporal import connect

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULT_TIMEOUT_S = 120.0


def floor_task_queue(settings: Settings) -> str:
    return f"{settings.task_queue}-floor"


@activity.defn(name=FLOOR_ACTIVITY)
async def noop() -> float:
    return time.time()


async def run_floor_worker(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = await connect(settings)
    queue = floor_task_queue(settings)
    async with contextlib.AsyncExitStack() as running:
        await running.enter_async_context(
            Worker(
                client,
                task_queue=queue,
                workflows=[FloorWorkflow],
                workflow_runner=workflow_runner(),
                workflow_task_poller_behavior=WORKFLOW_TASK_POLLERS,
                max_cached_workflows=settings.worker_cache_size,
            )
        )
        await running.enter_async_context(
            Worker(
                client,
                task_queue=platform_task_queue(queue),
                activities=[noop],
                max_task_queue_activities_per_second=settings.platform_rate_limit,
            )
        )
        # The heap as the coupon worker keeps it (worker.py): the ratio stays fair.
        freeze_startup_heap()
        log.info("floor worker polling %s", queue)
        await stop.wait()


def floor_worker_process(settings: Settings, env: dict[str, str], log_dir: Path) -> ManagedProcess:
    return ManagedProcess(
        "floor worker",
        [sys.executable, "-m", "bench.floor"],
        log_dir / "floor-worker.log",
        env={**env, **settings.to_env()},
        cwd=PROJECT_ROOT,
        nice=BACKGROUND_NICE,  # as the stack's own worker: the ratio stays fair
    )


async def _one(client: Client, settings: Settings, workflow_id: str) -> float:
    handle = await client.start_workflow(
        FLOOR_WORKFLOW, id=workflow_id, task_queue=floor_task_queue(settings), result_type=float
    )
    sent = time.time()
    await handle.signal(FLOOR_SIGNAL)
    done: float = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    return done - sent


async def _signal_started(client: Client, workflow_id: str) -> float:
    handle = client.get_workflow_handle(workflow_id, result_type=float)
    sent = time.time()
    await handle.signal(FLOOR_SIGNAL)
    done: float = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    return done - sent


async def floor_saturation(
    client: Client,
    settings: Settings,
    n: int,
    concurrency: int,
    *,
    ids: str = "floor-s",
    phase: str = "floor saturation",
) -> LoadResult:
    """`n` floor workflows with `concurrency` in flight, their ids `ids`-0, `ids`-1, ..."""
    return await closed_loop(phase, n, concurrency, lambda i: _one(client, settings, f"{ids}-{i}"))


async def measure_floor(
    client: Client,
    settings: Settings,
    *,
    n: int,
    concurrency: int,
    light_n: int,
    light_rate: float,
    processes: dict[str, int],
) -> dict[str, Any]:
    # Warm-up: the first workflows pay for the worker's sandbox imports and connections.
    await floor_saturation(client, settings, 10, 10, ids="floor-w", phase="floor warm-up")

    # Light rate: start the workflows first and let their first task run, so the figure
    # is signal-to-activity-done alone, like unlock-to-issued.
    ids = [f"floor-l-{i}" for i in range(light_n)]
    for workflow_id in ids:
        await client.start_workflow(
            FLOOR_WORKFLOW, id=workflow_id, task_queue=floor_task_queue(settings)
        )
    await asyncio.sleep(1.0)
    light = await fixed_rate(
        "floor light rate", light_n, light_rate, lambda i: _signal_started(client, ids[i])
    )

    cpu = CpuSplit(processes)
    cpu.start()
    saturated = await floor_saturation(client, settings, n, concurrency)
    cpu_split = cpu.stop(saturated.wall_s)
    progress("floor", f"{saturated.throughput_per_s:.1f} workflows/s at saturation")
    return {
        "workflows": n,
        "concurrency": concurrency,
        **saturated.saturation_figures(),
        "signal_to_done_ms": summary_ms(saturated.latencies_s),
        "cpu_by_process": cpu_split,
        "light_rate": {
            "rate_per_s": light_rate,
            "signal_to_done_ms": summary_ms(light.latencies_s),
        },
        "worker": "bench/floor.py: same sandboxed runner, workflow task pollers and cache "
        "size, activity on a -platform queue with the same rate limit, SDK defaults "
        "otherwise (as app/workers.py)",
    }


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run_floor_worker(Settings.from_env()))
