"""`Platform` over Alipay's voucher APIs (the OpenAPI gateway, RSA2), with httpx.

A batch is a cashless voucher template (alipay.marketing.cashlessvoucher.template.create,
live from creation over its publish window), read with
alipay.marketing.voucher.templatedetail.query; a coupon is a voucher sent with
alipay.marketing.voucher.send (`out_biz_no` = our idempotency key, so a resend after an
ambiguous answer finds the same voucher) and read with alipay.marketing.voucher.query. Every
request is signed with the app's key and every answer, and every notification, verified with
Alipay's public key before a word of it is believed (`protocol` has the rules and the
documentation they come from).

What Alipay does not have, this adapter says so instead of pretending: templates cannot be
paused or resumed (PlatformRefused ACTION_UNSUPPORTED); `stop` deletes the template
(alipay.marketing.voucher.template.delete, which Alipay allows only while nothing was sent);
there is no per-user limit (a batch reports its whole quantity as the limit); and no flow
files (`batch_flow` raises FlowUnavailable: reconciliation asks about each voucher instead).
"""

from __future__ import annotations

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
    ALIPAY_USER_ID,
    BUSINESS_FAILED,
    CALL_LIMITED,
    CASHLESS_FIX_VOUCHER,
    CASHLESS_TEMPLATE_CREATE,
    CHARSET,
    ERROR_RESPONSE,
    NOTIFY_SUCCESS,
    SIGN_TYPE,
    SUCCESS,
    TEMPLATE_DELETE,
    TEMPLATE_DELETED,
    TEMPLATE_DETAIL_QUERY,
    TEMPLATE_DRAFT,
    TEMPLATE_EFFECTIVE,
    TEMPLATE_EXPIRED,
    UNSIGNED_CODES,
    V_USE,
    VOUCHER_DELETED,
    VOUCHER_ENABLED,
    VOUCHER_EXPIRED,
    VOUCHER_NOTIFY_TYPE,
    VOUCHER_QUERY,
    VOUCHER_SEND,
    VOUCHER_USED,
    AlipayApp,
    SubCode,
    cents,
    format_time,
    notify_sign_content,
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
    PlatformKeyReused,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
    read_answer,
)

log = logging.getLogger(__name__)

# What a business refusal (code 40004) means, by its sub_code. Only these are definitive or
# make a coupon wait; any other answer that is not a success (gateway errors such as a bad
# signature or an unknown app_id, 20000 and its isp./aop. codes, a 40004 we do not know) is
# PlatformUnavailable and retried, because calling it a refusal would fail coupons for good
# over an operator's slip.
_BUSINESS_ERRORS: dict[str, type[PlatformError]] = {
    # The template may send again (budget raised, publishing resumed or begun): coupons wait.
    SubCode.BUDGET_NOT_ENOUGH: PlatformBudgetExhausted,
    SubCode.PUBLISH_NOT_STARTED: PlatformBatchUnavailable,
    SubCode.TEMPLATE_PAUSED: PlatformBatchUnavailable,
    # The user or Alipay's risk control says no: no retry changes it.
    SubCode.USER_NOT_EXIST: PlatformRefused,
    SubCode.RISK_REJECTED: PlatformRefused,
    SubCode.USER_SEND_LIMIT: PlatformRefused,
    # This template will not send: unknown, ended, deleted, or a draft never paid for.
    SubCode.TEMPLATE_NOT_EXIST: PlatformRefused,
    SubCode.TEMPLATE_EXPIRED: PlatformRefused,
    SubCode.TEMPLATE_DELETED: PlatformRefused,
    SubCode.TEMPLATE_NOT_ACTIVE: PlatformRefused,
    SubCode.TEMPLATE_CANNOT_DELETE: PlatformRefused,
    SubCode.OUT_BIZ_NO_REUSED: PlatformKeyReused,
    SubCode.INVALID_PARAMETER: PlatformRefused,
    SubCode.VOUCHER_NOT_EXIST: PlatformRefused,  # get_coupon answers None: not visible (yet)
}
# Alipay's frequency limits (code 40005): back off.
_RATE_LIMITS = frozenset({SubCode.APP_CALL_LIMITED, SubCode.METHOD_CALL_LIMITED})
# Only these codes can make a definitive or waiting outcome, so only these must be signed;
# the gateway's own refusals come unsigned and are all retried anyway.
ACTION_UNSUPPORTED = "ACTION_UNSUPPORTED"

