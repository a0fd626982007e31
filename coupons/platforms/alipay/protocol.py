"""The Alipay OpenAPI gateway protocol for payment vouchers (支付券), as both sides of it need
it: the app's keys, RSA2 signing and verification of requests, answers and messages, the
gateway's time and amount formats, the methods, statuses and error codes the adapter and the
simulator's face agree on. `docs/platforms/alipay.md` has the table of every rule with its source.

Sources, by the short names the docstrings use:
- [PY] Alipay's official Python SDK, PyPI `alipay-sdk-python` 3.7.1411 (repo
  alipay/alipay-sdk-python-all): `alipay.aop.api.request|domain|response.<N>` classes,
  `DefaultAlipayClient`, `util/SignatureUtils.py`, `util/WebUtils.py`.
- [PHP3] alipay/alipay-sdk-php-all `v3/src/Model/*.php` (OpenAPI document 2025-12-15): the
  field descriptions and, in `<Api>ErrorResponseModel`, each API's published error codes;
  `CommonErrorType` the gateway's common codes.
- [JV2] alipay/alipay-sdk-java-all `v2/.../com/alipay/api` (`AlipayConstants`,
  `AbstractAlipayClient`, `internal/util/AlipaySignature`); [JOLD] the same repo's older model
  comments, which still carry the enum lists (statuses).
- [DOCS] AlipayDocs/open-docs (Alipay's own doc repository): answer samples such as
  `{"xxx_response":{"code":"40004","msg":"Business Failed","sub_code":"INVALID_PARAMETER",...},
  "sign":"***"}` and the `unknown-sub-code` / "未知的错误码<X>" wrapper.
- [MSG] the message pages of opendocs (copies at www.5851388.com; the used-voucher page itself,
  opendocs 6a0f4680_alipay.marketing.activity.message.used, was not readable): envelope
  notify_id, utc_timestamp, msg_method, app_id, version, biz_content, sign, sign_type, charset.
- [ERR] opendocs common/02km9f (公共错误码), read through third-party copies: 10000, 20000,
  20001, 40001..40006 and their isv./isp./aop. sub codes.

The gateway (all confirmed unless marked):
- One URL, `POST https://openapi.alipay.com/gateway.do`, form-encoded; [PY] sends the common
  parameters in the query string and biz_content in the body, both are one request.
  Common parameters app_id, method, format=JSON, charset=utf-8, sign_type=RSA2, timestamp
  "yyyy-MM-dd HH:mm:ss" in Beijing time ([JV2] AlipayConstants.DATE_TIMEZONE "GMT+8";
  [PY] stamps the machine's local time instead), version=1.0, biz_content (JSON).
- Request signature: the parameters but `sign`, sorted by name, "k=v&k=v" with raw values,
  RSA-SHA256 (PKCS#1 v1.5), base64 ([PY] SignatureUtils.get_sign_content / sign_with_rsa2;
  [PY] signs empty values too, Alipay's Java SDK skips them: we never send one).
- Answer: HTTP 200; `{"<method, dots as _>_response": {...}, "sign": ...}`; code "10000" is
  success, else code/msg/sub_code/sub_msg; the signature covers the exact text of the
  `_response` value ([PY] DefaultAlipayClient.__parse_response). Business refusals are
  `40004` with the API's own code as sub_code, signed ([DOCS]). The gateway's own refusals
  may come unsigned: [JV2] AbstractAlipayClient checks a failed answer's signature only when
  it has one (unconfirmed which ones Alipay signs); the simulator signs none of them.
- A message (msg_method): a form POST to the app's gateway address set in the console, signed
  over every parameter but `sign` and `sign_type`, empty ones too ([JV2]
  AlipaySignature.getSignCheckContentV1; for messages unconfirmed, standard); the receiver
  answers the plain text `success`, else Alipay delivers again (unconfirmed for messages).

Over 500 lines on purpose: both sides of one signed protocol in one place, so the adapter and
the simulator can only ever speak the same one.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from coupons.platforms.rsa_keys import new_rsa_key, private_pem, public_pem, rsa_sign, rsa_verify

# The simulator's merchant app and the merchant's PID: fixed, so a configuration can name them.
SIM_APP_ID = "2021000000000001"
SIM_PID = "2088000000000001"

GATEWAY_PATH = "/gateway.do"
PRODUCTION_GATEWAY = "https://openapi.alipay.com/gateway.do"
SIGN_TYPE = "RSA2"
CHARSET = "utf-8"
FORMAT = "JSON"
VERSION = "1.0"
# Alipay's times carry no zone and mean Beijing time ([JV2] AlipayConstants.DATE_TIMEZONE
# "GMT+8"); China has had no DST since 1991, so a fixed offset is exact.
SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_YUAN = re.compile(r"(0|[1-9][0-9]{0,11})(\.[0-9]{1,2})?")

# The payment voucher (支付券) activity family: the methods the adapter calls ([PY] request
# classes AlipayMarketingActivityVoucher{Create,Publish,Query,Stop,Send}Request and
# AlipayMarketingActivityUserQueryvoucherRequest; [PHP3] AlipayMarketingActivityVoucherApi.md).
ACTIVITY_CREATE = "alipay.marketing.activity.voucher.create"
ACTIVITY_PUBLISH = "alipay.marketing.activity.voucher.publish"
ACTIVITY_QUERY = "alipay.marketing.activity.voucher.query"
ACTIVITY_STOP = "alipay.marketing.activity.voucher.stop"
VOUCHER_SEND = "alipay.marketing.activity.voucher.send"
USER_QUERY_VOUCHER = "alipay.marketing.activity.user.queryvoucher"
# The used-voucher message (券核销消息), sent to the app's gateway address.
MESSAGE_USED = "alipay.marketing.activity.message.used"
MESSAGE_VERSION = "1.1"  # "1.1版本为标准消息" [MSG]

# The one kind of activity we create: a fixed-value voucher (voucher_type FIX_VOUCHER, [PHP3]
# AlipayMarketingActivityVoucherCreateModel) with no funds behind it (budget_type NO_CASH
# 免充值: the merchant receives the order price minus the voucher, [JOLD]
# PaymentVoucherBudgetInfo), owned and redeemable by the merchant's PID
# (merchant_id_type PID 直连商户, [PHP3] PaymentVoucherBelongMerchantInfo), valid a number of
# days after it is received (type RELATIVE, [JOLD] PaymentVoucherValidPeriod), limited per
# Alipay account over the activity's whole life (LIFE_CYCLE, [PHP3] PaymentVoucherSendRule).
FIX_VOUCHER = "FIX_VOUCHER"
NO_CASH = "NO_CASH"
MERCHANT_PID = "PID"
RELATIVE = "RELATIVE"
LIFE_CYCLE = "LIFE_CYCLE"
# Published limits ([PHP3] PaymentFixVoucher.amount "0.1<=x<=3000", PaymentVoucherSendRule
# .voucher_quantity "最少1个 ... 最多99999999个", AlipayMarketingActivityVoucherCreateModel
# .publish_end_time "间隔必须小于等于180天"; out_biz_no 64 on the sibling append page, unconfirmed
# for create and send).
AMOUNT_CENTS = (10, 300_000)
QUANTITY = (1, 99_999_999)
MAX_PUBLISH_SPAN = timedelta(days=180)
MAX_OUT_BIZ_NO = 64
# What we put in names that Alipay shows: activity_name is string[0,20] on the sibling 商家券
# create page ([MIRROR]), brand_name at most 12 on the older cashless template ([JV2]
# AlipayMarketingCashlessvoucherTemplateCreateModel); 支付券's own limits are unpublished.
MAX_ACTIVITY_NAME = 20
MAX_BRAND_NAME = 12

# Activity statuses (voucher.query activity_status): "INIT 未激活 / ACTIVE 已激活 / FINISHED
# 已停止; 如果该值为空, 说明活动还未创建成功" ([JOLD] AlipayMarketingActivityVoucherQueryResponse);
# PAUSE "活动已暂停" is published for the generic activity.query ([JOLD]
# AlipayMarketingActivityQueryResponse) and read wherever it appears.
ACTIVITY_INIT, ACTIVITY_ACTIVE, ACTIVITY_PAUSE, ACTIVITY_FINISHED = (
    "INIT",
    "ACTIVE",
    "PAUSE",
    "FINISHED",
)
# User voucher statuses: "SENDED:可用 USED:已核销(即完全使用), EXPIRED:已过期" ([JOLD]
# UserVoucherBaseInfo; [PHP3] UserVoucherBaseInfo).
VOUCHER_SENDED, VOUCHER_USED, VOUCHER_EXPIRED = "SENDED", "USED", "EXPIRED"

# How the app knows its users, a setting (ALIPAY_USER_ID_TYPE): open_id, Alipay's per-app id
# (new apps get it, user_id "未来计划逐步回收" for new merchants [MSG]), or the older user_id.
OPEN_ID, USER_ID = "open_id", "user_id"
USER_ID_TYPES = (OPEN_ID, USER_ID)

# The receiver's whole answer that takes a message; anything else and Alipay delivers again.
NOTIFY_SUCCESS = "success"

# Gateway codes ([ERR]).
SUCCESS = "10000"
UNAVAILABLE = "20000"
AUTH_INSUFFICIENT = "20001"
MISSING_ARGUMENTS = "40001"
INVALID_ARGUMENTS = "40002"
CONDITION_FAILED = "40003"
BUSINESS_FAILED = "40004"
CALL_LIMITED = "40005"
PERMISSION_DENIED = "40006"
CODE_MESSAGES = {
    SUCCESS: "Success",
    UNAVAILABLE: "Service Currently Unavailable",
    AUTH_INSUFFICIENT: "Insufficient Token Permissions",
    MISSING_ARGUMENTS: "Missing Required Arguments",
    INVALID_ARGUMENTS: "Invalid Arguments",
    CONDITION_FAILED: "Insufficient Conditions",
    BUSINESS_FAILED: "Business Failed",
    CALL_LIMITED: "Call Limited",
    PERMISSION_DENIED: "Insufficient Permissions",
}
# The gateway's own refusals (no business ran): they may come unsigned, and the adapter retries
# every one of them, so an unsigned one can never fail a coupon.
GATEWAY_CODES = frozenset(
    {
        UNAVAILABLE,
        AUTH_INSUFFICIENT,
        MISSING_ARGUMENTS,
        INVALID_ARGUMENTS,
        CONDITION_FAILED,
        CALL_LIMITED,
        PERMISSION_DENIED,
    }
)
ERROR_RESPONSE = "error_response"
UNKNOWN_SUB_CODE = "unknown-sub-code"
_WRAPPED_SUB_CODE = re.compile(r"未知的错误码\s*([A-Za-z0-9_.\-]+)")


class SubCode:
    """The sub_codes this protocol speaks, each with its source: the gateway's ([ERR]; the same
    names without prefix in [PHP3] CommonErrorType), and the per-API business codes ([PHP3]
    AlipayMarketingActivity<Api>ErrorResponseModel; under 40004 as sub_code, [DOCS])."""

    # gateway
    SYSTEM_BUSY = "isp.unknow-error"
    GATEWAY_BUSY = "aop.unknow-error"
    MISSING_METHOD = "isv.missing-method"
    MISSING_SIGNATURE = "isv.missing-signature"
    MISSING_SIGNATURE_TYPE = "isv.missing-signature-type"
    MISSING_APP_ID = "isv.missing-app-id"
    MISSING_TIMESTAMP = "isv.missing-timestamp"
    MISSING_VERSION = "isv.missing-version"
    INVALID_PARAMETER_FORMAT = "isv.invalid-parameter"
    INVALID_METHOD = "isv.invalid-method"
    INVALID_FORMAT = "isv.invalid-format"
    INVALID_SIGNATURE_TYPE = "isv.invalid-signature-type"
    INVALID_SIGNATURE = "isv.invalid-signature"
    INVALID_APP_ID = "isv.invalid-app-id"
    INVALID_TIMESTAMP = "isv.invalid-timestamp"
    INVALID_CHARSET = "isv.invalid-charset"
    APP_CALL_LIMITED = "isv.app-call-limited"
    METHOD_CALL_LIMITED = "isv.method-call-limited"
    # An open_id this app does not know: [PHP3] CommonErrorType CODE_OPENID_ERROR
    # "openid-error". Its v2 form (gateway code, an isv. prefix or none) is unconfirmed: the
    # simulator answers it as a signed 40004 sub_code, the adapter reads either spelling.
    OPENID_ERROR = "openid-error"
    # business, per API (all of voucher.send's; the others' that the service can meet)
    SYSTEM_ERROR = "SYSTEM_ERROR"  # every API
    INVALID_PARAMETER = "INVALID_PARAMETER"  # every API
    BIZ_ERROR = "BIZ_ERROR"  # create, publish
    MATERIAL_AUDIT_WAITING = "MATERIAL_AUDIT_WAITING"  # create
    BUSINESS_HAS_RISK = "BUSINESS_HAS_RISK"  # publish
    ACTIVITY_NOT_ACTIVE = "ACTIVITY_NOT_ACTIVE"  # send
    ACTIVITY_NOT_START = "ACTIVITY_NOT_START"  # send
    ACTIVITY_IS_END = "ACTIVITY_IS_END"  # send
    ACTIVITY_IS_STOPED = "ACTIVITY_IS_STOPED"  # send [sic]
    BUDGET_NOT_ENOUGH = "BUDGET_NOT_ENOUGH"  # send
    COUNT_OVER_LIMIT = "COUNT_OVER_LIMIT"  # send
    VOUCHER_NOT_EXIST = "VOUCHER_NOT_EXIST"  # user.queryvoucher
    ACTIVITY_NOT_PERMISSION = "ACTIVITY_NOT_PERMISSION"  # user.queryvoucher
    MERCHANT_RELATION_NOT_EXIST = "MERCHANT_RELATION_NOT_EXIST"  # user.queryvoucher


def unwrapped_sub_code(sub_code: str, sub_msg: str) -> str:
    """The business code behind Alipay's `unknown-sub-code` wrapper (sub_msg "未知的错误码X",
    [DOCS] support/支付宝小程序/常见问题/未知的错误码MINI_APP_INFO_AUDIT_CONTAINS), else
    `sub_code` as given."""
    if sub_code == UNKNOWN_SUB_CODE:
        wrapped = _WRAPPED_SUB_CODE.search(sub_msg)
        if wrapped is not None:
            return wrapped.group(1)
    return sub_code


# ---------------------------------------------------------------- keys


def _pem_or_base64(text: bytes) -> tuple[bool, bytes]:
    """Alipay's console hands keys out as bare base64 (no PEM armour): accept both."""
    stripped = text.strip()
    if stripped.startswith(b"-----BEGIN"):
        return True, stripped
    try:
        return False, base64.b64decode(b"".join(stripped.split()), validate=True)
    except binascii.Error:
        raise ValueError("neither PEM nor base64 key material") from None


