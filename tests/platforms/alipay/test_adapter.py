"""AlipayPlatform against the simulator in alipay mode: the whole payment voucher flow, what the
adapter sends, how each Alipay answer maps onto the `Platform` types and errors, and what is
never believed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

from app.embedded import SimulatorProcess
from coupons.platforms.alipay.adapter import AlipayPlatform, error_for
from coupons.platforms.alipay.protocol import (
    ALIPAY_PRIVATE_KEY,
    USER_QUERY_VOUCHER,
    AlipayApp,
    epoch_ms,
    key_file,
    load_private_key,
    notify_sign_content,
    parse_time,
    response_key,
    response_text,
    rsa2_sign,
    sim_app,
)
from coupons.platforms.alipay.simulator import AlipayFace
from coupons.platforms.base import (
    BatchAction,
    BatchSpec,
    BatchStatus,
    CallbackRejected,
    FlowKind,
    FlowUnavailable,
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
from coupons.platforms.rsa_keys import new_rsa_key

from ..conftest import SimControl, batch_spec, coupon_use, running_batch
from .conftest import adapter, gateway
from .support import Receiver, alipay_user, open_id


def send_request(batch: PlatformBatch, user: str | None = None) -> SendRequest:
    # Our idempotency keys are 32 hex characters, Alipay's out_biz_no takes up to 64.
    return SendRequest(batch.batch_id, user or alipay_user(), uuid.uuid4().hex)


async def coupons_of(control: SimControl, batch_id: str) -> list[dict[str, Any]]:
    response = await control.http.get(f"/sim/batches/{batch_id}/coupons")
    response.raise_for_status()
    coupons: list[dict[str, Any]] = response.json()["coupons"]
    return coupons


def whole_second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


class _Recording(httpx.AsyncBaseTransport):
    """Passes requests on to the simulator and keeps each one's biz_content by method."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl((await request.aread()).decode()))
        self.sent.append((form["method"], json.loads(form["biz_content"])))
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


# ---------------------------------------------------------------- the whole flow


async def test_activity_publish_send_query_use_and_a_verified_message(
    platform: AlipayPlatform, control: SimControl, receiver: Receiver
) -> None:
    typed: Platform = platform  # AlipayPlatform satisfies the protocol (checked by mypy)
    await control.knobs(callback_url=await receiver.start(), lookup_lag_s=1.0)
    user = alipay_user()

    batch = await typed.create_batch(batch_spec(quantity=10, valid_days=7))
    started = await typed.change_batch(batch.batch_id, BatchAction.START)
    coupon = await typed.send_coupon(send_request(started, user))
    hidden = await typed.get_coupon(user, coupon.coupon_id)
    await asyncio.sleep(1.1)
    seen = await typed.get_coupon(user, coupon.coupon_id)
    used = await control.use(coupon.coupon_id)
    notice = coupon_use(
        typed, {"content-type": "application/x-www-form-urlencoded"}, await receiver.next()
    )
    after = await typed.get_coupon(user, coupon.coupon_id)

    # An activity is INIT until published: created, then running.
    assert (batch.status, started.status) == (BatchStatus.CREATED, BatchStatus.RUNNING)
    assert (batch.face_value_cents, batch.min_spend_cents, batch.quantity) == (1000, 5000, 10)
    assert (batch.valid_days, batch.remaining, batch.per_user_limit) == (7, 10, 1)
    assert batch.ends_at - batch.starts_at == timedelta(days=7)
    assert batch.starts_at.tzinfo is not None
    # Sent while the query lags: the voucher is real, its validity bounded from the activity.
    assert coupon.status is PlatformCouponStatus.SENT and coupon.raw["voucher_id"]
    assert hidden is None
    assert seen is not None and seen.coupon_id == coupon.coupon_id
    assert (seen.batch_id, seen.user_id, seen.status) == (
        batch.batch_id,
        user,
        PlatformCouponStatus.SENT,
    )
    assert whole_second(coupon.sent_at) <= seen.sent_at
    # Valid 7 days from its receipt; the simulator also never lets a voucher outlive its
    # activity's window (whether Alipay cuts RELATIVE validity there is unconfirmed), which a
    # send a second after creation can meet.
    assert seen.valid_until == min(seen.sent_at + timedelta(days=7), batch.ends_at)
    assert seen.used_at is None  # the voucher query publishes no use time
    assert used.status_code == 200
    assert (notice.platform_coupon_id, notice.batch_id, notice.user_id) == (
        coupon.coupon_id,
        batch.batch_id,
        user,
    )
    assert notice.notification_id == notice.raw["biz_content"]["id"]
    assert abs(notice.used_at - datetime.now(UTC)) < timedelta(seconds=10)
    assert after is not None and after.status is PlatformCouponStatus.USED
    assert (await typed.get_batch(batch.batch_id)).remaining == 9
    assert typed.callback_success == "success"  # what our receiver must answer Alipay