_TEMPLATE_STATUS = {
    TEMPLATE_DRAFT: BatchStatus.CREATED,
    TEMPLATE_EFFECTIVE: BatchStatus.RUNNING,
    TEMPLATE_DELETED: BatchStatus.STOPPED,
    TEMPLATE_EXPIRED: BatchStatus.EXPIRED,
}
_VOUCHER_STATUS = {
    VOUCHER_ENABLED: PlatformCouponStatus.SENT,
    VOUCHER_USED: PlatformCouponStatus.USED,
    VOUCHER_EXPIRED: PlatformCouponStatus.EXPIRED,
    # Deleted from the wallet: it can never be used, which is what expired means to us.
    VOUCHER_DELETED: PlatformCouponStatus.EXPIRED,
}
_MINUTES_PER = {"DAY": 24 * 60, "HOUR": 60, "MINUTE": 1}


def error_for(code: str, msg: str, sub_code: str, sub_msg: str) -> PlatformError:
    """The `PlatformError` an answer other than success means."""
    business = unwrapped_sub_code(sub_code, sub_msg)
    message = sub_msg or msg
    if code == CALL_LIMITED or business in _RATE_LIMITS:
        return PlatformRateLimited(business or code, message)
    if code == BUSINESS_FAILED:
        kind = _BUSINESS_ERRORS.get(business)
        if kind is not None:
            return kind(business, message)
        log.warning("unknown Alipay refusal %s %s (%s): retried", code, business, message)
    elif code.startswith("4"):
        # Not the coupon's fault: our keys, app_id or the app's configuration are wrong.
        log.error("Alipay's gateway refused our call (%s %s): %s", code, sub_code, message)
    return PlatformUnavailable(business or code or "UNKNOWN", message)


def _text(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is not a non-empty string")
    return value


def _whole(raw: Mapping[str, Any], name: str) -> int:
    value = raw.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"{name} is not a whole number")


def _valid_days(period_json: str) -> int:
    """A template's voucher_valid_period in (whole, rounded up) days."""
    period = json.loads(period_json)
    if period["type"] == "RELATIVE":
        minutes = int(period["duration"]) * _MINUTES_PER[period["unit"]]
    elif period["type"] == "ABSOLUTE":
        span = parse_time(period["end"]) - parse_time(period["start"])
        minutes = math.ceil(span.total_seconds() / 60)
    else:
        raise ValueError(f"voucher_valid_period type {period['type']!r}")
    return max(1, math.ceil(minutes / (24 * 60)))


def _batch(raw: dict[str, Any]) -> PlatformBatch:
    quantity = _whole(raw, "voucher_quantity")
    return PlatformBatch(
        batch_id=_text(raw, "template_id"),
        name=str(raw.get("voucher_name") or raw["template_id"]),
        status=_TEMPLATE_STATUS[raw["status"]],  # a status we do not know is unreadable
        quantity=quantity,
        remaining=max(0, quantity - _whole(raw, "publish_count")),
        valid_days=_valid_days(_text(raw, "voucher_valid_period")),
        face_value_cents=cents(_text(raw, "amount")),
        min_spend_cents=cents(_text(raw, "floor_amount")),
        # Alipay templates limit no user: one may hold as many as the template has.
        per_user_limit=quantity,
        starts_at=parse_time(_text(raw, "publish_start_time")),
        ends_at=parse_time(_text(raw, "publish_end_time")),
        raw=raw,
    )


def _holder(raw: Mapping[str, Any]) -> str:
    user = raw.get("user_id") or raw.get("open_id")
    if not isinstance(user, str) or not user:
        raise ValueError("neither user_id nor open_id")
    return user


