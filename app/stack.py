"""The embedded stack behind `make run`: PostgreSQL, the Temporal dev server, the platform
simulator, the worker and the HTTP API, started in order, stopped in reverse on Ctrl-C or
SIGTERM.

Whatever `DATABASE_URL`, `TEMPORAL_ADDRESS` or `PLATFORM_URL` point at is used as it is,
and nothing embedded is started in its place. Data lives under `DATA_DIR` (`.data/`)
and survives restarts.

`make run` records the stack it runs (`app.running`): command lines, the worker and
the API follow it. It leaves nothing behind when killed: its servers get their stop signal
from the kernel when it dies (any signal, even SIGKILL), it stops in order when `make`
dies or the terminal closes, and the next start on the same data stops whatever a dead
stack's record says still runs (by pid and start time, never by name).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import FrameType

from app import running
from app.embedded import (
    BACKGROUND_NICE,
    EmbeddedPostgres,
    ManagedProcess,
    ProcessStartError,
    Server,
    SimulatorProcess,
    TemporalDevServer,
    answers_health,
    listens,
    port_open,
    process_start_time,
    set_own_parent_death_signal,
    stop_recorded,
)
from coupons.catalog.campaigns import ensure_campaign
from coupons.config import PROMETHEUS_MULTIPROC_DIR, ConfigError, Settings
from coupons.errors import Refused
from coupons.ledger import db
from coupons.model import SEARCH_ATTRIBUTES
from coupons.platforms.configured import make_platform

log = logging.getLogger("app.stack")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# How long the API process may take to answer its health check after it starts.
API_START_TIMEOUT_S = 30.0


# What a stack starts: a server (PostgreSQL, Temporal, the simulator) or a plain child.
Part = Server | ManagedProcess


def platform_api_key(settings: Settings) -> str:
    """The simulator's key: from the environment, else generated once and kept in a file."""
    return settings.platform_api_key or _kept_secret(settings.data_dir / "platform-api-key")


def platform_callback_secret(settings: Settings) -> str:
    """The secret the simulator signs its callbacks with and the API checks them by: from
    the environment, else generated once and kept in a file."""
    return settings.platform_callback_secret or _kept_secret(
        settings.data_dir / "platform-callback-secret"
    )