async def test_what_create_sends_names_the_merchant_the_window_and_the_rules(
    alipay_simulator: SimulatorProcess,
) -> None:
    recording = _Recording()
    client = httpx.AsyncClient(transport=recording)
    platform = adapter(alipay_simulator, client=client)
    spec = batch_spec(quantity=10, per_user_limit=2, valid_days=7)

    try:
        before = datetime.now(UTC).replace(microsecond=0)
        await platform.create_batch(spec)
    finally:
        await client.aclose()

    method, biz = recording.sent[0]
    assert method == "alipay.marketing.activity.voucher.create"
    assert biz["belong_merchant_info"] == {
        "merchant_id": "2088000000000001",
        "merchant_id_type": "PID",
    }
    assert biz["voucher_use_rule"]["available_merchant"] == {"available_pids": ["2088000000000001"]}
    assert biz["voucher_type"] == "FIX_VOUCHER"
    assert biz["voucher_budget_info"] == {"budget_type": "NO_CASH", "amount": "100.00"}
    assert biz["voucher_send_rule"] == {
        "voucher_quantity": 10,
        "voucher_quantity_limit_per_user": 2,
        "voucher_quantity_limit_per_user_period_type": "LIFE_CYCLE",
    }
    assert biz["voucher_use_rule"]["fix_voucher"] == {"amount": "10.00", "floor_amount": "50.00"}
    assert biz["voucher_use_rule"]["voucher_valid_period"] == {
        "type": "RELATIVE",
        "valid_days_after_receive": 7,
    }
    assert biz["voucher_display_info"]["brand_name"] == spec.name[:12]
    assert biz["voucher_display_info"]["voucher_description"]
    # Read as Beijing time (+08:00), the window starts now: it was written in Beijing time.
    starts = parse_time(biz["publish_start_time"])
    assert before <= starts <= datetime.now(UTC)
    assert parse_time(biz["publish_end_time"]) - starts == timedelta(days=7)
    assert biz["out_biz_no"] == spec.request_key


async def test_a_default_window_is_at_most_180_days_and_a_retry_repeats_it(
    platform: AlipayPlatform,
) -> None:
    spec = batch_spec(valid_days=365)

    first = await platform.create_batch(spec)
    await asyncio.sleep(1.1)  # a window from the clock would differ by now
    again = await platform.create_batch(spec)

    assert first.batch_id == again.batch_id
    assert first.ends_at - first.starts_at == timedelta(days=180)
    assert first.valid_days == 365  # validity runs from receipt, not from the window


async def test_users_are_named_by_the_configured_field_never_by_their_shape(
    alipay_simulator: SimulatorProcess, control: SimControl
) -> None:
    by_open_id = adapter(alipay_simulator, user_id_type="open_id")
    by_user_id = adapter(alipay_simulator, user_id_type="user_id")
    try:
        batch = await running_batch(by_open_id)
        # Shaped like a user_id, configured as open_ids: sent as an open_id.
        numeric = f"2088{uuid.uuid4().int % 10**12:012d}"
        as_open_id = await by_open_id.send_coupon(send_request(batch, numeric))
        named = await by_open_id.send_coupon(send_request(batch, open_id()))
        seen = await by_open_id.get_coupon(named.user_id, named.coupon_id)
        # A name that is no user_id, sent as a user_id: Alipay knows no such user.
        with pytest.raises(PlatformRefused) as unknown:
            await by_user_id.send_coupon(send_request(batch, "ann"))
        with pytest.raises(PlatformRefused) as bad_open_id:
            await by_open_id.send_coupon(send_request(batch, "not an open id"))
    finally:
        await by_open_id.aclose()
        await by_user_id.aclose()

    assert as_open_id.user_id == numeric and named.coupon_id != as_open_id.coupon_id
    assert seen is not None and seen.user_id == named.user_id
    assert unknown.value.code == "INVALID_PARAMETER"
    assert bad_open_id.value.code == "openid-error"
    assert len(await coupons_of(control, batch.batch_id)) == 2
    with pytest.raises(ValueError, match="user_id_type"):
        adapter(alipay_simulator, user_id_type="uid")


