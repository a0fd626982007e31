"""The reference the steady claims' workflow starts are printed beside, measured in the same
run on the same Temporal server: its start rate with nothing else asked of it.

The claims' commit rate has its physical limit in PostgreSQL's single-row commit rate
(bench/reference.py); their workflows' starts have theirs in the server's. Here the bench
starts workflows as the outbox does (STARTS_AT_ONCE in flight, one client), each the
smallest start there is: the floor's workflow, no input, no search attributes, on a task
queue no worker polls. So the server does a start's work and nothing after it (no first
workflow task handed out, no worker's CPU taken from it): no design that starts one
workflow per claim starts them faster on this server. The workflows stay open and
untouched until the bench's stack is thrown away.
"""

from __future__ import annotations

import time
from typing import Any

from temporalio.client import Client

from app.claims import STARTS_AT_ONCE
from bench.floor_workflow import FLOOR_WORKFLOW
from bench.load import closed_loop, progress
from bench.proc import CpuSplit
from bench.stats import summary_ms
from coupons.config import Settings


async def measure_start_reference(
    client: Client, settings: Settings, *, n: int, processes: dict[str, int]
) -> dict[str, Any]:
    """`n` workflow starts, STARTS_AT_ONCE in flight: starts per second, each start's wait
    for the server's answer, and the CPU of each process meanwhile (`processes` names the
    server "temporal", as the bench's parts do)."""
    # No worker of the stack polls it.
    task_queue = f"{settings.task_queue}-start-reference"

    async def start(i: int) -> float:
        sent = time.monotonic()
        await client.start_workflow(
            FLOOR_WORKFLOW, id=f"bench-start-reference-{i}", task_queue=task_queue
        )
        return time.monotonic() - sent

    cpu = CpuSplit(processes)
    cpu.start()
    run = await closed_loop("start reference", n, STARTS_AT_ONCE, start)
    split = cpu.stop(run.wall_s)
    server_ms = 1000 * split["temporal"]["cpu_s"] / n
    progress(
        "reference",
        f"{run.throughput_per_s:.0f} workflow starts/s by the Temporal server alone, "
        f"{server_ms:.1f} ms of its CPU each",
    )
    return {
        "starts": n,
        "in_flight": STARTS_AT_ONCE,
        "starts_per_s": round(run.throughput_per_s, 1),
        "starts_overall_per_s": round(run.overall_per_s, 1),
        "wall_s": round(run.wall_s, 2),
        "start_latency_ms": summary_ms(run.latencies_s),
        "server_cpu_ms_per_start": round(server_ms, 2),
        "cpu_by_process": split,
        "measure": f"{n} starts of the floor's workflow (no input, no search attributes) "
        f"on a task queue no worker polls, {STARTS_AT_ONCE} in flight from the bench's "
        "client, as the outbox starts claims' workflows; starts/s between the 10th and the "
        "90th percentile of their answers",
    }
