"""The simulator's Alipay face: the OpenAPI gateway at `/gateway.do` with the voucher APIs.

Served methods: alipay.marketing.cashlessvoucher.template.create (a template publishing at
once), alipay.marketing.cashvoucher.template.create (a draft until its fund order is paid),
alipay.marketing.voucher.templatedetail.query, alipay.marketing.voucher.template.delete,
alipay.marketing.voucher.send and alipay.marketing.voucher.query. The gateway's own rules are
in `protocol` (parameters, signatures, answer format, codes); this module checks them as
Alipay does, in Alipay's order (method, then app_id, then the other common parameters, then the
signature), and answers gateway refusals unsigned, business answers signed with the Alipay key.

Documented behaviour followed (see also `protocol`): GET with a query string and POST
with a form body are both accepted (python-alipay-sdk sends GET, Alipay's Java SDK POSTs);
template fields (voucher_quantity, amount, floor_amount, publish_start_time,
publish_end_time, voucher_valid_period, out_biz_no, notify_uri, voucher_description), their
limits (cashless amount 1 to 999 yuan, publish window at most 90 days, starting at most 15
days ahead) and statuses I/S/D/E; voucher.send by template_id + out_biz_no (a resend of a
known out_biz_no answers the same voucher_id) to user_id (2088 and 12 digits) or open_id;
voucher statuses ENABLED/USED/EXPIRED with a V_USE bill detail once used.

Chosen where the documentation is silent or the simulator is narrower than Alipay:
- publish_start_time/publish_end_time may be omitted: the template then publishes from its
  creation for its validity days;
- validity is RELATIVE only (duration in DAY, or HOUR/MINUTE adding up to whole days);
- Alipay templates have no per-user limit: a user may hold as many vouchers as the template;
- out_biz_no of a send is unique per app, not per template (stricter than Alipay);
- a paused batch (only the control plane pauses; Alipay cannot) reads effective (S) and
  refuses sends with TEMPLATE_PUBLISH_PAUSED; deleting a template that has sent vouchers is
  refused (TEMPLATE_CANNOT_DELETE);
- notifications go to the `callback_url` knob (not each template's notify_uri), form-encoded
  and signed as Alipay signs its notifications; the business sub_codes are `SubCode`'s.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from coupons.platforms.alipay.protocol import (
    ALIPAY_PRIVATE_KEY,
    ALIPAY_USER_ID,
    APP_PUBLIC_KEY,
    BUSINESS_FAILED,
    CALL_LIMITED,
    CASH_TEMPLATE_CREATE,
    CASHLESS_FIX_VOUCHER,
    CASHLESS_TEMPLATE_CREATE,
    CHARSET,
    CODE_MESSAGES,
    ERROR_RESPONSE,
    FORMAT,
    GATEWAY_PATH,
    INVALID_ARGUMENTS,
    MISSING_ARGUMENTS,
    NOTIFY_SUCCESS,
    SHANGHAI,
    SIGN_TYPE,
    SIM_APP_ID,
    SUCCESS,
    TEMPLATE_DELETE,
    TEMPLATE_DELETED,
    TEMPLATE_DETAIL_QUERY,
    TEMPLATE_DRAFT,
    TEMPLATE_EFFECTIVE,
    TEMPLATE_EXPIRED,
    UNAVAILABLE,
    UNSIGNED_CODES,
    V_USE,
    VERSION,
    VOUCHER_ENABLED,
    VOUCHER_EXPIRED,
    VOUCHER_NOTIFY_TYPE,
    VOUCHER_QUERY,
    VOUCHER_SEND,
    VOUCHER_USED,
    SubCode,
    cents,
    ensure_test_keys,
    format_time,
    key_file,
    load_private_key,
    load_public_key,
    notify_sign_content,
    parse_time,
    request_sign_content,
    response_key,
    response_text,
    rsa2_sign,
    rsa2_verify,
    yuan,
)
from coupons.platforms.rsa_keys import new_rsa_key
from coupons.platforms.simcore.core import Simulator
from coupons.platforms.simcore.errors import SimError

FORM = "application/x-www-form-urlencoded"
# Alipay's gateway labels its JSON answers so (seen on the live gateway).
ANSWER_TYPE = "text/html;charset=utf-8"
CASH_VOUCHER = "FIX_VOUCHER"
MAX_PUBLISH_SPAN = timedelta(days=90)
MAX_START_AHEAD = timedelta(days=15)
MAX_BRAND_NAME = 12
MAX_OUT_BIZ_NO = 64
MAX_OPEN_ID = 128
# The cashless template's face value range, 1 to 999 yuan; a cash template's is at least 0.1.
CASHLESS_AMOUNT = (100, 99_900)
CASH_MIN_AMOUNT = 10
_UNITS = {"DAY": 1, "HOUR": 24, "MINUTE": 24 * 60}

_SIM_ERRORS: dict[str, tuple[str, str]] = {
    "INVALID_REQUEST": (BUSINESS_FAILED, SubCode.INVALID_PARAMETER),
    "BATCH_NOT_FOUND": (BUSINESS_FAILED, SubCode.TEMPLATE_NOT_EXIST),
    "BATCH_PAUSED": (BUSINESS_FAILED, SubCode.TEMPLATE_PAUSED),
    "BATCH_NOT_STARTED": (BUSINESS_FAILED, SubCode.PUBLISH_NOT_STARTED),
    "BUDGET_EXHAUSTED": (BUSINESS_FAILED, SubCode.BUDGET_NOT_ENOUGH),
    "USER_RESTRICTED": (BUSINESS_FAILED, SubCode.RISK_REJECTED),
    "USER_LIMIT_REACHED": (BUSINESS_FAILED, SubCode.USER_SEND_LIMIT),
    "IDEMPOTENCY_KEY_REUSED": (BUSINESS_FAILED, SubCode.OUT_BIZ_NO_REUSED),
    "COUPON_NOT_FOUND": (BUSINESS_FAILED, SubCode.VOUCHER_NOT_EXIST),
    "RATE_LIMITED": (CALL_LIMITED, SubCode.APP_CALL_LIMITED),
    "SYSTEM_ERROR": (UNAVAILABLE, SubCode.SYSTEM_BUSY),
}
# Why a template does not send, by the batch's status (a running one would).
_NOT_SENDING = {
    "created": SubCode.TEMPLATE_NOT_ACTIVE,
    "stopped": SubCode.TEMPLATE_DELETED,
    "expired": SubCode.TEMPLATE_EXPIRED,
}
_TEMPLATE_STATUS = {
    "created": TEMPLATE_DRAFT,
    "running": TEMPLATE_EFFECTIVE,
    "paused": TEMPLATE_EFFECTIVE,
    "stopped": TEMPLATE_DELETED,
    "expired": TEMPLATE_EXPIRED,
}
_VOUCHER_STATUS = {"sent": VOUCHER_ENABLED, "used": VOUCHER_USED, "expired": VOUCHER_EXPIRED}


class _Refusal(Exception):
    """An answer other than success, with the code and sub_code Alipay gives it."""

    def __init__(self, code: str, sub_code: str, sub_msg: str) -> None:
        super().__init__(f"{code} {sub_code}: {sub_msg}")
        self.code = code
        self.sub_code = sub_code
        self.sub_msg = sub_msg


def _invalid(message: str) -> _Refusal:
    return _Refusal(BUSINESS_FAILED, SubCode.INVALID_PARAMETER, message)


def _missing(sub_code: str, message: str) -> _Refusal:
    return _Refusal(MISSING_ARGUMENTS, sub_code, message)


def _bad(sub_code: str, message: str) -> _Refusal:
    return _Refusal(INVALID_ARGUMENTS, sub_code, message)


# ---------------------------------------------------------------- business parameters


def _text(biz: Mapping[str, Any], name: str, *, limit: int | None = None) -> str:
    value = biz.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"{name} 不能为空")
    if limit is not None and len(value) > limit:
        raise _invalid(f"{name} 长度不能超过 {limit}")
    return value


def _amount(biz: Mapping[str, Any], name: str) -> int:
    value = biz.get(name)
    try:
        return cents(value if isinstance(value, str) else str(value))
    except ValueError:
        raise _invalid(f"{name} 须为金额, 单位为元, 最多两位小数") from None


def _quantity(biz: Mapping[str, Any], name: str) -> int:
    value = biz.get(name)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(f"{name} 须为大于 0 的整数")
    return value


def _window_moment(biz: Mapping[str, Any], name: str) -> datetime | None:
    """An optional publish time; absent is None, garbled is refused."""
    value = biz.get(name)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            return parse_time(value).astimezone(UTC)
    except ValueError:
        pass
    raise _invalid(f"{name} 格式须为 yyyy-MM-dd HH:mm:ss")


def _valid_days(value: Any) -> int:
    """A RELATIVE validity period in whole days; anything else the core cannot model."""
    try:
        period = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        period = None
    if not isinstance(period, dict):
        raise _invalid("voucher_valid_period 须为 JSON 字符串")
    if period.get("type") != "RELATIVE":
        raise _invalid("voucher_valid_period: this simulator supports type RELATIVE only")
    duration, per_day = period.get("duration"), _UNITS.get(str(period.get("unit")))
    if isinstance(duration, bool) or not isinstance(duration, int) or duration < 1:
        raise _invalid("voucher_valid_period.duration 须为大于 0 的整数")
    if per_day is None or duration % per_day:
        raise _invalid("voucher_valid_period: unit DAY, or HOUR/MINUTE adding up to whole days")
    return duration // per_day


def _user_fields(user: str) -> dict[str, str]:
    return {"user_id": user} if ALIPAY_USER_ID.fullmatch(user) else {"open_id": user}


def _voucher_name(batch: Mapping[str, Any]) -> str:
    # Alipay names a fixed voucher by its face value.
    return f"{yuan(batch['face_value_cents'])}元代金券"


def _shanghai(iso_time: str) -> str:
    return format_time(datetime.fromisoformat(iso_time))


# ---------------------------------------------------------------- methods


Method = Callable[[Simulator, Request, dict[str, Any]], Awaitable[dict[str, Any]]]


def _create_template(cash: bool) -> Method:
    async def create(sim: Simulator, request: Request, biz: dict[str, Any]) -> dict[str, Any]:
        voucher_type = CASH_VOUCHER if cash else CASHLESS_FIX_VOUCHER
        if biz.get("voucher_type") != voucher_type:
            raise _invalid(f"voucher_type 须为 {voucher_type}")
        brand_name = _text(biz, "brand_name", limit=MAX_BRAND_NAME)
        amount, floor = _amount(biz, "amount"), _amount(biz, "floor_amount")
        if cash and amount < CASH_MIN_AMOUNT:
            raise _invalid("amount 不能小于 0.1")
        if not cash and not CASHLESS_AMOUNT[0] <= amount <= CASHLESS_AMOUNT[1]:
            raise _invalid("amount 有效范围为 1~999")
        quantity = _quantity(biz, "voucher_quantity")
        valid_days = _valid_days(biz.get("voucher_valid_period"))
        out_biz_no = _text(biz, "out_biz_no", limit=MAX_OUT_BIZ_NO)
        starts_at = _window_moment(biz, "publish_start_time")
        ends_at = _window_moment(biz, "publish_end_time")
        now = sim.now()
        begins = starts_at or now
        ends = ends_at or begins + timedelta(days=valid_days)
        if begins > now + MAX_START_AHEAD:
            raise _invalid("发放开始时间不能大于当前时间15天")
        if ends <= begins:
            raise _invalid("发放结束时间必须晚于发放开始时间")
        if ends - begins > MAX_PUBLISH_SPAN:
            raise _invalid("发放结束时间和发放开始时间跨度不能大于90天")
        description = biz.get("voucher_description")
        if description is not None:
            try:
                described = json.loads(description) if isinstance(description, str) else None
            except ValueError:
                described = None
            if not isinstance(described, list):
                raise _invalid("voucher_description 须为 JSON 数组字符串")
        extra = {
            "voucher_type": voucher_type,
            **{
                name: biz[name]
                for name in ("voucher_description", "notify_uri", "rule_conf")
                if isinstance(biz.get(name), str)
            },
        }
        terms = {
            "name": brand_name,
            "face_value_cents": amount,
            "min_spend_cents": floor,
            "quantity": quantity,
            "valid_days": valid_days,
            # No per-user limit on Alipay templates: a user may hold all of them.
            "per_user_limit": quantity,
        }
        batch, _created = sim.create_batch(out_biz_no, terms, starts_at, ends_at, extra)
        # A cashless template publishes at once (also after a crash between the two steps);
        # a cash one waits for its fund order to be paid.
        if not cash and batch["status"] == "created":
            batch = sim.change_batch(batch["batch_id"], "start")
        template_id = batch["batch_id"]
        if not cash:
            return {"template_id": template_id}
        return {
            "template_id": template_id,
            "fund_order_no": f"2{template_id[:8]}{template_id[-18:-2]}",
            # Paying is the operator's PUT {"status": "running"} on the control plane.
            "confirm_uri": str(request.base_url) + f"sim/batches/{template_id}",
        }

    return create


async def _template_detail(sim: Simulator, request: Request, biz: dict[str, Any]) -> dict[str, Any]:
    batch = sim.batch(_text(biz, "template_id"))
    face = batch["face_value_cents"]
    published = batch["quantity"] - batch["remaining"]
    # The core's own record of uses (its flow), counted; Alipay publishes no such file.
    used = sim.flow(batch["batch_id"], "used").records
    return {
        "template_id": batch["batch_id"],
        "voucher_name": _voucher_name(batch),
        "voucher_type": batch["extra"].get("voucher_type", CASHLESS_FIX_VOUCHER),
        "status": _TEMPLATE_STATUS[batch["status"]],
        "amount": yuan(face),
        "floor_amount": yuan(batch["min_spend_cents"]),
        "voucher_quantity": batch["quantity"],
        "total_amount": yuan(face * batch["quantity"]),
        "publish_count": published,
        "publish_amount": yuan(face * published),
        "used_count": used,
        "used_amount": yuan(face * used),
        "recycle_amount": "0.00",
        "publish_start_time": _shanghai(batch["starts_at"]),
        "publish_end_time": _shanghai(batch["ends_at"]),
        "voucher_valid_period": json.dumps(
            {"type": "RELATIVE", "duration": batch["valid_days"], "unit": "DAY"},
            separators=(",", ":"),
        ),
        "voucher_description": batch["extra"].get("voucher_description", "[]"),
    }


async def _template_delete(sim: Simulator, request: Request, biz: dict[str, Any]) -> dict[str, Any]:
    batch = sim.batch(_text(biz, "template_id"))
    status = batch["status"]
    if status == "stopped":
        return {}
    if status == "expired":
        raise _Refusal(BUSINESS_FAILED, SubCode.TEMPLATE_EXPIRED, "模板已过期")
    if batch["quantity"] > batch["remaining"]:
        raise _Refusal(BUSINESS_FAILED, SubCode.TEMPLATE_CANNOT_DELETE, "已发放券的模板不能删除")
    sim.change_batch(batch["batch_id"], "stop")
    return {}


async def _send(sim: Simulator, request: Request, biz: dict[str, Any]) -> dict[str, Any]:
    template_id = _text(biz, "template_id")
    out_biz_no = _text(biz, "out_biz_no", limit=MAX_OUT_BIZ_NO)
    user_id, open_id = biz.get("user_id"), biz.get("open_id")
    if isinstance(user_id, str) and user_id:
        if not ALIPAY_USER_ID.fullmatch(user_id):
            raise _Refusal(BUSINESS_FAILED, SubCode.USER_NOT_EXIST, "用户不存在")
        user = user_id
    elif isinstance(open_id, str) and open_id:
        user = _text(biz, "open_id", limit=MAX_OPEN_ID)
    elif biz.get("login_id") or biz.get("taobao_nick"):
        raise _invalid("this simulator knows users by user_id or open_id only")
    else:
        raise _invalid("user_id, open_id, login_id, taobao_nick 不能同时为空")
    try:
        coupon, _created = await sim.send(template_id, user, out_biz_no)
    except SimError as exc:
        if exc.code != "BATCH_NOT_RUNNING":
            raise
        status = sim.batch(template_id)["status"]
        raise _Refusal(
            BUSINESS_FAILED, _NOT_SENDING.get(status, SubCode.TEMPLATE_NOT_ACTIVE), exc.message
        ) from None
    return {"voucher_id": coupon["coupon_id"], **_user_fields(coupon["user_id"])}


async def _voucher_query(sim: Simulator, request: Request, biz: dict[str, Any]) -> dict[str, Any]:
    coupon = sim.lookup(_text(biz, "voucher_id"), None)
    batch = sim.batch(coupon["batch_id"])
    status = _VOUCHER_STATUS[coupon["status"]]
    face = batch["face_value_cents"]
    answer: dict[str, Any] = {
        "voucher_id": coupon["coupon_id"],
        "template_id": coupon["batch_id"],
        "status": status,
        **_user_fields(coupon["user_id"]),
        "name": _voucher_name(batch),
        "total_amount": yuan(face),
        "available_amount": yuan(face if status == VOUCHER_ENABLED else 0),
        "available": status == VOUCHER_ENABLED,
        "gmt_create": _shanghai(coupon["sent_at"]),
        "gmt_active": _shanghai(coupon["sent_at"]),
        "gmt_expired": _shanghai(coupon["valid_until"]),
    }
    if coupon["used_at"] is not None:
        answer["bill_details"] = [
            {
                "amount": yuan(face),
                "biz_type": V_USE,
                "gmt_create": _shanghai(coupon["used_at"]),
                "status": "S",
            }
        ]
    return answer


_METHODS: dict[str, Method] = {
    CASHLESS_TEMPLATE_CREATE: _create_template(cash=False),
    CASH_TEMPLATE_CREATE: _create_template(cash=True),
    TEMPLATE_DETAIL_QUERY: _template_detail,
    TEMPLATE_DELETE: _template_delete,
    VOUCHER_SEND: _send,
    VOUCHER_QUERY: _voucher_query,
}


# ---------------------------------------------------------------- the face


def _digits(count: int) -> str:
    return "".join(secrets.choice(string.digits) for _ in range(count))


class AlipayFace:
    name = "alipay"

    def __init__(self, keys_dir: Path) -> None:
        ensure_test_keys(keys_dir)
        self._app_key = load_public_key(key_file(keys_dir, APP_PUBLIC_KEY).read_bytes())
        self._alipay_key = load_private_key(key_file(keys_dir, ALIPAY_PRIVATE_KEY).read_bytes())
        # Signs the forged probes: a key no receiver trusts.
        self._wrong_key = new_rsa_key()

    def __repr__(self) -> str:  # never show a key
        return "AlipayFace()"

    @property
    def callbacks_on(self) -> bool:
        return True  # signed with the platform's own key: no shared secret to wait for

    # -- the gateway --------------------------------------------------------------

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def gateway(request: Request) -> Response:
            return await self._gateway(sim, request)

        return [Route(GATEWAY_PATH, sim.protocol(self, gateway), methods=["GET", "POST"])]

    async def _gateway(self, sim: Simulator, request: Request) -> Response:
        key = ERROR_RESPONSE
        try:
            params = await _gateway_params(request)
            method = params.get("method", "")
            if not method:
                raise _missing(SubCode.MISSING_METHOD, "缺少方法名参数")
            handler = _METHODS.get(method)
            if handler is None:
                raise _bad(SubCode.INVALID_METHOD, "不存在的方法名")
            key = response_key(method)
            self._check_common(params)
            biz = _biz_content(params)
            return self._answer(
                key,
                {
                    "code": SUCCESS,
                    "msg": CODE_MESSAGES[SUCCESS],
                    **await handler(sim, request, biz),
                },
            )
        except _Refusal as refusal:
            return self._refusal(key, refusal)
        except SimError as exc:
            if exc.code == "INJECTED":
                return self.error_response(exc)
            return self._refusal(key, _sim_refusal(exc))

    def _check_common(self, params: Mapping[str, str]) -> None:
        """The common parameters and the signature, in the order the gateway checks them."""
        app_id = params.get("app_id", "")
        if not app_id:
            raise _missing(SubCode.MISSING_APP_ID, "缺少AppID参数")
        if app_id != SIM_APP_ID:
            raise _bad(SubCode.INVALID_APP_ID, "无效的AppID参数")
        if params.get("charset", "").lower() != CHARSET:
            raise _bad(SubCode.INVALID_CHARSET, "字符集错误")
        if params.get("format", FORMAT).upper() != FORMAT:
            raise _bad(SubCode.INVALID_FORMAT, "无效的数据格式")
        sign_type = params.get("sign_type", "")
        if not sign_type:
            raise _missing(SubCode.MISSING_SIGNATURE_TYPE, "缺少签名类型参数")
        if sign_type != SIGN_TYPE:
            raise _bad(SubCode.INVALID_SIGNATURE_TYPE, "无效的签名类型")
        if not params.get("sign"):
            raise _missing(SubCode.MISSING_SIGNATURE, "缺少签名参数")
        timestamp = params.get("timestamp", "")
        if not timestamp:
            raise _missing(SubCode.MISSING_TIMESTAMP, "缺少时间戳参数")
        try:
            parse_time(timestamp)
        except ValueError:
            raise _bad(SubCode.INVALID_TIMESTAMP, "非法的时间戳参数") from None
        if not params.get("version"):
            raise _missing(SubCode.MISSING_VERSION, "缺少版本参数")
        if params["version"] != VERSION:
            raise _bad(SubCode.INVALID_PARAMETER_FORMAT, "version 须为 1.0")
        if not rsa2_verify(self._app_key, request_sign_content(params), params["sign"]):
            raise _bad(SubCode.INVALID_SIGNATURE, "无效签名")

    def _answer(self, key: str, payload: Mapping[str, Any]) -> Response:
        signer = None if payload["code"] in UNSIGNED_CODES else self._alipay_key
        return Response(response_text(key, payload, signer).encode(), media_type=ANSWER_TYPE)

    def _refusal(self, key: str, refusal: _Refusal) -> Response:
        return self._answer(
            key,
            {
                "code": refusal.code,
                "msg": CODE_MESSAGES[refusal.code],
                "sub_code": refusal.sub_code,
                "sub_msg": refusal.sub_msg,
            },
        )

    def error_response(self, error: SimError) -> Response:
        """A core error met before the method was read (the rate limit), or an injected fault
        (a bare HTTP status, as a proxy in front of the gateway would answer)."""
        if error.code == "INJECTED" and error.status is not None:
            return Response(
                f"{error.status} {error.message}", error.status, media_type="text/plain"
            )
        return self._refusal(ERROR_RESPONSE, _sim_refusal(error))

    def new_batch_id(self) -> str:
        # Like Alipay's template ids: the date, digits, two letters (28 characters).
        date = datetime.now(UTC).astimezone(SHANGHAI).strftime("%Y%m%d")
        letters = "".join(secrets.choice(string.ascii_uppercase) for _ in range(2))
        return f"{date}{_digits(18)}{letters}"

    def new_coupon_id(self) -> str:
        date = datetime.now(UTC).astimezone(SHANGHAI).strftime("%Y%m%d")
        return f"{date}{_digits(20)}"

    # -- notifications ----------------------------------------------------------

    def notification(self, notification_id: str, coupon: Mapping[str, Any], now: datetime) -> bytes:
        params = {
            "notify_id": notification_id,
            # The real clock, not the simulator's: `clock_offset_s` moves coupon validity, and
            # a receiver's freshness check must see when the notification was made.
            "notify_time": format_time(datetime.now(UTC)),
            "notify_type": VOUCHER_NOTIFY_TYPE,
            "app_id": SIM_APP_ID,
            "charset": CHARSET,
            "version": VERSION,
            "sign_type": SIGN_TYPE,
            "biz_type": V_USE,
            "voucher_id": coupon["coupon_id"],
            "template_id": coupon["batch_id"],
            **_user_fields(coupon["user_id"]),
            "gmt_biz": _shanghai(coupon["used_at"]),
        }
        return self._signed_form(params, self._alipay_key)

    def delivery_body(self, body: bytes) -> bytes:
        """The stored notification as one delivery attempt sends it: Alipay's notify_time is
        when a notification is sent, and the signature covers it, so each attempt is stamped
        and signed afresh (same notify_id), and a receiver's freshness check holds for a retry
        hours later."""
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        params["notify_time"] = format_time(datetime.now(UTC))
        return self._signed_form(params, self._alipay_key)

    @staticmethod
    def _signed_form(params: Mapping[str, str], key: Any) -> bytes:
        fields = {name: value for name, value in params.items() if name != "sign"}
        fields["sign"] = rsa2_sign(key, notify_sign_content(fields))
        return urlencode(fields).encode()

    def delivery_headers(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": f"{FORM}; charset={CHARSET}"}

    def forged(self, body: bytes, n: int) -> tuple[bytes, dict[str, str]]:
        """The genuine fields signed with a wrong key, or the genuine signature over a tampered
        field (a new notify_id, so a receiver cannot hide an acceptance behind its duplicate
        check)."""
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        if n % 2 == 0:
            content = self._signed_form(params, self._wrong_key)
        else:
            content = urlencode({**params, "notify_id": f"ntf_{uuid.uuid4().hex}"}).encode()
        return content, self.delivery_headers(content)

    def acknowledged(self, response: httpx.Response) -> bool:
        # Alipay takes only the seven characters "success"; anything else is sent again.
        return response.is_success and response.content.strip() == NOTIFY_SUCCESS.encode()


def _sim_refusal(error: SimError) -> _Refusal:
    code, sub_code = _SIM_ERRORS.get(error.code, (UNAVAILABLE, SubCode.SYSTEM_BUSY))
    return _Refusal(code, sub_code, error.message)


async def _gateway_params(request: Request) -> dict[str, str]:
    """The query string's parameters and, for a POST, the form body's; a name given twice
    with two values is refused, since no one can tell which one was signed."""
    pairs = list(request.query_params.multi_items())
    if request.method == "POST":
        body = await request.body()
        if body:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != FORM:
                raise _bad(SubCode.INVALID_PARAMETER_FORMAT, f"body must be {FORM}")
            try:
                text = body.decode(CHARSET)
            except UnicodeDecodeError:
                raise _bad(SubCode.INVALID_CHARSET, "字符集错误") from None
            pairs += parse_qsl(text, keep_blank_values=True)
    params: dict[str, str] = {}
    for name, value in pairs:
        if params.setdefault(name, value) != value:
            raise _bad(SubCode.INVALID_PARAMETER_FORMAT, f"参数 {name} 重复")
    return params


def _biz_content(params: Mapping[str, str]) -> dict[str, Any]:
    text = params.get("biz_content", "")
    if not text:
        return {}
    try:
        biz = json.loads(text)
    except ValueError:
        biz = None
    if not isinstance(biz, dict):
        raise _bad(SubCode.INVALID_PARAMETER_FORMAT, "biz_content 须为 JSON 对象")
    return biz