async def test_create_batch_is_idempotent_by_request_key(platform: AlipayPlatform) -> None:
    spec = batch_spec(quantity=5)

    first = await platform.create_batch(spec)
    again = await platform.create_batch(spec)
    with pytest.raises(PlatformRefused) as reused:
        await platform.create_batch(
            BatchSpec(spec.request_key, spec.name, 2000, 5000, 5, spec.valid_days)
        )

    assert first.batch_id == again.batch_id
    # An out_biz_no reused with other parameters: Alipay publishes no own code for it.
    assert reused.value.code == "INVALID_PARAMETER"


async def test_a_batch_breaking_a_published_limit_is_refused(platform: AlipayPlatform) -> None:
    with pytest.raises(PlatformRefused) as too_much:
        await platform.create_batch(
            BatchSpec("too-much", "big", 300_001, 0, quantity=1, valid_days=7)
        )
    starts = whole_second(datetime.now(UTC))
    with pytest.raises(PlatformRefused) as too_long:
        await platform.create_batch(
            batch_spec(starts_at=starts, ends_at=starts + timedelta(days=181))
        )

    assert too_much.value.code == too_long.value.code == "INVALID_PARAMETER"
    assert "3000" in too_much.value.message and "180" in too_long.value.message


async def test_an_explicit_window_is_kept_and_sends_wait_until_it_opens(
    platform: AlipayPlatform,
) -> None:
    starts_at = whole_second(datetime.now(UTC) + timedelta(days=1))
    spec = batch_spec(starts_at=starts_at, ends_at=starts_at + timedelta(days=3))

    batch = await running_batch(platform, spec)
    with pytest.raises(PlatformBatchUnavailable) as waiting:
        await platform.send_coupon(send_request(batch))

    assert (batch.starts_at, batch.ends_at) == (starts_at, starts_at + timedelta(days=3))
    assert batch.status is BatchStatus.RUNNING
    assert waiting.value.code == "ACTIVITY_NOT_START"
    assert not isinstance(waiting.value, PlatformBudgetExhausted)


# ---------------------------------------------------------------- errors


async def _cut_budget(control: SimControl, batch: PlatformBatch, user: str) -> None:
    (await control.change_batch(batch.batch_id, remaining=0)).raise_for_status()


async def _pause(control: SimControl, batch: PlatformBatch, user: str) -> None:
    (await control.change_batch(batch.batch_id, status="paused")).raise_for_status()


async def _stop(control: SimControl, batch: PlatformBatch, user: str) -> None:
    (await control.change_batch(batch.batch_id, status="stopped")).raise_for_status()


async def _expire(control: SimControl, batch: PlatformBatch, user: str) -> None:
    (await control.change_batch(batch.batch_id, status="expired")).raise_for_status()


async def _restrict(control: SimControl, batch: PlatformBatch, user: str) -> None:
    await control.knobs(restricted_users=[user])


async def _fail(control: SimControl, batch: PlatformBatch, user: str) -> None:
    await control.knobs(error_rate=1.0)


Setup = Callable[[SimControl, PlatformBatch, str], Awaitable[None]]


@pytest.mark.parametrize(
    ("setup", "kind", "code"),
    [
        (_cut_budget, PlatformBudgetExhausted, "BUDGET_NOT_ENOUGH"),
        (_pause, PlatformBatchUnavailable, "ACTIVITY_NOT_ACTIVE"),
        (_restrict, PlatformRefused, "INVALID_PARAMETER"),
        (_stop, PlatformRefused, "ACTIVITY_IS_STOPED"),
        (_expire, PlatformRefused, "ACTIVITY_IS_END"),
        (_fail, PlatformUnavailable, "SYSTEM_ERROR"),
    ],
    ids=["budget", "paused", "restricted-user", "stopped", "ended", "system-error"],
)
async def test_each_refusal_of_a_send_maps_to_its_error(
    platform: AlipayPlatform,
    control: SimControl,
    setup: Setup,
    kind: type[PlatformError],
    code: str,
) -> None:
    batch = await running_batch(platform)
    request = send_request(batch)
    await setup(control, batch, request.user_id)
    before = await control.stats()

    with pytest.raises(PlatformError) as refused:
        await platform.send_coupon(request)

    assert type(refused.value) is kind
    assert refused.value.code == code
    assert (await control.stats())["coupons"] == before["coupons"]


async def test_an_unpublished_activity_makes_sends_wait(platform: AlipayPlatform) -> None:
    batch = await platform.create_batch(batch_spec())

    with pytest.raises(PlatformBatchUnavailable) as waiting:
        await platform.send_coupon(send_request(batch))

    assert waiting.value.code == "ACTIVITY_NOT_ACTIVE"


