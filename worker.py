"""Runs the coupon worker: `python worker.py` (settings from the environment)."""

import asyncio
import logging
import sys

from coupons.config import ConfigError, Settings
from coupons.workers import run_worker

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per platform request would drown the worker's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        asyncio.run(run_worker(Settings.from_env()))
    except ConfigError as err:
        # A setting that cannot work, or a namespace not prepared for us: one clear line.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
