"""`python -m bench --size full|quick|tiny`: what `make bench` runs.

Starts a fresh embedded stack with the HTTP API (temporary DATA_DIR, free ports: never the
user's `.data` or default ports), runs every part against it, writes
bench/results/<date>.{json,png,md} (quick and tiny runs prefixed with their size, so they
never overwrite a full run; each figure beside the previous committed run of the same size)
and stops everything it started, also on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from temporalio.client import Client

from app.embedded import ManagedProcess, free_port
from app.service import Backends
from app.stack import HARNESS_SIMULATOR_KNOBS, Stack
from bench import report
from bench.catalog import measure_reconcile, measure_sync
from bench.claimers import service_campaign
from bench.claiming import measure_claims
from bench.compare import compare, previous_run, results_prefix
from bench.end_to_end import LifecycleDriver, lifecycle_saturation, measure_lifecycle
from bench.floor import (
    floor_saturation,
    floor_task_queue,
    floor_worker_process,
    measure_floor,
)
from bench.load import progress
from bench.open_coupons import measure_open, settle
from bench.paired import measure_paired
from bench.peer_dbos import run_peer
from bench.probes import IssuedWatcher, create_statement_stats, enable_statement_stats
from bench.proc import memory_gib
from bench.sizes import SIZES, Size
from coupons.config import PLATFORMS, Settings
from coupons.ledger import db
from coupons.temporal import connect

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"
# Variables that would point the run at someone's real services or fault knobs.
FOREIGN_ENV = ("DATABASE_URL", "TEMPORAL_ADDRESS", "PLATFORM_URL", "PLATFORM_API_KEY")
# The bench client's connections; with the worker's 20, the API processes' and DBOS's, it
# stays under the server's max_connections (200). The claim part's 100 (bench/claimers.py
# and its pgbench reference) come after it closed.
CLIENT_POOL = 50
PEER_TIMEOUT_S = {"tiny": 120.0, "quick": 180.0, "full": 420.0}
# API_PROCESSES: one per core this process may run on, as the API is deployed, and at most
# two: each holds a pool of DB_POOL_SIZE (20) connections for the whole run.
API_PROCESSES = min(len(os.sched_getaffinity(0)), 2)
# A part's last workflow tasks drain in seconds once it ends; bounded all the same.
PAIRED_SETTLE_S = 120.0


def machine(size: Size) -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "temporalio": version("temporalio"),
        "dbos": version("dbos"),
        "size": size.name,
        "api_processes": API_PROCESSES,
    }


def bench_settings(data_dir: Path, size: Size, platform: str = "generic") -> Settings:
    return Settings(
        data_dir=data_dir,
        platform=platform,
        pg_port=free_port(),
        temporal_port=free_port(),
        temporal_ui_port=free_port(),
        simulator_port=free_port(),
        api_port=free_port(),
        api_processes=API_PROCESSES,
        worker_metrics_port=free_port(),
        worker_cache_size=size.worker_cache_size,
    ).check()


async def callbacks_off(settings: Settings) -> None:
    """No redemption callbacks from the simulator: the reconciliation part marks coupons
    used behind the service's back and counts on finding them still `issued`, which the
    API would otherwise have redeemed through their callbacks first."""
    async with httpx.AsyncClient(base_url=settings.simulator_url, trust_env=False) as sim:
        (await sim.put("/sim/knobs", json={"callback_url": ""})).raise_for_status()


async def run_parts(
    stack: Stack, floor_worker: ManagedProcess, size: Size, statements: bool, log_dir: Path
) -> dict[str, Any]:
    settings = stack.settings
    worker_pid = stack.worker.pid
    assert worker_pid is not None
    client = await connect(settings)
    await callbacks_off(settings)
    for name in ("bench-life", "bench-open"):
        await service_campaign(settings, name, 1_000_000)
    results: dict[str, Any] = {}
    assert stack.temporal and stack.postgres and stack.simulator and stack.api
    processes = {
        "worker": worker_pid,
        "temporal": stack.temporal.pid or 0,
        "postgres": stack.postgres.pid or 0,
        "simulator": stack.simulator.pid or 0,
        "bench (load, claims)": os.getpid(),
    }

    progress("floor", f"{size.floor_n} workflows, {size.concurrency} in flight")
    results["floor"] = await measure_floor(
        client,
        settings,
        n=size.floor_n,
        concurrency=size.concurrency,
        light_n=size.light_n,
        light_rate=size.light_rate_per_s,
        processes={**processes, "floor worker": floor_worker.pid or 0},
    )
    # Its worker would otherwise compete for the CPU with the parts that follow.
    floor_worker.stop()

    async with (
        db.pool(settings.database_url, max_size=CLIENT_POOL, timeout_s=120) as pool,
        IssuedWatcher(pool) as watcher,
    ):
        backends = Backends(settings, pool, client)
        progress("lifecycle", f"{size.lifecycle_n} lifecycles, {size.concurrency} in flight")
        life = await measure_lifecycle(
            LifecycleDriver(client, backends, watcher, "bench-life"),
            pool,
            worker_pid,
            n=size.lifecycle_n,
            concurrency=size.concurrency,
            light_n=size.light_n,
            light_rate=size.light_rate_per_s,
            history_sample=size.history_sample,
            statements_enabled=statements,
            processes=processes,
        )
        life["ratio_to_floor"] = round(
            life["throughput_per_s"] / results["floor"]["throughput_per_s"], 3
        )
        results["lifecycle"] = life

        # Right after the lifecycle part, while its coupons' own redemption polls are
        # still minutes away (see measure_reconcile).
        progress("reconciliation", f"a batch of {size.reconcile_coupons}+ issued coupons")
        results["reconciliation"] = await measure_reconcile(
            LifecycleDriver(client, backends, watcher, "bench-life"),
            pool,
            settings,
            coupons=size.reconcile_coupons,
            concurrency=size.concurrency,
        )
        progress("catalog sync", f"{size.sync_batches} batches")
        results["catalog_sync"] = await measure_sync(client, pool, settings, n=size.sync_batches)

        progress("peer", f"DBOS: {size.peer_n} lifecycles, {size.concurrency} in flight")
        results["peer"] = await asyncio.to_thread(
            run_peer,
            settings,
            dict(os.environ),
            log_dir,
            n=size.peer_n,
            concurrency=size.concurrency,
            timeout_s=PEER_TIMEOUT_S[size.name],
        )
        if results["peer"].get("error"):
            progress("peer", f"not measured: {results['peer']['error'].splitlines()[0]}")

        progress("open coupons", f"{size.open_count} coupons left in received")
        results["open_coupons"] = await measure_open(
            LifecycleDriver(client, backends, watcher, "bench-open"),
            worker_pid,
            settings.task_queue,
            count=size.open_count,
            probes=size.open_probe_claims,
            evicted_sample=size.evicted_sample,
            cache_size=settings.worker_cache_size,
        )
    # Last, once the bench's own pool is closed (the claim part opens connections of its
    # own), so that the thousands of coupons its claims leave open weigh on no other part.
    results.update(
        await measure_claims(
            settings,
            client,
            size,
            worker_pid,
            {**processes, **{api.name.lower(): api.pid or 0 for api in stack.apis}},
        )
    )
    # Only the claims need the API.
    await asyncio.to_thread(stack.stop_api)

    # After every other part, so that neither the pairs' coupons (polling for redemption
    # minutes later) nor the workflows they add to the server weigh on those parts.
    progress("paired", f"{size.paired_parts} pairs of floor and lifecycle parts of {size.paired_n}")
    async with (
        db.pool(settings.database_url, max_size=CLIENT_POOL, timeout_s=120) as pool,
        IssuedWatcher(pool) as watcher,
    ):
        driver = LifecycleDriver(client, Backends(settings, pool, client), watcher, "bench-life")
        try:
            results["paired"] = await measure_paired_parts(
                client, settings, floor_worker, driver, size, worker_pid
            )
        except Exception as err:
            # Last of a half-hour run: its failure must not lose the figures before it.
            log.exception("the pairs failed")
            results["paired"] = {"error": f"{type(err).__name__}: {err}"}
            progress("paired", f"not measured: {results['paired']['error']}")
    return results


async def measure_paired_parts(
    client: Client,
    settings: Settings,
    floor_worker: ManagedProcess,
    driver: LifecycleDriver,
    size: Size,
    worker_pid: int,
) -> dict[str, Any]:
    """The pairs (bench/paired.py), once the claims' coupons have had their first workflow
    tasks; the floor's worker back for them, and stopped again after."""
    waited = await settle(client, settings.task_queue, worker_pid)
    progress("paired", f"the worker idle after {waited['settle_s']:.0f} s")
    await asyncio.to_thread(floor_worker.start)
    try:
        # The first items of each side pay for connections opened again (the floor's worker,
        # the bench's pool) after a long idle; the main runs warm up the same way.
        await floor_saturation(client, settings, 10, 10, ids="floor-pw", phase="floor warm-up")
        await lifecycle_saturation(driver, 10, 10, users="pairw", phase="lifecycle warm-up")

        floor_pid = floor_worker.pid
        assert floor_pid is not None
        workers = {
            "floor": (floor_task_queue(settings), floor_pid),
            "lifecycle": (settings.task_queue, worker_pid),
        }

        async def settle_worker(side: str) -> dict[str, Any]:
            task_queue, pid = workers[side]
            return await settle(client, task_queue, pid, PAIRED_SETTLE_S)

        paired = await measure_paired(
            lambda k: floor_saturation(
                client,
                settings,
                size.paired_n,
                size.concurrency,
                ids=f"floor-p{k}",
                phase=f"floor part {k + 1}",
            ),
            lambda k: lifecycle_saturation(
                driver,
                size.paired_n,
                size.concurrency,
                users=f"pair{k}",
                phase=f"lifecycle part {k + 1}",
            ),
            settle_worker,
            pairs=size.paired_parts,
            items_per_part=size.paired_n,
        )
        return {**paired, "settle_before": waited}
    finally:
        await asyncio.to_thread(floor_worker.stop)


