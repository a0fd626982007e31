"""Fixtures of the WeChat Pay tests: the test merchant and the platform's keys of the
module's simulator in wechat mode (`wechat_simulator`, from tests/platforms/conftest.py), its
control plane, our adapter, and a receiver of notifications."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from app.embedded import SimulatorProcess
from coupons.platforms.base import CallbackRejected
from coupons.platforms.wechat.adapter import WechatPayPlatform
from coupons.platforms.wechat.protocol import (
    PlatformKeys,
    WechatMerchant,
    load_platform_keys,
    sim_merchant,
)

from ..conftest import SimControl, controlling


@pytest.fixture(scope="module")
def merchant(wechat_simulator: SimulatorProcess) -> WechatMerchant:
    return sim_merchant(wechat_simulator.keys_dir)


@pytest.fixture(scope="module")
def platform_keys(wechat_simulator: SimulatorProcess) -> PlatformKeys:
    return load_platform_keys(wechat_simulator.keys_dir)


@pytest.fixture
async def control(wechat_simulator: SimulatorProcess) -> AsyncIterator[SimControl]:
    async with controlling(wechat_simulator) as control:
        yield control


@pytest.fixture
async def adapter(
    wechat_simulator: SimulatorProcess, merchant: WechatMerchant, control: SimControl
) -> AsyncIterator[WechatPayPlatform]:
    platform = WechatPayPlatform(wechat_simulator.url, merchant)
    try:
        yield platform
    finally:
        await platform.aclose()


@dataclass
class Received:
    headers: dict[str, str]  # names lowercased
    body: bytes
    status: int | None = None


Answer = Callable[[Received], Awaitable[int]]


async def ok(_: Received) -> int:
    return 200


def verifying(adapter: WechatPayPlatform) -> Answer:
    """A correct receiver: 200 only for what verifies."""

    async def answer(request: Received) -> int:
        try:
            adapter.verify_callback(request.headers, request.body)
        except CallbackRejected:
            return 401
        return 200

    return answer


@dataclass
class Receiver:
    """A tiny HTTP/1.1 server on a free port that records each request and answers it."""

    answer: Answer = ok
    received: list[Received] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/callbacks/wechat"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Received(headers, body)
            request.status = await self.answer(request)
            self.received.append(request)
            head = f"HTTP/1.1 {request.status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            writer.write(head.encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def at_least(items: list[Received], count: int) -> bool:
    return len(items) >= count


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10) -> None:
    """Until `check` (sync or async) holds, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
