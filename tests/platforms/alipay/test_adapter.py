"""AlipayPlatform against the simulator in alipay mode: the whole voucher flow, how each
Alipay answer maps onto the `Platform` types and errors, and what is never believed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

from coupons.embedded import SimulatorProcess
from coupons.platforms.alipay.adapter import AlipayPlatform, error_for
from coupons.platforms.alipay.protocol import (
    ALIPAY_PRIVATE_KEY,
    GATEWAY_PATH,
    AlipayApp,
    format_time,
    key_file,
    load_private_key,
    notify_sign_content,
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

from ..conftest import SimControl, batch_spec, controlling, coupon_use
from .test_simulator import Receiver, alipay_user


@pytest.fixture
async def control(alipay_simulator: SimulatorProcess) -> AsyncIterator[SimControl]:
    async with controlling(alipay_simulator) as control:
        yield control


def gateway(process: SimulatorProcess) -> str:
    return process.url + GATEWAY_PATH


@pytest.fixture
async def platform(
    alipay_simulator: SimulatorProcess, control: SimControl
) -> AsyncIterator[AlipayPlatform]:
    adapter = AlipayPlatform(gateway(alipay_simulator), sim_app(alipay_simulator.keys_dir))
    try:
        yield adapter
    finally:
        await adapter.aclose()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    try:
        yield receiver
    finally:
        await receiver.close()


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


# ---------------------------------------------------------------- the whole flow


async def test_template_send_query_use_and_a_verified_notification(
    platform: AlipayPlatform, control: SimControl, receiver: Receiver
) -> None:
    typed: Platform = platform  # AlipayPlatform satisfies the protocol (checked by mypy)
    await control.knobs(callback_url=await receiver.start(), lookup_lag_s=1.0)
    user = alipay_user()

    batch = await typed.create_batch(batch_spec(quantity=10, valid_days=7))
    started = await typed.change_batch(batch.batch_id, BatchAction.START)
    coupon = await typed.send_coupon(send_request(batch, user))
    hidden = await typed.get_coupon(user, coupon.coupon_id)
    await asyncio.sleep(1.1)
    seen = await typed.get_coupon(user, coupon.coupon_id)
    used = await control.use(coupon.coupon_id)
    notice = coupon_use(
        typed, {"content-type": "application/x-www-form-urlencoded"}, await receiver.next()
    )
    after = await typed.get_coupon(user, coupon.coupon_id)

    # A cashless template publishes from creation: start has nothing to do.
    assert batch.status is started.status is BatchStatus.RUNNING
    assert (batch.face_value_cents, batch.min_spend_cents, batch.quantity) == (1000, 5000, 10)
    assert batch.valid_days == 7 and batch.remaining == 10
    assert batch.ends_at - batch.starts_at == timedelta(days=7)
    assert batch.starts_at.tzinfo is not None
    # Sent while the query lags: the voucher is real, its validity taken from the template.
    assert coupon.status is PlatformCouponStatus.SENT and coupon.raw["voucher_id"]
    assert hidden is None
    assert seen is not None and seen.coupon_id == coupon.coupon_id
    assert (seen.batch_id, seen.user_id, seen.status) == (
        batch.batch_id,
        user,
        PlatformCouponStatus.SENT,
    )
    assert whole_second(coupon.sent_at) <= seen.sent_at
    assert coupon.valid_until <= seen.valid_until + timedelta(seconds=1)
    assert seen.valid_until == seen.sent_at + timedelta(days=7)
    assert used.status_code == 200
    assert (notice.platform_coupon_id, notice.batch_id, notice.user_id) == (
        coupon.coupon_id,
        batch.batch_id,
        user,
    )
    assert notice.notification_id and notice.raw["biz_type"] == "V_USE"
    assert after is not None and after.status is PlatformCouponStatus.USED
    assert after.used_at == notice.used_at
    assert (await typed.get_batch(batch.batch_id)).remaining == 9
    assert typed.callback_success == "success"  # what our receiver must answer Alipay


async def test_a_user_known_by_open_id_gets_a_voucher(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await platform.create_batch(batch_spec())
    open_id = f"074a{uuid.uuid4().hex}"

    coupon = await platform.send_coupon(send_request(batch, open_id))

    assert coupon.user_id == open_id
    assert coupon.raw["open_id"] == open_id and "user_id" not in coupon.raw


async def test_create_batch_is_idempotent_by_request_key(platform: AlipayPlatform) -> None:
    spec = batch_spec(quantity=5)

    first = await platform.create_batch(spec)
    again = await platform.create_batch(spec)
    with pytest.raises(PlatformRefused) as reused:
        await platform.create_batch(
            BatchSpec(spec.request_key, spec.name, 2000, 5000, 5, spec.valid_days)
        )

    assert first.batch_id == again.batch_id
    assert reused.value.code == "OUT_BIZ_NO_REPEATED"


async def test_an_explicit_window_is_kept_and_sends_wait_until_it_opens(
    platform: AlipayPlatform,
) -> None:
    starts_at = whole_second(datetime.now(UTC) + timedelta(days=1))
    spec = batch_spec(starts_at=starts_at, ends_at=starts_at + timedelta(days=3))

    batch = await platform.create_batch(spec)
    with pytest.raises(PlatformBatchUnavailable) as waiting:
        await platform.send_coupon(send_request(batch))

    assert (batch.starts_at, batch.ends_at) == (starts_at, starts_at + timedelta(days=3))
    assert batch.status is BatchStatus.RUNNING
    assert waiting.value.code == "PUBLISH_TIME_NOT_STARTED"
    assert not isinstance(waiting.value, PlatformBudgetExhausted)


# ---------------------------------------------------------------- errors


async def _cut_budget(control: SimControl, batch: PlatformBatch) -> None:
    (await control.change_batch(batch.batch_id, remaining=0)).raise_for_status()


async def _pause(control: SimControl, batch: PlatformBatch) -> None:
    (await control.change_batch(batch.batch_id, status="paused")).raise_for_status()


async def _stop(control: SimControl, batch: PlatformBatch) -> None:
    (await control.change_batch(batch.batch_id, status="stopped")).raise_for_status()


async def _expire(control: SimControl, batch: PlatformBatch) -> None:
    (await control.change_batch(batch.batch_id, status="expired")).raise_for_status()


async def _restrict(control: SimControl, batch: PlatformBatch, user: str) -> None:
    await control.knobs(restricted_users=[user])


async def _fail(control: SimControl, batch: PlatformBatch) -> None:
    await control.knobs(error_rate=1.0)


Setup = Callable[..., Awaitable[None]]


@pytest.mark.parametrize(
    ("setup", "kind", "code"),
    [
        (_cut_budget, PlatformBudgetExhausted, "BUDGET_NOT_ENOUGH_ERROR"),
        (_pause, PlatformBatchUnavailable, "TEMPLATE_PUBLISH_PAUSED"),
        (_restrict, PlatformRefused, "RISK_CONTROL_REJECTED"),
        (_stop, PlatformRefused, "TEMPLATE_DELETED"),
        (_expire, PlatformRefused, "AFTER_VOUCHER_END_TIME"),
        (_fail, PlatformUnavailable, "isp.unknow-error"),
    ],
    ids=["budget", "paused", "risk", "deleted", "expired", "system-error"],
)
async def test_each_refusal_of_a_send_maps_to_its_error(
    platform: AlipayPlatform,
    control: SimControl,
    setup: Setup,
    kind: type[PlatformError],
    code: str,
) -> None:
    batch = await platform.create_batch(batch_spec())
    request = send_request(batch)
    if setup is _restrict:
        await setup(control, batch, request.user_id)
    else:
        await setup(control, batch)
    before = await control.stats()

    with pytest.raises(PlatformError) as refused:
        await platform.send_coupon(request)

    assert type(refused.value) is kind
    assert refused.value.code == code
    assert (await control.stats())["coupons"] == before["coupons"]


async def test_an_unknown_template_is_refused(platform: AlipayPlatform) -> None:
    with pytest.raises(PlatformRefused) as unknown_get:
        await platform.get_batch("20990101000000000000000000XX")
    with pytest.raises(PlatformRefused) as unknown_send:
        await platform.send_coupon(
            SendRequest("20990101000000000000000000XX", alipay_user(), uuid.uuid4().hex)
        )

    assert unknown_get.value.code == unknown_send.value.code == "TEMPLATE_NOT_EXIST"


async def test_an_out_biz_no_reused_for_another_user_is_refused(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await platform.create_batch(batch_spec())
    request = send_request(batch)
    await platform.send_coupon(request)

    with pytest.raises(PlatformRefused) as reused:
        await platform.send_coupon(
            SendRequest(batch.batch_id, alipay_user(), request.idempotency_key)
        )

    assert reused.value.code == "OUT_BIZ_NO_REPEATED"
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
    batch = await platform.create_batch(batch_spec())
    await control.knobs(lookup_error_status=503)

    coupon = await platform.send_coupon(send_request(batch))
    with pytest.raises(PlatformUnavailable) as failing:
        await platform.get_coupon(coupon.user_id, coupon.coupon_id)

    assert coupon.status is PlatformCouponStatus.SENT
    assert failing.value.code == "HTTP_503"


async def test_an_ambiguous_5xx_then_a_resend_gives_one_voucher(
    platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await platform.create_batch(batch_spec())
    request = send_request(batch)
    await control.knobs(ambiguous_rate=1.0, ambiguous_mode="5xx")

    with pytest.raises(PlatformUnavailable) as ambiguous:
        await platform.send_coupon(request)
    await control.knobs(ambiguous_rate=0.0)
    first = await platform.send_coupon(request)
    again = await platform.send_coupon(request)

    assert ambiguous.value.code == "isp.unknow-error"
    assert first.coupon_id == again.coupon_id
    assert [coupon["coupon_id"] for coupon in await coupons_of(control, batch.batch_id)] == [
        first.coupon_id
    ]
    assert (await platform.get_batch(batch.batch_id)).remaining == 9


async def test_an_ambiguous_timeout_then_a_resend_gives_one_voucher(
    alipay_simulator: SimulatorProcess, platform: AlipayPlatform, control: SimControl
) -> None:
    batch = await platform.create_batch(batch_spec())
    request = send_request(batch)
    await control.knobs(ambiguous_rate=1.0, ambiguous_hang_s=1.0)
    impatient = AlipayPlatform(
        gateway(alipay_simulator), sim_app(alipay_simulator.keys_dir), timeout_s=0.3
    )

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


async def test_templates_cannot_pause_or_resume_and_stop_deletes_an_unused_one(
    platform: AlipayPlatform,
) -> None:
    unused = await platform.create_batch(batch_spec())
    used = await platform.create_batch(batch_spec())
    await platform.send_coupon(send_request(used))

    refusals = []
    for action in (BatchAction.PAUSE, BatchAction.RESUME):
        with pytest.raises(PlatformRefused) as refused:
            await platform.change_batch(unused.batch_id, action)
        refusals.append(refused.value.code)
    stopped = await platform.change_batch(unused.batch_id, BatchAction.STOP)
    stopped_again = await platform.change_batch(unused.batch_id, BatchAction.STOP)
    with pytest.raises(PlatformRefused) as restart:
        await platform.change_batch(unused.batch_id, BatchAction.START)
    with pytest.raises(PlatformRefused) as in_use:
        await platform.change_batch(used.batch_id, BatchAction.STOP)

    assert refusals == ["ACTION_UNSUPPORTED", "ACTION_UNSUPPORTED"]
    assert stopped.status is stopped_again.status is BatchStatus.STOPPED
    assert restart.value.code == "ACTION_UNSUPPORTED"
    assert in_use.value.code == "TEMPLATE_CANNOT_DELETE"
    assert (await platform.get_batch(used.batch_id)).status is BatchStatus.RUNNING


@pytest.mark.parametrize("kind", list(FlowKind))
async def test_alipay_publishes_no_flow_files(platform: AlipayPlatform, kind: FlowKind) -> None:
    with pytest.raises(FlowUnavailable):
        await platform.batch_flow("20990101000000000000000000XX", kind)


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
    tampered = AlipayPlatform(
        gateway(alipay_simulator), sim_app(alipay_simulator.keys_dir), client=client
    )

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
    """Only the gateway's own refusals come unsigned: a success without a signature, even one
    whose code is a number rather than the string Alipay sends, is not believed."""
    batch = await platform.create_batch(batch_spec())
    client = httpx.AsyncClient(
        transport=_TamperingTransport(b'"code":"10000"', b'"code":' + code, _unsigned)
    )
    stripped = AlipayPlatform(
        gateway(alipay_simulator), sim_app(alipay_simulator.keys_dir), client=client
    )

    try:
        with pytest.raises(PlatformUnavailable) as refused:
            await stripped.get_batch(batch.batch_id)
    finally:
        await client.aclose()

    assert refused.value.code == "UNSIGNED_RESPONSE"


async def test_our_request_signed_with_a_wrong_key_is_refused_by_the_gateway(
    alipay_simulator: SimulatorProcess, control: SimControl
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    wrong = AlipayPlatform(
        gateway(alipay_simulator), AlipayApp(app.app_id, new_rsa_key(), app.alipay_public_key)
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


async def _genuine_notification(
    platform: AlipayPlatform, control: SimControl, receiver: Receiver
) -> bytes:
    await control.knobs(callback_url=await receiver.start())
    batch = await platform.create_batch(batch_spec())
    coupon = await platform.send_coupon(send_request(batch))
    (await control.use(coupon.coupon_id)).raise_for_status()
    return await receiver.next()


def _resigned(simulator: SimulatorProcess, body: bytes, **changes: str) -> bytes:
    """The notification with `changes`, signed again with Alipay's (the simulator's) key."""
    key = load_private_key(key_file(simulator.keys_dir, ALIPAY_PRIVATE_KEY).read_bytes())
    fields = {**dict(parse_qsl(body.decode())), **changes}
    fields.pop("sign")
    fields["sign"] = rsa2_sign(key, notify_sign_content(fields))
    return urlencode(fields).encode()


def _changed(body: bytes, **changes: str) -> bytes:
    return urlencode({**dict(parse_qsl(body.decode())), **changes}).encode()


async def test_notifications_that_must_not_be_believed_are_rejected(
    alipay_simulator: SimulatorProcess,
    platform: AlipayPlatform,
    control: SimControl,
    receiver: Receiver,
) -> None:
    body = await _genuine_notification(platform, control, receiver)
    fields = dict(parse_qsl(body.decode()))
    sign = fields["sign"]
    long_ago = format_time(datetime.now(UTC) - timedelta(minutes=10))
    ahead = format_time(datetime.now(UTC) + timedelta(minutes=10))
    cases = {
        "tampered field": _changed(body, voucher_id="2026000000000000000000000000"),
        "tampered signature": _changed(
            body, sign=sign[:30] + ("A" if sign[30] != "A" else "B") + sign[31:]
        ),
        "no signature": urlencode({k: v for k, v in fields.items() if k != "sign"}).encode(),
        "stale": _resigned(alipay_simulator, body, notify_time=long_ago),
        "from the future": _resigned(alipay_simulator, body, notify_time=ahead),
        "another app": _resigned(alipay_simulator, body, app_id="2021000000009999"),
        "a field twice": body + b"&voucher_id=x",
        "not a form": b"\xff\xfe",
    }

    accepted = platform.verify_callback({}, body)
    assert accepted is not None
    # Genuine, about something else: taken and ignored (None), not rejected.
    refund = _resigned(alipay_simulator, body, biz_type="V_REFUND")
    assert platform.verify_callback({}, refund) is None
    reasons = {}
    for name, forged in cases.items():
        with pytest.raises(CallbackRejected) as rejected:
            platform.verify_callback({}, forged)
        reasons[name] = rejected.value.reason

    assert accepted.notification_id == fields["notify_id"]
    assert reasons["tampered field"] == reasons["tampered signature"] == "bad signature"
    assert reasons["no signature"] == "missing sign"
    assert reasons["stale"].startswith("stale")
    assert reasons["from the future"].startswith("from the future")
    assert reasons["another app"].startswith("for another app")
    assert "twice" in reasons["a field twice"]
    assert reasons["not a form"].startswith("unparseable")


async def test_forged_probes_are_rejected_and_genuine_notifications_taken(
    alipay_simulator: SimulatorProcess, control: SimControl
) -> None:
    platform = AlipayPlatform(gateway(alipay_simulator), sim_app(alipay_simulator.keys_dir))
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
        batch = await platform.create_batch(batch_spec())
        for _ in range(2):  # the probes alternate: a wrong key, then a tampered field
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
    platform = AlipayPlatform(gateway(alipay_simulator), sim_app(alipay_simulator.keys_dir))
    used_at = datetime.now(UTC).isoformat()
    coupon = {"coupon_id": "V1", "batch_id": "T1", "user_id": alipay_user(), "used_at": used_at}
    long_ago = format_time(datetime.now(UTC) - timedelta(hours=2))
    stored = _resigned(
        alipay_simulator,
        face.notification("ntf_1", coupon, datetime.now(UTC)),
        notify_time=long_ago,
    )

    with pytest.raises(CallbackRejected) as stale:
        platform.verify_callback({}, stored)
    fresh = coupon_use(platform, {}, face.delivery_body(stored))

    assert stale.value.reason.startswith("stale")
    assert (fresh.notification_id, fresh.platform_coupon_id) == ("ntf_1", "V1")


def test_reprs_show_no_key(alipay_simulator: SimulatorProcess) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    platform = AlipayPlatform(gateway(alipay_simulator), app)

    shown = repr(platform) + repr(app)

    assert app.app_id in shown
    assert "Key" not in shown and "BEGIN" not in shown and "0x" not in shown


# ---------------------------------------------------------------- the error table


@pytest.mark.parametrize(
    ("code", "sub_code", "sub_msg", "kind"),
    [
        ("40004", "BUDGET_NOT_ENOUGH_ERROR", "", PlatformBudgetExhausted),
        (
            "40004",
            "unknown-sub-code",
            "未知的错误码BUDGET_NOT_ENOUGH_ERROR",
            PlatformBudgetExhausted,
        ),
        ("40004", "PUBLISH_TIME_NOT_STARTED", "", PlatformBatchUnavailable),
        ("40004", "TEMPLATE_PUBLISH_PAUSED", "", PlatformBatchUnavailable),
        ("40004", "USER_NOT_EXIST", "", PlatformRefused),
        ("40004", "RISK_CONTROL_REJECTED", "", PlatformRefused),
        ("40004", "USER_SEND_LIMIT_EXCEEDED", "", PlatformRefused),
        ("40004", "AFTER_VOUCHER_END_TIME", "", PlatformRefused),
        ("40004", "TEMPLATE_DELETED", "", PlatformRefused),
        ("40004", "TEMPLATE_NOT_EXIST", "", PlatformRefused),
        ("40004", "SOMETHING_NEW", "", PlatformUnavailable),
        ("40004", "unknown-sub-code", "系统繁忙", PlatformUnavailable),
        ("20000", "isp.unknow-error", "", PlatformUnavailable),
        ("20000", "aop.unknow-error", "", PlatformUnavailable),
        ("40002", "isv.invalid-signature", "", PlatformUnavailable),
        ("40002", "isv.invalid-app-id", "", PlatformUnavailable),
        ("40005", "isv.method-call-limited", "", PlatformRateLimited),
        ("40005", "isv.app-call-limited", "", PlatformRateLimited),
    ],
)
def test_the_error_table(code: str, sub_code: str, sub_msg: str, kind: type[PlatformError]) -> None:
    error = error_for(code, "msg", sub_code, sub_msg)

    assert type(error) is kind
    assert error.code == ("BUDGET_NOT_ENOUGH_ERROR" if "BUDGET" in sub_code + sub_msg else sub_code)