def _kept_secret(path: Path) -> str:
    if not path.exists():
        # Created owner-only from the first byte, never readable by others in between.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as secret_file:
            secret_file.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def stop_leftovers(data_dir: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """Stop what a dead stack on `data_dir` left running (killed with its servers kept, say:
    an older version, or one that could not tell them); a line saying what, or None.
    Refuses if that stack still runs."""
    record = running.read_record(data_dir / running.RECORD_NAME)
    if record is None or record.pid == os.getpid():
        return None
    if record.alive:
        raise RuntimeError(
            f"a stack already runs on {data_dir} ({record.describe()}); stop it first"
        )
    stopped = [
        f"{child.name} (pid {child.pid})"
        # In the order a stack stops: the worker before the servers it uses.
        for child in reversed(record.children)
        if stop_recorded(child.pid, child.start_time, signal.Signals[child.stop_signal])
    ]
    running.remove_record(data_dir, record.pid, environ)
    if not stopped:
        return None
    return (
        f"stopped what the stack that ran here before (pid {record.pid}) left running: "
        + ", ".join(stopped)
    )


# Chaos runs and benchmarks measure faults and throughput, not WeChat Pay's registration of a
# new stock (about a minute before it may start): their simulator waits 1 s, so the catalog's
# waiting for it still runs.
HARNESS_SIMULATOR_KNOBS = {"SIM_WECHAT_START_DELAY_S": "1"}


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


def _test_merchant(settings: Settings) -> str:
    if settings.platform != "wechat":
        return "test merchant"
    signs = {
        "public_key": "its public key",
        "certificates": "platform certificates",
        "switching": "either key (switching)",
    }[settings.wechat_platform_keys]
    return f"test merchant; signed with {signs}"


class Stack:
    """The embedded parts, started in order; benchmarks and chaos runs drive them too."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_env: dict[str, str] | None = None,
        demo: bool = True,
        api: bool = False,
        simulator_knobs: Mapping[str, str] | None = None,
        record: bool = False,
        die_with_parent: bool = False,
        temporal_dynamic_config: Mapping[str, object] | None = None,
    ) -> None:
        """`api` starts the HTTP API too (`make run` does), on the settings' API_PORT;
        `simulator_knobs` (SIM_* variables) start the embedded simulator with those knobs.

        `record` makes this the running stack others follow (`app.running`), and first
        stops what a dead one on the same data left running. `die_with_parent` has the
        kernel stop each server when this process dies: only for a stack started, and
        supervised, from the main thread (the signal comes when the starting thread ends).
        `temporal_dynamic_config`: the embedded dev server's dynamic config values."""
        self.settings = settings
        self.worker_env = worker_env or {}
        self.simulator_knobs = dict(simulator_knobs or {})
        self.demo = demo
        self.with_api = api
        # API_PROCESSES of them on API_PORT, "API" first.
        self.apis: list[ManagedProcess] = []
        self.started: list[tuple[str, Part]] = []
        self.stopping = threading.Event()
        self.postgres: EmbeddedPostgres | None = None
        self.temporal: TemporalDevServer | None = None
        self.simulator: SimulatorProcess | None = None
        self.record = record
        self.temporal_dynamic_config = dict(temporal_dynamic_config or {})
        self.die_with_parent = die_with_parent
        self.leftovers: str | None = None

    def start(self) -> None:
        # Absolute from here on: the children run elsewhere, and others follow the record.
        self.settings = s = replace(self.settings, data_dir=self.settings.data_dir.resolve())
        data = s.data_dir
        logs = data / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if self.record:
            self.leftovers = stop_leftovers(data)
            if self.leftovers:
                log.warning("%s", self.leftovers)

        if s.codec_keys_file is None:
            # Payloads encrypted from the first start: no input, result or failure carries a
            # user id or receipt in clear (workflow ids and search attributes still do, to be
            # searched); `coupons.codec`, and the API serves the codec to the Web UI.
            from coupons.codec import ensure_keys

            ensure_keys(s.stack_codec_keys_file)
            self.settings = s = replace(s, codec_keys_file=s.stack_codec_keys_file.resolve())
        if s.codec_token is None:
            token = _kept_secret(data / "codec-token")
            self.settings = s = replace(s, codec_token=token)
        codec_endpoint = f"{s.api_url}/codec/{s.codec_token}" if self.with_api else None
        # Recorded before anything starts: a command line run meanwhile follows this stack.
        self._write_record()

        if s.database_url_override is None:
            self.postgres = pg = EmbeddedPostgres(
                data / "postgres",
                s.pg_port,
                log_path=logs / "postgres.log",
                die_with_parent=self.die_with_parent,
            )
            pg.start()
            self._started("PostgreSQL", pg)
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
                ui_codec_endpoint=codec_endpoint,
                redact=[s.codec_token or ""],
                die_with_parent=self.die_with_parent,
                dynamic_config=self.temporal_dynamic_config,
                nice=BACKGROUND_NICE,
            )
            temporal.start()
            self._started("Temporal", temporal)

        if self.with_api and port_open(s.api_client_host, s.api_port):
            raise RuntimeError(f"API_PORT {s.api_port} is in use; choose another with API_PORT")
        metrics = s.worker_metrics_port
        if metrics is not None and port_open(s.metrics_host, metrics):
            raise RuntimeError(
                f"WORKER_METRICS_PORT {metrics} is in use; choose another, or set it to off"
            )
        if s.platform_url_override is None:
            key = platform_api_key(s)
            callback_secret = platform_callback_secret(s)
            self.settings = s = replace(
                s, platform_api_key=key, platform_callback_secret=callback_secret
            )
            sim_env = {
                "PLATFORM_API_KEY": key,
                "PLATFORM_CALLBACK_SECRET": callback_secret,
                **self.simulator_knobs,
            }
            if self.with_api:
                # The simulator tells the API when a shop till marks a coupon used.
                sim_env["SIM_CALLBACK_URL"] = s.callback_url
            if s.platform == "wechat":
                # The simulated WeChat Pay signs the way this merchant's is said to.
                sim_env["SIM_WECHAT_SIGNER"] = s.wechat_platform_keys
            self.simulator = sim = SimulatorProcess(
                data / "simulator.sqlite3",
                s.simulator_port,
                env=sim_env,
                log_path=logs / "simulator.log",
                mode=s.platform,
                keys_dir=s.platform_keys_dir.resolve(),
                die_with_parent=self.die_with_parent,
            )
            sim.start()
            self._started("platform simulator", sim)

        # A real platform's batch is real money: never made without an operator asking.
        if self.demo and s.platform_url_override is None:
            asyncio.run(seed_demo(s))
        env = {**os.environ, **s.to_env(), **self.worker_env}
        self.worker = ManagedProcess(
            "worker",
            [sys.executable, "worker.py"],
            logs / "worker.log",
            env=env,
            cwd=PROJECT_ROOT,
            die_with_parent=self.die_with_parent,
            nice=BACKGROUND_NICE,
            # Its graceful stop lets the activities in flight finish first.
            stop_timeout_s=s.worker_shutdown_grace_s + 5,
        )
        self.worker.start()
        self._started("worker", self.worker)
        if self.with_api:
            api_env = {**os.environ, **s.to_env()}
            # Only the stack names it: one process keeps its own registry (a directory from
            # the environment would be one that nothing empties).
            api_env.pop(PROMETHEUS_MULTIPROC_DIR, None)
            if s.api_processes > 1:
                # Their shared metrics (coupons.metrics.api_registry), counted from zero at
                # each start of the stack, as one process's would be.
                shared_metrics = data / "api-metrics"
                shutil.rmtree(shared_metrics, ignore_errors=True)
                shared_metrics.mkdir()
                api_env[PROMETHEUS_MULTIPROC_DIR] = str(shared_metrics)
            for n in range(1, s.api_processes + 1):
                name = "API" if n == 1 else f"API {n}"
                api = ManagedProcess(
                    name,
                    [sys.executable, "-m", "app.api"],
                    logs / ("api.log" if n == 1 else f"api-{n}.log"),
                    env=api_env,
                    cwd=PROJECT_ROOT,
                    die_with_parent=self.die_with_parent,
                )
                self.apis.append(api)
                self.start_api(api)
                self._started(name, api)

    @property
    def lines(self) -> list[str]:
        """What `make run` prints once the stack is up: each part, where it is, how reached."""
        s = self.settings
        data = s.data_dir
        lines = [
            f"PostgreSQL  {s.database_url}  (embedded, data {data / 'postgres'})"
            if self.postgres is not None
            else "PostgreSQL  DATABASE_URL (external)",
            f"Codec       payloads encrypted (keys {s.codec_keys_file})"
            + ("; the Web UI decodes them through the API" if self.with_api else ""),
            f"Temporal    {s.temporal_address}  Web UI http://127.0.0.1:{s.temporal_ui_port}"
            f"  (dev server, {data / 'temporal.db'})"
            if self.temporal is not None
            else f"Temporal    {s.temporal_address}  (external)",
        ]
        if self.simulator is None:
            lines.append(f"Platform    {s.platform_url}  (external)")
        else:
            lines.append(
                f"Platform    {s.platform_url}  ({s.platform} simulator, "
                f"{data / 'simulator.sqlite3'})"
            )
            if s.platform != "generic":
                lines.append(
                    f"Keys        {s.platform_keys_dir.resolve() / s.platform}  "
                    f"({_test_merchant(s)})"
                )
        if self.demo:
            lines.append(
                "Demo        campaign 'demo' on batch 'demo': task first-order, quota 1000, "
                "1 per user, valid 30 days"
                if self.simulator is not None
                else "Demo        none (PLATFORM_URL is a real platform)"
            )
        metrics = f", metrics {s.worker_metrics_url}" if s.worker_metrics_url else ""
        lines.append(
            f"Worker      pid {self.worker.pid}, task queues {s.task_queue} and "
            f"{s.platform_task_queue}{metrics}"
        )
        if self.apis:
            pids = ", ".join(str(api.pid) for api in self.apis)
            lines.append(
                f"API         {s.api_url}  docs {s.api_url}/docs  "
                f"(pid{'s' if len(self.apis) > 1 else ''} {pids}; keys: starter.py tenant create)"
            )
        return [
            *lines,
            f"Schedules   catalog-sync every {s.sync_interval_s:g} s, reconcile-daily at "
            f"{s.reconcile_hour_utc:02d}:00 UTC (kept up to date by the worker)",
            f"Logs        {data / 'logs'}",
        ]

    def _started(self, name: str, part: Part) -> None:
        self.started.append((name, part))
        self._write_record()

    def _write_record(self) -> None:
        """Record this stack and its servers' pids (again after a server's restart)."""
        if not self.record:
            return
        children = []
        for name, part in self.started:
            process = part.process if isinstance(part, Server) else part
            if process.pid and process.start_time:
                children.append(
                    running.Child(name, process.pid, process.start_time, process.stop_signal.name)
                )
        start_time = process_start_time(os.getpid())
        assert start_time is not None  # this very process runs
        running.write_record(self.settings, children, pid=os.getpid(), start_time=start_time)

    @property
    def api(self) -> ManagedProcess | None:
        """The first API process (of API_PROCESSES), if the stack runs the API."""
        return self.apis[0] if self.apis else None

    def start_api(self, api: ManagedProcess | None = None) -> None:
        """Start an API process (by default each one not running) and wait until it
        listens on API_PORT and the port answers its health check."""
        processes = [api] if api is not None else [p for p in self.apis if not p.alive]
        for process in processes:
            self._start_api_process(process)

    def _start_api_process(self, process: ManagedProcess) -> None:
        process.start()
        health = f"{self.settings.api_url}/health"
        port = self.settings.api_port
        try:
            # Its own socket, not only its siblings' on the same port.
            process.wait_ready(
                lambda: listens(process.pid, port) and answers_health(health),
                API_START_TIMEOUT_S,
            )
        except BaseException:
            process.stop(timeout_s=5)
            raise

    def stop_api(self) -> None:
        for api in self.apis:
            api.stop()

    def supervise(self) -> None:
        """Keep the worker and the API running until asked to stop; a dead server ends the
        stack."""
        restartable: dict[str, tuple[ManagedProcess, Callable[[], None]]] = {
            "worker": (self.worker, self.worker.start)
        }
        for api in self.apis:
            restartable[api.name] = (api, functools.partial(self.start_api, api))
        restarts = dict.fromkeys(restartable, 0)
        up_since = dict.fromkeys(restartable, time.monotonic())
        while not self.stopping.wait(1.0):
            for name, part in self.started:
                if name in restartable or part.alive:
                    continue
                raise RuntimeError(f"{name} stopped unexpectedly; see its log under .data/logs")
            for name, (process, start) in restartable.items():
                if process.alive:
                    continue
                # A process that ran a good while before dying starts over with a short wait.
                ran_long = time.monotonic() - up_since[name] > 60
                restarts[name] = 1 if ran_long else restarts[name] + 1
                delay = min(30, 2 ** restarts[name])
                log.warning(
                    "%s exited (rc %s); restarting in %d s", name, process.returncode, delay
                )
                if self.stopping.wait(delay):
                    return
                try:
                    start()
                except ProcessStartError as err:
                    log.error("%s did not come back: %s", name, err)
                self._write_record()
                up_since[name] = time.monotonic()

    def stop(self) -> list[str]:
        """Stop what was started, in reverse order; the names of what was stopped."""
        stopped = []
        for name, part in reversed(self.started):
            log.info("stopping %s", name)
            part.stop()
            stopped.append(name)
        self.started.clear()
        if self.record:
            running.remove_record(self.settings.data_dir, os.getpid())
        return stopped


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # `make` gone (killed, its terminal closed): stop in order as on Ctrl-C.
    set_own_parent_death_signal(signal.SIGTERM)
    try:
        settings = Settings.from_env()
        other = running.stack_for(settings)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if other is not None:
        print(
            f"error: a stack already runs on these ports ({other.describe()}); stop it "
            "first, or give this one other ports (PG_PORT, TEMPORAL_PORT, ...)",
            file=sys.stderr,
        )
        return 2
    stack = Stack(settings, api=True, record=True, die_with_parent=True)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stack.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, request_stop)
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
        stopped = stack.stop()
        # The terminal may be gone (SIGHUP): the line is then for no one.
        with contextlib.suppress(OSError):
            data = stack.settings.data_dir
            print(f"stopped {', '.join(stopped) or 'nothing'}; data kept in {data}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
