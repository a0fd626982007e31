"""Runs the coupon worker: `python worker.py` (settings from the environment, following the
running stack where it says nothing: `app.running`)."""

import asyncio
import logging
import sys

from app.running import settings_from_env
from app.workers import run_worker
from coupons.config import ConfigError

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
        asyncio.run(run_worker(settings))
    except ConfigError as err:
        # A setting that cannot work, or a namespace not prepared for us: one clear line.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