def with_statement_stats(stack: Stack) -> bool:
    """Restart PostgreSQL with pg_stat_statements loaded, the worker and the API stopped
    meanwhile (so neither keeps a pool of connections the restart broke)."""
    assert stack.postgres is not None and stack.api is not None
    try:
        enable_statement_stats(stack.postgres.url("postgres"))
        stack.worker.stop()
        stack.stop_api()
        stack.postgres.restart()
        stack.worker.start()
        stack.start_api()
    except Exception:
        log.exception("could not load pg_stat_statements")
        if not stack.worker.alive:
            stack.worker.start()
        stack.start_api()  # those not running
        return False
    return create_statement_stats(stack.settings.database_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the temporary DATA_DIR (logs)"
    )
    parser.add_argument(
        "--platform",
        choices=PLATFORMS,
        default=os.environ.get("PLATFORM") or "generic",
        help="the platform protocol the simulator speaks (default: PLATFORM, else generic)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    size = SIZES[args.size]
    for key in list(os.environ):
        if key in FOREIGN_ENV or key.startswith("SIM_"):
            del os.environ[key]

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    began = time.monotonic()
    data_dir = Path(tempfile.mkdtemp(prefix="coupons-bench-"))
    settings = bench_settings(data_dir, size, args.platform)
    stack = Stack(settings, demo=False, api=True, simulator_knobs=HARNESS_SIMULATOR_KNOBS)
    floor_worker = floor_worker_process(settings, dict(os.environ), data_dir / "logs")
    ok = False
    try:
        progress("stack", f"starting in {data_dir}")
        stack.start()
        statements = with_statement_stats(stack)
        floor_worker.start()
        # The worker restarted with PostgreSQL above: name its current pid, not the first.
        parts = "; ".join(line.split("  (")[0] for line in stack.lines[:3])
        progress("stack", f"up: {parts}; worker pid {stack.worker.pid}")
        results = asyncio.run(run_parts(stack, floor_worker, size, statements, data_dir / "logs"))
        ok = True
    except KeyboardInterrupt:
        progress("bench", "interrupted: stopping everything it started")
        return 130
    finally:
        floor_worker.stop()
        stack.stop()
        if ok and not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            progress("bench", f"data and logs kept in {data_dir}")

    date = time.strftime("%Y-%m-%d")
    data: dict[str, Any] = {
        "date": date,
        "size": size.as_dict(),
        "platform": args.platform,
        "machine": machine(size),
        "wall_s": round(time.monotonic() - began, 1),
        **results,
    }
    data["targets"] = report.targets(data)
    prefix = results_prefix(size.name, args.platform)
    data["previous"] = compare(data, previous_run(RESULTS, prefix))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{prefix}{date}"
    report.write_json(data, stem.with_suffix(".json"))
    report.write_plot(data, stem.with_suffix(".png"))
    report.write_markdown(data, stem.with_suffix(".md"), stem.with_suffix(".png").name)
    progress("bench", f"done in {data['wall_s']} s: {stem}.json, .png, .md")
    for target in data["targets"]:
        progress(
            "target",
            f"{'met   ' if target['met'] else 'MISSED'} {target['target']}: {target['figure']}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
