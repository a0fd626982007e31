"""`Platform` over WeChat Pay API v3 vouchers (代金券, /v3/marketing/favor), with httpx.

Documented behaviour followed (pay.weixin.qq.com merchant docs for 代金券, cross-checked with
wechatpay-im/website's API pages and the SDKs' models):

- Create a stock: `POST /v3/marketing/favor/coupon-stocks` (stock_name ≤ 20 characters, at
  most 9 of them Chinese, none of `_ , ; |`; belong_merchant = our mchid; the window
  available_begin_time..available_end_time, not starting in the past, at most 90 days;
  stock_use_rule max_coupons / max_amount = coupon_amount * max_coupons / max_coupons_per_user
  / natural_person_limit / prevent_api_abuse; coupon_use_rule.fixed_normal_coupon; no_cash;
  stock_type NORMAL; out_request_no) answers `stock_id`, `create_time`. Re-entry with the
  same out_request_no finds the same stock; with other content it is 400
  RESOURCE_ALREADY_EXISTS.
- Start / pause / restart: `POST /v3/marketing/favor/stocks/{stock_id}/start|pause|restart`
  with `stock_creator_mchid`. Query: `GET /v3/marketing/favor/stocks/{stock_id}
  ?stock_creator_mchid=`; status `unactivated`, `audit`, `running`, `paused`, `stoped` [sic].
- Send: `POST /v3/marketing/favor/users/{openid}/coupons` with stock_id, out_request_no,
  appid, stock_creator_mchid; answers only `coupon_id`. Query a coupon: `GET
  /v3/marketing/favor/users/{openid}/coupons/{coupon_id}?appid=`; status SENDED, USED,
  EXPIRED; the used time in `consume_information.consume_time`.
- Use flow: `GET /v3/marketing/favor/stocks/{stock_id}/use-flow` answers `url`, `hash_value`,
  `hash_type` (SHA1); the file is downloaded with a signed GET, its answer is not signed, so
  its SHA1 is what vouches for it. Columns are found by their header (批次id, 优惠id, 消耗时间,
  ...), each value may carry a leading "`".
- Errors (send coupon's table): 403 NOT_ENOUGH 批次预算不足; 403 USER_ACCOUNT_ABNORMAL 用户非法;
  403 REQUEST_BLOCKED (用户被限领拦截, 活动未开始或已结束, no permission); 400 INVALID_REQUEST
  活动已结束或未激活; 400 PARAM_ERROR 非法的批次状态 (a stock not running: paused); 404
  RESOURCE_NOT_EXISTS; 429 FREQUENCY_LIMITED / FREQUENCY_LIMIT_EXCEED; 500 SYSTEM_ERROR.
- Callbacks: COUPON.USE, `resource_type` encrypt-resource; the decrypted resource carries
  stock_creator_mchid, stock_id, coupon_id, ... and consume_information.consume_time.

Decisions where WeChat Pay and `Platform` differ:

- WeChat Pay has no call to stop a voucher stock (only start, pause, restart): STOP raises
  PlatformRefused NO_STOP_CALL. A stock whose window is over reads `stoped`; it is EXPIRED
  when its available_end_time has passed, else STOPPED (stopped by an operator).
- No sent flow exists (only use-flow and refund-flow): `batch_flow(SENT)` raises
  FlowUnavailable. The use-flow names no user: its records have user_id "" and no key.
- The stock query has no coupon validity after receipt: a batch's `valid_days` reads as its
  window's length in days (what we ask for by default). A send answers only the coupon id:
  `sent_at` is our clock at the answer and `valid_until` the stock's available_end_time, an
  upper bound (no coupon outlives its stock); the coupon query has the exact values, which
  is where the issue activity's receipt takes them from.
- COUPON.USE's documented resource carries no openid: a notice's `user_id` is "" unless the
  resource names an `openid`. Receivers key on the coupon id.
- With no window asked for, the window starts now (whole seconds) and lasts valid_days;
  it is remembered per request key, so a retried create in this process repeats the first
  one exactly (a different one would be RESOURCE_ALREADY_EXISTS).
- No minimum spend (0) becomes the face value plus one cent: WeChat Pay refuses a threshold
  that does not exceed the coupon (使用门槛必须大于优惠金额), and that is what "no threshold"
  means there; the batch then reads that threshold back. A minimum asked for at or below the
  face value is refused (PARAM_ERROR), not silently raised.
- Names and keys are made to fit: forbidden name characters become spaces and the name is
  cut to WeChat's length; a request key outside out_request_no's characters is replaced by a
  digest of it (deterministic, so retries agree).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx

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
from coupons.platforms.wechat.protocol import (
    AEAD_ALGORITHM,
    BEIJING,
    MAX_CLOCK_OFFSET_S,
    SignatureError,
    WechatMerchant,
    aead_decrypt,
    authorization,
    json_body,
    parse_time,
    rfc3339,
    verify_signed,
)

log = logging.getLogger(__name__)

# What a non-2xx answer means, by (HTTP status, WeChat code, message); None stands for any.
# The most specific entry wins. Only refusals are definitive, and only a signed answer is
# believed to be one. Anything not listed (401 SIGN_ERROR after a key rotation,
# APPID_MCHID_NOT_MATCH, MCH_NOT_EXISTS, NO_AUTH: our configuration, not the coupon; an
# unknown 4xx from a proxy; 5xx) is PlatformUnavailable and retried.
_ERRORS: dict[tuple[int, str | None, str | None], type[PlatformError]] = {
    # A stock that is not running but may again (paused): the coupon waits for it.
    (400, "PARAM_ERROR", "非法的批次状态"): PlatformBatchUnavailable,
    (400, "PARAM_ERROR", None): PlatformRefused,
    # 活动已结束或未激活 (ended, never started); our settings' faults: _CONFIGURATION_MARKERS.
    (400, "INVALID_REQUEST", None): PlatformRefused,
    (400, "RESOURCE_ALREADY_EXISTS", None): PlatformKeyReused,  # out_request_no reused
    (403, "NOT_ENOUGH", None): PlatformBudgetExhausted,
    (403, "USER_ACCOUNT_ABNORMAL", None): PlatformRefused,  # risk control: 用户非法
    # 用户被限领拦截 (per-user limit), 活动未开始或已结束 (商户无权发券: our settings).
    (403, "REQUEST_BLOCKED", None): PlatformRefused,
    (403, "RULE_LIMIT", None): PlatformRefused,
    (404, "RESOURCE_NOT_EXISTS", None): PlatformRefused,  # get_coupon answers None
    (429, None, None): PlatformRateLimited,
}
# INVALID_REQUEST and REQUEST_BLOCKED also answer for our merchant's settings (openid与appid
# 不匹配, 非法的商户号, 商户无权发券): a slip an operator fixes, never a coupon's failure.
_CONFIGURATION_MARKERS = ("appid", "商户号", "无权")
_DEFINITIVE = (PlatformRefused, PlatformBatchUnavailable)
_COUPON_USE = "COUPON.USE"
_ENCRYPTED = "encrypt-resource"
_STOCK_STATUS = {
    "unactivated": BatchStatus.CREATED,
    "audit": BatchStatus.CREATED,  # under review: not sending yet
    "running": BatchStatus.RUNNING,
    "paused": BatchStatus.PAUSED,
    "stoped": BatchStatus.STOPPED,  # [sic]; EXPIRED once its window is over, see _stock
}
_COUPON_STATUS = {
    "SENDED": PlatformCouponStatus.SENT,
    "USED": PlatformCouponStatus.USED,
    "EXPIRED": PlatformCouponStatus.EXPIRED,
}
_ACTION_PATHS = {
    BatchAction.START: "start",
    BatchAction.PAUSE: "pause",
    BatchAction.RESUME: "restart",
}
_REQUEST_NO = re.compile(r"[0-9A-Za-z_|*-]{1,128}")
_NAME_FORBIDDEN = str.maketrans({char: " " for char in "_,;|"})
_NAME_MAX, _NAME_MAX_CHINESE = 20, 9
_MINUTES_PER_DAY = 24 * 60
_USER_AGENT = "coupon-lifecycle-wechatpay/1"


def _normal(message: str) -> str:
    return message.strip().rstrip("。.")


def _error_for(status: int, code: str, message: str) -> PlatformError:
    kind = (
        _ERRORS.get((status, code, _normal(message)))
        or _ERRORS.get((status, code, None))
        or _ERRORS.get((status, None, None))
    )
    if kind is PlatformRefused and any(marker in message for marker in _CONFIGURATION_MARKERS):
        kind = None  # the same codes also say our merchant settings are wrong: not the coupon
    if kind is None:
        if (
            status in (401, 403)
            or code in ("APPID_MCHID_NOT_MATCH", "MCH_NOT_EXISTS")
            or any(marker in message for marker in _CONFIGURATION_MARKERS)
        ):
            # Not the coupon's fault: our key or the merchant's configuration is wrong.
            log.error("WeChat Pay refused our credentials (%s %s): %s", status, code, message)
        kind = PlatformUnavailable
    return kind(code, message)


def _stock_name(name: str) -> str:
    """`name` as WeChat Pay accepts a stock name: no `_ , ; |`, at most 20 characters of
    which at most 9 are not ASCII (Chinese)."""
    cleaned = " ".join(name.translate(_NAME_FORBIDDEN).split())[:_NAME_MAX]
    while sum(not char.isascii() for char in cleaned) > _NAME_MAX_CHINESE:
        cleaned = cleaned[:-1]
    return cleaned.strip() or "coupon batch"


def _threshold(spec: BatchSpec) -> int:
    """WeChat Pay's threshold for our minimum spend: it must exceed the face value (an order
    is never paid down to zero), so "no minimum" (0) is the face value plus one cent, which
    is all "no threshold" can mean there; a minimum asked for that does not exceed the face
    value is refused here, rather than changed behind the asker's back."""
    if spec.min_spend_cents == 0:
        return spec.face_value_cents + 1
    if spec.min_spend_cents <= spec.face_value_cents:
        raise PlatformRefused(
            "PARAM_ERROR",
            f"WeChat Pay needs a minimum spend above the face value ({spec.face_value_cents} "
            f"cents); {spec.min_spend_cents} was asked for (0 means none: face value + 1 cent)",
        )
    return spec.min_spend_cents


