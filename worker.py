"""Runs the coupon worker: `python worker.py` (settings from the environment, following the
running stack where it says nothing: `app.running`).

What runs on which task queue is `build_workers` (app/workers.py): the workflows and the
ledger activities on `TASK_QUEUE`, every platform call on `<TASK_QUEUE>-platform`,
rate-limited to the platform's published limit.

SIGTERM or SIGINT (a deploy, Ctrl-C) stops it gracefully: no new work is taken, the
activities in flight get `WORKER_SHUTDOWN_GRACE_S` to finish, and it exits 0. A second
signal stops it at once.
"""

import asyncio
import logging
import os
import sys

from app.heap import freeze_startup_heap
from app.running import settings_from_env
from app.workers import build_workers, run_until_stopped, worker_services
from coupons.config import ConfigError, Settings


async def main(settings: Settings) -> None:
    """Run the workers until SIGINT or SIGTERM, then let the work in flight finish."""
    async with worker_services(settings) as services:
        workers = build_workers(services.client, services.pool, services.platform, settings)
        freeze_startup_heap()
        await run_until_stopped(workers, services.stop)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per platform request would drown the worker's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        # Its keys from the stack's data directory when the environment has none: a worker
        # started by hand beside `make run` must read and write the payloads the stack's do.
        settings = settings_from_env().with_stack_secrets()
        asyncio.run(main(settings))
    except ConfigError as err:
        # A setting that cannot work, or a namespace not prepared for us: one clear line.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # Stopped in order: the workers shut down, the pool and the platform closed. Exit
    # without the interpreter's teardown, in which the Temporal SDK's threads can still
    # take the GIL and abort the process (SIGABRT, about one stop in thirty here;
    # temporalio/sdk-python#300): an orderly stop would look like a crash to what runs us.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
