"""The simulator's Alipay face: the OpenAPI gateway at `/gateway.do` with the payment voucher
(支付券) activity family, and the used-voucher message.

Served methods: alipay.marketing.activity.voucher.create (an activity, INIT), .publish (ACTIVE),
.query, .stop (FINISHED), .send, and alipay.marketing.activity.user.queryvoucher; a voucher used
at the till sends alipay.marketing.activity.message.used to the `callback_url` knob. The
gateway's own rules are in `protocol` (parameters, signatures, answer format, codes); this module
checks them as Alipay does, in Alipay's order (method, then app_id, then the other common
parameters, then the signature), answers the gateway's refusals unsigned and business answers
signed with the Alipay key. Each rule names its source (the short names are `protocol`'s);
`docs/platforms/alipay.md` has the table.

Enforced as published:
- create: voucher_type FIX_VOUCHER; fix_voucher.amount 0.1 to 3000 yuan with at most two
  decimals, floor_amount optional ([PHP3] PaymentFixVoucher); voucher_quantity 1 to 99999999,
  voucher_quantity_limit_per_user 0 (no limit) or more ([PHP3] PaymentVoucherSendRule);
  publish_start_time/publish_end_time "yyyy-MM-dd HH:mm:ss", the end after the start, at most
  180 days apart ([PHP3] AlipayMarketingActivityVoucherCreateModel); voucher_valid_period RELATIVE
  with valid_days_after_receive > 0 ([JOLD] PaymentVoucherValidPeriod); available_merchant
  available_pids or available_smids ("至少二选一", [PHP3] PaymentVoucherAvailableMerchant);
  budget amount = face value x quantity when given ("总预算=优惠金额*总发券张数", [JOLD]
  PaymentVoucherBudgetInfo).
- Statuses: INIT until published, ACTIVE, FINISHED once stopped or past publish_end_time
  ([JOLD] AlipayMarketingActivityVoucherQueryResponse); vouchers SENDED / USED / EXPIRED ([JOLD]
  UserVoucherBaseInfo). Answers carry only the published fields ([PY] response classes): send
  answers voucher_id alone, the voucher query names no use time.
- Send refusals, each a published send code ([PHP3] AlipayMarketingActivityVoucherSend
  ErrorResponseModel): ACTIVITY_NOT_ACTIVE (not published, or paused), ACTIVITY_NOT_START
  (window not open), ACTIVITY_IS_STOPED, ACTIVITY_IS_END, BUDGET_NOT_ENOUGH, COUNT_OVER_LIMIT
  (the per-user limit), SYSTEM_ERROR (the error knobs), INVALID_PARAMETER; queryvoucher answers
  VOUCHER_NOT_EXIST for a voucher the user does not hold or the lag still hides.
- Gateway refusals with their [ERR] codes; the frequency limit is 40005 isv.app-call-limited.

Chosen where the documentation is silent (marked unconfirmed in the docs table):
- Required fields: the ones the service relies on are refused when missing (activity_name,
  out_biz_no, belong_merchant_info with this merchant's PID, the window, voucher_send_rule,
  voucher_use_rule, voucher_display_info.brand_name); Alipay publishes no required marks for
  支付券.
- Only what the core can model: FIX_VOUCHER, NO_CASH, RELATIVE validity with no wait days,
  LIFE_CYCLE per-user limits, a PID merchant; anything else is refused as INVALID_PARAMETER with
  a message saying the simulator is narrower.
- Users: the simulator's user_ids are 2088 and 12 digits; any other user_id is one Alipay does
  not know (INVALID_PARAMETER). An open_id is known if it is 1 to 128 of [0-9A-Za-z_-];
  another is openid-error (a signed 40004 sub_code; its v2 form is unconfirmed). Users in the
  `restricted_users` knob are refused INVALID_PARAMETER (Alipay publishes no risk code for send).
- An unknown activity is INVALID_PARAMETER (no ACTIVITY_NOT_EXIST is published); an out_biz_no
  reused with other parameters too (the documented idempotency covers only "参数不变").
  out_biz_no is unique per app (strict: the scope is not stated).
- A paused activity (only the control plane pauses; Alipay has no pause call) reads PAUSE, as
  activity.query publishes it; publish and stop apply at once (Alipay confirms them by message).
- A voucher's validity ends at publish_end_time at the latest (the core's rule for every
  platform); Alipay does not say whether RELATIVE validity is cut there.
- The used message: the envelope of [MSG] with biz_content {id, activity_id, event_time (epoch
  ms), voucher_id, user_id | open_id (user_id for the simulator's user_ids)}; each delivery is
  stamped (utc_timestamp) and signed afresh, the same notify_id and biz_content.id.

Over 500 lines on purpose: one face of one platform, its every method and rule beside the
others they share state with; docs/platforms/alipay.md is its index.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from coupons.platforms.alipay.protocol import (
    ACTIVITY_ACTIVE,
    ACTIVITY_CREATE,
    ACTIVITY_FINISHED,
    ACTIVITY_INIT,
    ACTIVITY_PAUSE,
    ACTIVITY_PUBLISH,
    ACTIVITY_QUERY,
    ACTIVITY_STOP,
    ALIPAY_PRIVATE_KEY,
    AMOUNT_CENTS,
    APP_PUBLIC_KEY,
    BUSINESS_FAILED,
    CALL_LIMITED,
    CHARSET,
    CODE_MESSAGES,
    ERROR_RESPONSE,
    FIX_VOUCHER,
    FORMAT,
    GATEWAY_CODES,
    GATEWAY_PATH,
    INVALID_ARGUMENTS,
    LIFE_CYCLE,
    MAX_OUT_BIZ_NO,
    MAX_PUBLISH_SPAN,
    MERCHANT_PID,
    MESSAGE_USED,
    MESSAGE_VERSION,
    MISSING_ARGUMENTS,
    NO_CASH,
    NOTIFY_SUCCESS,
    OPEN_ID,
    QUANTITY,
    RELATIVE,
    SHANGHAI,
    SIGN_TYPE,
    SIM_APP_ID,
    SIM_PID,
    SUCCESS,
    UNAVAILABLE,
    USER_ID,
    USER_QUERY_VOUCHER,
    VERSION,
    VOUCHER_EXPIRED,
    VOUCHER_SEND,
    VOUCHER_SENDED,
    VOUCHER_USED,
    SubCode,
    cents,
    ensure_test_keys,
    epoch_ms,
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
# The simulator's users: Alipay user_ids as they are published today (2088 and 12 digits).
SIM_USER_ID = re.compile(r"2088[0-9]{12}")
OPEN_ID_FORM = re.compile(r"[0-9A-Za-z_-]{1,128}")
PERIOD_TYPES = ("DAY", "WEEK", "MONTH", LIFE_CYCLE)

_SIM_ERRORS: dict[str, tuple[str, str]] = {
    "INVALID_REQUEST": (BUSINESS_FAILED, SubCode.INVALID_PARAMETER),
    "BATCH_NOT_FOUND": (BUSINESS_FAILED, SubCode.INVALID_PARAMETER),
    "BATCH_PAUSED": (BUSINESS_FAILED, SubCode.ACTIVITY_NOT_ACTIVE),
    "BATCH_NOT_STARTED": (BUSINESS_FAILED, SubCode.ACTIVITY_NOT_START),
    "BATCH_STATE_INVALID": (BUSINESS_FAILED, SubCode.BIZ_ERROR),
    "BUDGET_EXHAUSTED": (BUSINESS_FAILED, SubCode.BUDGET_NOT_ENOUGH),
    "USER_RESTRICTED": (BUSINESS_FAILED, SubCode.INVALID_PARAMETER),
    "USER_LIMIT_REACHED": (BUSINESS_FAILED, SubCode.COUNT_OVER_LIMIT),
    "IDEMPOTENCY_KEY_REUSED": (BUSINESS_FAILED, SubCode.INVALID_PARAMETER),
    "COUPON_NOT_FOUND": (BUSINESS_FAILED, SubCode.VOUCHER_NOT_EXIST),
    "RATE_LIMITED": (CALL_LIMITED, SubCode.APP_CALL_LIMITED),
    "SYSTEM_ERROR": (BUSINESS_FAILED, SubCode.SYSTEM_ERROR),
}
# Why an activity does not send, by the core's status (a running one would).
_NOT_SENDING = {
    "created": SubCode.ACTIVITY_NOT_ACTIVE,
    "paused": SubCode.ACTIVITY_NOT_ACTIVE,
    "stopped": SubCode.ACTIVITY_IS_STOPED,
    "expired": SubCode.ACTIVITY_IS_END,
}
_ACTIVITY_STATUS = {
    "created": ACTIVITY_INIT,
    "running": ACTIVITY_ACTIVE,
    "paused": ACTIVITY_PAUSE,
    "stopped": ACTIVITY_FINISHED,
    "expired": ACTIVITY_FINISHED,
}
_VOUCHER_STATUS = {"sent": VOUCHER_SENDED, "used": VOUCHER_USED, "expired": VOUCHER_EXPIRED}


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


def _object(biz: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = biz.get(name)
    if not isinstance(value, dict):
        raise _invalid(f"{name} 不能为空")
    return value


def _amount(biz: Mapping[str, Any], name: str) -> int:
    value = biz.get(name)
    try:
        return cents(value if isinstance(value, str) else str(value))
    except ValueError:
        raise _invalid(f"{name} 须为金额, 单位为元, 最多两位小数") from None


def _whole(biz: Mapping[str, Any], name: str, *, low: int, high: int | None = None) -> int:
    value = biz.get(name)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _invalid(f"{name} 须为不小于 {low} 的整数")
    if high is not None and value > high:
        raise _invalid(f"{name} 不能大于 {high}")
    return value


def _moment(biz: Mapping[str, Any], name: str) -> datetime:
    value = biz.get(name)
    try:
        if isinstance(value, str):
            return parse_time(value).astimezone(UTC)
    except ValueError:
        pass
    raise _invalid(f"{name} 格式须为 yyyy-MM-dd HH:mm:ss")


def _user(biz: Mapping[str, Any]) -> tuple[str, str]:
    """(the field, the id) of the user a request names: user_id or open_id, one of them."""
    named = [field for field in (USER_ID, OPEN_ID) if biz.get(field) not in (None, "")]
    if len(named) != 1:
        raise _invalid("user_id 与 open_id 须二选一")
    field = named[0]
    user = biz[field]
    if not isinstance(user, str):
        raise _invalid(f"{field} 须为字符串")
    if field == USER_ID and not SIM_USER_ID.fullmatch(user):
        raise _invalid("user_id 不存在")  # a user Alipay does not know
    if field == OPEN_ID and not OPEN_ID_FORM.fullmatch(user):
        raise _Refusal(BUSINESS_FAILED, SubCode.OPENID_ERROR, "open_id 不属于当前应用")
    return field, user


def _user_fields(user: str) -> dict[str, str]:
    return {USER_ID: user} if SIM_USER_ID.fullmatch(user) else {OPEN_ID: user}


def _voucher_name(batch: Mapping[str, Any]) -> str:
    # Alipay names a fixed voucher by its face value.
    return f"{yuan(batch['face_value_cents'])}元代金券"


def _shanghai(iso_time: str) -> str:
    return format_time(datetime.fromisoformat(iso_time))


def _activity(sim: Simulator, biz: Mapping[str, Any]) -> dict[str, Any]:
    activity_id = _text(biz, "activity_id", limit=128)
    try:
        return sim.batch(activity_id)
    except SimError:
        raise _invalid("活动不存在") from None


# ---------------------------------------------------------------- methods


Method = Callable[[Simulator, dict[str, Any]], Awaitable[dict[str, Any]]]


def _valid_days(use_rule: Mapping[str, Any]) -> int:
    period = _object(use_rule, "voucher_valid_period")
    if period.get("type") != RELATIVE:
        raise _invalid("voucher_valid_period.type: this simulator supports RELATIVE only")
    if period.get("wait_days_after_receive") not in (None, 0, "0"):
        raise _invalid("wait_days_after_receive: this simulator supports 0 only")
    return _whole(period, "valid_days_after_receive", low=1)


def _per_user_limit(send_rule: Mapping[str, Any]) -> int:
    period = send_rule.get("voucher_quantity_limit_per_user_period_type", LIFE_CYCLE)
    if period not in PERIOD_TYPES:
        raise _invalid(f"voucher_quantity_limit_per_user_period_type 须为 {'/'.join(PERIOD_TYPES)}")
    if period != LIFE_CYCLE:
        raise _invalid("voucher_quantity_limit_per_user_period_type: this simulator: LIFE_CYCLE")
    if send_rule.get("voucher_quantity_limit_per_user") in (None, ""):
        return 0
    return _whole(send_rule, "voucher_quantity_limit_per_user", low=0)


async def _create(sim: Simulator, biz: dict[str, Any]) -> dict[str, Any]:
    if biz.get("voucher_type") != FIX_VOUCHER:
        raise _invalid(f"voucher_type: this simulator creates {FIX_VOUCHER} only")
    name = _text(biz, "activity_name")
    out_biz_no = _text(biz, "out_biz_no", limit=MAX_OUT_BIZ_NO)
    owner = _object(biz, "belong_merchant_info")
    if owner.get("merchant_id_type") != MERCHANT_PID or owner.get("merchant_id") != SIM_PID:
        raise _invalid(f"belong_merchant_info: merchant_id_type PID, merchant_id {SIM_PID}")
    starts_at = _moment(biz, "publish_start_time")
    ends_at = _moment(biz, "publish_end_time")
    if ends_at <= starts_at:
        raise _invalid("publish_end_time 须晚于 publish_start_time")
    if ends_at - starts_at > MAX_PUBLISH_SPAN:
        raise _invalid("publish_end_time 与 publish_start_time 间隔必须小于等于180天")
    send_rule = _object(biz, "voucher_send_rule")
    quantity = _whole(send_rule, "voucher_quantity", low=QUANTITY[0], high=QUANTITY[1])
    per_user = _per_user_limit(send_rule)
    use_rule = _object(biz, "voucher_use_rule")
    fix = _object(use_rule, "fix_voucher")
    amount = _amount(fix, "amount")
    if not AMOUNT_CENTS[0] <= amount <= AMOUNT_CENTS[1]:
        raise _invalid("amount 取值范围: 0.1<=x<=3000")
    floor = _amount(fix, "floor_amount") if fix.get("floor_amount") not in (None, "") else 0
    valid_days = _valid_days(use_rule)
    scope = _object(use_rule, "available_merchant")
    merchants = [scope.get("available_pids"), scope.get("available_smids")]
    if not any(isinstance(listed, list) and listed for listed in merchants):
        raise _invalid("available_pids 和 available_smids 至少二选一")
    budget = biz.get("voucher_budget_info")
    if budget is not None:
        if not isinstance(budget, dict) or budget.get("budget_type") != NO_CASH:
            raise _invalid(f"voucher_budget_info.budget_type: this simulator: {NO_CASH} only")
        given = budget.get("amount") not in (None, "")
        if given and _amount(budget, "amount") != amount * quantity:
            raise _invalid("voucher_budget_info.amount 须为 优惠金额*总发券张数")
    display = _object(biz, "voucher_display_info")
    _text(display, "brand_name")
    terms = {
        "name": name,
        "face_value_cents": amount,
        "min_spend_cents": floor,
        "quantity": quantity,
        "valid_days": valid_days,
        # "不填写或填入0表示没有领取限制": a user may hold all of them.
        "per_user_limit": per_user or quantity,
    }
    # What the query answers beyond the core's terms, and what a retry is compared with.
    extra = {
        "belong_merchant_info": dict(owner),
        "voucher_display_info": dict(display),
        "available_merchant": dict(scope),
        "voucher_quantity_limit_per_user": per_user,
    }
    batch, _created = sim.create_batch(out_biz_no, terms, starts_at, ends_at, extra)
    return {"activity_id": batch["batch_id"]}


async def _publish(sim: Simulator, biz: dict[str, Any]) -> dict[str, Any]:
    activity = _activity(sim, biz)
    _text(biz, "out_biz_no", limit=MAX_OUT_BIZ_NO)
    status = activity["status"]
    if status in ("stopped", "expired"):
        raise _Refusal(BUSINESS_FAILED, SubCode.BIZ_ERROR, "活动已结束, 不能激活")
    if status == "paused":
        raise _Refusal(BUSINESS_FAILED, SubCode.BIZ_ERROR, "活动已暂停, 不能激活")
    if status == "created":
        sim.change_batch(activity["batch_id"], "start")
    # recharge_url is for RECHARGE activities only; a NO_CASH one has nothing to pay.
    return {}


async def _stop(sim: Simulator, biz: dict[str, Any]) -> dict[str, Any]:
    activity = _activity(sim, biz)
    _text(biz, "out_biz_no", limit=MAX_OUT_BIZ_NO)
    if activity["status"] not in ("stopped", "expired"):  # FINISHED already: nothing to do
        sim.change_batch(activity["batch_id"], "stop")
    return {}


async def _query(sim: Simulator, biz: dict[str, Any]) -> dict[str, Any]:
    batch = _activity(sim, biz)
    extra = batch["extra"]
    face, quantity = batch["face_value_cents"], batch["quantity"]
    sent = quantity - batch["remaining"]
    # The core's own record of uses (its flow), counted; Alipay publishes no such file.
    used = sim.flow(batch["batch_id"], "used").records
    fix = {"amount": yuan(face)}
    if batch["min_spend_cents"]:
        fix["floor_amount"] = yuan(batch["min_spend_cents"])
    return {
        "activity_id": batch["batch_id"],
        "activity_name": batch["name"],
        "activity_status": _ACTIVITY_STATUS[batch["status"]],
        "belong_merchant_info": extra.get("belong_merchant_info", {}),
        "publish_start_time": _shanghai(batch["starts_at"]),
        "publish_end_time": _shanghai(batch["ends_at"]),
        "voucher_type": FIX_VOUCHER,
        "voucher_send_rule": {
            "voucher_quantity": quantity,
            "voucher_quantity_limit_per_user": extra.get("voucher_quantity_limit_per_user", 0),
            "voucher_quantity_limit_per_user_period_type": LIFE_CYCLE,
        },
        "voucher_use_rule": {
            "fix_voucher": fix,
            "voucher_valid_period": {
                "type": RELATIVE,
                "valid_days_after_receive": batch["valid_days"],
            },
        },
        "voucher_budget_info": {"budget_type": NO_CASH, "amount": yuan(face * quantity)},
        "voucher_display_info": extra.get("voucher_display_info", {}),
        "summary": {"publish_count": sent, "used_count": used},
        "voucher_inventory_info": {"send_count": sent, "use_count": used},
    }


async def _send(sim: Simulator, biz: dict[str, Any]) -> dict[str, Any]:
    activity = _activity(sim, biz)
    out_biz_no = _text(biz, "out_biz_no", limit=MAX_OUT_BIZ_NO)
    _field, user = _user(biz)
    try:
        coupon, _created = await sim.send(activity["batch_id"], user, out_biz_no)
    except SimError as exc:
        if exc.code != "BATCH_NOT_RUNNING":
            raise
        status = sim.batch(activity["batch_id"])["status"]
        raise _Refusal(
            BUSINESS_FAILED, _NOT_SENDING.get(status, SubCode.ACTIVITY_NOT_ACTIVE), exc.message
        ) from None
    return {"voucher_id": coupon["coupon_id"]}


async def _query_voucher(sim: Simulator, biz: dict[str, Any]) -> dict[str, Any]:
    voucher_id = _text(biz, "voucher_id", limit=64)
    _field, user = _user(biz)
    coupon = sim.lookup(voucher_id, user)
    asked_activity = biz.get("activity_id")
    if asked_activity not in (None, "", coupon["batch_id"]):
        raise _Refusal(BUSINESS_FAILED, SubCode.VOUCHER_NOT_EXIST, "用户券不存在")
    batch = sim.batch(coupon["batch_id"])
    status = _VOUCHER_STATUS[coupon["status"]]
    sent_at, valid_until = _shanghai(coupon["sent_at"]), _shanghai(coupon["valid_until"])
    name = _voucher_name(batch)
    merchant = batch["extra"].get("belong_merchant_info", {}).get("merchant_id", SIM_PID)
    return {
        "activity_id": coupon["batch_id"],
        "voucher_status": status,
        "voucher_name": name,
        "voucher_type": FIX_VOUCHER,
        "available_begin_time": sent_at,
        "available_end_time": valid_until,
        "create_time": sent_at,
        "belong_merchant_id": merchant,
        "user_voucher_base_info": {
            "voucher_id": coupon["coupon_id"],
            "voucher_name": name,
            "voucher_status": status,
            "valid_begin_time": sent_at,
            "valid_end_time": valid_until,
            "create_time": sent_at,
            "voucher_max_use_times": 1,
            "voucher_used_times": 1 if status == VOUCHER_USED else 0,
            "belong_merchant_id": merchant,
        },
    }


_METHODS: dict[str, Method] = {
    ACTIVITY_CREATE: _create,
    ACTIVITY_PUBLISH: _publish,
    ACTIVITY_QUERY: _query,
    ACTIVITY_STOP: _stop,
    VOUCHER_SEND: _send,
    USER_QUERY_VOUCHER: _query_voucher,
}


# ---------------------------------------------------------------- the face


def _digits(count: int) -> str:
    return "".join(secrets.choice(string.digits) for _ in range(count))


class _GatewayRoute(Route):
    """`/gateway.do`, also when the request line names it in absolute form (`POST
    http://host/gateway.do?... HTTP/1.1`), which RFC 9112 section 3.2.2 has every server accept
    and Alipay's Python SDK sends ([PY] util/WebUtils.get_http_connection passes the whole URL
    to http.client); uvicorn's h11 protocol leaves that URL in the ASGI path."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if scope.get("type") == "http" and path.startswith(("http://", "https://")):
            scope = {**scope, "path": urlsplit(path).path}
        return super().matches(scope)


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

        return [_GatewayRoute(GATEWAY_PATH, sim.protocol(self, gateway), methods=["GET", "POST"])]

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
                {"code": SUCCESS, "msg": CODE_MESSAGES[SUCCESS], **await handler(sim, biz)},
            )
        except _Refusal as refusal:
            return self._refusal(key, refusal)
        except SimError as exc:
            if exc.code == "INJECTED":
                return self.error_response(exc)
            return self._refusal(key, _sim_refusal(exc))

    def _check_common(self, params: Mapping[str, str]) -> None:
        """The common parameters and the signature, in the order the gateway checks them. The
        timestamp's format only: [PY] stamps the machine's local time, not Beijing time, and
        Alipay publishes no allowed skew."""
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
        signer = None if payload["code"] in GATEWAY_CODES else self._alipay_key
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
        # Like Alipay's activity ids ("2016042700826004508401111111": 28 digits).
        date = datetime.now(UTC).astimezone(SHANGHAI).strftime("%Y%m%d")
        return f"{date}{_digits(20)}"

    def new_coupon_id(self) -> str:
        # Like Alipay's voucher ids ("2021072900073002214009f8qhr3": 28 characters).
        date = datetime.now(UTC).astimezone(SHANGHAI).strftime("%Y%m%d")
        tail = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6))
        return f"{date}{_digits(14)}{tail}"

    # -- the used-voucher message --------------------------------------------------

    def notification(self, notification_id: str, coupon: Mapping[str, Any], now: datetime) -> bytes:
        used_at = datetime.fromisoformat(coupon["used_at"])
        biz = {
            "id": f"used_{coupon['coupon_id']}",
            "activity_id": coupon["batch_id"],
            "event_time": epoch_ms(used_at),
            "voucher_id": coupon["coupon_id"],
            **_user_fields(coupon["user_id"]),
        }
        params = {
            "notify_id": notification_id,
            "utc_timestamp": epoch_ms(datetime.now(UTC)),
            "msg_method": MESSAGE_USED,
            "app_id": SIM_APP_ID,
            "version": MESSAGE_VERSION,
            "charset": CHARSET,
            "sign_type": SIGN_TYPE,
            "biz_content": json.dumps(biz, ensure_ascii=False, separators=(",", ":")),
        }
        return self._signed_form(params, self._alipay_key)

    def delivery_body(self, body: bytes) -> bytes:
        """The stored message as one delivery attempt sends it: utc_timestamp is "消息发送时的
        服务端时间" and the signature covers it, so each attempt is stamped and signed afresh
        (the same notify_id and biz_content), and a receiver's freshness check holds for a
        retry hours later. The real clock, not the simulator's: `clock_offset_s` moves coupon
        validity, not when a message leaves."""
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        params["utc_timestamp"] = epoch_ms(datetime.now(UTC))
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
        biz_content (a new event id, so a receiver cannot hide an acceptance behind its
        duplicate check)."""
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        if n % 2 == 0:
            content = self._signed_form(params, self._wrong_key)
        else:
            biz = {**json.loads(params["biz_content"]), "id": f"used_{uuid.uuid4().hex}"}
            tampered = {**params, "biz_content": json.dumps(biz, separators=(",", ":"))}
            content = urlencode(tampered).encode()
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
