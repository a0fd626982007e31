"""The Alipay OpenAPI gateway protocol, as both sides of it need it: the app's keys, RSA2
signing and verification of requests, answers and notifications, the gateway's time and
amount formats, and the error codes the adapter and the simulator's face agree on.

Documented behaviour followed (opendocs.alipay.com, as quoted by the generated SDK models in
alipay/alipay-sdk-java-all and the gateway error table, common/02km9f):
- One gateway, `POST https://openapi.alipay.com/gateway.do`, form-encoded. Common parameters
  app_id, method, format=JSON, charset=utf-8, sign_type=RSA2, timestamp "yyyy-MM-dd
  HH:mm:ss" (Beijing time), version=1.0, biz_content (the business parameters as JSON).
- Request signature: every parameter but `sign` whose value is not empty, sorted by name,
  joined as "k=v&k=v" with raw (not URL-encoded) values, RSA-SHA256 (PKCS#1 v1.5) with the
  app's private key, base64.
- Answer: HTTP 200 whatever happened; `{"<method, dots as _>_response": {...}, "sign": ...}`,
  `code` "10000" for success, else code/msg/sub_code/sub_msg; the signature covers the exact
  text of the `_response` value as sent, verified with Alipay's public key. Gateway-level
  refusals (bad signature, unknown app_id: 40001/40002) come unsigned, and with the method
  unknown as `error_response`.
- Asynchronous notification: a form-encoded POST whose signature covers every parameter but
  `sign` and `sign_type` (empty ones too), sorted and joined the same way; the receiver
  answers the plain text `success`, else Alipay sends it again.

Where the documentation we could reach is silent, this module chooses (and both sides follow):
- the business error sub_codes of the voucher APIs (`SubCode`); AFTER_VOUCHER_END_TIME is the
  code Alipay was seen to answer voucher.send for a template past its validity
  (developer.aliyun.com/ask/285772), BUDGET_NOT_ENOUGH_ERROR the one for an exhausted template
  (developer.aliyun.com/ask/285812),
  where it came wrapped as sub_code `unknown-sub-code`, sub_msg "未知的错误码<code>":
  `unwrapped_sub_code` reads that form too;
- the fields of the voucher-use notification (`notify_type` VOUCHER_NOTIFY_TYPE, `biz_type`
  V_USE as in the voucher query's bill details, `voucher_id`, `template_id`, `user_id` or
  `open_id`, `gmt_biz`).
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
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from coupons.platforms.rsa_keys import new_rsa_key, private_pem, public_pem, rsa_sign, rsa_verify

# The simulator's merchant app: fixed, so a configuration can name it.
SIM_APP_ID = "2021000000000001"

GATEWAY_PATH = "/gateway.do"
PRODUCTION_GATEWAY = "https://openapi.alipay.com/gateway.do"
SIGN_TYPE = "RSA2"
CHARSET = "utf-8"
FORMAT = "JSON"
VERSION = "1.0"
# Alipay's times carry no zone and mean Beijing time; China has had no DST since 1991, so a
# fixed offset is exact (and needs no tz database).
SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_YUAN = re.compile(r"(0|[1-9][0-9]{0,11})(\.[0-9]{1,2})?")
# A user's id at Alipay: 2088 and twelve more digits. Anything else we know a user by is the
# newer per-app `open_id`.
ALIPAY_USER_ID = re.compile(r"2088[0-9]{12}")

# The methods the voucher adapter calls.
CASHLESS_TEMPLATE_CREATE = "alipay.marketing.cashlessvoucher.template.create"
CASH_TEMPLATE_CREATE = "alipay.marketing.cashvoucher.template.create"
TEMPLATE_DETAIL_QUERY = "alipay.marketing.voucher.templatedetail.query"
TEMPLATE_DELETE = "alipay.marketing.voucher.template.delete"
VOUCHER_SEND = "alipay.marketing.voucher.send"
VOUCHER_QUERY = "alipay.marketing.voucher.query"

# The one kind of template we create: a fixed-value voucher without funds behind it.
CASHLESS_FIX_VOUCHER = "CASHLESS_FIX_VOUCHER"
# Template statuses (templatedetail.query): draft (a cash template not paid for yet),
# effective, deleted, expired.
TEMPLATE_DRAFT, TEMPLATE_EFFECTIVE, TEMPLATE_DELETED, TEMPLATE_EXPIRED = "I", "S", "D", "E"
# Voucher statuses (voucher.query) this protocol uses.
VOUCHER_ENABLED, VOUCHER_USED, VOUCHER_EXPIRED, VOUCHER_DELETED = (
    "ENABLED",
    "USED",
    "EXPIRED",
    "DELETE",
)
# The bill detail (and notification) type of a use.
V_USE = "V_USE"
VOUCHER_NOTIFY_TYPE = "voucher_change"
# The receiver's whole answer that takes a notification; anything else and Alipay sends again.
NOTIFY_SUCCESS = "success"

# Gateway codes (common/02km9f).
SUCCESS = "10000"
UNAVAILABLE = "20000"
MISSING_ARGUMENTS = "40001"
INVALID_ARGUMENTS = "40002"
BUSINESS_FAILED = "40004"
CALL_LIMITED = "40005"
CODE_MESSAGES = {
    SUCCESS: "Success",
    UNAVAILABLE: "Service Currently Unavailable",
    MISSING_ARGUMENTS: "Missing Required Arguments",
    INVALID_ARGUMENTS: "Invalid Arguments",
    BUSINESS_FAILED: "Business Failed",
    CALL_LIMITED: "Call Limited",
}
# Codes only the gateway answers (no business ran): Alipay does not sign them.
UNSIGNED_CODES = frozenset({UNAVAILABLE, MISSING_ARGUMENTS, INVALID_ARGUMENTS, CALL_LIMITED})
ERROR_RESPONSE = "error_response"
UNKNOWN_SUB_CODE = "unknown-sub-code"
_WRAPPED_SUB_CODE = re.compile(r"未知的错误码\s*([A-Za-z0-9_.\-]+)")


class SubCode:
    """The sub_codes this protocol speaks. Gateway ones are documented; the business ones of
    the voucher APIs are this module's choice (see the module docstring)."""

    # gateway (documented)
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
    # voucher business (40004)
    INVALID_PARAMETER = "INVALID_PARAMETER"
    TEMPLATE_NOT_EXIST = "TEMPLATE_NOT_EXIST"
    TEMPLATE_NOT_ACTIVE = "TEMPLATE_NOT_ACTIVE"  # a draft: a cash template not paid for
    PUBLISH_NOT_STARTED = "PUBLISH_TIME_NOT_STARTED"
    TEMPLATE_PAUSED = "TEMPLATE_PUBLISH_PAUSED"
    # Seen in answers to voucher.send for a template past its validity (Alipay community Q&A).
    TEMPLATE_EXPIRED = "AFTER_VOUCHER_END_TIME"
    TEMPLATE_DELETED = "TEMPLATE_DELETED"
    TEMPLATE_CANNOT_DELETE = "TEMPLATE_CANNOT_DELETE"
    BUDGET_NOT_ENOUGH = "BUDGET_NOT_ENOUGH_ERROR"
    USER_NOT_EXIST = "USER_NOT_EXIST"
    RISK_REJECTED = "RISK_CONTROL_REJECTED"
    USER_SEND_LIMIT = "USER_SEND_LIMIT_EXCEEDED"
    OUT_BIZ_NO_REUSED = "OUT_BIZ_NO_REPEATED"
    VOUCHER_NOT_EXIST = "VOUCHER_NOT_EXIST"


def unwrapped_sub_code(sub_code: str, sub_msg: str) -> str:
    """The business code behind Alipay's `unknown-sub-code` wrapper ("未知的错误码X"), else
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
        error, never quoted."""
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
