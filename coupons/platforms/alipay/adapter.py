"""`Platform` over Alipay's payment vouchers (支付券, the `alipay.marketing.activity.*` family),
through the OpenAPI gateway with RSA2, with httpx.

Why this family: it is the one a merchant integrating today uses to give a chosen user a voucher
from its server ("通过调用此接口可发放支付券给指定用户", [PHP3] AlipayMarketingActivityVoucherApi
send()), and the only voucher family of Alipay's current v3 SDKs; the older
`alipay.marketing.cashlessvoucher.template.*` / `alipay.marketing.voucher.*` family is not in
them. This service creates its own activities, so no merchant needs the older family to run it.

A batch is an activity: `alipay.marketing.activity.voucher.create` (FIX_VOUCHER, NO_CASH; the
fields in `_activity_request`), started with `.publish` and ended with `.stop`, read with
`.query`. A coupon is a voucher sent with `alipay.marketing.activity.voucher.send`
(`out_biz_no` = our idempotency key: "参数不变的情况下, 再次请求返回与上一次相同的结果", so a
resend after an ambiguous answer finds the same voucher) and read with
`alipay.marketing.activity.user.queryvoucher` (by the user and the voucher id). A use arrives
as the message `alipay.marketing.activity.message.used`. Every request is signed with the app's
key, and every answer and message verified with Alipay's public key before a word of it is
believed (`protocol` has the rules and their sources; `docs/platforms/alipay.md` the table).

What Alipay does not have, this adapter says so: no call pauses or resumes an activity
(PlatformRefused ACTION_UNSUPPORTED; PAUSE is only read); no flow files (`batch_flow` raises
FlowUnavailable: reconciliation asks about each voucher); no use time in the voucher query
(`used_at` is None there; the used message's event_time has it).

Chosen where the documentation is silent (each marked unconfirmed in the docs table):
- Users are named by the field the settings say (ALIPAY_USER_ID_TYPE), never guessed from the
  shape of the id: Alipay widens user ids ("userid 会进行升位扩展") and new apps get open_ids.
- A user Alipay does not know is refused for good: INVALID_PARAMETER on send (the only published
  send code that fits) or openid-error ([PHP3] CommonErrorType), when signed.
- publish and stop confirm asynchronously (messages created / stopped): after the call the
  activity is read a few times until its status moved, then as it is.
- With no window asked for, the publish window starts now (whole seconds) and lasts valid_days
  (at most 180); it is remembered per request key, so a retried create in this process repeats
  the first exactly (Alipay's answer to an out_biz_no reused with other parameters is
  unpublished).
- The message's dedup id is biz_content.id ("事件id。可用于业务去重"), not notify_id.

Over 500 lines on purpose: the whole of one platform's adapter, each method next to the
published rules it follows; docs/platforms/alipay.md is its index.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import httpx

from coupons.platforms.alipay.protocol import (
    ACTIVITY_ACTIVE,
    ACTIVITY_CREATE,
    ACTIVITY_FINISHED,
    ACTIVITY_INIT,
    ACTIVITY_PAUSE,
    ACTIVITY_PUBLISH,
    ACTIVITY_QUERY,
    ACTIVITY_STOP,
    BUSINESS_FAILED,
    CALL_LIMITED,
    CHARSET,
    ERROR_RESPONSE,
    FIX_VOUCHER,
    GATEWAY_CODES,
    LIFE_CYCLE,
    MAX_ACTIVITY_NAME,
    MAX_BRAND_NAME,
    MAX_OUT_BIZ_NO,
    MAX_PUBLISH_SPAN,
    MERCHANT_PID,
    MESSAGE_USED,
    NO_CASH,
    NOTIFY_SUCCESS,
    OPEN_ID,
    RELATIVE,
    SIGN_TYPE,
    SUCCESS,
    USER_ID_TYPES,
    USER_QUERY_VOUCHER,
    VOUCHER_EXPIRED,
    VOUCHER_SEND,
    VOUCHER_SENDED,
    VOUCHER_USED,
    AlipayApp,
    SubCode,
    cents,
    format_time,
    notify_sign_content,
    parse_epoch,
    parse_time,
    response_key,
    rsa2_verify,
    signed_request,
    top_level_members,
    unwrapped_sub_code,
    yuan,
)
from coupons.platforms.base import (
    BatchAction,
    BatchSpec,
    BatchStatus,
    CallbackRejected,
    CouponUsedNotice,
    FlowKind,
    FlowRecord,
    FlowUnavailable,
    PlatformBatch,
    PlatformBatchUnavailable,
    PlatformBudgetExhausted,
    PlatformCoupon,
    PlatformCouponStatus,
    PlatformError,
    PlatformNotReady,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
    answer_text,
    exchange,
    read_answer,
)

log = logging.getLogger(__name__)

# What a signed business refusal means, by its (unwrapped) code. Sources: [PHP3]
# AlipayMarketingActivity{VoucherSend,VoucherCreate,VoucherPublish,UserQueryvoucher}
# ErrorResponseModel; the meanings are read from the names (Alipay publishes no sub_msg table).
# Any other answer that is not a success is PlatformUnavailable and retried: SYSTEM_ERROR, the
# gateway's codes (20000 and its isp./aop. codes, a bad signature, an unknown app_id), a code
# we do not know, anything unsigned; calling those a refusal would fail coupons for good over
# an outage or an operator's slip.
_BUSINESS_ERRORS: dict[str, type[PlatformError]] = {
    # The activity may send again (published, its window open, budget appended): coupons wait.
    SubCode.BUDGET_NOT_ENOUGH: PlatformBudgetExhausted,
    SubCode.ACTIVITY_NOT_ACTIVE: PlatformBatchUnavailable,
    SubCode.ACTIVITY_NOT_START: PlatformBatchUnavailable,
    # This activity will never send again.
    SubCode.ACTIVITY_IS_END: PlatformRefused,
    SubCode.ACTIVITY_IS_STOPED: PlatformRefused,
    # The user holds the activity's per-user limit.
    SubCode.COUNT_OVER_LIMIT: PlatformRefused,
    # A parameter Alipay will not take, a user it does not know (unconfirmed which code).
    SubCode.INVALID_PARAMETER: PlatformRefused,
    SubCode.OPENID_ERROR: PlatformRefused,
    SubCode.VOUCHER_NOT_EXIST: PlatformRefused,  # get_coupon answers None: not visible (yet)
    # create and publish
    SubCode.BIZ_ERROR: PlatformRefused,
    SubCode.BUSINESS_HAS_RISK: PlatformRefused,
}
# Our app's relation to the activity or merchant is wrong: a configuration to fix, retried.
_CONFIGURATION_ERRORS = frozenset(
    {SubCode.ACTIVITY_NOT_PERMISSION, SubCode.MERCHANT_RELATION_NOT_EXIST}
)
# The frequency limits (code 40005 [ERR]): back off.
_RATE_LIMITS = frozenset({SubCode.APP_CALL_LIMITED, SubCode.METHOD_CALL_LIMITED})
ACTION_UNSUPPORTED = "ACTION_UNSUPPORTED"

# "" : "如果该值为空, 说明活动还未创建成功" - not sending yet, as INIT.
_ACTIVITY_STATUS = {
    "": BatchStatus.CREATED,
    ACTIVITY_INIT: BatchStatus.CREATED,
    ACTIVITY_ACTIVE: BatchStatus.RUNNING,
    ACTIVITY_PAUSE: BatchStatus.PAUSED,
    # Stopped by us, or over at publish_end_time ("活动到期结束"): `_activity` tells which.
    ACTIVITY_FINISHED: BatchStatus.STOPPED,
}
_VOUCHER_STATUS = {
    VOUCHER_SENDED: PlatformCouponStatus.SENT,
    VOUCHER_USED: PlatformCouponStatus.USED,
    VOUCHER_EXPIRED: PlatformCouponStatus.EXPIRED,
}
# How old a used-voucher message may be. Whether Alipay stamps each redelivery afresh is not
# published, and it redelivers for about 25 hours (its asynchronous notifications: "25小时以内完成
# 8次通知"): a stored message redelivered unchanged must still be taken. A replayed genuine
# message only reports a use that happened, once per biz_content.id, so the window costs nothing.
MESSAGE_MAX_AGE_S = 25 * 3600.0
# After publish or stop (asynchronous at Alipay), the reads until the status moved.
SETTLE_DELAYS_S = (0.1, 0.2, 0.4, 0.8, 1.6)


def _openid_error(code: str) -> bool:
    # The v3 name, or the v2 convention of an isv. prefix (unconfirmed which one v2 answers).
    return code in (SubCode.OPENID_ERROR, f"isv.{SubCode.OPENID_ERROR}")


def error_for(
    code: str, msg: str, sub_code: str, sub_msg: str, *, signed: bool = True
) -> PlatformError:
    """The `PlatformError` an answer other than success means. Only a signed answer can be
    definitive (or make a coupon wait): an unsigned one is retried, whatever it says."""
    business = unwrapped_sub_code(sub_code, sub_msg)
    if _openid_error(business):
        business = SubCode.OPENID_ERROR
    message = sub_msg or msg
    if code == CALL_LIMITED or business in _RATE_LIMITS:
        return PlatformRateLimited(business or code, message)
    kind = _BUSINESS_ERRORS.get(business)
    definitive = code == BUSINESS_FAILED or business == SubCode.OPENID_ERROR
    if kind is not None and signed and definitive:
        return kind(business, message)
    if business in _CONFIGURATION_ERRORS or (code in GATEWAY_CODES and code.startswith("4")):
        # Not the coupon's fault: our keys, app_id, PID or the app's rights are wrong.
        log.error("Alipay refused our call (%s %s): %s; retried", code, business, message)
    elif code == BUSINESS_FAILED and business != SubCode.SYSTEM_ERROR:
        log.warning("unknown Alipay refusal %s %s (%s): retried", code, business, message)
    return PlatformUnavailable(business or code or "UNKNOWN", message)


def _object(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not an object")
    return value


def _whole(raw: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = raw.get(name)
    if value is None and default is not None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"{name} is not a whole number")


def _valid_days(period: Mapping[str, Any]) -> int:
    """An activity's voucher_valid_period in (whole, rounded up) days ([JOLD]
    PaymentVoucherValidPeriod: RELATIVE valid_days_after_receive, or ABSOLUTE
    valid_begin_time..valid_end_time)."""
    kind = period.get("type")
    if kind == RELATIVE:
        return _whole(period, "valid_days_after_receive")
    if kind == "ABSOLUTE":
        span = parse_time(answer_text(period, "valid_end_time")) - parse_time(
            answer_text(period, "valid_begin_time")
        )
        return max(1, math.ceil(span / timedelta(days=1)))
    raise ValueError(f"voucher_valid_period type {kind!r}")


def _activity_valid_days(raw: dict[str, Any]) -> int:
    return _valid_days(_object(_object(raw, "voucher_use_rule"), "voucher_valid_period"))


def _activity(raw: dict[str, Any]) -> PlatformBatch:
    """A PlatformBatch from voucher.query's answer ([PY] AlipayMarketingActivityVoucherQuery
    Response: activity_status, publish window, voucher_send_rule, voucher_use_rule, summary)."""
    status = _ACTIVITY_STATUS[str(raw.get("activity_status") or "")]  # unknown: unreadable
    starts_at = parse_time(answer_text(raw, "publish_start_time"))
    ends_at = parse_time(answer_text(raw, "publish_end_time"))
    if status in (BatchStatus.STOPPED, BatchStatus.RUNNING) and datetime.now(UTC) >= ends_at:
        status = BatchStatus.EXPIRED  # "活动到期结束(publish_end_time)"
    send_rule = _object(raw, "voucher_send_rule")
    use_rule = _object(raw, "voucher_use_rule")
    fix = _object(use_rule, "fix_voucher")
    quantity = _whole(send_rule, "voucher_quantity")
    # "不填写或填入0表示没有领取限制": no limit is the whole quantity to us.
    per_user = _whole(send_rule, "voucher_quantity_limit_per_user", 0) or quantity
    summary = raw.get("summary")
    sent = _whole(summary, "publish_count") if isinstance(summary, dict) else 0
    floor = fix.get("floor_amount")
    return PlatformBatch(
        batch_id=answer_text(raw, "activity_id"),
        name=str(raw.get("activity_name") or raw["activity_id"]),
        status=status,
        quantity=quantity,
        remaining=max(0, quantity - sent),
        valid_days=_activity_valid_days(raw),
        face_value_cents=cents(answer_text(fix, "amount")),
        # "不填写, 认为无门槛"
        min_spend_cents=cents(floor) if isinstance(floor, str) and floor else 0,
        per_user_limit=per_user,
        starts_at=starts_at,
        ends_at=ends_at,
        raw=raw,
    )


def _voucher(asked_id: str, user_id: str, raw: dict[str, Any]) -> PlatformCoupon:
    """A PlatformCoupon from user.queryvoucher's answer ([PY] AlipayMarketingActivityUser
    QueryvoucherResponse; its user_voucher_base_info is [PY] UserVoucherBaseInfo). The answer
    names no user: the query was by user, so the voucher is that user's."""
    base = raw.get("user_voucher_base_info")
    base = base if isinstance(base, dict) else {}
    voucher_id = base.get("voucher_id") or asked_id
    if voucher_id != asked_id:
        raise ValueError("the answer is about another voucher")
    status = base.get("voucher_status") or raw.get("voucher_status")
    return PlatformCoupon(
        coupon_id=asked_id,
        batch_id=answer_text(raw, "activity_id"),
        user_id=user_id,
        # A status not published (say a refund) is unreadable: asked again, never guessed.
        status=_VOUCHER_STATUS[str(status)],
        sent_at=parse_time(str(base.get("create_time") or raw.get("create_time") or "")),
        valid_until=parse_time(
            str(base.get("valid_end_time") or raw.get("available_end_time") or "")
        ),
        used_at=None,  # the query publishes no use time
        raw=raw,
    )


