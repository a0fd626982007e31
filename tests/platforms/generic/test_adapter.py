"""RestPlatform: how each kind of platform answer maps onto the `Platform` types and errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest

from coupons.platforms.base import (
    BatchAction,
    BatchStatus,
    Platform,
    PlatformBatch,
    PlatformBatchUnavailable,
    PlatformBudgetExhausted,
    PlatformCouponStatus,
    PlatformError,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
)
from coupons.platforms.generic.adapter import RestPlatform

from ..conftest import SimControl, StartSimulator, batch_spec, new_key, running_batch


async def test_success_maps_to_typed_results_with_raw_json(platform: RestPlatform) -> None:
    typed: Platform = platform  # RestPlatform satisfies the protocol (checked by mypy)
    batch = await running_batch(typed, batch_spec(valid_days=7))
    coupon = await typed.send_coupon(SendRequest(batch.batch_id, "typed", new_key("send")))

    assert batch.status is BatchStatus.RUNNING
    assert (batch.face_value_cents, batch.min_spend_cents, batch.per_user_limit) == (1000, 5000, 1)
    assert batch.raw["face_value_cents"] == 1000
    # The default window: from creation, for `valid_days`; no coupon outlives it.
    assert batch.starts_at.tzinfo is not None
    assert batch.ends_at - batch.starts_at == timedelta(days=7)
    assert coupon.status is PlatformCouponStatus.SENT
    assert coupon.sent_at.tzinfo is not None and coupon.valid_until.tzinfo is not None
    assert coupon.valid_until == batch.ends_at
    assert coupon.used_at is None
    assert coupon.raw["coupon_id"] == coupon.coupon_id


async def test_get_coupon_not_found_is_none(platform: RestPlatform) -> None:
    assert await platform.get_coupon("nobody", "cpn_nope") is None


async def test_error_rate_gives_unavailable_and_applies_nothing(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec())
    await sim.knobs(error_rate=1.0)
    before = await sim.stats()

    with pytest.raises(PlatformUnavailable) as unavailable:
        await platform.send_coupon(SendRequest(batch.batch_id, "err", new_key("send")))

    after = await sim.stats()
    assert unavailable.value.code == "SYSTEM_ERROR"
    assert after["errors_injected"] == before["errors_injected"] + 1
    assert after["coupons"] == before["coupons"]
    assert after["sends_applied"] == before["sends_applied"]
    assert (await platform.get_batch(batch.batch_id)).remaining == 10


async def test_ambiguous_timeout_gives_unavailable_but_the_send_was_applied(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec())
    request = SendRequest(batch.batch_id, "ambiguous", new_key("send"))
    await sim.knobs(ambiguous_rate=1.0, ambiguous_hang_s=1.0)
    before = await sim.stats()
    impatient = RestPlatform(sim.url, timeout_s=0.3)

    try:
        with pytest.raises(PlatformUnavailable) as unavailable:
            await impatient.send_coupon(request)
    finally:
        await impatient.aclose()
    assert unavailable.value.code == "TIMEOUT"
    assert (await sim.stats())["coupons"] == before["coupons"] + 1

    await sim.knobs(ambiguous_rate=0.0)
    resent = await platform.send_coupon(request)

    after = await sim.stats()
    assert after["sends_applied"] == before["sends_applied"] + 1
    assert after["sends_replayed"] == before["sends_replayed"] + 1
    seen = await platform.get_coupon("ambiguous", resent.coupon_id)
    assert seen is not None and seen.coupon_id == resent.coupon_id
    assert (await platform.get_batch(batch.batch_id)).remaining == 9


async def test_ambiguous_5xx_gives_unavailable_and_a_resend_returns_the_coupon(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec())
    request = SendRequest(batch.batch_id, "ambiguous5xx", new_key("send"))
    await sim.knobs(ambiguous_rate=1.0, ambiguous_mode="5xx")

    with pytest.raises(PlatformUnavailable) as unavailable:
        await platform.send_coupon(request)
    await sim.knobs(ambiguous_rate=0.0)
    first = await platform.send_coupon(request)
    again = await platform.send_coupon(request)

    assert unavailable.value.code == "SYSTEM_ERROR"
    assert first.coupon_id == again.coupon_id
    assert (await platform.get_batch(batch.batch_id)).remaining == 9


async def test_rate_limit_gives_rate_limited(platform: RestPlatform, sim: SimControl) -> None:
    batch = await platform.create_batch(batch_spec())
    await sim.knobs(rate_limit_per_s=3)

    answers = await asyncio.gather(
        *(platform.get_batch(batch.batch_id) for _ in range(10)), return_exceptions=True
    )

    limited = [answer for answer in answers if isinstance(answer, PlatformRateLimited)]
    served = [answer for answer in answers if isinstance(answer, PlatformBatch)]
    assert limited and served, answers
    assert len(limited) + len(served) == len(answers)
    assert {error.code for error in limited} == {"RATE_LIMITED"}


async def test_api_key_is_required_and_a_bad_key_is_retried_not_refused(
    start_simulator: StartSimulator,
) -> None:
    process = start_simulator(env={"PLATFORM_API_KEY": "s3cret-key"})
    anonymous = RestPlatform(process.url)
    wrong = RestPlatform(process.url, api_key="guess")
    right = RestPlatform(process.url, api_key="s3cret-key")
    try:
        # A missing or rotated key is an operator's problem, not the coupon's: retryable.
        with pytest.raises(PlatformUnavailable) as no_key:
            await anonymous.create_batch(batch_spec())
        with pytest.raises(PlatformUnavailable) as wrong_key:
            await wrong.get_batch("bat_any")
        batch = await right.create_batch(batch_spec())
        async with httpx.AsyncClient(base_url=process.url) as http:
            health = await http.get("/health")
    finally:
        for adapter in (anonymous, wrong, right):
            await adapter.aclose()

    assert no_key.value.code == wrong_key.value.code == "UNAUTHORIZED"
    assert batch.status is BatchStatus.CREATED
    assert health.status_code == 200
    assert "s3cret-key" not in process.log_path.read_text()


async def test_unreachable_platform_gives_unavailable() -> None:
    adapter = RestPlatform("http://127.0.0.1:9", timeout_s=1.0)
    try:
        with pytest.raises(PlatformUnavailable) as unavailable:
            await adapter.get_batch("bat_any")
    finally:
        await adapter.aclose()

    assert unavailable.value.code == "TRANSPORT_ERROR"


async def test_aclose_leaves_a_borrowed_client_open(sim: SimControl) -> None:
    async with httpx.AsyncClient() as client:
        adapter = RestPlatform(sim.url, client=client)
        await adapter.aclose()

        assert not client.is_closed
        assert await adapter.get_coupon("nobody", "cpn_nope") is None


@asynccontextmanager
async def answering(status: int, payload: dict[str, Any]) -> AsyncIterator[RestPlatform]:
    """An adapter whose platform answers every request with `payload`."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=payload))
    async with httpx.AsyncClient(transport=transport) as client:
        yield RestPlatform("http://platform.test", client=client)


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (409, "BATCH_NOT_RUNNING", PlatformRefused),
        (409, "BATCH_STATE_INVALID", PlatformRefused),
        (409, "BATCH_PAUSED", PlatformBatchUnavailable),
        (409, "BATCH_NOT_STARTED", PlatformBatchUnavailable),
        (409, "BUDGET_EXHAUSTED", PlatformBudgetExhausted),
        (429, "ANYTHING", PlatformRateLimited),
        # A known code with a status it never comes with: someone else answered, retry.
        (502, "BATCH_NOT_RUNNING", PlatformUnavailable),
        (403, "BATCH_PAUSED", PlatformUnavailable),
    ],
)
async def test_error_codes_map_by_status_and_code(
    status: int, code: str, error: type[PlatformError]
) -> None:
    async with answering(status, {"code": code, "message": "m"}) as adapter:
        with pytest.raises(PlatformError) as raised:
            await adapter.change_batch("bat_x", BatchAction.START)

    assert type(raised.value) is error
    assert raised.value.code == code


async def test_an_unknown_batch_status_is_an_unreadable_answer(platform: RestPlatform) -> None:
    batch = await platform.create_batch(batch_spec())
    # A platform that grew a status we do not know: the answer cannot be trusted as read.
    async with answering(200, {**batch.raw, "status": "archived"}) as adapter:
        with pytest.raises(PlatformUnavailable) as unreadable:
            await adapter.get_batch(batch.batch_id)

    assert unreadable.value.code == "BAD_RESPONSE"