async def test_the_per_user_limit_is_alipays_and_refuses_a_second_voucher(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec(per_user_limit=1))
    user = alipay_user()
    await platform.send_coupon(send_request(batch, user))

    with pytest.raises(PlatformRefused) as limited:
        await platform.send_coupon(send_request(batch, user))

    assert limited.value.code == "COUNT_OVER_LIMIT"
    assert len(await coupons_of(control, batch.batch_id)) == 1


async def test_an_unknown_activity_is_refused(platform: AlipayPlatform) -> None:
    with pytest.raises(PlatformRefused) as unknown_get:
        await platform.get_batch("20990101000000000000000000")
    with pytest.raises(PlatformRefused) as unknown_send:
        await platform.send_coupon(
            SendRequest("20990101000000000000000000", alipay_user(), uuid.uuid4().hex)
        )

    assert unknown_get.value.code == unknown_send.value.code == "INVALID_PARAMETER"


async def test_an_out_biz_no_reused_for_another_user_is_refused(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform)
    request = send_request(batch)
    await platform.send_coupon(request)

    with pytest.raises(PlatformRefused) as reused:
        await platform.send_coupon(
            SendRequest(batch.batch_id, alipay_user(), request.idempotency_key)
        )

    assert reused.value.code == "INVALID_PARAMETER"
    assert len(await coupons_of(control, batch.batch_id)) == 1