def _request_no(key: str) -> str:
    """`key` as an out_request_no: itself when WeChat Pay accepts it, else a digest of it."""
    if _REQUEST_NO.fullmatch(key):
        return key
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _integer(raw: Mapping[str, Any], name: str) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} is not an integer")
    return value


def _text(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is not a non-empty string")
    return value


def _stock(raw: dict[str, Any]) -> PlatformBatch:
    rule, begins, ends = (
        raw["stock_use_rule"],
        raw["available_begin_time"],
        raw["available_end_time"],
    )
    fixed = rule["fixed_normal_coupon"]
    starts_at, ends_at = parse_time(begins), parse_time(ends)
    status = _STOCK_STATUS[raw["status"]]  # a status we do not know is an unreadable answer
    if status == BatchStatus.STOPPED and ends_at <= datetime.now(UTC):
        status = BatchStatus.EXPIRED
    quantity = _integer(rule, "max_coupons")
    return PlatformBatch(
        batch_id=_text(raw, "stock_id"),
        name=_text(raw, "stock_name"),
        status=status,
        quantity=quantity,
        remaining=max(0, quantity - _integer(raw, "distributed_coupons")),
        valid_days=max(1, math.ceil((ends_at - starts_at) / timedelta(days=1))),
        face_value_cents=_integer(fixed, "coupon_amount"),
        min_spend_cents=_integer(fixed, "transaction_minimum"),
        per_user_limit=_integer(rule, "max_coupons_per_user"),
        starts_at=starts_at,
        ends_at=ends_at,
        raw=raw,
    )


def _coupon(raw: dict[str, Any], openid: str) -> PlatformCoupon:
    status = _COUPON_STATUS[raw["status"]]
    used_at = None
    if status == PlatformCouponStatus.USED:
        used_at = parse_time(raw["consume_information"]["consume_time"])
    return PlatformCoupon(
        coupon_id=_text(raw, "coupon_id"),
        batch_id=_text(raw, "stock_id"),
        user_id=openid,
        status=status,
        sent_at=parse_time(raw["create_time"]),
        valid_until=parse_time(raw["available_end_time"]),
        used_at=used_at,
        raw=raw,
    )


@dataclass(frozen=True)
class _FlowFile:
    url: str
    sha1: str


def _flow_file(raw: dict[str, Any]) -> _FlowFile:
    if str(raw["hash_type"]).upper() != "SHA1":
        raise ValueError(f"hash_type {raw['hash_type']!r}, not SHA1")
    return _FlowFile(url=_text(raw, "url"), sha1=_text(raw, "hash_value").lower())


_STOCK_COLUMN, _COUPON_COLUMN, _USED_COLUMN = "批次id", "优惠id", "消耗时间"


def _cell(value: str) -> str:
    # Bills put a "`" before values so spreadsheets keep long numbers as text.
    return value.strip().removeprefix("`").strip()


def _flow_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    # The file's times are Beijing time, written without an offset.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=BEIJING)


def _use_flow(text: str) -> list[FlowRecord]:
    rows = [row for row in csv.reader(io.StringIO(text.lstrip("\ufeff"), newline="")) if row]
    if not rows:
        return []
    header = [_cell(name).lower() for name in rows[0]]
    where = {
        name: header.index(name.lower()) for name in (_STOCK_COLUMN, _COUPON_COLUMN, _USED_COLUMN)
    }
    return [
        FlowRecord(
            coupon_id=_cell(row[where[_COUPON_COLUMN]]),
            batch_id=_cell(row[where[_STOCK_COLUMN]]),
            user_id="",  # the use flow names no user
            idempotency_key=None,
            at=_flow_time(_cell(row[where[_USED_COLUMN]])),
        )
        for row in rows[1:]
    ]


class WechatPayPlatform:
    """Adapter for WeChat Pay vouchers; raises only `PlatformError` subclasses."""

    def __init__(
        self,
        base_url: str,
        merchant: WechatMerchant,
        *,
        timeout_s: float = 5.0,
        client: httpx.AsyncClient | None = None,
        callback_max_skew_s: float = 300,
    ) -> None:
        """`base_url` is WeChat Pay's API origin (https://api.mch.weixin.qq.com, or the
        simulator); `callback_max_skew_s` how far a notification's timestamp may be from our
        clock, either way, before it is taken for a replay."""
        self._base_url = base_url.rstrip("/")
        self._origin = httpx.URL(self._base_url + "/")
        # Signed URLs are the path as sent: any path prefix of the base URL is part of it.
        self._prefix = urlsplit(self._base_url).path
        self._merchant = merchant
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._callback_max_skew_s = callback_max_skew_s
        # Default windows by request key: a retried create must repeat the first exactly.
        self._windows: dict[str, tuple[datetime, datetime]] = {}
        # A stock's end never changes once created (there is no call to change it).
        self._stock_ends: dict[str, datetime] = {}

    # Documented: a receiver takes a notification by answering 200 or 204, no words needed.
    callback_success = None

    def __repr__(self) -> str:  # never show a key
        return f"WechatPayPlatform({self._base_url!r}, mchid={self._merchant.mchid!r})"

    # -- HTTP -------------------------------------------------------------------

    async def _exchange(
        self,
        method: str,
        path: str,
        what: str,
        body: Mapping[str, Any] | None = None,
        *,
        signed_answer: bool = True,
    ) -> httpx.Response:
        """One signed request to `path` (path and query, as signed); any answer but a 2xx
        whose signature holds raises the `PlatformError` it means."""
        content = json_body(body) if body is not None else b""
        signed_url = self._prefix + path
        headers = {
            "Authorization": authorization(self._merchant, method, signed_url, content),
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
            "Wechatpay-Serial": self._merchant.platform_public_key_id,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._client.request(
                method,
                self._base_url + path,
                content=content,
                headers=headers,
                timeout=self._timeout,
                # A redirect could lead off the platform, with our signature: never follow.
                follow_redirects=False,
            )
        except httpx.TimeoutException as exc:
            raise PlatformUnavailable("TIMEOUT", f"{what}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise PlatformUnavailable("TRANSPORT_ERROR", f"{what}: {exc!r}") from exc
        if not response.is_success:
            raise self._error_of(response, what)
        if signed_answer:
            self._check_signature(response, what)
        return response

    def _check_signature(self, response: httpx.Response, what: str) -> None:
        try:
            verify_signed(
                response.headers,
                response.content,
                public_key=self._merchant.platform_public_key,
                key_id=self._merchant.platform_public_key_id,
                max_skew_s=MAX_CLOCK_OFFSET_S,
            )
        except SignatureError as exc:
            log.warning("%s: answer %s not believed: %s", what, response.status_code, exc.reason)
            raise PlatformUnavailable("BAD_SIGNATURE", f"{what}: {exc.reason}") from None

    def _error_of(self, response: httpx.Response, what: str) -> PlatformError:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("code"), str):
            code, message = payload["code"], str(payload.get("message", ""))
        else:
            code, message = f"HTTP_{response.status_code}", response.text[:200]
        error = _error_for(response.status_code, code, message)
        if isinstance(error, _DEFINITIVE):
            # Anyone on the path can answer 4xx: only WeChat Pay's signature makes a refusal.
            self._check_signature(response, f"{what} ({response.status_code} {code})")
        return error

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        what = f"{method} {path.partition('?')[0]}"
        response = await self._exchange(method, path, what, body)
        try:
            payload = json.loads(response.content)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise PlatformUnavailable("BAD_RESPONSE", f"{what}: not a JSON object")
        return payload

    def _platform_path(self, url: str) -> str:
        """The path and query of `url`, only if it is on the platform's origin: the request
        carries our signature, and a descriptor must not send it anywhere else."""
        try:
            target = self._origin.join(url)
        except httpx.InvalidURL as exc:
            raise PlatformUnavailable("BAD_FLOW_URL", f"unreadable flow file URL: {exc}") from exc
        if (target.scheme, target.host, target.port) != (
            self._origin.scheme,
            self._origin.host,
            self._origin.port,
        ):
            raise PlatformUnavailable(
                "BAD_FLOW_URL", f"flow file at {target.scheme}://{target.host}, off the platform"
            )
        path = target.raw_path.decode("ascii")
        if not path.startswith(self._prefix):
            raise PlatformUnavailable("BAD_FLOW_URL", "flow file outside the platform's base path")
        return path.removeprefix(self._prefix)

    # -- Platform ---------------------------------------------------------------

    def _window(self, spec: BatchSpec) -> tuple[datetime, datetime]:
        if spec.starts_at is not None and spec.ends_at is not None:
            return spec.starts_at, spec.ends_at
        remembered = self._windows.get(spec.request_key)
        if remembered is not None:
            return remembered
        # Now, in whole seconds: WeChat Pay refuses a window that starts in the past (by more
        # than its clocks' slack), and one that starts later refuses sends until it opens.
        begins = spec.starts_at or datetime.now(UTC).replace(microsecond=0)
        ends = spec.ends_at or begins + timedelta(days=spec.valid_days)
        self._windows[spec.request_key] = (begins, ends)
        return begins, ends

    async def create_batch(self, spec: BatchSpec) -> PlatformBatch:
        begins, ends = self._window(spec)
        mchid = self._merchant.mchid
        raw = await self._call(
            "POST",
            "/v3/marketing/favor/coupon-stocks",
            {
                "stock_name": _stock_name(spec.name),
                "belong_merchant": mchid,
                "available_begin_time": rfc3339(begins),
                "available_end_time": rfc3339(ends),
                "stock_use_rule": {
                    "max_coupons": spec.quantity,
                    "max_amount": spec.quantity * spec.face_value_cents,
                    "max_coupons_per_user": spec.per_user_limit,
                    "natural_person_limit": False,
                    "prevent_api_abuse": False,
                },
                "coupon_use_rule": {
                    "coupon_available_time": {
                        "available_time_after_receive": spec.valid_days * _MINUTES_PER_DAY
                    },
                    "fixed_normal_coupon": {
                        "coupon_amount": spec.face_value_cents,
                        "transaction_minimum": _threshold(spec),
                    },
                    "available_merchants": [mchid],
                },
                "no_cash": False,
                "stock_type": "NORMAL",
                "out_request_no": _request_no(spec.request_key),
            },
        )
        stock_id = read_answer(lambda answer: _text(answer, "stock_id"), raw)
        return await self.get_batch(stock_id)

    async def get_batch(self, batch_id: str) -> PlatformBatch:
        query = urlencode({"stock_creator_mchid": self._merchant.mchid})
        raw = await self._call(
            "GET", f"/v3/marketing/favor/stocks/{quote(batch_id, safe='')}?{query}"
        )
        batch = read_answer(_stock, raw)
        self._stock_ends[batch.batch_id] = batch.ends_at
        return batch

    async def change_batch(self, batch_id: str, action: BatchAction) -> PlatformBatch:
        verb = _ACTION_PATHS.get(BatchAction(action))
        if verb is None:
            raise PlatformRefused(
                "NO_STOP_CALL",
                "WeChat Pay vouchers have no call to stop a stock (only start, pause and "
                "restart): pause it, or let its window end",
            )
        await self._call(
            "POST",
            f"/v3/marketing/favor/stocks/{quote(batch_id, safe='')}/{verb}",
            {"stock_creator_mchid": self._merchant.mchid},
        )
        return await self.get_batch(batch_id)

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[FlowRecord]:
        if FlowKind(kind) == FlowKind.SENT:
            raise FlowUnavailable(
                "NO_SENT_FLOW", "WeChat Pay publishes no flow of sent vouchers, only use-flow"
            )
        what = f"use flow of {batch_id}"
        raw = await self._call(
            "GET", f"/v3/marketing/favor/stocks/{quote(batch_id, safe='')}/use-flow"
        )
        file = read_answer(_flow_file, raw)
        try:
            # The download's answer is not signed (documented): its SHA1 vouches for it.
            response = await self._exchange(
                "GET", self._platform_path(file.url), f"download {what}", signed_answer=False
            )
        except _DEFINITIVE as exc:
            # An expired or unknown file token: ask for the flow again, nothing is refused.
            raise PlatformUnavailable("FLOW_DOWNLOAD_FAILED", f"download {what}: {exc}") from exc
        if hashlib.sha1(response.content, usedforsecurity=False).hexdigest() != file.sha1:
            raise PlatformUnavailable("BAD_FLOW_FILE", "the flow file does not match its SHA1")
        try:
            return _use_flow(response.content.decode("utf-8"))
        except (csv.Error, IndexError, UnicodeDecodeError, ValueError) as exc:
            raise PlatformUnavailable("BAD_FLOW_FILE", f"unreadable flow file: {exc!r}") from exc

    async def _stock_end(self, batch_id: str) -> datetime:
        ends = self._stock_ends.get(batch_id)
        if ends is None:
            ends = (await self.get_batch(batch_id)).ends_at
        return ends

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        mchid, openid = self._merchant.mchid, request.user_id
        raw = await self._call(
            "POST",
            f"/v3/marketing/favor/users/{quote(openid, safe='')}/coupons",
            {
                "stock_id": request.batch_id,
                "out_request_no": _request_no(request.idempotency_key),
                "appid": self._merchant.appid,
                "stock_creator_mchid": mchid,
            },
        )
        coupon_id = read_answer(lambda answer: _text(answer, "coupon_id"), raw)
        sent_at = datetime.now(UTC)
        try:
            valid_until = await self._stock_end(request.batch_id)
        except PlatformError as exc:
            # The coupon is in the wallet; only its stock could not be read. Never a refusal
            # of the send: resending the same out_request_no returns this coupon again.
            raise PlatformUnavailable(
                "STOCK_UNREADABLE", f"coupon {coupon_id} sent, its stock unreadable: {exc}"
            ) from exc
        return PlatformCoupon(
            coupon_id=coupon_id,
            batch_id=request.batch_id,
            user_id=openid,
            status=PlatformCouponStatus.SENT,
            sent_at=sent_at,
            valid_until=valid_until,
            used_at=None,
            raw=raw,
        )

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        query = urlencode({"appid": self._merchant.appid})
        path = (
            f"/v3/marketing/favor/users/{quote(user_id, safe='')}"
            f"/coupons/{quote(coupon_id, safe='')}?{query}"
        )
        try:
            raw = await self._call("GET", path)
        except PlatformRefused as exc:
            if exc.code == "RESOURCE_NOT_EXISTS":
                return None
            raise
        return read_answer(lambda answer: _coupon(answer, user_id), raw)

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CouponUsedNotice | None:
        merchant = self._merchant
        try:
            verify_signed(
                headers,
                body,
                public_key=merchant.platform_public_key,
                key_id=merchant.platform_public_key_id,
                max_skew_s=self._callback_max_skew_s,
            )
        except SignatureError as exc:
            raise CallbackRejected(exc.reason) from None
        try:
            envelope = json.loads(body)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise CallbackRejected(f"unparseable body: {exc}") from None
        if not isinstance(envelope, dict):
            raise CallbackRejected("unparseable body: not a JSON object")
        if envelope.get("event_type") != _COUPON_USE:
            return None  # genuine (signed), and not a coupon's use
        resource = envelope.get("resource")
        if envelope.get("resource_type") != _ENCRYPTED or not isinstance(resource, dict):
            raise CallbackRejected("no encrypted resource")
        if resource.get("algorithm") != AEAD_ALGORITHM:
            raise CallbackRejected(f"unknown algorithm {str(resource.get('algorithm'))[:40]!r}")
        nonce, ciphertext = resource.get("nonce"), resource.get("ciphertext")
        associated_data = resource.get("associated_data") or ""
        if not (isinstance(nonce, str) and isinstance(ciphertext, str)) or not isinstance(
            associated_data, str
        ):
            raise CallbackRejected("garbled resource")
        try:
            plaintext = aead_decrypt(
                merchant.apiv3_key,
                nonce=nonce,
                ciphertext=ciphertext,
                associated_data=associated_data,
            )
            coupon = json.loads(plaintext)
            if not isinstance(coupon, dict):
                raise ValueError("the resource is not a JSON object")
        except ValueError as exc:
            raise CallbackRejected(f"unreadable resource: {exc}") from None
        creator = coupon.get("stock_creator_mchid")
        if creator is not None and creator != merchant.mchid:
            raise CallbackRejected(f"a stock of merchant {str(creator)[:20]!r}, not ours")
        try:
            consumed = coupon["consume_information"]
            openid = coupon.get("openid")
            return CouponUsedNotice(
                notification_id=_text(envelope, "id"),
                platform_coupon_id=_text(coupon, "coupon_id"),
                batch_id=_text(coupon, "stock_id"),
                user_id=openid if isinstance(openid, str) else "",
                used_at=parse_time(consumed["consume_time"]),
                raw={**{k: v for k, v in envelope.items() if k != "resource"}, "resource": coupon},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CallbackRejected(f"unreadable notification: {exc!r}") from None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
