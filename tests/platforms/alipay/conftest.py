"""Fixtures of the Alipay tests: the control plane of the module's simulator in alipay mode
(`alipay_simulator`, from tests/platforms/conftest.py), our adapter, a message receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from app.embedded import SimulatorProcess
from coupons.platforms.alipay.adapter import AlipayPlatform
from coupons.platforms.alipay.protocol import GATEWAY_PATH, SIM_PID, sim_app

from ..conftest import SimControl, controlling
from .support import Receiver


def gateway(process: SimulatorProcess) -> str:
    return process.url + GATEWAY_PATH


def adapter(
    process: SimulatorProcess,
    *,
    user_id_type: str = "open_id",
    timeout_s: float = 5.0,
    client: httpx.AsyncClient | None = None,
) -> AlipayPlatform:
    """Our adapter pointed at `process` with its test merchant, as the settings would make it."""
    return AlipayPlatform(
        gateway(process),
        sim_app(process.keys_dir),
        pid=SIM_PID,
        user_id_type=user_id_type,
        timeout_s=timeout_s,
        client=client,
    )


@pytest.fixture
async def control(alipay_simulator: SimulatorProcess) -> AsyncIterator[SimControl]:
    async with controlling(alipay_simulator) as control:
        yield control


@pytest.fixture
async def platform(
    alipay_simulator: SimulatorProcess, control: SimControl
) -> AsyncIterator[AlipayPlatform]:
    """The adapter naming users by user_id, as an app on the older ids does."""
    platform = adapter(alipay_simulator, user_id_type="user_id")
    try:
        yield platform
    finally:
        await platform.aclose()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    try:
        yield receiver
    finally:
        await receiver.close()
