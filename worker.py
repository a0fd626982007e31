"""Runs the coupon worker: `python worker.py` (settings from the environment)."""

import asyncio
import logging

from coupons.config import Settings
from coupons.workers import run_worker

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per platform request would drown the worker's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(run_worker(Settings.from_env()))
