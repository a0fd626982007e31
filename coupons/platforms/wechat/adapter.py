"""`Platform` over WeChat Pay API v3 vouchers (代金券, /v3/marketing/favor), with httpx.

Every rule followed here, with its published source (pay.weixin.qq.com pages, the official
wechatpay-java / wechatpay-go SDK models) and the test that proves it, is a row of
docs/platforms/wechat.md; unconfirmed ones are marked there. In short:

- A batch is a stock: `POST /v3/marketing/favor/coupon-stocks`, then `/start`; `/pause`,
  `/restart`; `/stop` only for a stock never started (终止未激活的批次). A new stock cannot
  start at once: the platform answers 400 INVALID_REQUEST 卡包信息尚未注册完成,请稍后重试 for
  about a minute, which is an answer to wait out (PlatformUnavailable), not a refusal.
- A coupon's validity is the stock's window (`available_begin_time`..`available_end_time`,
  at most 90 days): `coupon_use_rule.coupon_available_time` (valid N minutes after receipt) is
  "暂未开放" through the API and refused above 1440, so it is never sent. `valid_days` of a
  batch without a window is the window's length; with a window, coupons are valid until it
  ends, so a `valid_days` shorter than the window is refused (it cannot be kept).
- Send: `POST /v3/marketing/favor/users/{openid}/coupons` with `out_request_no` (our key);
  it answers only `coupon_id`. The coupon query (`GET .../users/{openid}/coupons/{id}`)
  answers its status SENDED / USED / EXPIRED and its own available_begin/end_time; the
  official SDK models carry no `consume_information`, so a use's time comes from the
  COUPON.USE notification (or is unknown: None).
- Errors: the favor error table (`_ERRORS`); only a signed answer is believed a refusal.
- The use flow (`/use-flow`) is published from 10:00 the day after the stock ends; before
  that (and for a stock nothing of was used) it answers 404 RESOURCE_NOT_EXISTS 账单文件不存在:
  FlowUnavailable, so reconciliation asks about each coupon. No sent flow exists.
- Signatures: answers and notifications are verified with the key their `Wechatpay-Serial`
  names: the WeChat Pay public key (`PUB_KEY_ID_...`) if the merchant has one, or a platform
  certificate downloaded from `GET /v3/certificates` and opened with the APIv3 key. So a
  merchant on platform certificates, one on the public key, and one in the middle of the switch
  (answers follow the request's `Wechatpay-Serial`, notifications are signed by either for
  about a week) all work. Certificates are fetched when a serial we do not hold appears, at
  most once a minute (a forged serial cannot make us hammer the platform), and `refresh_keys`
  fetches them for a receiver of notifications.

Decisions where WeChat Pay and `Platform` differ:

- A running stock cannot be stopped (only paused, or left to end): STOP of a started stock
  raises PlatformRefused NO_STOP_CALL. A stock whose window is over reads `stoped`; it is
  EXPIRED when its available_end_time has passed, else STOPPED.
- COUPON.USE's resource carries no openid: a notice's `user_id` is "". Receivers find the
  coupon by its coupon id and take each notification once, by its id.
- With no window asked for, the window starts now (whole seconds) and lasts valid_days; it is
  remembered per request key, so a retried create in this process repeats the first exactly
  (WeChat Pay takes the whole request as the re-entry's content), and forgotten when the
  create is refused. Across processes the catalog never asks again for a batch the ledger
  holds.
- No minimum spend (0) becomes the face value plus one cent: the threshold must exceed the
  face value (使用门槛必须大于优惠金额). A minimum at or below the face value is refused here.
- Names and keys are made to fit: forbidden name characters become spaces and the name is
  cut to WeChat's length; a request key outside out_request_no's characters is replaced by a
  digest of it (deterministic, so retries agree).
- 预充值 (no_cash false): starting the stock locks its budget from the merchant's balance; a
  balance too small is a refusal of the start naming that, not a coupon's budget running out.

Over 500 lines on purpose: the whole of one platform's adapter, each method next to the
published rules it follows; docs/platforms/wechat.md is its index.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

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
    PlatformNotReady,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
    answer_text,
    exchange,
    on_platform,
    read_answer,
)
from coupons.platforms.wechat.protocol import (
    AEAD_ALGORITHM,
    BEIJING,
    MAX_CLOCK_OFFSET_S,
    PUBLIC_KEY_ID_PREFIX,
    SignatureError,
    WechatMerchant,
    aead_decrypt,
    authorization,
    certificate_key,
    json_body,
    parse_time,
    read_certificates,
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
# INVALID_REQUEST also answers a start right after creation while WeChat Pay registers the new
# stock (卡包信息尚未注册完成,请稍后重试): asked again later, it goes through.
_TRANSIENT_MARKERS = ("尚未注册完成",)
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
    BatchAction.STOP: "stop",  # only a stock never started (终止未激活的代金券批次)
}
_REQUEST_NO = re.compile(r"[0-9A-Za-z_|*-]{1,128}")
_NAME_FORBIDDEN = str.maketrans({char: " " for char in "_,;|"})
_NAME_MAX, _NAME_MAX_CHINESE = 20, 9
# available_begin_time..available_end_time: "批次可用时间范围最长为90天".
_LONGEST_WINDOW = timedelta(days=90)
# A serial we do not hold makes us fetch the certificates at most this often.
_CERTIFICATES_REFETCH_S = 60.0
# Certificates held are fetched again after this long ("间隔时间小于12小时").
_CERTIFICATES_LIFE_S = 6 * 3600.0
_USER_AGENT = "coupon-lifecycle-wechatpay/1"


def _normal(message: str) -> str:
    return message.strip().rstrip("。.")


def _error_for(status: int, code: str, message: str) -> PlatformError:
    kind = (
        _ERRORS.get((status, code, _normal(message)))
        or _ERRORS.get((status, code, None))
        or _ERRORS.get((status, None, None))
    )
    if kind is PlatformRefused and any(marker in message for marker in _TRANSIENT_MARKERS):
        return PlatformNotReady(code, message)
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


def _days(span: timedelta) -> str:
    days = span / timedelta(days=1)
    return f"{days:g} days" if days != 1 else "1 day"


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
        batch_id=answer_text(raw, "stock_id"),
        name=answer_text(raw, "stock_name"),
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
    # The official SDKs' Coupon model has no consume_information (only COUPON.USE carries
    # it); where an answer has it, its time is the use's.
    consumed = raw.get("consume_information")
    used_at = None
    if status == PlatformCouponStatus.USED and isinstance(consumed, dict):
        used_at = parse_time(consumed["consume_time"])
    return PlatformCoupon(
        coupon_id=answer_text(raw, "coupon_id"),
        batch_id=answer_text(raw, "stock_id"),
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
    return _FlowFile(url=answer_text(raw, "url"), sha1=answer_text(raw, "hash_value").lower())


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
        # Platform certificates downloaded with the APIv3 key, by serial (key_name).
        self._certificates: dict[str, x509.Certificate] = {}
        self._certificates_asked_at: float | None = None
        self._certificates_downloaded_at: float | None = None
        self._certificates_lock = asyncio.Lock()
        self._told_certificate_signs = False

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
        refresh: bool = True,
    ) -> httpx.Response:
        """One signed request to `path` (path and query, as signed); any answer but a 2xx
        whose signature holds raises the `PlatformError` it means. `refresh` False: a serial
        we do not hold is not a reason to fetch the certificates (we are fetching them)."""
        content = json_body(body) if body is not None else b""
        signed_url = self._prefix + path
        headers = {
            "Authorization": authorization(self._merchant, method, signed_url, content),
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        if self._merchant.platform_public_key_id is not None:
            # A merchant with a public key names it on every request: during the switch
            # WeChat Pay signs each answer with the key the request names (as wechatpayv3
            # and the official SDKs do in public key mode).
            headers["Wechatpay-Serial"] = self._merchant.platform_public_key_id
        if body is not None:
            headers["Content-Type"] = "application/json"
        response = await exchange(
            self._client,
            what,
            method,
            self._base_url + path,
            content=content,
            headers=headers,
            timeout=self._timeout,
        )
        if not response.is_success:
            raise await self._error_of(response, what, refresh=refresh)
        if signed_answer:
            await self._check_signature(response, what, refresh=refresh)
        return response

    def _verifying_keys(self) -> dict[str, rsa.RSAPublicKey]:
        now = datetime.now(UTC)
        keys = {
            serial: certificate_key(cert)
            for serial, cert in self._certificates.items()
            if cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
        }
        merchant = self._merchant
        if merchant.platform_public_key is not None and merchant.platform_public_key_id:
            keys[merchant.platform_public_key_id] = merchant.platform_public_key
        return keys

    def _verify(self, headers: Mapping[str, str], body: bytes, max_skew_s: float) -> None:
        serial = verify_signed(headers, body, keys=self._verifying_keys(), max_skew_s=max_skew_s)
        if (
            self._merchant.platform_public_key_id is not None
            and not serial.startswith(PUBLIC_KEY_ID_PREFIX)
            and not self._told_certificate_signs
        ):
            self._told_certificate_signs = True
            log.info(
                "WeChat Pay signed with platform certificate %s although we hold its public "
                "key: the merchant is on certificates, or in the middle of the switch",
                serial,
            )

    async def _check_signature(
        self, response: httpx.Response, what: str, *, refresh: bool = True
    ) -> None:
        downloaded = self._certificates_downloaded_at
        if (
            refresh
            and downloaded is not None
            and time.monotonic() - downloaded > _CERTIFICATES_LIFE_S
        ):
            # WeChat Pay: fetch the list more often than every 12 hours, so a withdrawn
            # certificate stops verifying and a new one is held before it signs.
            await self.refresh_keys()
        try:
            try:
                self._verify(response.headers, response.content, MAX_CLOCK_OFFSET_S)
            except SignatureError as exc:
                if not (exc.unknown_key and refresh):
                    raise
                # Again once the certificates were fetched (by this call, or by another one
                # that asked first).
                await self.refresh_keys()
                self._verify(response.headers, response.content, MAX_CLOCK_OFFSET_S)
        except SignatureError as exc:
            log.warning("%s: answer %s not believed: %s", what, response.status_code, exc.reason)
            raise PlatformUnavailable("BAD_SIGNATURE", f"{what}: {exc.reason}") from None

    async def refresh_keys(self) -> bool:
        """Download the platform certificates (`GET /v3/certificates`), opened with the APIv3
        key; True when one we did not hold arrived. At most once a minute: asked more often
        (a serial we do not hold, again and again), it answers False without a call."""
        async with self._certificates_lock:
            now = time.monotonic()
            asked = self._certificates_asked_at
            if asked is not None and now - asked < _CERTIFICATES_REFETCH_S:
                return False
            self._certificates_asked_at = now
            what = "GET /v3/certificates"
            try:
                response = await self._exchange(
                    "GET", "/v3/certificates", what, signed_answer=False, refresh=False
                )
                downloaded = read_certificates(
                    json.loads(response.content), self._merchant.apiv3_key, datetime.now(UTC)
                )
            except PlatformError as exc:
                log.warning("platform certificates not downloaded: %s", exc)
                return False
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("platform certificates not readable: %s", exc)
                return False
            # The answer is signed by one of the certificates it carries (documented), or by
            # the public key a merchant in the middle of the switch names: a download that
            # does not verify with them is not believed.
            keys = {
                **self._verifying_keys(),
                **{serial: certificate_key(cert) for serial, cert in downloaded.items()},
            }
            try:
                verify_signed(response.headers, response.content, keys=keys)
            except SignatureError as exc:
                log.warning("platform certificates not believed: %s", exc.reason)
                return False
            new = set(downloaded) - set(self._certificates)
            self._certificates = downloaded
            self._certificates_downloaded_at = time.monotonic()
            if new:
                log.info("platform certificates now held: %s", ", ".join(sorted(downloaded)))
            return bool(new)

    async def _error_of(
        self, response: httpx.Response, what: str, *, refresh: bool = True
    ) -> PlatformError:
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
            await self._check_signature(
                response, f"{what} ({response.status_code} {code})", refresh=refresh
            )
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
        path = on_platform(self._origin, url).raw_path.decode("ascii")
        if not path.startswith(self._prefix):
            raise PlatformUnavailable("BAD_FLOW_URL", "flow file outside the platform's base path")
        return path.removeprefix(self._prefix)

    # -- Platform ---------------------------------------------------------------

    def batch_request(self, spec: BatchSpec) -> BatchSpec:
        """`spec` with the window this create would fill in (base.FixesRequest)."""
        begins, ends = self._window(spec)
        return replace(spec, starts_at=begins, ends_at=ends)

    def _window(self, spec: BatchSpec) -> tuple[datetime, datetime]:
        """The stock's window, which is also every coupon's validity on WeChat Pay; refused
        here, before any call, when it cannot keep what `spec` asks."""
        remembered = self._windows.get(spec.request_key)
        if remembered is not None:
            return remembered
        # Now, in whole seconds: WeChat Pay refuses a window that starts in the past (by more
        # than its clocks' slack), and one that starts later refuses sends until it opens.
        begins = spec.starts_at or datetime.now(UTC).replace(microsecond=0)
        ends = spec.ends_at or begins + timedelta(days=spec.valid_days)
        if ends - begins > _LONGEST_WINDOW:
            raise PlatformRefused(
                "PARAM_ERROR",
                "a WeChat Pay stock and its coupons last at most 90 days (批次可用时间范围最长为"
                f"90天); {_days(ends - begins)} were asked for",
            )
        if spec.valid_days * timedelta(days=1) < ends - begins:
            raise PlatformRefused(
                "PARAM_ERROR",
                "WeChat Pay coupons are valid until their stock's window ends (validity after "
                "receipt is not open through its API), so a coupon valid "
                f"{spec.valid_days} days cannot be kept in a window of {_days(ends - begins)}: "
                "shorten the window or give more days",
            )
        if spec.starts_at is None or spec.ends_at is None:
            self._windows[spec.request_key] = (begins, ends)
        return begins, ends

    async def create_batch(self, spec: BatchSpec) -> PlatformBatch:
        begins, ends = self._window(spec)
        mchid = self._merchant.mchid
        try:
            raw = await self._create_stock(spec, begins, ends, mchid)
        except PlatformRefused:
            # Refused: no stock holds this window, and a corrected request must not inherit
            # a start that is in the past by then.
            self._windows.pop(spec.request_key, None)
            raise
        stock_id = read_answer(lambda answer: answer_text(answer, "stock_id"), raw)
        return await self.get_batch(stock_id)

    async def _create_stock(
        self, spec: BatchSpec, begins: datetime, ends: datetime, mchid: str
    ) -> dict[str, Any]:
        return await self._call(
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

    async def get_batch(self, batch_id: str) -> PlatformBatch:
        query = urlencode({"stock_creator_mchid": self._merchant.mchid})
        raw = await self._call(
            "GET", f"/v3/marketing/favor/stocks/{quote(batch_id, safe='')}?{query}"
        )
        batch = read_answer(_stock, raw)
        self._stock_ends[batch.batch_id] = batch.ends_at
        return batch

    async def change_batch(self, batch_id: str, action: BatchAction) -> PlatformBatch:
        action = BatchAction(action)
        if action is BatchAction.STOP:
            batch = await self.get_batch(batch_id)
            if batch.status in (BatchStatus.STOPPED, BatchStatus.EXPIRED):
                return batch  # stopping twice is a no-op, as every action here is
            if batch.status is not BatchStatus.CREATED:
                raise PlatformRefused(
                    "NO_STOP_CALL",
                    "WeChat Pay stops only a stock that was never started (终止未激活的批次); "
                    f"{batch_id} is {batch.status.value}: pause it, or let its window end",
                )
        try:
            await self._call(
                "POST",
                f"/v3/marketing/favor/stocks/{quote(batch_id, safe='')}/{_ACTION_PATHS[action]}",
                {"stock_creator_mchid": self._merchant.mchid},
            )
        except PlatformBudgetExhausted as exc:
            # Starting a 预充值 stock locks its whole budget from the merchant's balance: here
            # NOT_ENOUGH says that balance is short, which no coupon can wait out.
            raise PlatformRefused(
                exc.code,
                f"the merchant's balance cannot fund stock {batch_id}'s budget ({exc.message}): "
                "top it up at the merchant platform, then start the batch again",
            ) from exc
        return await self.get_batch(batch_id)

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[FlowRecord]:
        if FlowKind(kind) == FlowKind.SENT:
            raise FlowUnavailable(
                "NO_SENT_FLOW", "WeChat Pay publishes no flow of sent vouchers, only use-flow"
            )
        what = f"use flow of {batch_id}"
        try:
            raw = await self._call(
                "GET", f"/v3/marketing/favor/stocks/{quote(batch_id, safe='')}/use-flow"
            )
        except PlatformRefused as exc:
            if exc.code != "RESOURCE_NOT_EXISTS" or "批次" in exc.message:
                raise
            # 账单文件不存在: the file is published from 10:00 the day after the stock ends, and
            # never for a stock none of whose coupons was used. Not a refusal: ask per coupon.
            raise FlowUnavailable(
                "USE_FLOW_NOT_YET",
                f"WeChat Pay has no use flow of stock {batch_id} yet ({exc.message}): it is "
                "published from 10:00 the day after the stock ends",
            ) from exc
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
        coupon_id = read_answer(lambda answer: answer_text(answer, "coupon_id"), raw)
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
            self._verify(headers, body, self._callback_max_skew_s)
        except SignatureError as exc:
            # A certificate we do not hold yet: `refresh_keys`, then ask again.
            raise CallbackRejected(exc.reason, key_unknown=exc.unknown_key) from None
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
                notification_id=answer_text(envelope, "id"),
                platform_coupon_id=answer_text(coupon, "coupon_id"),
                batch_id=answer_text(coupon, "stock_id"),
                user_id=openid if isinstance(openid, str) else "",
                used_at=parse_time(consumed["consume_time"]),
                raw={**{k: v for k, v in envelope.items() if k != "resource"}, "resource": coupon},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CallbackRejected(f"unreadable notification: {exc!r}") from None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
