"""WechatPayPlatform against the simulator in wechat mode, over real HTTP: the whole flow
with its callback, every mapped refusal, an ambiguous send, flows, answers that must not be
believed (faults forced at one exact point by a transport that alters one answer), and
notifications that must be rejected."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import pytest

from app.embedded import SimulatorProcess
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
    PlatformNotReady,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
    verified_notice,
)
from coupons.platforms.rsa_keys import new_rsa_key
from coupons.platforms.wechat.adapter import WechatPayPlatform, _error_for
from coupons.platforms.wechat.protocol import (
    PlatformKeys,
    WechatMerchant,
    aead_encrypt,
    json_body,
    rfc3339,
    signed_headers,
    sim_merchant,
)

from ..conftest import SimControl, batch_spec, coupon_use, new_key
from .conftest import Receiver, at_least, eventually, verifying


async def running(adapter: WechatPayPlatform, spec: BatchSpec | None = None) -> PlatformBatch:
    batch = await adapter.create_batch(spec or batch_spec())
    return await adapter.change_batch(batch.batch_id, BatchAction.START)


def send(batch: PlatformBatch, user: str | None = None) -> SendRequest:
    return SendRequest(batch.batch_id, user or new_key("user"), uuid.uuid4().hex)


# ---------------------------------------------------------------- the whole flow


async def test_create_start_send_lookup_use_and_the_verified_callback(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    receiver = Receiver(answer=verifying(adapter))
    await receiver.start()
    try:
        await control.knobs(callback_url=receiver.url, lookup_lag_s=0.6)
        created = await adapter.create_batch(batch_spec(quantity=5, valid_days=7))
        assert created.status == BatchStatus.CREATED and created.batch_id.isdigit()
        assert (created.quantity, created.remaining, created.valid_days) == (5, 5, 7)
        assert (created.face_value_cents, created.min_spend_cents) == (1000, 5000)
        batch = await adapter.change_batch(created.batch_id, BatchAction.START)
        assert batch.status == BatchStatus.RUNNING

        request = send(batch)
        sent = await adapter.send_coupon(request)
        assert sent.coupon_id.isdigit() and sent.status == PlatformCouponStatus.SENT
        # A WeChat Pay coupon is valid until its stock's window ends.
        assert sent.valid_until == batch.ends_at
        # Lookup lag: the send is applied, the query does not show it yet.
        assert await adapter.get_coupon(request.user_id, sent.coupon_id) is None

        async def visible() -> bool:
            return await adapter.get_coupon(request.user_id, sent.coupon_id) is not None

        await eventually(visible)
        seen = await adapter.get_coupon(request.user_id, sent.coupon_id)
        assert seen is not None and seen.status == PlatformCouponStatus.SENT
        assert (seen.batch_id, seen.user_id, seen.used_at) == (
            batch.batch_id,
            request.user_id,
            None,
        )
        assert seen.valid_until == batch.ends_at

        assert (await control.use(sent.coupon_id)).status_code == 200

        async def delivered() -> bool:
            return any(r.status == 200 for r in receiver.received)

        await eventually(delivered)
        genuine = next(r for r in receiver.received if r.status == 200)
        notice = coupon_use(adapter, genuine.headers, genuine.body)
        assert (notice.platform_coupon_id, notice.batch_id) == (sent.coupon_id, batch.batch_id)
        assert abs(notice.used_at - datetime.now(UTC)) < timedelta(seconds=30)
        assert notice.user_id == ""  # WeChat's COUPON.USE resource names no openid

        async def listed() -> list[tuple[str, str]]:
            path = f"/sim/notifications?coupon_id={sent.coupon_id}"
            return [
                (n["id"], n["state"])
                for n in (await control.http.get(path)).json()["notifications"]
            ]

        # Delivered on the receiver's answer, a moment after the receiver has the request.
        async def listed_delivered() -> bool:
            return [s for _, s in await listed()] == ["delivered"]

        await eventually(listed_delivered)
        assert await listed() == [(notice.notification_id, "delivered")]

        used = await adapter.get_coupon(request.user_id, sent.coupon_id)
        assert used is not None and used.status == PlatformCouponStatus.USED
        # The query's Coupon has no consume_information: the use's time is the notice's.
        assert used.used_at is None and "consume_information" not in used.raw
        # The use flow is published from 10:00 the day after the stock ends: not yet.
        with pytest.raises(FlowUnavailable) as not_yet:
            await adapter.batch_flow(batch.batch_id, FlowKind.USED)
        assert not_yet.value.code == "USE_FLOW_NOT_YET"
        after_end = batch.ends_at - datetime.now(UTC) + timedelta(days=1, hours=10)
        await control.knobs(clock_offset_s=after_end.total_seconds())
        flow = await adapter.batch_flow(batch.batch_id, FlowKind.USED)
        assert [(r.coupon_id, r.batch_id, r.at) for r in flow] == [
            (sent.coupon_id, batch.batch_id, notice.used_at)
        ]
        with pytest.raises(FlowUnavailable):
            await adapter.batch_flow(batch.batch_id, FlowKind.SENT)
        after = await adapter.get_batch(batch.batch_id)
        assert (after.quantity, after.remaining) == (5, 4)
    finally:
        await receiver.stop()


# ---------------------------------------------------------------- refusals


async def refusal(adapter: WechatPayPlatform, request: SendRequest) -> PlatformError:
    with pytest.raises(PlatformError) as raised:
        await adapter.send_coupon(request)
    return raised.value


async def test_no_budget_is_budget_exhausted(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    batch = await running(adapter)
    assert (await control.change_batch(batch.batch_id, remaining=0)).status_code == 200
    error = await refusal(adapter, send(batch))
    assert type(error) is PlatformBudgetExhausted and error.code == "NOT_ENOUGH"
    assert (await adapter.get_batch(batch.batch_id)).remaining == 0


async def test_a_paused_stock_makes_coupons_wait(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    batch = await running(adapter)
    paused = await adapter.change_batch(batch.batch_id, BatchAction.PAUSE)
    assert paused.status == BatchStatus.PAUSED
    error = await refusal(adapter, send(batch))
    assert type(error) is PlatformBatchUnavailable and error.code == "PARAM_ERROR"
    resumed = await adapter.change_batch(batch.batch_id, BatchAction.RESUME)
    assert resumed.status == BatchStatus.RUNNING
    # Paused behind our back, by the platform's operator: the same.
    assert (await control.change_batch(batch.batch_id, status="paused")).status_code == 200
    assert type(await refusal(adapter, send(batch))) is PlatformBatchUnavailable


async def test_user_restrictions_and_limits_are_refusals(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    batch = await running(adapter)
    await control.knobs(restricted_users=["risky-user"])
    error = await refusal(adapter, send(batch, "risky-user"))
    assert type(error) is PlatformRefused and error.code == "USER_ACCOUNT_ABNORMAL"
    await adapter.send_coupon(send(batch, "one-only"))
    error = await refusal(adapter, send(batch, "one-only"))
    assert type(error) is PlatformRefused and error.code == "REQUEST_BLOCKED"
    assert "限领" in error.message


async def test_stocks_not_sending_are_refusals(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    unactivated = await adapter.create_batch(batch_spec())
    error = await refusal(adapter, send(unactivated))
    assert (type(error), error.code) == (PlatformRefused, "INVALID_REQUEST")

    later = datetime.now(UTC) + timedelta(hours=1)
    not_open = await running(
        adapter, batch_spec(starts_at=later, ends_at=later + timedelta(days=1))
    )
    error = await refusal(adapter, send(not_open))
    assert (type(error), error.code) == (PlatformRefused, "REQUEST_BLOCKED")

    for status in ("stopped", "expired"):
        ended = await running(adapter)
        assert (await control.change_batch(ended.batch_id, status=status)).status_code == 200
        error = await refusal(adapter, send(ended))
        assert (type(error), error.code) == (PlatformRefused, "INVALID_REQUEST"), status

    error = await refusal(adapter, SendRequest("1", "someone", uuid.uuid4().hex))
    assert (type(error), error.code) == (PlatformRefused, "RESOURCE_NOT_EXISTS")


async def test_frequency_limits_and_system_errors_are_retried_not_refused(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    batch = await running(adapter)
    await control.knobs(rate_limit_per_s=1)
    with pytest.raises(PlatformRateLimited):
        for _ in range(3):
            await adapter.get_batch(batch.batch_id)
    await control.knobs(rate_limit_per_s=0, error_rate=1)
    error = await refusal(adapter, send(batch))
    assert (type(error), error.code) == (PlatformUnavailable, "SYSTEM_ERROR")


async def test_a_failing_lookup_never_refuses_the_send(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    batch = await running(adapter)
    await control.knobs(lookup_error_status=403)
    request = send(batch)
    sent = await adapter.send_coupon(request)  # the send does not look the coupon up
    for status in (403, 503):
        await control.knobs(lookup_error_status=status)
        with pytest.raises(PlatformUnavailable):
            await adapter.get_coupon(request.user_id, sent.coupon_id)
    # A 400 is the lookup's own refusal (PARAM_ERROR), raised by the lookup alone.
    await control.knobs(lookup_error_status=400)
    with pytest.raises(PlatformRefused) as raised:
        await adapter.get_coupon(request.user_id, sent.coupon_id)
    assert raised.value.code == "PARAM_ERROR"
    await control.knobs(lookup_error_status=404)
    assert await adapter.get_coupon(request.user_id, sent.coupon_id) is None


async def test_an_ambiguous_send_resent_with_its_key_gives_one_coupon(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    batch = await running(adapter)
    request = send(batch)
    await control.knobs(ambiguous_rate=1, ambiguous_mode="5xx")
    error = await refusal(adapter, request)
    assert (type(error), error.code) == (PlatformUnavailable, "SYSTEM_ERROR")
    await control.knobs(ambiguous_rate=0)
    sent = await adapter.send_coupon(request)
    again = await adapter.send_coupon(request)
    held = (await control.http.get(f"/sim/batches/{batch.batch_id}/coupons")).json()["coupons"]
    assert [(c["coupon_id"], c["idempotency_key"]) for c in held] == [
        (sent.coupon_id, request.idempotency_key)
    ]
    assert again.coupon_id == sent.coupon_id


async def test_a_hanging_send_is_a_timeout(
    wechat_simulator: SimulatorProcess, merchant: WechatMerchant, control: SimControl
) -> None:
    hasty = WechatPayPlatform(wechat_simulator.url, merchant, timeout_s=0.3)
    try:
        batch = await running(hasty)
        await control.knobs(ambiguous_rate=1, ambiguous_mode="hang", ambiguous_hang_s=1)
        error = await refusal(hasty, send(batch))
        assert (type(error), error.code) == (PlatformUnavailable, "TIMEOUT")
    finally:
        await hasty.aclose()


@pytest.mark.parametrize(
    ("status", "code", "message", "kind"),
    [
        (403, "NOT_ENOUGH", "批次预算不足", PlatformBudgetExhausted),
        (400, "PARAM_ERROR", "非法的批次状态\n", PlatformBatchUnavailable),
        (400, "PARAM_ERROR", "参数错误", PlatformRefused),
        (400, "INVALID_REQUEST", "活动已结束或未激活", PlatformRefused),
        # A start right after creation: WeChat Pay is still registering the stock.
        (400, "INVALID_REQUEST", "卡包信息尚未注册完成,请稍后重试", PlatformNotReady),
        (403, "USER_ACCOUNT_ABNORMAL", "用户非法", PlatformRefused),
        (403, "REQUEST_BLOCKED", "用户被限领拦截", PlatformRefused),
        (403, "RULE_LIMIT", "用户已达最大领券次数", PlatformRefused),
        (404, "RESOURCE_NOT_EXISTS", "批次不存在", PlatformRefused),
        (429, "FREQUENCY_LIMITED", "频率超限", PlatformRateLimited),
        (429, "FREQUENCY_LIMIT_EXCEED", "接口限频", PlatformRateLimited),
        (500, "SYSTEM_ERROR", "系统错误", PlatformUnavailable),
        (401, "SIGN_ERROR", "错误的签名", PlatformUnavailable),
        (400, "APPID_MCHID_NOT_MATCH", "商户号与appid不匹配", PlatformUnavailable),
        (403, "NO_AUTH", "商户无权限", PlatformUnavailable),
        # The same codes saying our merchant settings are wrong: retried, never the coupon's.
        (400, "INVALID_REQUEST", "openid与appid不匹配", PlatformUnavailable),
        (400, "INVALID_REQUEST", "非法的商户号", PlatformUnavailable),
        (403, "REQUEST_BLOCKED", "商户无权发券", PlatformUnavailable),
        (502, "HTTP_502", "bad gateway", PlatformUnavailable),
    ],
)
def test_the_error_table(status: int, code: str, message: str, kind: type[PlatformError]) -> None:
    error = _error_for(status, code, message)
    assert type(error) is kind and (error.code, error.message) == (code, message)


# ---------------------------------------------------------------- batches


async def test_batches_keep_their_word_and_stop_only_before_they_start(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    spec = batch_spec(quantity=5, valid_days=2)
    first = await adapter.create_batch(spec)
    again = await adapter.create_batch(spec)  # a retried create: the same stock
    assert again.batch_id == first.batch_id and again.starts_at == first.starts_at
    assert first.ends_at - first.starts_at == timedelta(days=2)
    with pytest.raises(PlatformRefused) as reused:
        await adapter.create_batch(BatchSpec(**{**spec.__dict__, "quantity": 6}))
    assert reused.value.code == "RESOURCE_ALREADY_EXISTS"

    started = await adapter.change_batch(first.batch_id, BatchAction.START)
    repeated = await adapter.change_batch(first.batch_id, BatchAction.START)
    assert started.status == repeated.status == BatchStatus.RUNNING
    with pytest.raises(PlatformRefused) as no_stop:
        await adapter.change_batch(first.batch_id, BatchAction.STOP)
    assert no_stop.value.code == "NO_STOP_CALL" and "never started" in no_stop.value.message
    # A stock never started is stopped (终止未激活的批次), and stopping it again is a no-op.
    unstarted = await adapter.create_batch(batch_spec())
    stopped = await adapter.change_batch(unstarted.batch_id, BatchAction.STOP)
    again_stopped = await adapter.change_batch(unstarted.batch_id, BatchAction.STOP)
    assert stopped.status == again_stopped.status == BatchStatus.STOPPED

    assert (await control.change_batch(first.batch_id, status="stopped")).status_code == 200
    assert (await adapter.get_batch(first.batch_id)).status == BatchStatus.STOPPED
    expiring = await running(adapter)
    assert (await control.change_batch(expiring.batch_id, status="expired")).status_code == 200
    assert (await adapter.get_batch(expiring.batch_id)).status == BatchStatus.EXPIRED
    with pytest.raises(PlatformRefused) as unknown:
        await adapter.get_batch("1")
    assert unknown.value.code == "RESOURCE_NOT_EXISTS"


async def test_names_and_keys_are_made_to_fit_wechat(adapter: WechatPayPlatform) -> None:
    spec = BatchSpec(
        request_key="batch-a.b@c_d",
        name="spring_sale, 10 off; 50 | for everyone",
        face_value_cents=500,
        min_spend_cents=501,
        quantity=5,
        valid_days=1,
    )
    created = await adapter.create_batch(spec)
    assert created.name == "spring sale 10 off 5"
    assert (await adapter.create_batch(spec)).batch_id == created.batch_id
    chinese = await adapter.create_batch(
        BatchSpec(new_key("batch"), "春季满五十减十元优惠大促销", 1000, 5000, 5, 1)
    )
    assert chinese.name == "春季满五十减十元优"
    # No minimum spend: WeChat's threshold must exceed the face value, by one cent at least.
    free = await adapter.create_batch(BatchSpec(new_key("batch"), "no minimum", 500, 0, 5, 1))
    assert (free.face_value_cents, free.min_spend_cents) == (500, 501)
    # A minimum asked for at or below the face value is refused, not raised in silence.
    with pytest.raises(PlatformRefused, match="minimum spend above the face value") as low:
        await adapter.create_batch(BatchSpec(new_key("batch"), "low", 1000, 500, 5, 1))
    assert low.value.code == "PARAM_ERROR"


async def test_a_coupon_is_valid_as_long_as_its_stock_and_no_promise_is_made_it_cannot_keep(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    """valid_days is the stock's window (WeChat Pay opens no validity after receipt through
    its API): 30 days from now by default, each coupon's end the window's end; a window of
    more than 90 days, or valid_days shorter than the window asked for, is refused before
    any call."""
    batch = await running(adapter, batch_spec(valid_days=30))
    assert batch.ends_at - batch.starts_at == timedelta(days=30) and batch.valid_days == 30
    request = send(batch)
    sent = await adapter.send_coupon(request)
    seen = await adapter.get_coupon(request.user_id, sent.coupon_id)
    assert seen is not None and seen.valid_until == sent.valid_until == batch.ends_at

    before = (await control.stats())["batches"]
    now = datetime.now(UTC)
    for spec, words in (
        (batch_spec(valid_days=91), "at most 90 days"),
        (batch_spec(valid_days=5, starts_at=now, ends_at=now + timedelta(days=10)), "10 days"),
    ):
        with pytest.raises(PlatformRefused, match=words) as refused:
            await adapter.create_batch(spec)
        assert refused.value.code == "PARAM_ERROR"
    assert (await control.stats())["batches"] == before
    # A window with enough days: coupons last until it ends.
    fits = await adapter.create_batch(
        batch_spec(valid_days=10, starts_at=now, ends_at=now + timedelta(days=10))
    )
    assert fits.valid_days == 10


async def test_a_start_before_the_stock_is_registered_is_waited_out_not_refused(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    await control.knobs(wechat_start_delay_s=1)
    created = await adapter.create_batch(batch_spec())
    with pytest.raises(PlatformUnavailable, match="尚未注册完成"):
        await adapter.change_batch(created.batch_id, BatchAction.START)
    await asyncio.sleep(1.1)
    started = await adapter.change_batch(created.batch_id, BatchAction.START)
    assert started.status == BatchStatus.RUNNING


async def test_a_balance_too_small_for_a_prepaid_stock_is_a_refusal_of_the_start(
    adapter: WechatPayPlatform, control: SimControl
) -> None:
    created = await adapter.create_batch(batch_spec(quantity=5))  # 5 x 10.00 yuan
    await control.knobs(wechat_balance_cents=4_999)
    with pytest.raises(PlatformRefused, match="balance cannot fund") as refused:
        await adapter.change_batch(created.batch_id, BatchAction.START)
    assert refused.value.code == "NOT_ENOUGH"
    assert (await adapter.get_batch(created.batch_id)).status == BatchStatus.CREATED


# ---------------------------------------------------------------- platform keys


@pytest.mark.parametrize(
    ("signer", "public_key"),
    [("certificates", False), ("certificates", True), ("switching", True)],
)
async def test_every_way_wechat_pay_signs_verifies(
    wechat_simulator: SimulatorProcess, control: SimControl, signer: str, public_key: bool
) -> None:
    """A merchant on platform certificates (no public key), one holding the public key whose
    switch is not turned on at WeChat Pay, and one in the middle of the switch: answers and
    notifications verify, certificates fetched with the APIv3 key when a serial needs them.
    While switching, half the notifications come signed by the certificate (share 0), half by
    the public key (share 1)."""
    await control.knobs(wechat_signer=signer, wechat_switch_public_share=0)
    merchant = sim_merchant(wechat_simulator.keys_dir, public_key=public_key)
    adapter = WechatPayPlatform(wechat_simulator.url, merchant)
    receiver = Receiver()
    await receiver.start()
    try:
        batch = await running(adapter)
        request = send(batch)
        sent = await adapter.send_coupon(request)
        seen = await adapter.get_coupon(request.user_id, sent.coupon_id)
        assert seen is not None and seen.coupon_id == sent.coupon_id
        coupons = [sent.coupon_id]
        for _ in range(5):
            coupons.append((await adapter.send_coupon(send(batch))).coupon_id)
        await control.knobs(callback_url=receiver.url)
        for delivered, share in ((3, 0), (6, 1)):
            await control.knobs(wechat_switch_public_share=share)
            for coupon_id in coupons[delivered - 3 : delivered]:
                assert (await control.use(coupon_id)).status_code == 200
            await eventually(partial(at_least, receiver.received, delivered))
        # As the API receives them: a certificate not held yet is fetched, then believed.
        notices = [await verified_notice(adapter, r.headers, r.body) for r in receiver.received]
        assert sorted(n.platform_coupon_id for n in notices if n) == sorted(coupons)
        by_public_key = [
            r.headers["wechatpay-serial"].startswith("PUB_KEY_ID_") for r in receiver.received
        ]
        expected = {"certificates": [False] * 6, "switching": [False] * 3 + [True] * 3}
        assert by_public_key == expected[signer]
    finally:
        await receiver.stop()
        await adapter.aclose()


async def test_a_receiver_fetches_a_certificate_it_does_not_hold_then_believes_it(
    wechat_simulator: SimulatorProcess,
    merchant: WechatMerchant,
    platform_keys: PlatformKeys,
    control: SimControl,
) -> None:
    """Notifications signed by a certificate the adapter never fetched, arriving together: each
    is rejected at first as a key it does not hold; `verified_notice` fetches the certificates
    once (a second fetch within the minute makes no call) and every one of them verifies. A key
    nobody holds stays unknown however often it is asked, at no more calls."""
    fetches: list[str] = []

    def counted(
        q: httpx.Request, s: int, h: dict[str, str], c: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        fetches.append(q.url.path)
        return s, h, c

    adapter, client = await through(wechat_simulator.url, merchant, "/v3/certificates", counted)
    try:
        coupon = used_coupon(merchant)
        signed = [
            notification(platform_keys, merchant.apiv3_key, coupon, by_certificate=True)
            for _ in range(3)
        ]
        with pytest.raises(CallbackRejected) as rejected:
            adapter.verify_callback(*signed[0])
        assert rejected.value.key_unknown
        notices = await asyncio.gather(
            *(verified_notice(adapter, headers, body) for headers, body in signed)
        )
        assert [n.platform_coupon_id if n else None for n in notices] == [coupon["coupon_id"]] * 3
        assert len(fetches) == 1
        assert await adapter.refresh_keys() is False and len(fetches) == 1  # within the minute
        forged = signed_headers(new_rsa_key(), "0123456789ABCDEF", signed[0][1])
        for _ in range(3):
            with pytest.raises(CallbackRejected) as unknown:
                await verified_notice(adapter, forged, signed[0][1])
            assert unknown.value.key_unknown
        assert len(fetches) == 1
    finally:
        await client.aclose()


async def test_a_refused_create_forgets_its_window_and_the_corrected_one_is_taken(
    wechat_simulator: SimulatorProcess, merchant: WechatMerchant, control: SimControl
) -> None:
    """A create refused for its terms leaves no stock: asked again corrected (later, in the
    same process), it gets a window of its own, not the first one's start, which may be in
    the past by then (开始时间不可早于当前时间)."""
    starts: list[str] = []

    def seen(
        q: httpx.Request, s: int, h: dict[str, str], c: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        starts.append(json.loads(q.content)["available_begin_time"])
        return s, h, c

    adapter, client = await through(wechat_simulator.url, merchant, "/coupon-stocks", seen)
    try:
        spec = batch_spec(quantity=3)  # WeChat Pay: at least 5
        with pytest.raises(PlatformRefused, match="max_coupons"):
            await adapter.create_batch(spec)
        await asyncio.sleep(1.1)
        corrected = await adapter.create_batch(BatchSpec(**{**spec.__dict__, "quantity": 5}))
        again = await adapter.create_batch(BatchSpec(**{**spec.__dict__, "quantity": 5}))
        assert corrected.quantity == 5 and again.batch_id == corrected.batch_id
        assert starts[1] > starts[0] and starts[2] == starts[1]  # the taken one is kept
    finally:
        await client.aclose()


async def test_certificates_that_do_not_open_with_the_apiv3_key_are_not_believed(
    wechat_simulator: SimulatorProcess, merchant: WechatMerchant, control: SimControl
) -> None:
    """Anyone on the path could answer /v3/certificates with a certificate of their own: it
    must open with the APIv3 key, which only WeChat Pay and the merchant hold."""
    await control.knobs(wechat_signer="certificates")
    attacker = new_rsa_key()

    def forged(
        q: httpx.Request, s: int, h: dict[str, str], c: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        answer = json.loads(c)
        sealed = answer["data"][0]["encrypt_certificate"]
        sealed.update(aead_encrypt(b"a" * 32, b"not the platform's certificate", "certificate"))
        body = json_body(answer)
        return (
            s,
            {**h, **lowered(signed_headers(attacker, answer["data"][0]["serial_no"], body))},
            body,
        )

    merchant_on_certificates = sim_merchant(wechat_simulator.keys_dir, public_key=False)
    tampered, client = await through(
        wechat_simulator.url, merchant_on_certificates, "/v3/certificates", forged
    )
    try:
        assert await tampered.refresh_keys() is False
        with pytest.raises(PlatformUnavailable) as raised:
            await tampered.create_batch(batch_spec())
        assert raised.value.code == "BAD_SIGNATURE"
    finally:
        await client.aclose()


# ---------------------------------------------------------------- answers not believed


Change = Callable[[httpx.Request, int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


class Tamper(httpx.AsyncBaseTransport):
    """The real transport, with the answer to requests whose path contains `where` changed."""

    def __init__(self, where: str, change: Change) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._where, self._change = where, change

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        content = await response.aread()
        await response.aclose()
        skip = ("content-length", "content-encoding", "transfer-encoding")
        headers = {k.lower(): v for k, v in response.headers.items() if k.lower() not in skip}
        status = response.status_code
        if self._where in request.url.path:
            status, headers, content = self._change(request, status, headers, content)
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def through(
    url: str, merchant: WechatMerchant, where: str, change: Change
) -> tuple[WechatPayPlatform, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=Tamper(where, change))
    return WechatPayPlatform(url, merchant, client=client), client


def lowered(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def resigned(keys: PlatformKeys, body: bytes, **kwargs: str) -> dict[str, str]:
    return lowered(signed_headers(keys.private_key, keys.key_id, body, **kwargs))


async def test_answers_that_do_not_verify_are_unavailable_never_believed(
    wechat_simulator: SimulatorProcess,
    merchant: WechatMerchant,
    platform_keys: PlatformKeys,
    adapter: WechatPayPlatform,
) -> None:
    batch = await running(adapter)
    stale = str(int(time.time()) - 301)
    signature = "wechatpay-signature"

    def flip(value: str) -> str:
        raw = bytearray(base64.b64decode(value))
        raw[3] ^= 1
        return base64.b64encode(bytes(raw)).decode()

    changes: dict[str, Change] = {
        "tampered body": lambda q, s, h, c: (s, h, c.replace(b'"running"', b'"paused"')),
        "tampered signature": lambda q, s, h, c: (s, {**h, signature: flip(h[signature])}, c),
        "wrong serial": lambda q, s, h, c: (s, {**h, "wechatpay-serial": "PUB_KEY_ID_0123"}, c),
        "stale": lambda q, s, h, c: (s, {**h, **resigned(platform_keys, c, timestamp=stale)}, c),
        "unsigned": lambda q, s, h, c: (s, {k: v for k, v in h.items() if k != signature}, c),
    }
    for kind, change in changes.items():
        tampered, client = await through(wechat_simulator.url, merchant, "/stocks/", change)
        try:
            with pytest.raises(PlatformUnavailable) as raised:
                await tampered.get_batch(batch.batch_id)
            assert raised.value.code == "BAD_SIGNATURE", kind
        finally:
            await client.aclose()


async def test_an_unsigned_refusal_is_not_a_refusal(
    wechat_simulator: SimulatorProcess, merchant: WechatMerchant, adapter: WechatPayPlatform
) -> None:
    """A proxy (or anyone on the path) answering 4xx must not fail coupons for good."""

    def strip(
        q: httpx.Request, s: int, h: dict[str, str], c: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        return s, {k: v for k, v in h.items() if not k.startswith("wechatpay-")}, c

    batch = await running(adapter)
    request = send(batch)
    sent = await adapter.send_coupon(request)
    tampered, client = await through(wechat_simulator.url, merchant, "/users/", strip)
    try:
        with pytest.raises(PlatformUnavailable):  # 403 REQUEST_BLOCKED, unsigned
            await tampered.send_coupon(send(batch, request.user_id))
        with pytest.raises(PlatformUnavailable):  # 404 RESOURCE_NOT_EXISTS, unsigned: not None
            await tampered.get_coupon("someone-else", sent.coupon_id)
    finally:
        await client.aclose()


async def test_a_flow_file_that_is_not_the_one_hashed_is_refused(
    wechat_simulator: SimulatorProcess,
    merchant: WechatMerchant,
    platform_keys: PlatformKeys,
    adapter: WechatPayPlatform,
    control: SimControl,
) -> None:
    batch = await running(adapter)
    sent = await adapter.send_coupon(send(batch))
    assert (await control.use(sent.coupon_id)).status_code == 200
    await control.knobs(clock_offset_s=(batch.ends_at - datetime.now(UTC)).total_seconds() + 2e5)

    def altered(
        q: httpx.Request, s: int, h: dict[str, str], c: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        return s, h, c.replace(sent.coupon_id.encode(), b"000000000001")

    def elsewhere(
        q: httpx.Request, s: int, h: dict[str, str], c: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        answer = json.loads(c)
        answer["url"] = answer["url"].replace("127.0.0.1", "attacker.example")
        body = json_body(answer)
        return s, {**h, **resigned(platform_keys, body)}, body

    for where, change, code in (
        ("/billdownload/", altered, "BAD_FLOW_FILE"),
        ("/use-flow", elsewhere, "BAD_FLOW_URL"),
    ):
        tampered, client = await through(wechat_simulator.url, merchant, where, change)
        try:
            with pytest.raises(PlatformUnavailable) as raised:
                await tampered.batch_flow(batch.batch_id, FlowKind.USED)
            assert raised.value.code == code
        finally:
            await client.aclose()


# ---------------------------------------------------------------- callbacks


def notification(
    keys: PlatformKeys,
    apiv3_key: bytes,
    resource: dict[str, Any],
    *,
    event_type: str = "COUPON.USE",
    timestamp: str | None = None,
    key_id: str | None = None,
    by_certificate: bool = False,
) -> tuple[dict[str, str], bytes]:
    sealed = aead_encrypt(apiv3_key, json_body(resource), "coupon")
    body = json_body(
        {
            "id": f"EV-{uuid.uuid4().hex}",
            "create_time": rfc3339(datetime.now(UTC)),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": "用券成功",
            "resource": {"original_type": "coupon", **sealed},
        }
    )
    kwargs = {"timestamp": timestamp} if timestamp else {}
    if by_certificate:
        return signed_headers(keys.cert_private_key, keys.cert_serial, body, **kwargs), body
    headers = signed_headers(keys.private_key, key_id or keys.key_id, body, **kwargs)
    return headers, body


def used_coupon(merchant: WechatMerchant) -> dict[str, Any]:
    return {
        "stock_creator_mchid": merchant.mchid,
        "stock_id": "9856000",
        "coupon_id": "98674556",
        "status": "USED",
        "consume_information": {
            "consume_time": "2026-05-20T13:29:35+08:00",
            "consume_mchid": merchant.mchid,
            "transaction_id": "4200000000000000000000000001",
        },
    }


async def test_a_notification_decrypts_to_its_notice(
    adapter: WechatPayPlatform, merchant: WechatMerchant, platform_keys: PlatformKeys
) -> None:
    headers, body = notification(platform_keys, merchant.apiv3_key, used_coupon(merchant))
    notice = coupon_use(adapter, {k.lower(): v for k, v in headers.items()}, body)
    assert (notice.platform_coupon_id, notice.batch_id, notice.user_id) == (
        "98674556",
        "9856000",
        "",
    )
    assert notice.notification_id == json.loads(body)["id"]
    assert notice.used_at == datetime(2026, 5, 20, 5, 29, 35, tzinfo=UTC)
    with_openid = {**used_coupon(merchant), "openid": "o-user"}
    headers, body = notification(platform_keys, merchant.apiv3_key, with_openid)
    assert coupon_use(adapter, headers, body).user_id == "o-user"


async def test_notifications_in_doubt_are_rejected_without_saying_a_secret(
    adapter: WechatPayPlatform, merchant: WechatMerchant, platform_keys: PlatformKeys
) -> None:
    coupon = used_coupon(merchant)
    headers, body = notification(platform_keys, merchant.apiv3_key, coupon)
    envelope = json.loads(body)
    raw = bytearray(base64.b64decode(envelope["resource"]["ciphertext"]))
    raw[0] ^= 1
    envelope["resource"]["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    tampered_ciphertext = json_body(envelope)  # re-signed: only the AEAD can notice
    signature = bytearray(base64.b64decode(headers["Wechatpay-Signature"]))
    signature[-1] ^= 1
    flipped = base64.b64encode(bytes(signature)).decode()
    cases: list[tuple[Any, bytes, str]] = [
        (*notification(platform_keys, b"w" * 32, coupon), "unreadable resource"),
        (
            signed_headers(platform_keys.private_key, platform_keys.key_id, tampered_ciphertext),
            tampered_ciphertext,
            "unreadable resource",
        ),
        (headers, body.replace(b"COUPON.USE", b"COUPON.XXX"), "bad signature"),
        ({**headers, "Wechatpay-Signature": flipped}, body, "bad signature"),
        (
            *notification(
                platform_keys, merchant.apiv3_key, coupon, timestamp=str(int(time.time()) - 301)
            ),
            "stale",
        ),
        (
            *notification(platform_keys, merchant.apiv3_key, coupon, key_id="PUB_KEY_ID_0999"),
            "a key we do not hold",
        ),
        ({}, body, "missing header"),
        (
            *notification(
                platform_keys, merchant.apiv3_key, {**coupon, "stock_creator_mchid": "1900009999"}
            ),
            "not ours",
        ),
        (
            *notification(platform_keys, merchant.apiv3_key, {"stock_id": "1", "coupon_id": "2"}),
            "unreadable notification",
        ),
    ]
    # Genuine, about another event: taken and ignored (None), not rejected.
    other_event = notification(platform_keys, merchant.apiv3_key, coupon, event_type="COUPON.SEND")
    assert adapter.verify_callback(*other_event) is None
    for given, sent, reason in cases:
        with pytest.raises(CallbackRejected) as rejected:
            adapter.verify_callback(given, sent)
        assert reason in rejected.value.reason, (reason, rejected.value.reason)
        assert merchant.apiv3_key.decode() not in rejected.value.reason
        assert headers["Wechatpay-Signature"] not in rejected.value.reason


def test_repr_shows_no_key(adapter: WechatPayPlatform, merchant: WechatMerchant) -> None:
    typed: Platform = adapter
    assert typed.callback_success is None  # a 200 (or 204) takes a WeChat notification
    shown = repr(adapter)
    assert merchant.mchid in shown and merchant.apiv3_key.decode() not in shown