def load_private_key(data: bytes) -> rsa.RSAPrivateKey:
    is_pem, material = _pem_or_base64(data)
    key = (
        serialization.load_pem_private_key(material, password=None)
        if is_pem
        else serialization.load_der_private_key(material, password=None)
    )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def load_public_key(data: bytes) -> rsa.RSAPublicKey:
    is_pem, material = _pem_or_base64(data)
    key = (
        serialization.load_pem_public_key(material)
        if is_pem
        else serialization.load_der_public_key(material)
    )
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


@dataclass(frozen=True)
class AlipayApp:
    """What a merchant holds for one Alipay app: its id, its private key (signs requests) and
    Alipay's public key (verifies answers and notifications). The repr shows the id only."""

    app_id: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    alipay_public_key: rsa.RSAPublicKey = field(repr=False)

    @classmethod
    def from_files(
        cls, *, app_id: str, private_key_file: Path, alipay_public_key_file: Path
    ) -> AlipayApp:
        """Load the keys from PEM (or Alipay's bare base64) files; a bad file is named in the
        error, never quoted. The app key may be PKCS#8 or PKCS#1 (what Alipay's key tool gives
        non-Java merchants, and the only form [PY] SignatureUtils.sign_with_rsa2 reads)."""
        try:
            private_key = load_private_key(private_key_file.read_bytes())
        except ValueError as exc:
            raise ValueError(f"{private_key_file}: {exc}") from None
        try:
            public_key = load_public_key(alipay_public_key_file.read_bytes())
        except ValueError as exc:
            raise ValueError(f"{alipay_public_key_file}: {exc}") from None
        return cls(app_id=app_id, private_key=private_key, alipay_public_key=public_key)


