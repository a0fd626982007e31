"""The platform simulator as a real subprocess, and helpers to steer it from tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.embedded import LOCALHOST, SimulatorProcess, free_port
from coupons.platforms.base import (
    BatchAction,
    BatchSpec,
    CouponUsedNotice,
    Platform,
    PlatformBatch,
)
from coupons.platforms.generic.adapter import RestPlatform


def simulator_process(
    data: Path,
    env: Mapping[str, str] | None = None,
    mode: str = "generic",
    *,
    port: int | None = None,
    host: str = LOCALHOST,
) -> SimulatorProcess:
    """A simulator child on its own port (or `port` of `host`), with no knobs or key from the
    developer's shell."""
    return SimulatorProcess(
        data,
        port if port is not None else free_port(),
        env,
        log_path=data.with_suffix(".log"),
        inherit_knobs=False,
        mode=mode,
        host=host,
    )


StartSimulator = Callable[..., SimulatorProcess]
# The wechat simulator of the tests: limits off, no registration wait (see wechat_simulator).
WECHAT_TEST_KNOBS = {"SIM_ENDPOINT_LIMITS": "false", "SIM_WECHAT_START_DELAY_S": "0"}


@pytest.fixture(scope="session")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """One simulator shared by the session; tests keep apart by using fresh keys and users."""
    yield from started_simulator(tmp_path_factory, "generic")


@pytest.fixture
def start_simulator(tmp_path: Path) -> Iterator[StartSimulator]:
    """A private simulator for tests that restart it or need their own environment."""
    started: list[SimulatorProcess] = []

    def start(env: Mapping[str, str] | None = None) -> SimulatorProcess:
        name = f"sim{len(started)}"
        process = simulator_process(tmp_path / f"{name}.sqlite3", env)
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
        """Every knob back to the simulator's start values."""
        response = await self.http.delete("/sim/knobs")
        response.raise_for_status()

    async def stats(self) -> dict[str, int]:
        response = await self.http.get("/sim/stats")
        response.raise_for_status()
        stats: dict[str, int] = response.json()
        return stats

    async def use(self, coupon_id: str) -> httpx.Response:
        return await self.http.post(f"/sim/coupons/{coupon_id}/use")

    async def change_batch(self, batch_id: str, **changes: Any) -> httpx.Response:
        """What the platform's operator does behind the service's back (budget, status)."""
        return await self.http.put(f"/sim/batches/{batch_id}", json=changes)


@asynccontextmanager
async def controlling(process: SimulatorProcess) -> AsyncIterator[SimControl]:
    """The control plane of `process`, its knobs reset before and after."""
    control = SimControl(process.url)
    await control.reset()
    try:
        yield control
    finally:
        await control.reset()
        await control.http.aclose()


@pytest.fixture
async def sim(simulator: SimulatorProcess) -> AsyncIterator[SimControl]:
    async with controlling(simulator) as control:
        yield control


def started_simulator(
    tmp_path_factory: pytest.TempPathFactory,
    mode: str,
    env: Mapping[str, str] | None = None,
    **where: Any,
) -> Iterator[SimulatorProcess]:
    """A simulator in `mode` in a fresh folder, started, then stopped when done; `where`
    (port, host) as `simulator_process` takes them."""
    process = simulator_process(
        tmp_path_factory.mktemp(mode) / "sim.sqlite3", env, mode=mode, **where
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def wechat_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """A simulator speaking WeChat Pay, one per test module (its keys made on first start).

    Its per-endpoint frequency limits are off and a new stock may start at once, so tests of
    other things are not held up by them; the tests of those rules turn them on."""
    yield from started_simulator(tmp_path_factory, "wechat", WECHAT_TEST_KNOBS)


@pytest.fixture(scope="module")
def alipay_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """A simulator speaking Alipay's gateway, one per test module."""
    yield from started_simulator(tmp_path_factory, "alipay")


@pytest.fixture
async def platform(sim: SimControl) -> AsyncIterator[RestPlatform]:
    adapter = RestPlatform(sim.url, timeout_s=5.0)
    try:
        yield adapter
    finally:
        await adapter.aclose()


def new_key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def batch_spec(
    quantity: int = 10,
    per_user_limit: int = 1,
    valid_days: int = 7,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
) -> BatchSpec:
    return BatchSpec(
        request_key=new_key("batch"),
        name="10 off 50",
        face_value_cents=1000,
        min_spend_cents=5000,
        quantity=quantity,
        valid_days=valid_days,
        per_user_limit=per_user_limit,
        starts_at=starts_at,
        ends_at=ends_at,
    )


async def running_batch(platform: Platform, spec: BatchSpec | None = None) -> PlatformBatch:
    """A batch that sends: created, then started, as a platform wants it."""
    batch = await platform.create_batch(spec if spec is not None else batch_spec())
    return await platform.change_batch(batch.batch_id, BatchAction.START)


def coupon_use(platform: Platform, headers: Mapping[str, str], body: bytes) -> CouponUsedNotice:
    """`verify_callback` of a notification the test knows is a coupon's use."""
    notice = platform.verify_callback(headers, body)
    assert notice is not None, "verified, but not a coupon's use"
    return notice