def _used_at(raw: Mapping[str, Any]) -> datetime | None:
    bills = raw.get("bill_details") or []
    if not isinstance(bills, list):
        raise ValueError("bill_details is not a list")
    uses = [
        parse_time(_text(bill, "gmt_create")) for bill in bills if bill.get("biz_type") == V_USE
    ]
    return min(uses) if uses else None


def _coupon(raw: dict[str, Any]) -> PlatformCoupon:
    return PlatformCoupon(
        coupon_id=_text(raw, "voucher_id"),
        batch_id=_text(raw, "template_id"),
        user_id=_holder(raw),
        status=_VOUCHER_STATUS[raw["status"]],  # USING, REFUNDING...: unreadable, asked again
        sent_at=parse_time(_text(raw, "gmt_create")),
        valid_until=parse_time(_text(raw, "gmt_expired")),
        used_at=_used_at(raw),
        raw=raw,
    )


def _user_field(user_id: str) -> dict[str, str]:
    # Alipay knows a user by user_id (2088...) or, newer, by a per-app open_id.
    return {"user_id": user_id} if ALIPAY_USER_ID.fullmatch(user_id) else {"open_id": user_id}


class AlipayPlatform:
    """Adapter for Alipay vouchers; raises only `PlatformError` subclasses."""

    def __init__(
        self,
        gateway_url: str,
        app: AlipayApp,
        *,
        timeout_s: float = 5.0,
        client: httpx.AsyncClient | None = None,
        callback_max_skew_s: float = 300,
        notify_url: str | None = None,
    ) -> None:
        """`gateway_url` is the whole gateway URL (https://openapi.alipay.com/gateway.do);
        `notify_url` is given to new templates as their `notify_uri`, where Alipay sends
        voucher notifications; `callback_max_skew_s` how far a notification's notify_time may
        be from our clock, either way, before it is taken for a replay."""
        self._gateway_url = gateway_url
        self._app = app
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._callback_max_skew_s = callback_max_skew_s
        self._notify_url = notify_url or None
        # Template terms by template id, for the validity bound of what a send returns.
        self._templates: dict[str, PlatformBatch] = {}

    def __repr__(self) -> str:  # never show a key
        return f"AlipayPlatform({self._gateway_url!r}, app_id={self._app.app_id!r})"

    @property
    def callback_success(self) -> str | None:
        return NOTIFY_SUCCESS  # Alipay sends a notification again unless answered so

    # -- the gateway ----------------------------------------------------------------

    async def _call(self, method: str, biz_content: Mapping[str, Any]) -> dict[str, Any]:
        """One signed gateway call; its verified answer on success, else the error it means."""
        params = signed_request(self._app, method, biz_content, datetime.now(UTC))
        try:
            response = await self._client.post(
                self._gateway_url,
                data=params,
                timeout=self._timeout,
                # A redirect could lead off Alipay, with our signed request: never follow one.
                follow_redirects=False,
            )
        except httpx.TimeoutException as exc:
            raise PlatformUnavailable("TIMEOUT", f"{method}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise PlatformUnavailable("TRANSPORT_ERROR", f"{method}: {exc!r}") from exc
        if response.status_code == 429:
            raise PlatformRateLimited("HTTP_429", f"{method}: {response.text[:200]}")
        if response.status_code != 200:
            raise PlatformUnavailable(
                f"HTTP_{response.status_code}", f"{method}: {response.text[:200]}"
            )
        answer = self._verified(method, response.content)
        code = str(answer.get("code", ""))
        if code != SUCCESS:
            raise error_for(
                code,
                str(answer.get("msg", "")),
                str(answer.get("sub_code", "")),
                str(answer.get("sub_msg", "")),
            )
        return answer

    def _verified(self, method: str, content: bytes) -> dict[str, Any]:
        """The `_response` object of an answer, once Alipay's signature over its exact text
        holds (an unsigned one only for the gateway's own refusals)."""
        try:
            members = top_level_members(content.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise PlatformUnavailable(
                "BAD_RESPONSE", f"{method}: unreadable answer: {exc}"
            ) from None
        found = members.get(response_key(method)) or members.get(ERROR_RESPONSE)
        if found is None or not isinstance(found[1], dict):
            raise PlatformUnavailable("BAD_RESPONSE", f"{method}: no {response_key(method)}")
        text, answer = found[0], dict(found[1])
        sign = members.get("sign")
        if sign is None:
            # Only the gateway's own refusals come unsigned; anything else unsigned (a success,
            # a business refusal, a code that is not even a string) is not believed.
            code = answer.get("code")
            if not isinstance(code, str) or code not in UNSIGNED_CODES:
                raise PlatformUnavailable("UNSIGNED_RESPONSE", f"{method}: the answer is unsigned")
            return answer
        if not isinstance(sign[1], str) or not rsa2_verify(
            self._app.alipay_public_key, text, sign[1]
        ):
            log.error("an answer to %s fails Alipay's signature: not believed", method)
            raise PlatformUnavailable("BAD_SIGNATURE", f"{method}: the answer's signature fails")
        return answer

    # -- Platform -------------------------------------------------------------------

    async def create_batch(self, spec: BatchSpec) -> PlatformBatch:
        biz: dict[str, Any] = {
            "voucher_type": CASHLESS_FIX_VOUCHER,
            "brand_name": spec.name[:12],  # Alipay's limit; the name is only shown
            "amount": yuan(spec.face_value_cents),
            "floor_amount": yuan(spec.min_spend_cents),
            "voucher_quantity": spec.quantity,
            "voucher_valid_period": json.dumps(
                {"type": "RELATIVE", "duration": spec.valid_days, "unit": "DAY"},
                separators=(",", ":"),
            ),
            "voucher_description": "[]",
            "out_biz_no": spec.request_key,
        }
        # Only an explicit window is sent: a retry must send the very same parameters, which
        # a window computed from our clock would not be.
        ends_at = spec.ends_at
        if ends_at is None and spec.starts_at is not None:
            ends_at = spec.starts_at + timedelta(days=spec.valid_days)
        if spec.starts_at is not None:
            biz["publish_start_time"] = format_time(spec.starts_at)
        if ends_at is not None:
            biz["publish_end_time"] = format_time(ends_at)
        if self._notify_url is not None:
            biz["notify_uri"] = self._notify_url
        answer = await self._call(CASHLESS_TEMPLATE_CREATE, biz)
        return await self.get_batch(read_answer(lambda raw: _text(raw, "template_id"), answer))

    async def get_batch(self, batch_id: str) -> PlatformBatch:
        return read_answer(
            _batch, await self._call(TEMPLATE_DETAIL_QUERY, {"template_id": batch_id})
        )

    async def change_batch(self, batch_id: str, action: BatchAction) -> PlatformBatch:
        action = BatchAction(action)
        if action is BatchAction.STOP:
            # Deleting a deleted template is a no-op at Alipay, as stopping twice is to us.
            try:
                await self._call(TEMPLATE_DELETE, {"template_id": batch_id})
            except PlatformRefused as exc:
                if exc.code != SubCode.TEMPLATE_CANNOT_DELETE:
                    raise
                raise PlatformRefused(
                    exc.code,
                    f"Alipay deletes only a template nothing was sent from ({exc.message}): "
                    "end its campaigns instead, and let the template's window run out",
                ) from exc
            return await self.get_batch(batch_id)
        if action is BatchAction.START:
            batch = await self.get_batch(batch_id)
            if batch.status is BatchStatus.RUNNING:
                return batch  # published from its creation: nothing to start
            raise PlatformRefused(
                ACTION_UNSUPPORTED,
                f"Alipay has no call to start a template (it publishes from its creation); "
                f"{batch_id} is {batch.status.value} and cannot send again",
            )
        raise PlatformRefused(
            ACTION_UNSUPPORTED, f"Alipay voucher templates cannot {action.value}: no such call"
        )

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[FlowRecord]:
        raise FlowUnavailable(
            "NO_FLOW_FILES",
            f"Alipay publishes no {FlowKind(kind).value} flow of voucher template {batch_id}: "
            "ask about each voucher (alipay.marketing.voucher.query)",
        )

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        asked_at = datetime.now(UTC)
        answer = await self._call(
            VOUCHER_SEND,
            {
                "template_id": request.batch_id,
                "out_biz_no": request.idempotency_key,
                **_user_field(request.user_id),
            },
        )
        voucher_id = read_answer(lambda raw: _text(raw, "voucher_id"), answer)
        # The send answers only the voucher's id (its exact times are the query's, which a
        # caller makes anyway to see it visible): the terms come from the template, read once
        # per template (its validity rules never change), with the earliest moment the voucher
        # can have been sent, so its validity is never overstated.
        batch = self._templates.get(request.batch_id)
        if batch is None:
            try:
                batch = await self.get_batch(request.batch_id)
            except PlatformError as exc:
                # The voucher is sent: nothing said after that may fail the coupon. Retried,
                # the same out_biz_no finds the same voucher.
                raise PlatformUnavailable(
                    "TEMPLATE_UNREADABLE", f"voucher {voucher_id} sent, its template: {exc}"
                ) from exc
            self._templates[request.batch_id] = batch
        return PlatformCoupon(
            coupon_id=voucher_id,
            batch_id=request.batch_id,
            user_id=request.user_id,
            status=PlatformCouponStatus.SENT,
            sent_at=asked_at,
            valid_until=min(asked_at + timedelta(days=batch.valid_days), batch.ends_at),
            used_at=None,
            raw=answer,
        )

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        try:
            answer = await self._call(VOUCHER_QUERY, {"voucher_id": coupon_id})
        except PlatformRefused as exc:
            if exc.code == SubCode.VOUCHER_NOT_EXIST:
                return None
            raise
        coupon = read_answer(_coupon, answer)
        # We send by user_id or open_id (`_user_field`); the answer may carry both.
        if user_id not in (answer.get("user_id"), answer.get("open_id")):
            # The query is by voucher id alone: another user's voucher is not this user's.
            log.warning("voucher %s belongs to another user than asked", coupon_id)
            return None
        return replace(coupon, user_id=user_id)

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CouponUsedNotice | None:
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
        if params.get("sign_type") != SIGN_TYPE:
            raise CallbackRejected(f"sign_type {params.get('sign_type', '')[:20]!r}, not RSA2")
        if params.get("charset", CHARSET).lower() != CHARSET:
            raise CallbackRejected("charset is not utf-8")
        if not rsa2_verify(self._app.alipay_public_key, notify_sign_content(params), sign):
            raise CallbackRejected("bad signature")
        # Checked once the signature holds: what fails now is a genuine notification that is
        # replayed, late, or not meant for us, which is what the log should say.
        if params.get("app_id") != self._app.app_id:
            raise CallbackRejected(f"for another app ({params.get('app_id', '')[:32]!r})")
        try:
            signed_at = parse_time(params.get("notify_time", "")).timestamp()
        except ValueError:
            raise CallbackRejected("garbled notify_time") from None
        skew = time.time() - signed_at
        if skew > self._callback_max_skew_s:
            raise CallbackRejected(f"stale: sent {skew:.0f} s ago")
        if -skew > self._callback_max_skew_s:
            raise CallbackRejected(f"from the future: sent {-skew:.0f} s ahead of our clock")
        if params.get("notify_type") != VOUCHER_NOTIFY_TYPE or params.get("biz_type") != V_USE:
            return None  # genuine, and not a voucher's use
        try:
            return CouponUsedNotice(
                notification_id=_text(params, "notify_id"),
                platform_coupon_id=_text(params, "voucher_id"),
                batch_id=_text(params, "template_id"),
                user_id=_holder(params),
                used_at=parse_time(_text(params, "gmt_biz")),
                raw=dict(params),
            )
        except ValueError as exc:
            raise CallbackRejected(f"unreadable notification: {exc}") from None

    async def refresh_keys(self) -> bool:
        return False  # Alipay's public key is configured, never fetched

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