# Under the keys dir: what the merchant app holds, and what only the platform (the simulator)
# holds.
KEYS_SUBDIR = "alipay"
APP_PRIVATE_KEY = "app_private_key.pem"
APP_PUBLIC_KEY = "app_public_key.pem"
ALIPAY_PUBLIC_KEY = "alipay_public_key.pem"
ALIPAY_PRIVATE_KEY = "alipay_private_key.pem"
_KEY_FILES = (APP_PRIVATE_KEY, APP_PUBLIC_KEY, ALIPAY_PUBLIC_KEY, ALIPAY_PRIVATE_KEY)
_PRIVATE_FILES = frozenset({APP_PRIVATE_KEY, ALIPAY_PRIVATE_KEY})


def ensure_test_keys(keys_dir: Path) -> None:
    """Make `keys_dir/alipay` with a fresh app key pair and a fresh "Alipay" key pair, unless
    it exists; an existing file is never overwritten.

    The four files are written in a private temporary directory renamed into place at once, so
    two processes starting together (the simulator and a test) can never leave halves of two
    key pairs; the loser's keys are thrown away. A directory with a file missing is an error,
    since a replacement could not match the other half of its pair.
    """
    target = keys_dir / KEYS_SUBDIR
    if not target.exists():
        keys_dir.mkdir(parents=True, exist_ok=True)
        staging = keys_dir / f".{KEYS_SUBDIR}-{secrets.token_hex(8)}"
        staging.mkdir(mode=0o700)
        try:
            app, platform = new_rsa_key(), new_rsa_key()
            contents = {
                APP_PRIVATE_KEY: private_pem(app),
                APP_PUBLIC_KEY: public_pem(app.public_key()),
                ALIPAY_PRIVATE_KEY: private_pem(platform),
                ALIPAY_PUBLIC_KEY: public_pem(platform.public_key()),
            }
            for name, content in contents.items():
                mode = 0o600 if name in _PRIVATE_FILES else 0o644
                fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as file:
                    file.write(content)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    missing = [name for name in _KEY_FILES if not (target / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{target} lacks {', '.join(missing)}; remove the directory to make new test keys"
        )


def key_file(keys_dir: Path, name: str) -> Path:
    return keys_dir / KEYS_SUBDIR / name


def sim_app(keys_dir: Path) -> AlipayApp:
    """The simulator's merchant app, as a merchant would configure it: the app private key
    and Alipay's public key from `keys_dir/alipay` (made by the simulator's first start)."""
    return AlipayApp.from_files(
        app_id=SIM_APP_ID,
        private_key_file=key_file(keys_dir, APP_PRIVATE_KEY),
        alipay_public_key_file=key_file(keys_dir, ALIPAY_PUBLIC_KEY),
    )


# ---------------------------------------------------------------- signatures


def request_sign_content(params: Mapping[str, str]) -> str:
    """What a request's signature covers: the non-empty parameters but `sign`, sorted."""
    return "&".join(
        f"{name}={value}"
        for name, value in sorted(params.items())
        if name != "sign" and value != ""
    )


def notify_sign_content(params: Mapping[str, str]) -> str:
    """What a notification's signature covers: every parameter but `sign` and `sign_type`."""
    return "&".join(
        f"{name}={value}"
        for name, value in sorted(params.items())
        if name not in ("sign", "sign_type")
    )


def rsa2_sign(key: rsa.RSAPrivateKey, content: str) -> str:
    """Alipay's RSA2: RSA-SHA256 over the UTF-8 of the sign content."""
    return rsa_sign(key, content.encode("utf-8"))


def rsa2_verify(key: rsa.RSAPublicKey, content: str, signature: str) -> bool:
    """Whether `signature` (base64) is the RSA2 signature of `content`; garbage is False."""
    return rsa_verify(key, content.encode("utf-8"), signature)


def signed_request(
    app: AlipayApp, method: str, biz_content: Mapping[str, Any], now: datetime
) -> dict[str, str]:
    """The form parameters of one gateway call, signed with the app's key."""
    params = {
        "app_id": app.app_id,
        "method": method,
        "format": FORMAT,
        "charset": CHARSET,
        "sign_type": SIGN_TYPE,
        "timestamp": format_time(now),
        "version": VERSION,
        "biz_content": json.dumps(biz_content, ensure_ascii=False, separators=(",", ":")),
    }
    params["sign"] = rsa2_sign(app.private_key, request_sign_content(params))
    return params


# ---------------------------------------------------------------- answers


def response_key(method: str) -> str:
    return method.replace(".", "_") + "_response"


def response_text(key: str, payload: Mapping[str, Any], signer: rsa.RSAPrivateKey | None) -> str:
    """The gateway's answer: `{"<key>": payload, "sign": ...}`, signed over the exact text of
    the payload as written (no sign when `signer` is None)."""
    value = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    if signer is None:
        return f'{{"{key}":{value}}}'
    return f'{{"{key}":{value},"sign":"{rsa2_sign(signer, value)}"}}'


_WHITESPACE = " \t\n\r"


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def top_level_members(text: str) -> dict[str, tuple[str, Any]]:
    """Each member of a JSON object as (its exact text, its value): the signature of an
    answer covers one member's text as sent, which parsing and re-serialising would lose.
    Raises ValueError for anything but one JSON object, or a name given twice."""
    decoder = json.JSONDecoder()
    index = _skip(text, 0)
    if not text.startswith("{", index):
        raise ValueError("not a JSON object")
    index = _skip(text, index + 1)
    members: dict[str, tuple[str, Any]] = {}
    if text.startswith("}", index):
        index += 1
    else:
        while True:
            name, index = decoder.raw_decode(text, index)
            if not isinstance(name, str):
                raise ValueError("a member name is not a string")
            index = _skip(text, index)
            if not text.startswith(":", index):
                raise ValueError("no ':' after a member name")
            start = _skip(text, index + 1)
            value, index = decoder.raw_decode(text, start)
            if name in members:
                raise ValueError(f"member {name!r} given twice")
            members[name] = (text[start:index], value)
            index = _skip(text, index)
            if text.startswith(",", index):
                index = _skip(text, index + 1)
                continue
            if text.startswith("}", index):
                index += 1
                break
            raise ValueError("no ',' or '}' after a member")
    if _skip(text, index) != len(text):
        raise ValueError("text after the JSON object")
    return members


# ---------------------------------------------------------------- formats


def format_time(moment: datetime) -> str:
    return moment.astimezone(SHANGHAI).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """A gateway time ("yyyy-MM-dd HH:mm:ss", Beijing time) as an aware datetime."""
    if not _TIME.fullmatch(text):
        raise ValueError(f"time {text[:40]!r} is not yyyy-MM-dd HH:mm:ss")
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=SHANGHAI)