async def test_the_frequency_limit_gives_rate_limited(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await platform.create_batch(batch_spec())
    await control.knobs(rate_limit_per_s=1)

    with pytest.raises(PlatformRateLimited) as limited:
        for _ in range(3):
            await platform.get_batch(batch.batch_id)

    assert limited.value.code == "isv.app-call-limited"


async def test_a_failing_lookup_is_unavailable_never_none_and_never_fails_the_send(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform)
    await control.knobs(lookup_error_status=503)

    coupon = await platform.send_coupon(send_request(batch))
    with pytest.raises(PlatformUnavailable) as failing:
        await platform.get_coupon(coupon.user_id, coupon.coupon_id)

    assert coupon.status is PlatformCouponStatus.SENT
    assert failing.value.code == "HTTP_503"


async def test_another_users_voucher_is_not_this_users(platform: AlipayPlatform) -> None:
    batch = await running_batch(platform)
    coupon = await platform.send_coupon(send_request(batch))

    assert await platform.get_coupon(alipay_user(), coupon.coupon_id) is None


async def test_a_voucher_past_its_validity_reads_expired(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec(valid_days=7))
    coupon = await platform.send_coupon(send_request(batch))
    await control.knobs(clock_offset_s=8 * 86_400)

    seen = await platform.get_coupon(coupon.user_id, coupon.coupon_id)

    assert seen is not None and seen.status is PlatformCouponStatus.EXPIRED


async def test_an_ambiguous_5xx_then_a_resend_gives_one_voucher(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform)
    request = send_request(batch)
    await control.knobs(ambiguous_rate=1.0, ambiguous_mode="5xx")

    with pytest.raises(PlatformUnavailable) as ambiguous:
        await platform.send_coupon(request)
    await control.knobs(ambiguous_rate=0.0)
    first = await platform.send_coupon(request)
    again = await platform.send_coupon(request)

    assert ambiguous.value.code == "SYSTEM_ERROR"
    assert first.coupon_id == again.coupon_id
    assert [coupon["coupon_id"] for coupon in await coupons_of(control, batch.batch_id)] == [
        first.coupon_id
    ]
    assert (await platform.get_batch(batch.batch_id)).remaining == 9


async def test_an_ambiguous_timeout_then_a_resend_gives_one_voucher(
    alipay_simulator: SimulatorProcess, platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform)
    request = send_request(batch)
    await control.knobs(ambiguous_rate=1.0, ambiguous_hang_s=1.0)
    impatient = adapter(alipay_simulator, user_id_type="user_id", timeout_s=0.3)

    try:
        with pytest.raises(PlatformUnavailable) as timed_out:
            await impatient.send_coupon(request)
    finally:
        await impatient.aclose()
    await control.knobs(ambiguous_rate=0.0)
    resent = await platform.send_coupon(request)

    assert timed_out.value.code == "TIMEOUT"
    assert [coupon["coupon_id"] for coupon in await coupons_of(control, batch.batch_id)] == [
        resent.coupon_id
    ]


# ---------------------------------------------------------------- batch actions and flows


async def test_activities_cannot_pause_or_resume_and_stop_ends_them(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform)
    await platform.send_coupon(send_request(batch))

    refusals = []
    for action in (BatchAction.PAUSE, BatchAction.RESUME):
        with pytest.raises(PlatformRefused) as refused:
            await platform.change_batch(batch.batch_id, action)
        refusals.append(refused.value.code)
    started_again = await platform.change_batch(batch.batch_id, BatchAction.START)
    stopped = await platform.change_batch(batch.batch_id, BatchAction.STOP)
    stopped_again = await platform.change_batch(batch.batch_id, BatchAction.STOP)
    with pytest.raises(PlatformRefused) as restart:
        await platform.change_batch(batch.batch_id, BatchAction.START)

    assert refusals == ["ACTION_UNSUPPORTED", "ACTION_UNSUPPORTED"]
    assert started_again.status is BatchStatus.RUNNING  # publishing twice is a no-op
    # Unlike the older family's template delete, stop ends an activity that has sent.
    assert stopped.status is stopped_again.status is BatchStatus.STOPPED
    assert restart.value.code == "ACTION_UNSUPPORTED"


async def test_a_paused_activity_reads_paused_and_cannot_be_resumed_by_a_call(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform)
    (await control.change_batch(batch.batch_id, status="paused")).raise_for_status()

    paused = await platform.get_batch(batch.batch_id)
    with pytest.raises(PlatformRefused) as start:
        await platform.change_batch(batch.batch_id, BatchAction.START)

    assert paused.status is BatchStatus.PAUSED
    assert "resume" in start.value.message


async def test_an_activity_past_its_window_reads_expired_not_stopped(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await running_batch(platform)
    (await control.change_batch(batch.batch_id, status="expired")).raise_for_status()

    over = await platform.get_batch(batch.batch_id)

    assert over.raw["activity_status"] == "FINISHED"
    assert over.status is BatchStatus.EXPIRED


@pytest.mark.parametrize("kind", list(FlowKind))
async def test_alipay_publishes_no_flow_files(platform: AlipayPlatform, kind: FlowKind) -> None:
    with pytest.raises(FlowUnavailable):
        await platform.batch_flow("20990101000000000000000000", kind)


# ---------------------------------------------------------------- what is never believed


async def test_an_answer_failing_alipays_signature_is_not_believed(
    alipay_simulator: SimulatorProcess, platform: AlipayPlatform
) -> None:
    batch = await platform.create_batch(batch_spec())
    app = sim_app(alipay_simulator.keys_dir)
    # Alipay's public key as configured is not the one that signed the answer.
    misconfigured = AlipayPlatform(
        gateway(alipay_simulator),
        AlipayApp(app.app_id, app.private_key, new_rsa_key().public_key()),
        pid="2088000000000001",
    )

    try:
        with pytest.raises(PlatformUnavailable) as refused:
            await misconfigured.get_batch(batch.batch_id)
    finally:
        await misconfigured.aclose()

    assert refused.value.code == "BAD_SIGNATURE"


class _TamperingTransport(httpx.AsyncBaseTransport):
    """Rewrites the simulator's genuine answer: the fault forced at one exact point."""

    def __init__(self, old: bytes, new: bytes, rewrite: Callable[[bytes], bytes] | None = None):
        self._inner = httpx.AsyncHTTPTransport()
        self._old, self._new = old, new
        self._rewrite = rewrite

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        content = await response.aread()
        assert self._old in content
        content = content.replace(self._old, self._new)
        return httpx.Response(
            response.status_code,
            headers={"content-type": response.headers["content-type"]},
            content=self._rewrite(content) if self._rewrite else content,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_tampered_answer_is_not_believed(
    alipay_simulator: SimulatorProcess, platform: AlipayPlatform
) -> None:
    batch = await platform.create_batch(batch_spec(quantity=10))
    client = httpx.AsyncClient(
        transport=_TamperingTransport(b'"voucher_quantity":10', b'"voucher_quantity":99')
    )
    tampered = adapter(alipay_simulator, client=client)

    try:
        with pytest.raises(PlatformUnavailable) as refused:
            await tampered.get_batch(batch.batch_id)
    finally:
        await client.aclose()

    assert refused.value.code == "BAD_SIGNATURE"


def _unsigned(content: bytes) -> bytes:
    members = json.loads(content)
    members.pop("sign")
    return json.dumps(members).encode()


@pytest.mark.parametrize("code", [b'"10000"', b"10000"], ids=["string code", "number code"])
async def test_an_answer_stripped_of_its_signature_is_not_believed(
    alipay_simulator: SimulatorProcess, platform: AlipayPlatform, code: bytes
) -> None:
    """Only the gateway's own refusals may come unsigned: a success without a signature, even
    one whose code is a number rather than the string Alipay sends, is not believed."""
    batch = await platform.create_batch(batch_spec())
    client = httpx.AsyncClient(
        transport=_TamperingTransport(b'"code":"10000"', b'"code":' + code, _unsigned)
    )
    stripped = adapter(alipay_simulator, client=client)

    try:
        with pytest.raises(PlatformUnavailable) as refused:
            await stripped.get_batch(batch.batch_id)
    finally:
        await client.aclose()

    assert refused.value.code == "UNSIGNED_RESPONSE"


async def test_an_unsigned_refusal_is_retried_never_definitive(
    alipay_simulator: SimulatorProcess, platform: AlipayPlatform, control: SimControl
) -> None:
    """A refusal that would fail a coupon for good counts only when Alipay signed it: stripped
    of its signature, a stop's ACTIVITY_IS_STOPED, even dressed as a gateway code, is retried."""
    batch = await running_batch(platform)
    await control.change_batch(batch.batch_id, status="stopped")
    client = httpx.AsyncClient(
        transport=_TamperingTransport(b'"code":"40004"', b'"code":"40002"', _unsigned)
    )
    stripped = adapter(alipay_simulator, user_id_type="user_id", client=client)

    try:
        with pytest.raises(PlatformError) as refused:
            await stripped.send_coupon(send_request(batch))
    finally:
        await client.aclose()

    assert type(refused.value) is PlatformUnavailable
    assert refused.value.code == "ACTIVITY_IS_STOPED"


class _Answering(httpx.AsyncBaseTransport):
    """Answers every call with `payload`, signed with the simulated Alipay's key."""

    def __init__(self, key_dir: Any, method: str, payload: dict[str, Any]) -> None:
        self._key = load_private_key(key_file(key_dir, ALIPAY_PRIVATE_KEY).read_bytes())
        self._text = response_text(response_key(method), payload, self._key)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=self._text.encode())


@pytest.mark.parametrize("status", ["REFUNDED", "DISABLED", ""])
async def test_a_voucher_status_alipay_does_not_publish_is_unreadable_not_guessed(
    alipay_simulator: SimulatorProcess, status: str
) -> None:
    payload = {
        "code": "10000",
        "msg": "Success",
        "activity_id": "20260101000000000000000001",
        "voucher_status": status,
        "create_time": "2026-01-01 10:00:00",
        "available_end_time": "2026-01-08 10:00:00",
    }
    client = httpx.AsyncClient(
        transport=_Answering(alipay_simulator.keys_dir, USER_QUERY_VOUCHER, payload)
    )
    odd = adapter(alipay_simulator, client=client)

    try:
        with pytest.raises(PlatformUnavailable) as unreadable:
            await odd.get_coupon(open_id(), "2026010100000000000000abcdef")
    finally:
        await client.aclose()

    assert unreadable.value.code == "BAD_RESPONSE"


async def test_our_request_signed_with_a_wrong_key_is_refused_by_the_gateway(
    alipay_simulator: SimulatorProcess, control: SimControl
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    wrong = AlipayPlatform(
        gateway(alipay_simulator),
        AlipayApp(app.app_id, new_rsa_key(), app.alipay_public_key),
        pid="2088000000000001",
    )
    before = await control.stats()

    try:
        with pytest.raises(PlatformUnavailable) as refused:
            await wrong.create_batch(batch_spec())
    finally:
        await wrong.aclose()

    # Retried, not a refusal: it says our key is wrong, nothing about the batch.
    assert refused.value.code == "isv.invalid-signature"
    assert (await control.stats())["batches"] == before["batches"]


# ---------------------------------------------------------------- the used message


async def _genuine_message(
    platform: AlipayPlatform, control: SimControl, receiver: Receiver
) -> bytes:
    await control.knobs(callback_url=await receiver.start())
    batch = await running_batch(platform)
    coupon = await platform.send_coupon(send_request(batch))
    (await control.use(coupon.coupon_id)).raise_for_status()
    return await receiver.next()


def _resigned(simulator: SimulatorProcess, body: bytes, **changes: str) -> bytes:
    """The message with `changes`, signed again with Alipay's (the simulator's) key."""
    key = load_private_key(key_file(simulator.keys_dir, ALIPAY_PRIVATE_KEY).read_bytes())
    fields = {**dict(parse_qsl(body.decode())), **changes}
    fields.pop("sign")
    fields["sign"] = rsa2_sign(key, notify_sign_content(fields))
    return urlencode(fields).encode()


def _changed(body: bytes, **changes: str) -> bytes:
    return urlencode({**dict(parse_qsl(body.decode())), **changes}).encode()


def _biz_changed(body: bytes, **changes: str) -> str:
    biz = json.loads(dict(parse_qsl(body.decode()))["biz_content"])
    return json.dumps({**biz, **changes}, separators=(",", ":"))


async def test_messages_that_must_not_be_believed_are_rejected(
    alipay_simulator: SimulatorProcess,
    platform: AlipayPlatform,
    control: SimControl,
    receiver: Receiver,
) -> None:
    body = await _genuine_message(platform, control, receiver)
    fields = dict(parse_qsl(body.decode()))
    sign = fields["sign"]
    long_ago = epoch_ms(datetime.now(UTC) - timedelta(hours=26))
    ahead = epoch_ms(datetime.now(UTC) + timedelta(hours=26))
    cases = {
        "tampered voucher": _changed(
            body, biz_content=_biz_changed(body, voucher_id="2026000000000000000000000000")
        ),
        "tampered signature": _changed(
            body, sign=sign[:30] + ("A" if sign[30] != "A" else "B") + sign[31:]
        ),
        "no signature": urlencode({k: v for k, v in fields.items() if k != "sign"}).encode(),
        "rsa1": _changed(body, sign_type="RSA"),
        "stale": _resigned(alipay_simulator, body, utc_timestamp=long_ago),
        "from the future": _resigned(alipay_simulator, body, utc_timestamp=ahead),
        "garbled time": _resigned(alipay_simulator, body, utc_timestamp="2026-01-01 00:00:00"),
        "another app": _resigned(alipay_simulator, body, app_id="2021000000009999"),
        "biz not JSON": _resigned(alipay_simulator, body, biz_content="voucher_id=1"),
        "no event id": _resigned(alipay_simulator, body, biz_content=_biz_changed(body, id="")),
        "a field twice": body + b"&notify_id=x",
        "not a form": b"\xff\xfe",
    }

    accepted = platform.verify_callback({}, body)
    assert accepted is not None
    # Genuine, about something else: taken and ignored (None), not rejected.
    expired = _resigned(
        alipay_simulator, body, msg_method="alipay.marketing.activity.message.expired"
    )
    assert platform.verify_callback({}, expired) is None
    # The message page's example writes the sign type in lower case.
    assert platform.verify_callback({}, _resigned(alipay_simulator, body, sign_type="rsa2"))
    reasons = {}
    for name, forged in cases.items():
        with pytest.raises(CallbackRejected) as rejected:
            platform.verify_callback({}, forged)
        reasons[name] = rejected.value.reason

    biz = json.loads(fields["biz_content"])
    # The dedup id is the event's id, not the delivery's notify_id.
    assert accepted.notification_id == biz["id"] != fields["notify_id"]
    assert accepted.used_at.timestamp() == int(biz["event_time"]) / 1000
    assert reasons["tampered voucher"] == reasons["tampered signature"] == "bad signature"
    assert reasons["no signature"] == "missing sign"
    assert reasons["rsa1"].startswith("sign_type")
    assert reasons["stale"].startswith("stale")
    assert reasons["from the future"].startswith("from the future")
    assert reasons["garbled time"] == "garbled utc_timestamp"
    assert reasons["another app"].startswith("for another app")
    assert reasons["biz not JSON"].startswith("unreadable message")
    assert reasons["no event id"].startswith("unreadable message")
    assert "twice" in reasons["a field twice"]
    assert reasons["not a form"].startswith("unparseable")


async def test_forged_probes_are_rejected_and_genuine_messages_taken(
    alipay_simulator: SimulatorProcess, control: SimControl
) -> None:
    platform = adapter(alipay_simulator, user_id_type="user_id")
    verdicts: list[str] = []

    def answer(body: bytes) -> bytes:
        try:
            platform.verify_callback({}, body)
        except CallbackRejected as exc:
            verdicts.append(exc.reason)
            return b"fail"
        verdicts.append("accepted")
        return b"success"

    receiver = Receiver(answer)
    try:
        await control.knobs(callback_url=await receiver.start(), callback_forged_rate=1.0)
        batch = await running_batch(platform)
        for _ in range(2):  # the probes alternate: a wrong key, then a tampered event id
            coupon = await platform.send_coupon(send_request(batch))
            (await control.use(coupon.coupon_id)).raise_for_status()
            for _ in range(2):
                await receiver.next()
        stats = await control.stats()
    finally:
        await receiver.close()
        await platform.aclose()

    assert sorted(verdicts) == ["accepted", "accepted", "bad signature", "bad signature"]
    assert stats["callbacks_forged_sent"] >= 2
    assert stats["callbacks_forged_accepted"] == 0


def test_a_redelivery_stamped_afresh_is_taken_where_the_stored_one_is_stale(
    alipay_simulator: SimulatorProcess,
) -> None:
    face = AlipayFace(alipay_simulator.keys_dir)  # in-process, with the simulator's keys
    platform = adapter(alipay_simulator)
    used_at = datetime.now(UTC).isoformat()
    coupon = {"coupon_id": "V1", "batch_id": "A1", "user_id": open_id(), "used_at": used_at}
    long_ago = epoch_ms(datetime.now(UTC) - timedelta(hours=26))
    stored = _resigned(
        alipay_simulator,
        face.notification("ntf_1", coupon, datetime.now(UTC)),
        utc_timestamp=long_ago,
    )

    with pytest.raises(CallbackRejected) as stale:
        platform.verify_callback({}, stored)
    fresh = coupon_use(platform, {}, face.delivery_body(stored))

    assert stale.value.reason.startswith("stale")
    assert (fresh.notification_id, fresh.platform_coupon_id) == ("used_V1", "V1")
    assert fresh.user_id == coupon["user_id"]


def test_reprs_show_no_key(alipay_simulator: SimulatorProcess) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    platform = adapter(alipay_simulator)

    shown = repr(platform) + repr(app)

    assert app.app_id in shown
    assert "Key" not in shown and "BEGIN" not in shown and "0x" not in shown


# ---------------------------------------------------------------- the error table


@pytest.mark.parametrize(
    ("code", "sub_code", "sub_msg", "kind"),
    [
        ("40004", "BUDGET_NOT_ENOUGH", "", PlatformBudgetExhausted),
        ("40004", "unknown-sub-code", "未知的错误码BUDGET_NOT_ENOUGH", PlatformBudgetExhausted),
        ("40004", "ACTIVITY_NOT_ACTIVE", "", PlatformBatchUnavailable),
        ("40004", "ACTIVITY_NOT_START", "", PlatformBatchUnavailable),
        ("40004", "ACTIVITY_IS_END", "", PlatformRefused),
        ("40004", "ACTIVITY_IS_STOPED", "", PlatformRefused),
        ("40004", "COUNT_OVER_LIMIT", "", PlatformRefused),
        ("40004", "INVALID_PARAMETER", "", PlatformRefused),
        ("40004", "VOUCHER_NOT_EXIST", "", PlatformRefused),
        ("40004", "BIZ_ERROR", "", PlatformRefused),
        ("40004", "BUSINESS_HAS_RISK", "", PlatformRefused),
        ("40004", "openid-error", "", PlatformRefused),
        ("40002", "isv.openid-error", "", PlatformRefused),
        ("40004", "SYSTEM_ERROR", "", PlatformUnavailable),
        ("40004", "MATERIAL_AUDIT_WAITING", "", PlatformUnavailable),
        ("40004", "ACTIVITY_NOT_PERMISSION", "", PlatformUnavailable),
        ("40004", "MERCHANT_RELATION_NOT_EXIST", "", PlatformUnavailable),
        ("40004", "SOMETHING_NEW", "", PlatformUnavailable),
        ("40004", "unknown-sub-code", "系统繁忙", PlatformUnavailable),
        ("20000", "isp.unknow-error", "", PlatformUnavailable),
        ("20000", "aop.unknow-error", "", PlatformUnavailable),
        ("40002", "isv.invalid-signature", "", PlatformUnavailable),
        ("40002", "isv.invalid-app-id", "", PlatformUnavailable),
        ("40006", "isv.insufficient-isv-permissions", "", PlatformUnavailable),
        ("40005", "isv.method-call-limited", "", PlatformRateLimited),
        ("40005", "isv.app-call-limited", "", PlatformRateLimited),
    ],
)
def test_the_error_table(code: str, sub_code: str, sub_msg: str, kind: type[PlatformError]) -> None:
    error = error_for(code, "msg", sub_code, sub_msg)
    unsigned = error_for(code, "msg", sub_code, sub_msg, signed=False)

    assert type(error) is kind
    expected = sub_code
    if sub_msg.startswith("未知的错误码"):
        expected = sub_msg.removeprefix("未知的错误码")  # the code behind the wrapper
    if expected == "isv.openid-error":
        expected = "openid-error"  # either spelling, read as one
    assert error.code == expected
    # Unsigned, nothing is definitive or makes a coupon wait: it is retried (a frequency limit
    # still backs off).
    assert type(unsigned) is (
        PlatformRateLimited if kind is PlatformRateLimited else PlatformUnavailable
    )
