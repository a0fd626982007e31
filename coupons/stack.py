"""The embedded stack behind `make run`: PostgreSQL, the Temporal dev server, the platform
simulator and the worker, started in order, stopped in reverse on Ctrl-C or SIGTERM.

Whatever `DATABASE_URL`, `TEMPORAL_ADDRESS` or `PLATFORM_URL` point at is used as it is,
and nothing embedded is started in its place. Data lives under `DATA_DIR` (`.data/`)
and survives restarts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Protocol

from coupons.catalog import ensure_campaign
from coupons.config import Settings
from coupons.embedded import EmbeddedPostgres, ManagedProcess, SimulatorProcess, TemporalDevServer
from coupons.errors import Refused
from coupons.ledger import db
from coupons.model import SEARCH_ATTRIBUTES
from coupons.workers import make_platform

log = logging.getLogger("coupons.stack")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Stoppable(Protocol):
    def stop(self, timeout_s: float = 10) -> object: ...


def platform_api_key(settings: Settings) -> str:
    """The simulator's key: from the environment, else generated once and kept in a file."""
    if settings.platform_api_key:
        return settings.platform_api_key
    path = settings.data_dir / "platform-api-key"
    if not path.exists():
        # Created owner-only from the first byte, never readable by others in between.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as key_file:
            key_file.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


async def seed_demo(settings: Settings) -> None:
    platform = make_platform(settings)
    try:
        async with db.pool(settings.database_url, max_size=2) as pool:
            await ensure_campaign(
                pool,
                platform,
                "demo",
                required_tasks=["first-order"],
                quota=1000,
                per_user_limit=1,
                valid_days=30,
                task_deadline=timedelta(days=7),
            )
    except Refused as err:
        # An operator changed the demo campaign (or its data predates this version): keep it.
        log.warning("demo campaign left as it is: %s", err)
    finally:
        await platform.aclose()


class Stack:
    """The embedded parts, started in order; benchmarks and chaos runs drive them too."""

    def __init__(
        self, settings: Settings, *, worker_env: dict[str, str] | None = None, demo: bool = True
    ) -> None:
        self.settings = settings
        self.worker_env = worker_env or {}
        self.demo = demo
        self.started: list[tuple[str, Stoppable]] = []
        self.stopping = threading.Event()
        self.lines: list[str] = []
        self.postgres: EmbeddedPostgres | None = None
        self.temporal: TemporalDevServer | None = None
        self.simulator: SimulatorProcess | None = None

    def start(self) -> None:
        s = self.settings
        data = s.data_dir.resolve()
        logs = data / "logs"
        logs.mkdir(parents=True, exist_ok=True)

        if s.database_url_override is None:
            self.postgres = pg = EmbeddedPostgres(
                data / "postgres", s.pg_port, log_path=logs / "postgres.log"
            )
            pg.start()
            self.started.append(("PostgreSQL", pg))
            self.lines.append(f"PostgreSQL  {s.database_url}  (embedded, data {data / 'postgres'})")
        else:
            self.lines.append("PostgreSQL  DATABASE_URL (external)")
        applied = asyncio.run(db.migrate_url(s.database_url))
        log.info("migrations applied: %s", applied or "none (up to date)")

        if s.temporal_address_override is None:
            self.temporal = temporal = TemporalDevServer(
                data / "temporal.db",
                s.temporal_port,
                s.temporal_ui_port,
                {key.name: "Keyword" for key in SEARCH_ATTRIBUTES},
                log_path=logs / "temporal.log",
                namespace=s.temporal_namespace,
            )
            temporal.start()
            self.started.append(("Temporal", temporal))
            self.lines.append(
                f"Temporal    {s.temporal_address}  Web UI http://127.0.0.1:{s.temporal_ui_port}"
                f"  (dev server, {data / 'temporal.db'})"
            )
        else:
            self.lines.append(f"Temporal    {s.temporal_address}  (external)")

        if s.platform_url_override is None:
            key = platform_api_key(s)
            self.settings = s = replace(s, platform_api_key=key)
            self.simulator = sim = SimulatorProcess(
                data / "simulator.sqlite3",
                s.simulator_port,
                env={"PLATFORM_API_KEY": key},
                log_path=logs / "simulator.log",
            )
            sim.start()
            self.started.append(("platform simulator", sim))
            self.lines.append(
                f"Platform    {s.platform_url}  (simulator, {data / 'simulator.sqlite3'})"
            )
        else:
            self.lines.append(f"Platform    {s.platform_url}  (external)")

        if self.demo:
            asyncio.run(seed_demo(s))
            self.lines.append(
                "Demo        campaign 'demo' on batch 'demo': task first-order, quota 1000, "
                "1 per user, valid 30 days"
            )
        env = {**os.environ, **s.to_env(), **self.worker_env}
        self.worker = ManagedProcess(
            "worker", [sys.executable, "worker.py"], logs / "worker.log", env=env, cwd=PROJECT_ROOT
        )
        self.worker.start()
        self.started.append(("worker", self.worker))
        self.lines.append(
            f"Worker      pid {self.worker.pid}, task queues {s.task_queue} and "
            f"{s.platform_task_queue}"
        )
        self.lines.append(
            f"Schedules   catalog-sync every {s.sync_interval_s:g} s, reconcile-daily at "
            f"{s.reconcile_hour_utc:02d}:00 UTC (kept up to date by the worker)"
        )
        self.lines.append(f"Logs        {logs}")

    def supervise(self) -> None:
        """Keep the worker running until asked to stop; a dead server ends the stack."""
        restarts = 0
        up_since = time.monotonic()
        while not self.stopping.wait(1.0):
            for name, part in self.started:
                if part is self.worker or getattr(part, "alive", True):
                    continue
                raise RuntimeError(f"{name} stopped unexpectedly; see its log under .data/logs")
            if not self.worker.alive:
                # A worker that ran a good while before dying starts over with a short wait.
                restarts = 1 if time.monotonic() - up_since > 60 else restarts + 1
                delay = min(30, 2**restarts)
                log.warning(
                    "worker exited (rc %s); restarting in %d s", self.worker.returncode, delay
                )
                if self.stopping.wait(delay):
                    break
                self.worker.start()
                up_since = time.monotonic()

    def stop(self) -> None:
        for name, part in reversed(self.started):
            log.info("stopping %s", name)
            part.stop()
        self.started.clear()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stack = Stack(Settings.from_env())

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stack.stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    started = time.monotonic()
    try:
        stack.start()
        banner = "\n".join(f"  {line}" for line in stack.lines)
        print(
            f"\ncoupon service up in {time.monotonic() - started:.1f} s "
            f"(Ctrl-C stops everything it started):\n{banner}\n\n"
            "Try:  .venv/bin/python starter.py claim --campaign demo --user alice\n",
            flush=True,
        )
        stack.supervise()
        return 0
    except Exception as err:
        log.error("stack failed: %s", err)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
