"""The processes family: the stack's own processes killed or stopped while claims and
completions flow (the worker mid-send, the Temporal dev server, PostgreSQL), each brought
back by the scenario; the common checks must find nothing lost, sent twice or wrong."""

from __future__ import annotations

import asyncio
import time

from chaos.frame import Run, Scenario


async def _sends_in_flight(run: Run, wait_s: float = 5.0) -> int:
    """Wait (up to `wait_s`) until a send is applied: with the scenario's latency the
    worker is then still waiting for its answer. Returns the sends applied so far."""
    before = (await run.driver.sim_stats())["sends_applied"]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = (await run.driver.sim_stats())["sends_applied"]
        if now > before:
            return now
    return before


async def kill_worker(run: Run, load: asyncio.Task[None]) -> float:
    harness, kills = run.harness, run.size.worker_kills
    gap = run.size.load_s / (kills + 1)
    for k in range(kills):
        await asyncio.sleep(gap if k else gap * 0.7)
        applied = await _sends_in_flight(run)
        worker = harness.stack.worker
        harness.worker_down_on_purpose = True
        pid = worker.pid
        await asyncio.to_thread(worker.kill)
        run.fault(f"SIGKILL worker pid {pid} ({applied} sends applied so far, answers pending)")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(worker.start)
        harness.worker_down_on_purpose = False
        run.fault(f"worker restarted, pid {worker.pid}")
    return time.monotonic()


async def restart_temporal(run: Run, load: asyncio.Task[None]) -> float:
    temporal = run.harness.stack.temporal
    assert temporal is not None
    modes = run.size.temporal_restarts
    gap = run.size.load_s / (len(modes) + 1)
    for mode in modes:
        await asyncio.sleep(gap)
        pid = temporal.pid
        began = time.monotonic()
        if mode == "kill":
            await asyncio.to_thread(temporal.kill)
            run.fault(f"Temporal dev server pid {pid} SIGKILLed")
        else:
            await asyncio.to_thread(temporal.stop)
            run.fault(f"Temporal dev server pid {pid} stopped (SIGTERM)")
        await asyncio.sleep(max(0.0, run.size.temporal_down_s - (time.monotonic() - began)))
        await asyncio.to_thread(temporal.start)
        run.fault(
            f"Temporal dev server back on its file database, pid {temporal.pid}, "
            f"{time.monotonic() - began:.1f} s down"
        )
    return time.monotonic()


async def postgres_outage(run: Run, load: asyncio.Task[None]) -> float:
    postgres = run.harness.stack.postgres
    assert postgres is not None
    outages = run.size.postgres_outages
    gap = run.size.load_s / (len(outages) + 1)
    for mode, down_s in outages:
        await asyncio.sleep(gap)
        pid = postgres.pid
        began = time.monotonic()
        if mode == "kill":
            await asyncio.to_thread(postgres.kill)
            run.fault(f"PostgreSQL pid {pid} and its backends SIGKILLed (crash)")
        else:
            await asyncio.to_thread(postgres.stop)
            run.fault(f"PostgreSQL pid {pid} fast shutdown")
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - began)))
        await asyncio.to_thread(postgres.start)
        run.fault(f"PostgreSQL back, pid {postgres.pid}, {time.monotonic() - began:.1f} s down")
    return time.monotonic()


WORKER_KILL = Scenario(
    name="worker_kill",
    description="The worker SIGKILLed while sends are in flight (the simulator answers "
    "1.5 s after applying each send), several times, and restarted by the driver.",
    fault=kill_worker,
    reports=lambda size, i: ["signal"],
    latency_ms=1500,
)


TEMPORAL_RESTART = Scenario(
    name="temporal_restart",
    description="The Temporal dev server (file database) restarted while claims and "
    "completions flow: once gracefully, once SIGKILLed (quick/full), down 10 s each "
    "at full size (5 s quick, 3 s tiny).",
    fault=restart_temporal,
    reports=lambda size, i: ["update" if i % 2 else "signal"],
    latency_ms=200,
)


POSTGRES_OUTAGE = Scenario(
    name="postgres_outage",
    description="PostgreSQL down while claims and completions flow (10 s per outage at "
    "full size, a fast shutdown and a crash; 5 s quick and 3 s tiny, a crash).",
    fault=postgres_outage,
    reports=lambda size, i: ["update" if i % 2 else "signal"],
    latency_ms=200,
)