def yuan(cents: int) -> str:
    """Cents as Alipay's amount: yuan with two decimals ("#.00")."""
    if cents < 0:
        raise ValueError("a negative amount")
    return f"{cents // 100}.{cents % 100:02d}"


def cents(amount: str) -> int:
    """Alipay's amount ("10", "10.5", "10.50") in cents."""
    match = _YUAN.fullmatch(amount)
    if match is None:
        raise ValueError(f"amount {amount[:20]!r} is not yuan with at most two decimals")
    whole, fraction = match.group(1), (match.group(2) or ".")[1:]
    return int(whole) * 100 + int(fraction.ljust(2, "0"))


_DIGITS = re.compile(r"[0-9]{1,16}")


def epoch_ms(moment: datetime) -> str:
    """A message's time: epoch milliseconds as a string ("utc_timestamp ... 1514210452731",
    "event_time ... 精确到毫秒 ... long型的时间戳字符串" [MSG])."""
    return str(int(moment.timestamp() * 1000))


def parse_epoch(text: str) -> datetime:
    """A message's epoch time as an aware datetime. Milliseconds as documented; a value of at
    most 11 digits is read as seconds, since the page's own event_time example (1619338271) is
    in seconds though its text says milliseconds [MSG]."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"time {text[:20]!r} is not an epoch number")
    number = int(text)
    seconds = number if len(text) <= 11 else number / 1000
    return datetime.fromtimestamp(seconds, UTC)