def _out_biz_no(key: str) -> str:
    """Our key as an out_biz_no: as it is when it fits 64 characters, else a digest of it
    (deterministic, so a retry sends the same)."""
    if len(key) <= MAX_OUT_BIZ_NO and key.isascii() and key.isprintable():
        return key
    return hashlib.sha256(key.encode()).hexdigest()


def _operation_key(verb: str, activity_id: str) -> str:
    # publish and stop take an out_biz_no too: one per activity and verb, so a repeat is the
    # same request.
    return hashlib.sha256(f"{verb}:{activity_id}".encode()).hexdigest()[:32]


def _description(spec: BatchSpec) -> str:
    face = f"{yuan(spec.face_value_cents)}元"
    rule = f"满{yuan(spec.min_spend_cents)}元减{face}" if spec.min_spend_cents else f"立减{face}"
    return f"{spec.name}: {rule}, 领取后{spec.valid_days}天内有效"


class AlipayPlatform:
    """Adapter for Alipay payment vouchers; raises only `PlatformError` subclasses."""

    def __init__(
        self,
        gateway_url: str,
        app: AlipayApp,
        *,
        pid: str,
        user_id_type: str = OPEN_ID,
        timeout_s: float = 5.0,
        client: httpx.AsyncClient | None = None,
        callback_max_skew_s: float = MESSAGE_MAX_AGE_S,
    ) -> None:
        """`gateway_url` is the whole gateway URL (https://openapi.alipay.com/gateway.do);
        `pid` the merchant's PID (2088...), which owns the activities and redeems their
        vouchers; `user_id_type` which field names our users (open_id or user_id);
        `callback_max_skew_s` how far a message's utc_timestamp may be from our clock, either
        way, before it is taken for a replay (see MESSAGE_MAX_AGE_S)."""
        if user_id_type not in USER_ID_TYPES:
            raise ValueError(f"user_id_type {user_id_type!r}: one of {', '.join(USER_ID_TYPES)}")
        self._gateway_url = gateway_url
        self._app = app
        self._pid = pid
        self._user_field = user_id_type
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._callback_max_skew_s = callback_max_skew_s
        # Each activity's validity in days (its rule never changes), for what a send returns.
        self._valid_days: dict[str, int] = {}
        # Default windows by request key: a retried create must repeat the first exactly.
        self._windows: dict[str, tuple[datetime, datetime]] = {}

    def __repr__(self) -> str:  # never show a key
        return f"AlipayPlatform({self._gateway_url!r}, app_id={self._app.app_id!r})"

    @property
    def callback_success(self) -> str | None:
        return NOTIFY_SUCCESS  # Alipay delivers a message again unless answered so

    # -- the gateway ----------------------------------------------------------------

    async def _call(self, method: str, biz_content: Mapping[str, Any]) -> dict[str, Any]:
        """One signed gateway call; its verified answer on success, else the error it means."""
        params = signed_request(self._app, method, biz_content, datetime.now(UTC))
        response = await exchange(
            self._client, method, "POST", self._gateway_url, data=params, timeout=self._timeout
        )
        if response.status_code == 429:
            raise PlatformRateLimited("HTTP_429", f"{method}: {response.text[:200]}")
        if response.status_code != 200:
            raise PlatformUnavailable(
                f"HTTP_{response.status_code}", f"{method}: {response.text[:200]}"
            )
        answer, signed, own = self._verified(method, response.content)
        code = str(answer.get("code", ""))
        if code != SUCCESS:
            raise error_for(
                code,
                str(answer.get("msg", "")),
                str(answer.get("sub_code", "")),
                str(answer.get("sub_msg", "")),
                # The signature covers the object, not which call it answers: a refusal is
                # this call's only under this method's key (error_response is the gateway's).
                signed=signed and own,
            )
        if not own:
            raise PlatformUnavailable("BAD_RESPONSE", f"{method}: a success under {ERROR_RESPONSE}")
        return answer

    def _verified(self, method: str, content: bytes) -> tuple[dict[str, Any], bool, bool]:
        """The `_response` object of an answer, whether it was signed, and whether it is under
        this method's own key (not `error_response`): believed once Alipay's signature over its
        exact text holds, unsigned only as a gateway refusal (retried)."""
        try:
            members = top_level_members(content.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise PlatformUnavailable(
                "BAD_RESPONSE", f"{method}: unreadable answer: {exc}"
            ) from None
        own = response_key(method) in members
        found = members.get(response_key(method)) or members.get(ERROR_RESPONSE)
        if found is None or not isinstance(found[1], dict):
            raise PlatformUnavailable("BAD_RESPONSE", f"{method}: no {response_key(method)}")
        text, answer = found[0], dict(found[1])
        sign = members.get("sign")
        if sign is None:
            # Only the gateway's own refusals may come unsigned; anything else unsigned (a
            # success, a business refusal, a code that is not even a string) is not believed.
            code = answer.get("code")
            if not isinstance(code, str) or code not in GATEWAY_CODES:
                raise PlatformUnavailable("UNSIGNED_RESPONSE", f"{method}: the answer is unsigned")
            return answer, False, own
        if not isinstance(sign[1], str) or not rsa2_verify(
            self._app.alipay_public_key, text, sign[1]
        ):
            log.error("an answer to %s fails Alipay's signature: not believed", method)
            raise PlatformUnavailable("BAD_SIGNATURE", f"{method}: the answer's signature fails")
        return answer, True, own

    # -- Platform -------------------------------------------------------------------

    def batch_request(self, spec: BatchSpec) -> BatchSpec:
        """`spec` with the window this create would fill in (base.FixesRequest)."""
        begins, ends = self._window(spec)
        return replace(spec, starts_at=begins, ends_at=ends)

    def _window(self, spec: BatchSpec) -> tuple[datetime, datetime]:
        if spec.starts_at is not None and spec.ends_at is not None:
            return spec.starts_at, spec.ends_at
        remembered = self._windows.get(spec.request_key)
        if remembered is not None:
            return remembered
        # Whole seconds: Alipay's times have no fractions. At most the published 180 days: a
        # voucher's validity runs from when it is received, not from the window.
        begins = spec.starts_at or datetime.now(UTC).replace(microsecond=0)
        ends = spec.ends_at or begins + min(timedelta(days=spec.valid_days), MAX_PUBLISH_SPAN)
        self._windows[spec.request_key] = (begins, ends)
        return begins, ends

    def _activity_request(self, spec: BatchSpec) -> dict[str, Any]:
        """voucher.create's biz_content ([PY] AlipayMarketingActivityVoucherCreateModel and its
        domain classes; each field's rule in `protocol` and the docs table)."""
        begins, ends = self._window(spec)
        fix_voucher = {"amount": yuan(spec.face_value_cents)}
        if spec.min_spend_cents:
            fix_voucher["floor_amount"] = yuan(spec.min_spend_cents)
        return {
            "activity_name": spec.name[:MAX_ACTIVITY_NAME],
            "out_biz_no": _out_biz_no(spec.request_key),
            "belong_merchant_info": {"merchant_id": self._pid, "merchant_id_type": MERCHANT_PID},
            "publish_start_time": format_time(begins),
            "publish_end_time": format_time(ends),
            "voucher_type": FIX_VOUCHER,
            "voucher_send_rule": {
                "voucher_quantity": spec.quantity,
                "voucher_quantity_limit_per_user": spec.per_user_limit,
                "voucher_quantity_limit_per_user_period_type": LIFE_CYCLE,
            },
            "voucher_use_rule": {
                "fix_voucher": fix_voucher,
                "voucher_valid_period": {
                    "type": RELATIVE,
                    "valid_days_after_receive": spec.valid_days,
                },
                "available_merchant": {"available_pids": [self._pid]},
            },
            # "总预算=优惠金额*总发券张数"; NO_CASH: nothing is paid in.
            "voucher_budget_info": {
                "budget_type": NO_CASH,
                "amount": yuan(spec.face_value_cents * spec.quantity),
            },
            "voucher_display_info": {
                "brand_name": spec.name[:MAX_BRAND_NAME],
                "voucher_description": _description(spec),
            },
        }

    async def create_batch(self, spec: BatchSpec) -> PlatformBatch:
        answer = await self._call(ACTIVITY_CREATE, self._activity_request(spec))
        return await self.get_batch(
            read_answer(lambda raw: answer_text(raw, "activity_id"), answer)
        )

    async def get_batch(self, batch_id: str) -> PlatformBatch:
        return read_answer(_activity, await self._call(ACTIVITY_QUERY, {"activity_id": batch_id}))

    async def _settled(self, batch_id: str, moved: frozenset[BatchStatus]) -> PlatformBatch:
        """The activity once its status is one of `moved`, or as the last read shows it."""
        batch = await self.get_batch(batch_id)
        for delay in SETTLE_DELAYS_S:
            if batch.status in moved:
                break
            await asyncio.sleep(delay)
            batch = await self.get_batch(batch_id)
        return batch

    async def change_batch(self, batch_id: str, action: BatchAction) -> PlatformBatch:
        action = BatchAction(action)
        if action in (BatchAction.PAUSE, BatchAction.RESUME):
            raise PlatformRefused(
                ACTION_UNSUPPORTED,
                f"Alipay payment vouchers have no call to {action.value} an activity "
                "(alipay.marketing.activity.voucher.* has create, publish, modify, append, "
                "stop, send and query)",
            )
        batch = await self.get_batch(batch_id)
        if action is BatchAction.STOP:
            if batch.status in (BatchStatus.STOPPED, BatchStatus.EXPIRED):
                return batch  # stopping twice is a no-op to us
            await self._call(
                ACTIVITY_STOP,
                {"activity_id": batch_id, "out_biz_no": _operation_key("stop", batch_id)},
            )
            stopped = await self._settled(
                batch_id, frozenset({BatchStatus.STOPPED, BatchStatus.EXPIRED})
            )
            if stopped.status not in (BatchStatus.STOPPED, BatchStatus.EXPIRED):
                # Confirmed asynchronously (message.stopped): the next sync shows it.
                log.warning("activity %s stopped, still %s at Alipay", batch_id, stopped.status)
            return stopped
        if batch.status is BatchStatus.RUNNING:
            return batch
        if batch.status is not BatchStatus.CREATED:
            raise PlatformRefused(
                ACTION_UNSUPPORTED,
                f"activity {batch_id} is {batch.status.value}: Alipay publishes only a new "
                "activity (INIT), and has no call to resume a paused one",
            )
        await self._call(
            ACTIVITY_PUBLISH,
            {"activity_id": batch_id, "out_biz_no": _operation_key("publish", batch_id)},
        )
        published = await self._settled(batch_id, frozenset({BatchStatus.RUNNING}))
        if published.status is BatchStatus.CREATED:
            # Publishing is confirmed asynchronously (message.created): not a refusal, and
            # publishing again with the same out_biz_no is the same request.
            raise PlatformNotReady(
                "PUBLISH_PENDING", f"activity {batch_id} is not active yet after publishing"
            )
        return published

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[FlowRecord]:
        raise FlowUnavailable(
            "NO_FLOW_FILES",
            f"Alipay publishes no {FlowKind(kind).value} flow of voucher activity {batch_id}: "
            f"ask about each voucher ({USER_QUERY_VOUCHER})",
        )

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        asked_at = datetime.now(UTC)
        answer = await self._call(
            VOUCHER_SEND,
            {
                "activity_id": request.batch_id,
                "out_biz_no": _out_biz_no(request.idempotency_key),
                self._user_field: request.user_id,
            },
        )
        voucher_id = read_answer(lambda raw: answer_text(raw, "voucher_id"), answer)
        # The send answers only the voucher's id ([PY] AlipayMarketingActivityVoucherSend
        # Response); its exact times are the query's, which the caller makes to see it visible.
        # Until then the terms come from the activity, read once per activity (its validity
        # rule never changes), with the earliest moment the voucher can have been sent, so its
        # validity is never overstated.
        valid_days = self._valid_days.get(request.batch_id)
        if valid_days is None:
            try:
                # Only the validity rule: a status or field the rest of the activity's reading
                # does not know must not hold up a send that went through.
                raw = await self._call(ACTIVITY_QUERY, {"activity_id": request.batch_id})
                valid_days = read_answer(_activity_valid_days, raw)
            except PlatformError as exc:
                # The voucher is sent: nothing said after that may fail the coupon. Retried,
                # the same out_biz_no finds the same voucher.
                raise PlatformUnavailable(
                    "ACTIVITY_UNREADABLE", f"voucher {voucher_id} sent, its activity: {exc}"
                ) from exc
            self._valid_days[request.batch_id] = valid_days
        return PlatformCoupon(
            coupon_id=voucher_id,
            batch_id=request.batch_id,
            user_id=request.user_id,
            status=PlatformCouponStatus.SENT,
            sent_at=asked_at,
            valid_until=asked_at + timedelta(days=valid_days),
            used_at=None,
            raw=answer,
        )

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        try:
            answer = await self._call(
                USER_QUERY_VOUCHER, {"voucher_id": coupon_id, self._user_field: user_id}
            )
        except PlatformRefused as exc:
            if exc.code == SubCode.VOUCHER_NOT_EXIST:
                return None  # not this user's, or not visible yet
            raise
        return read_answer(lambda raw: _voucher(coupon_id, user_id, raw), answer)

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CouponUsedNotice | None:
        """The used-voucher message ([MSG] envelope: notify_id, utc_timestamp, msg_method,
        app_id, version, charset, sign_type, sign, biz_content): signature, app, freshness by
        utc_timestamp, then biz_content (id, activity_id, event_time, voucher_id, user_id |
        open_id; the used page's own field list is unconfirmed, these are the sibling expired
        message's)."""
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise CallbackRejected(f"unparseable form: {exc}") from None
        params: dict[str, str] = {}
        for name, value in pairs:
            if name in params:
                raise CallbackRejected(f"parameter {name[:40]!r} given twice")
            params[name] = value
        sign = params.get("sign")
        if not sign:
            raise CallbackRejected("missing sign")
        # The message page's example writes "rsa2".
        if params.get("sign_type", "").upper() != SIGN_TYPE:
            raise CallbackRejected(f"sign_type {params.get('sign_type', '')[:20]!r}, not RSA2")
        if params.get("charset", CHARSET).lower() != CHARSET:
            raise CallbackRejected("charset is not utf-8")
        if not rsa2_verify(self._app.alipay_public_key, notify_sign_content(params), sign):
            raise CallbackRejected("bad signature")
        # Checked once the signature holds: what fails now is a genuine message that is
        # replayed, late, or not meant for us, which is what the log should say.
        if params.get("app_id") != self._app.app_id:
            raise CallbackRejected(f"for another app ({params.get('app_id', '')[:32]!r})")
        try:
            sent_at = parse_epoch(params.get("utc_timestamp", "")).timestamp()
        except ValueError:
            raise CallbackRejected("garbled utc_timestamp") from None
        skew = time.time() - sent_at
        if skew > self._callback_max_skew_s:
            raise CallbackRejected(f"stale: sent {skew:.0f} s ago")
        if -skew > self._callback_max_skew_s:
            raise CallbackRejected(f"from the future: sent {-skew:.0f} s ahead of our clock")
        if params.get("msg_method") != MESSAGE_USED:
            return None  # genuine, and not a voucher's use (received, expired, ...)
        try:
            biz = json.loads(params.get("biz_content", ""))
            if not isinstance(biz, dict):
                raise ValueError("biz_content is not a JSON object")
            holder = biz.get("user_id") or biz.get("open_id") or ""
            return CouponUsedNotice(
                notification_id=answer_text(biz, "id"),
                platform_coupon_id=answer_text(biz, "voucher_id"),
                batch_id=answer_text(biz, "activity_id"),
                user_id=holder if isinstance(holder, str) else "",
                used_at=parse_epoch(str(biz.get("event_time", ""))),
                raw={**params, "biz_content": biz},
            )
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            raise CallbackRejected(f"unreadable message: {exc}") from None

    async def refresh_keys(self) -> bool:
        return False  # Alipay's public key is configured, never fetched

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
