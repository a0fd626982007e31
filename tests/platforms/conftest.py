"""The platform simulator as a real subprocess, and helpers to steer it from tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from coupons.platforms.base import BatchSpec
from coupons.platforms.rest import RestPlatform
from coupons.platforms.simulator import Knobs

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SimulatorProcess:
    """One `python -m coupons.platforms.simulator` child; restartable on the same port and data."""

    def __init__(self, data: Path, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.data = data
        self.log = log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Tests start from known knobs and no auth, whatever the developer's shell exports.
        self._env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("SIM_") and key != "PLATFORM_API_KEY"
        }
        self._env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        )
        self._env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None, "already running"
        args = ["--port", str(self.port), "--data", str(self.data)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coupons.platforms.simulator", *args],
                cwd=ROOT,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"simulator exited at start:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"simulator not healthy in {START_TIMEOUT_S}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


StartSimulator = Callable[..., SimulatorProcess]


@pytest.fixture(scope="session")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """One simulator shared by the session; tests keep apart by using fresh keys and users."""
    tmp = tmp_path_factory.mktemp("simulator")
    process = SimulatorProcess(tmp / "sim.sqlite3", tmp / "sim.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def start_simulator(tmp_path: Path) -> Iterator[StartSimulator]:
    """A private simulator for tests that restart it or need their own environment."""
    started: list[SimulatorProcess] = []

    def start(env: Mapping[str, str] | None = None) -> SimulatorProcess:
        name = f"sim{len(started)}"
        process = SimulatorProcess(tmp_path / f"{name}.sqlite3", tmp_path / f"{name}.log", env)
        started.append(process)
        process.start()
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


class SimControl:
    """The /sim control plane, plus the shop till (`use`), which is not part of `Platform`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, timeout=5.0)

    async def knobs(self, **changes: Any) -> dict[str, Any]:
        response = await self.http.put("/sim/knobs", json=changes)
        response.raise_for_status()
        knobs: dict[str, Any] = response.json()
        return knobs

    async def reset(self) -> None:
        await self.knobs(**asdict(Knobs()))

    async def stats(self) -> dict[str, int]:
        response = await self.http.get("/sim/stats")
        response.raise_for_status()
        stats: dict[str, int] = response.json()
        return stats

    async def use(self, coupon_id: str) -> httpx.Response:
        return await self.http.post(f"/v1/coupons/{coupon_id}/use")


@pytest.fixture
async def sim(simulator: SimulatorProcess) -> AsyncIterator[SimControl]:
    control = SimControl(simulator.url)
    await control.reset()
    try:
        yield control
    finally:
        await control.reset()
        await control.http.aclose()


@pytest.fixture
async def platform(sim: SimControl) -> AsyncIterator[RestPlatform]:
    adapter = RestPlatform(sim.url, timeout_s=5.0)
    try:
        yield adapter
    finally:
        await adapter.aclose()


def new_key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def batch_spec(quantity: int = 10, per_user_limit: int = 1, valid_days: int = 7) -> BatchSpec:
    return BatchSpec(
        request_key=new_key("batch"),
        name="10 off 50",
        face_value_cents=1000,
        min_spend_cents=5000,
        quantity=quantity,
        valid_days=valid_days,
        per_user_limit=per_user_limit,
    )
