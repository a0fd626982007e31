"""What the Alipay tests share: a merchant's message receiver, users, and signed gateway calls
made by hand with our protocol functions."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from app.embedded import LOCALHOST
from coupons.platforms.alipay.protocol import (
    GATEWAY_PATH,
    SIM_PID,
    AlipayApp,
    format_time,
    response_key,
    rsa2_verify,
    top_level_members,
)

from ..conftest import new_key


class Receiver:
    """A merchant's app gateway address: records each POST's body and answers what `answer`
    says of it (Alipay's `success` by default)."""

    def __init__(self, answer: Callable[[bytes], bytes] = lambda body: b"success") -> None:
        self.bodies: asyncio.Queue[bytes] = asyncio.Queue()
        self._answer = answer
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://{LOCALHOST}:{port}/alipay/gateway"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            self.bodies.put_nowait(body)
            answer = self._answer(body)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )
            await writer.drain()
        finally:
            writer.close()

    async def next(self, timeout_s: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.bodies.get(), timeout_s)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def alipay_user() -> str:
    """A user_id the simulated Alipay knows (2088 and 12 digits)."""
    return f"2088{secrets.randbelow(10**12):012d}"


def open_id() -> str:
    """An open_id of the simulator's app (Alipay's look: "074a" and letters and digits)."""
    return f"074a{uuid.uuid4().hex}"


def activity_biz(**changes: Any) -> dict[str, Any]:
    """voucher.create's biz_content for 10 vouchers of 10 yuan off 50, valid 7 days after they
    are received, sent over the next 7 days; `changes` replace top-level fields."""
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "activity_name": "10 off 50",
        "out_biz_no": new_key("act"),
        "belong_merchant_info": {"merchant_id": SIM_PID, "merchant_id_type": "PID"},
        "publish_start_time": format_time(now),
        # Published longer than a voucher lasts: no voucher meets the window's end.
        "publish_end_time": format_time(now + timedelta(days=30)),
        "voucher_type": "FIX_VOUCHER",
        "voucher_send_rule": {
            "voucher_quantity": 10,
            "voucher_quantity_limit_per_user": 1,
            "voucher_quantity_limit_per_user_period_type": "LIFE_CYCLE",
        },
        "voucher_use_rule": {
            "fix_voucher": {"amount": "10.00", "floor_amount": "50.00"},
            "voucher_valid_period": {"type": "RELATIVE", "valid_days_after_receive": 7},
            "available_merchant": {"available_pids": [SIM_PID]},
        },
        "voucher_budget_info": {"budget_type": "NO_CASH", "amount": "100.00"},
        "voucher_display_info": {"brand_name": "Shop", "voucher_description": "10 off 50"},
        **changes,
    }


async def call(
    http: httpx.AsyncClient, params: dict[str, str]
) -> tuple[httpx.Response, dict[str, tuple[str, Any]]]:
    """POST signed gateway parameters; the answer and its members (exact text, value)."""
    response = await http.post(GATEWAY_PATH, data=params)
    return response, top_level_members(response.text)


def verified(app: AlipayApp, members: dict[str, tuple[str, Any]], method: str) -> dict[str, Any]:
    """The method's `_response` object, once Alipay's (the simulator's) signature holds."""
    text, answer = members[response_key(method)]
    assert rsa2_verify(app.alipay_public_key, text, members["sign"][1])
    assert isinstance(answer, dict)
    return answer
