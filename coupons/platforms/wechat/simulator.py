"""The simulator's wechat face: WeChat Pay API v3 vouchers (代金券) over the neutral core.

It speaks the documented paths, field names, statuses, error codes and HTTP statuses of
/v3/marketing/favor and /v3/certificates, enforces the published rules and frequency limits,
verifies every request's `Authorization` the way WeChat Pay does (401 SIGN_ERROR, unsigned,
for a bad format, another merchant, another certificate serial, a timestamp more than 5
minutes off, or a signature that does not verify) and signs every other answer. Each rule, its
published source and the test that proves it is a row of docs/platforms/wechat.md, where
unconfirmed ones are marked. The test merchant is SIM_MCHID with SIM_APPID; every openid
belongs to that appid.

Which key signs (knob `wechat_signer`): `public_key`, the WeChat Pay public key
(`Wechatpay-Serial: PUB_KEY_ID_...`); `certificates`, the platform certificate (its serial),
whatever the request names; `switching`, a merchant in the middle of the switch: each answer
with the key the request's `Wechatpay-Serial` names (the certificate when it names none), each
notification with the public key at the share `wechat_switch_public_share`, else the
certificate. `GET /v3/certificates` answers the certificate sealed under the APIv3 key.

How the core's words become WeChat's:

- Batch status: created → unactivated, running → running, paused → paused, stopped and
  expired → stoped [sic] (WeChat has no "expired": a client reads the window's end).
- A coupon is valid until its stock's window ends: `coupon_available_time` is not open through
  the API (values above 1440 minutes are refused, others have no effect).
- Refusals of a send: no budget → 403 NOT_ENOUGH 批次预算不足; restricted user → 403
  USER_ACCOUNT_ABNORMAL 用户非法; per-user limit → 403 REQUEST_BLOCKED 用户被限领拦截; window
  not open yet → 403 REQUEST_BLOCKED 活动未开始或已结束; paused → 400 PARAM_ERROR 非法的批次状态;
  unactivated, stopped or expired → 400 INVALID_REQUEST 活动已结束或未激活; unknown stock →
  404 RESOURCE_NOT_EXISTS; an out_request_no reused with other content → 400
  RESOURCE_ALREADY_EXISTS; a frequency limit → 429 FREQUENCY_LIMIT_EXCEED 接口限频; injected
  errors → 500 SYSTEM_ERROR.
- A stock starts no sooner than `wechat_start_delay_s` after its creation (400
  INVALID_REQUEST 卡包信息尚未注册完成,请稍后重试 before); starting a 预充值 stock (no_cash
  false) locks its budget from the merchant's balance (knob `wechat_balance_cents`; 403
  NOT_ENOUGH when short); only a stock never started can be stopped.
- The use flow is published from 10:00 (Beijing) the day after the stock's window ends, and
  only when one of its coupons was used (404 RESOURCE_NOT_EXISTS 账单文件不存在 before): a CSV
  with WeChat's twelve columns, values after a "`" except the last three, times in Beijing
  time; its URL lives 30 s and the download, a signed GET of /v3/billdownload/file, is
  answered unsigned.
- COUPON.USE notifications: the documented envelope (id, create_time, event_type,
  resource_type encrypt-resource, summary, resource) with the coupon's detail and its
  consume_information (no openid) sealed with AEAD_AES_256_GCM under the APIv3 key. They go
  wherever the `callback_url` knob points; POST /v3/marketing/favor/callbacks sets that knob
  too (https only, `switch` false refused, as documented). A receiver takes one by answering
  200 or 204.

What is not faithful: a stock is never `audit`; transaction ids, order amounts and consume
merchants are made up; times are truncated to whole seconds (window and validity ends rounded
up); the balance knob resets when the simulator restarts; the platform certificate is signed by
itself, not by Tenpay.com Root CA.

Over 500 lines on purpose: one face of one platform, its every endpoint and rule beside the
others they share state with; docs/platforms/wechat.md is its index.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from coupons.platforms.rsa_keys import rsa_verify
from coupons.platforms.simcore.core import CURRENT_REQUEST, EndpointLimit, Simulator
from coupons.platforms.simcore.errors import SimError
from coupons.platforms.simcore.knobs import FaceKnob, number
from coupons.platforms.wechat.protocol import (
    BEIJING,
    MAX_CLOCK_OFFSET_S,
    REQUEST_ID_HEADER,
    SERIAL_HEADER,
    SIM_APPID,
    SIM_MCHID,
    Authorization,
    SignatureError,
    aead_encrypt,
    certificates_answer,
    json_body,
    load_platform_keys,
    parse_time,
    request_message,
    rfc3339,
    signed_headers,
)

Payload = dict[str, Any]
Handler = Callable[[Simulator, Request, bytes], Awaitable[Payload | Response]]

# Neutral or face code: (HTTP status, WeChat code, WeChat's message; None keeps the error's).
_ANSWERS: dict[str, tuple[int, str, str | None]] = {
    "INVALID_REQUEST": (400, "PARAM_ERROR", None),
    "PARAM_ERROR": (400, "PARAM_ERROR", None),
    "MCH_INVALID": (400, "INVALID_REQUEST", "非法的商户号"),
    "APPID_MCHID_NOT_MATCH": (400, "APPID_MCHID_NOT_MATCH", "商户号与appid不匹配"),
    "BATCH_NOT_FOUND": (404, "RESOURCE_NOT_EXISTS", "批次不存在"),
    "BATCH_STATE_INVALID": (400, "INVALID_REQUEST", None),
    "BATCH_PAUSED": (400, "PARAM_ERROR", "非法的批次状态"),
    "BATCH_NOT_RUNNING": (400, "INVALID_REQUEST", "活动已结束或未激活"),
    "BATCH_NOT_STARTED": (403, "REQUEST_BLOCKED", "活动未开始或已结束"),
    "BUDGET_EXHAUSTED": (403, "NOT_ENOUGH", "批次预算不足"),
    "USER_RESTRICTED": (403, "USER_ACCOUNT_ABNORMAL", "用户非法"),
    "USER_LIMIT_REACHED": (403, "REQUEST_BLOCKED", "用户被限领拦截"),
    "IDEMPOTENCY_KEY_REUSED": (
        400,
        "RESOURCE_ALREADY_EXISTS",
        "创建请求重入，但本次请求与上次请求信息不一致",  # noqa: RUF001
    ),
    "COUPON_NOT_FOUND": (404, "RESOURCE_NOT_EXISTS", "券不存在"),
    "COUPON_EXPIRED": (400, "INVALID_REQUEST", "券已过期"),
    "FILE_NOT_FOUND": (400, "INVALID_REQUEST", "参数错误,请重新获取账单地址后再请求"),
    "FLOW_NOT_YET": (404, "RESOURCE_NOT_EXISTS", "账单文件不存在"),
    "STOCK_REGISTERING": (400, "INVALID_REQUEST", "卡包信息尚未注册完成,请稍后重试"),
    "BALANCE_NOT_ENOUGH": (403, "NOT_ENOUGH", "账户余额不足,请充值"),
    "NOT_FOUND": (404, "RESOURCE_NOT_EXISTS", None),
    "RATE_LIMITED": (429, "FREQUENCY_LIMIT_EXCEED", "接口限频"),
    "SYSTEM_ERROR": (500, "SYSTEM_ERROR", "系统错误"),
    "SIGN_ERROR": (401, "SIGN_ERROR", None),
}
# An injected fault's code, by the HTTP status the knob asked for.
_INJECTED = {400: "PARAM_ERROR", 401: "SIGN_ERROR", 403: "NO_AUTH", 404: "RESOURCE_NOT_EXISTS"}
_STOCK_STATUS = {
    "created": "unactivated",
    "running": "running",
    "paused": "paused",
    "stopped": "stoped",
    "expired": "stoped",
}
_COUPON_STATUS = {"sent": "SENDED", "used": "USED", "expired": "EXPIRED"}
# The documented actions: the core's action, the field their answer times them with, and the
# published frequency limit (start and pause: "单ip 60/min"; restart's is not published and
# taken as pause's; stop's is not published).
_MINUTE = 60.0
_ACTIONS: dict[str, tuple[str, str, EndpointLimit | None]] = {
    "start": ("start", "start_time", EndpointLimit("start stock", 60, _MINUTE)),
    "pause": ("pause", "pause_time", EndpointLimit("pause stock", 60, _MINUTE)),
    "restart": ("resume", "restart_time", EndpointLimit("restart stock", 60, _MINUTE)),
    "stop": ("stop", "stop_time", None),
}
# The other published limits ("单个商户号调用频率60/min"; "频率限制:500/s"; "单ip 500/s";
# use flow and callbacks "单ip 5/min"; query callbacks 2000 QPS; certificates 1000/s).
_CREATE_LIMIT = EndpointLimit("create stock", 60, _MINUTE)
_SEND_LIMIT = EndpointLimit("send coupon", 500, 1.0)
_STOCK_QUERY_LIMIT = EndpointLimit("query stock", 500, 1.0)
_COUPON_QUERY_LIMIT = EndpointLimit("query coupon", 500, 1.0)
_USE_FLOW_LIMIT = EndpointLimit("use flow", 5, _MINUTE)
_SET_CALLBACKS_LIMIT = EndpointLimit("set callbacks", 5, _MINUTE)
_GET_CALLBACKS_LIMIT = EndpointLimit("query callbacks", 2000, 1.0)
_CERTIFICATES_LIMIT = EndpointLimit("certificates", 1000, 1.0)
_CREATE_FIELDS = frozenset(
    {
        "stock_name", "comment", "belong_merchant", "available_begin_time",
        "available_end_time", "stock_use_rule", "pattern_info", "coupon_use_rule", "no_cash",
        "stock_type", "out_request_no", "ext_info",
    }
)  # fmt: skip
_STOCK_USE_FIELDS = frozenset(
    {
        "max_coupons", "max_amount", "max_amount_by_day", "max_coupons_per_user",
        "natural_person_limit", "prevent_api_abuse",
    }
)  # fmt: skip
_COUPON_USE_FIELDS = frozenset(
    {
        "coupon_available_time", "fixed_normal_coupon", "discount_coupon", "exchange_coupon",
        "goods_tag", "limit_pay", "limit_card", "trade_type", "combine_use", "available_items",
        "unavailable_items", "available_merchants",
    }
)  # fmt: skip
_SEND_FIELDS = frozenset(
    {"stock_id", "out_request_no", "appid", "stock_creator_mchid", "coupon_value",
     "coupon_minimum"}
)  # fmt: skip
_AUTH_FORMAT = "Http头Authorization值格式错误，请参考《微信支付商户REST API签名规则》"  # noqa: RUF001
_REQUEST_NO = re.compile(r"[0-9A-Za-z_|*-]{1,128}")
_NAME_FORBIDDEN = frozenset("_,;|")
_USE_FLOW_COLUMNS = (
    "批次id", "优惠id", "优惠类型", "优惠金额（元）", "订单总金额（元）",  # noqa: RUF001
    "交易类型", "支付单号", "消耗时间", "消耗商户号", "设备号", "银行流水号", "单品信息",
)  # fmt: skip
_FLOW_URL_LIFE_S = 30.0  # documented: the download URL is valid for 30 s
_FLOW_FILES_KEPT = 256
# The use flow: "该接口需要活动结束后次日10点才可以下载".
_FLOW_PUBLISHED_AT = timedelta(days=1, hours=10)
_START_GRACE = timedelta(minutes=1)
_LONGEST_WINDOW = timedelta(days=90)
_SHORTEST_WINDOW = timedelta(seconds=1)
_FURTHEST_START = timedelta(days=365)
# Published ranges of a stock's terms ("发放总个数最少5个, 最多1000万个"; "每个用户可领个数
# 最少为1个, 最多为60个"; "面额 必须大于1分且小于等于1000元"; "批次总预算最多1亿元"; "批次备注
# 最多60个UTF8字符"; available_merchants "条目个数限制为【1,50】"; available_time_after_receive
# at most 1440).
_QUANTITY = (5, 10_000_000)
_PER_USER = (1, 60)
_FACE_VALUE = (2, 100_000)
_MOST_BUDGET = 10_000_000_000
_MOST_COMMENT = 60
_MERCHANTS = (1, 50)
_MOST_MINUTES_AFTER_RECEIVE = 1440
_ASSOCIATED_DATA = "coupon"
SIGNERS = ("public_key", "certificates", "switching")


def _signer(value: object) -> str:
    if value not in SIGNERS:
        raise ValueError(f"must be one of {', '.join(SIGNERS)}")
    return str(value)


def _cents(value: object) -> int:
    cents = number(value)
    if cents != int(cents):
        raise ValueError("must be a whole number of cents")
    return int(cents)


# ---------------------------------------------------------------- request fields


def _param(message: str) -> SimError:
    return SimError("PARAM_ERROR", message)


def _object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise _param("请求体不是合法的JSON") from None
    if not isinstance(data, dict):
        raise _param("请求体必须是JSON对象")
    return data


def _only(data: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _param(f"请求中含有未在API文档中定义的参数: {', '.join(unknown)}")


def _text(data: Mapping[str, Any], name: str, longest: int = 128) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _param(f"{name}必填")
    if len(value) > longest:
        raise _param(f"{name}长度不能超过{longest}")
    return value


def _integer(data: Mapping[str, Any], name: str, bounds: tuple[int, int] = (0, 2**63)) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _param(f"{name}必填,且必须是整数")
    if value < bounds[0]:
        raise _param(f"{name}不能小于{bounds[0]}")
    if value > bounds[1]:
        raise _param(f"{name}不能大于{bounds[1]}")
    return value


def _boolean(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name)
    if not isinstance(value, bool):
        raise _param(f"{name}必填,且必须是布尔值")
    return value


def _member(data: Mapping[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    value = data.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _param(f"{name}必填,且必须是对象")
    return value


def _moment(data: Mapping[str, Any], name: str) -> datetime:
    try:
        return parse_time(data.get(name))
    except ValueError:
        raise _param(f"{name}输入时间格式错误") from None


def _request_no(data: Mapping[str, Any]) -> str:
    value = _text(data, "out_request_no")
    if not _REQUEST_NO.fullmatch(value):
        raise _param("out_request_no只能包含英文字母、数字和|_*-")
    return value


def _stock_name(data: Mapping[str, Any]) -> str:
    name = _text(data, "stock_name", longest=20)
    if any(char in _NAME_FORBIDDEN for char in name):
        raise _param("批次名称中不能包含特殊字符 _ , ; |")
    if sum(not char.isascii() for char in name) > 9:
        raise _param("批次名称最多9个中文汉字")
    return name


def _end_time(moment: datetime) -> str:
    """An end, in whole seconds, never before the real one."""
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return rfc3339(moment)


def _yuan(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _transaction_id(coupon_id: str) -> str:
    """A made-up WeChat Pay order number for the order a coupon was used in."""
    digits = int(hashlib.sha1(coupon_id.encode(), usedforsecurity=False).hexdigest()[:15], 16)
    return f"4200{digits:024d}"[:28]


def _request_id() -> str:
    return secrets.token_hex(20).upper() + "-0"


def _flow_published_at(ends_at: datetime) -> datetime:
    """10:00 Beijing time the day after the stock's window ends."""
    day = ends_at.astimezone(BEIJING).replace(hour=0, minute=0, second=0, microsecond=0)
    return day + _FLOW_PUBLISHED_AT


def _checked_window(begins: datetime, ends: datetime) -> None:
    if ends - begins < _SHORTEST_WINDOW:
        raise _param("可用结束时间必须晚于开始时间")
    if ends - begins > _LONGEST_WINDOW:
        raise _param("批次可用时间范围最长为90天")


def _checked_use_rule(use_rule: Mapping[str, Any], amount: int) -> tuple[int, int]:
    """The stock rule's quantity and per-user limit, checked against the published ranges."""
    _only(use_rule, _STOCK_USE_FIELDS)
    quantity = _integer(use_rule, "max_coupons", _QUANTITY)
    budget = _integer(use_rule, "max_amount", (1, _MOST_BUDGET))
    per_user = _integer(use_rule, "max_coupons_per_user", _PER_USER)
    _boolean(use_rule, "natural_person_limit")
    _boolean(use_rule, "prevent_api_abuse")
    if budget != amount * quantity:
        raise _param("批次预算等于批次面额乘以发券数")
    if "max_amount_by_day" in use_rule:
        by_day = _integer(use_rule, "max_amount_by_day", (1, _MOST_BUDGET))
        if by_day > budget:
            raise _param("单天预算不能大于总预算")
    if per_user > quantity:
        raise _param("单个用户可领个数不能大于发放总上限")
    return quantity, per_user


def _checked_coupon_rule(coupon_rule: Mapping[str, Any]) -> tuple[int, int]:
    """The fixed coupon's face value and threshold; the validity after receipt, if given, is
    checked as the platform checks it and has no effect (not open through the API)."""
    _only(coupon_rule, _COUPON_USE_FIELDS)
    fixed = _member(coupon_rule, "fixed_normal_coupon")
    amount = _integer(fixed, "coupon_amount", _FACE_VALUE)
    threshold = _integer(fixed, "transaction_minimum")
    if threshold <= amount:
        raise _param("使用门槛必须大于优惠金额")
    merchants = coupon_rule.get("available_merchants")
    if merchants is not None and (
        not isinstance(merchants, list) or not _MERCHANTS[0] <= len(merchants) <= _MERCHANTS[1]
    ):
        raise _param("available_merchants条目个数限制为[1,50]")
    available = _member(coupon_rule, "coupon_available_time", required=False)
    if "available_time_after_receive" in available:
        minutes = available["available_time_after_receive"]
        if isinstance(minutes, int) and minutes > _MOST_MINUTES_AFTER_RECEIVE:
            # The words WeChat Pay answered (developers.weixin.qq.com, 2020).
            raise _param(
                "输入源“/body/coupon_use_rule/coupon_available_time/available_time_after_"
                "receive”映射到数值字段“领取后有效时间”规则校验失败，值高于最大值 1440"  # noqa: RUF001
            )
        _integer(available, "available_time_after_receive", (1, _MOST_MINUTES_AFTER_RECEIVE))
    return amount, threshold


class WechatFace:
    name = "wechat"
    knobs: ClassVar[dict[str, FaceKnob]] = {
        # Which key signs answers and notifications (see the module's docstring).
        "wechat_signer": FaceKnob("public_key", _signer),
        # While switching: the share of notifications signed with the public key (WeChat Pay
        # raises it day by day, 0.1% to 100% in a week).
        "wechat_switch_public_share": FaceKnob(0.5, lambda value: number(value, hi=1.0)),
        # A new stock cannot start for this long (WeChat Pay: about a minute).
        "wechat_start_delay_s": FaceKnob(60.0, number),
        # The merchant's balance, from which starting a 预充值 stock locks its budget.
        "wechat_balance_cents": FaceKnob(10**11, _cents),
    }

    def __init__(self, keys_dir: Path) -> None:
        self._keys = load_platform_keys(keys_dir)
        self._sim: Simulator | None = None
        # Use-flow files by token: (when the URL stops working, monotonic; the bytes).
        self._files: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._wrong_key: rsa.RSAPrivateKey | None = None

    @property
    def callbacks_on(self) -> bool:
        return True  # notifications are signed with the platform key: nothing to configure

    # -- the protocol -----------------------------------------------------------

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        self._sim = sim

        def wechat(
            handler: Handler, limit: EndpointLimit | None
        ) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                body = await request.body()
                self._authenticate(request, body)
                answer = await handler(sim, request, body)
                return answer if isinstance(answer, Response) else self._answer(answer)

            return sim.protocol(self, endpoint, limit)

        def route(
            path: str, handler: Handler, method: str, limit: EndpointLimit | None
        ) -> BaseRoute:
            return Route(path, wechat(handler, limit), methods=[method])

        favor = "/v3/marketing/favor"
        return [
            route(f"{favor}/coupon-stocks", self._create_stock, "POST", _CREATE_LIMIT),
            route(f"{favor}/stocks/{{stock_id}}", self._get_stock, "GET", _STOCK_QUERY_LIMIT),
            route(f"{favor}/stocks/{{stock_id}}/use-flow", self._use_flow, "GET", _USE_FLOW_LIMIT),
            *(
                route(f"{favor}/stocks/{{stock_id}}/{verb}", self._action(verb), "POST", limit)
                for verb, (_, _, limit) in _ACTIONS.items()
            ),
            route(f"{favor}/users/{{openid}}/coupons", self._send, "POST", _SEND_LIMIT),
            route(
                f"{favor}/users/{{openid}}/coupons/{{coupon_id}}",
                self._coupon_detail,
                "GET",
                _COUPON_QUERY_LIMIT,
            ),
            route(f"{favor}/callbacks", self._get_callbacks, "GET", _GET_CALLBACKS_LIMIT),
            route(f"{favor}/callbacks", self._set_callbacks, "POST", _SET_CALLBACKS_LIMIT),
            route("/v3/billdownload/file", self._download, "GET", None),
            route("/v3/certificates", self._certificates, "GET", _CERTIFICATES_LIMIT),
        ]

    def _authenticate(self, request: Request, body: bytes) -> None:
        """Check the request's signature as WeChat Pay does; SIGN_ERROR on any doubt."""
        try:
            auth = Authorization.parse(request.headers.get("authorization"))
        except SignatureError as exc:
            raise SimError("SIGN_ERROR", f"{_AUTH_FORMAT} ({exc.reason})") from None
        if auth.mchid != SIM_MCHID:
            raise SimError("SIGN_ERROR", "Http头Authorization中的mchid不存在或与证书不匹配")
        try:
            serial = int(auth.serial_no, 16)
        except ValueError:
            serial = -1
        if serial != self._keys.merchant_serial:
            raise SimError("SIGN_ERROR", "商户证书序列号有误。请使用签名私钥匹配的证书序列号")
        if abs(time.time() - int(auth.timestamp)) > MAX_CLOCK_OFFSET_S:
            raise SimError("SIGN_ERROR", "Http头Authorization中的timestamp与当前时间相差过大")
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string") or b""
        url = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
        message = request_message(request.method, url, auth.timestamp, auth.nonce_str, body)
        if not rsa_verify(self._keys.merchant_public_key, message, auth.signature):
            raise SimError("SIGN_ERROR", "错误的签名，验签失败")  # noqa: RUF001

    def _knob(self, name: str) -> Any:
        assert self._sim is not None  # routes() ran before any request
        return self._sim.knobs.face[name]

    def _public_key_signs(self, *, notification: bool) -> bool:
        signer = self._knob("wechat_signer")
        if signer != "switching":
            return bool(signer == "public_key")
        if notification:
            assert self._sim is not None
            return self._sim.rng.random() < float(self._knob("wechat_switch_public_share"))
        # An answer is signed with the key its request names (the certificate by default).
        request = CURRENT_REQUEST.get()
        named = request.headers.get(SERIAL_HEADER) if request is not None else None
        return named == self._keys.key_id

    def _signed(self, body: bytes, *, notification: bool = False) -> dict[str, str]:
        keys = self._keys
        if self._public_key_signs(notification=notification):
            signature = signed_headers(keys.private_key, keys.key_id, body)
        else:
            signature = signed_headers(keys.cert_private_key, keys.cert_serial, body)
        return {REQUEST_ID_HEADER: _request_id(), **signature}

    def _answer(self, payload: Payload) -> Response:
        body = json_body(payload)
        return Response(body, 200, headers=self._signed(body), media_type="application/json")

    def error_response(self, error: SimError) -> Response:
        if error.code == "INJECTED":
            status = error.status or 500
            code = _INJECTED.get(status, "SYSTEM_ERROR" if status >= 500 else "INVALID_REQUEST")
            message: str | None = error.message
        else:
            status, code, message = _ANSWERS.get(error.code, (500, "SYSTEM_ERROR", "系统错误"))
        body = json_body({"code": code, "message": message or error.message})
        # A request whose signature failed gets no signed answer: WeChat Pay signs only for a
        # merchant it has authenticated.
        headers = {REQUEST_ID_HEADER: _request_id()} if code == "SIGN_ERROR" else self._signed(body)
        return Response(body, status, headers=headers, media_type="application/json")

    def new_batch_id(self) -> str:
        return str(10**9 + secrets.randbelow(9 * 10**9))

    def new_coupon_id(self) -> str:
        return str(10**11 + secrets.randbelow(9 * 10**11))

    # -- platform certificates ----------------------------------------------------

    async def _certificates(self, sim: Simulator, request: Request, body: bytes) -> Payload:
        return certificates_answer([self._keys.certificate], self._keys.apiv3_key)

    # -- stocks -----------------------------------------------------------------

    @staticmethod
    def _check_creator(value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise _param("stock_creator_mchid必填")
        if value != SIM_MCHID:
            raise SimError("MCH_INVALID", "非法的商户号")

    async def _create_stock(self, sim: Simulator, request: Request, body: bytes) -> Payload:
        data = _object(body)
        _only(data, _CREATE_FIELDS)
        stock_name = _stock_name(data)
        if "comment" in data:
            _text(data, "comment", longest=_MOST_COMMENT)
        if _text(data, "belong_merchant", longest=20) != SIM_MCHID:
            raise SimError("MCH_INVALID", "非法的商户号")
        begins, ends = _moment(data, "available_begin_time"), _moment(data, "available_end_time")
        coupon_rule = _member(data, "coupon_use_rule")
        amount, threshold = _checked_coupon_rule(coupon_rule)
        quantity, per_user = _checked_use_rule(_member(data, "stock_use_rule"), amount)
        _boolean(data, "no_cash")
        if _text(data, "stock_type") != "NORMAL":
            raise _param("stock_type仅支持NORMAL")
        request_no = _request_no(data)
        _checked_window(begins, ends)
        if not _known_request(sim, request_no):
            # A re-entry finds its stock whatever the time; only a new stock is checked.
            now = sim.now()
            if begins < now - _START_GRACE:
                raise _param("开始时间不可早于当前时间")
            if begins > now + _FURTHEST_START:
                raise _param("不能创建365天后开始的批次")
        terms = {
            "name": stock_name,
            "face_value_cents": amount,
            "min_spend_cents": threshold,
            "quantity": quantity,
            # Every coupon is valid until the window ends: the core bounds a coupon by its
            # batch's end, and no coupon is sent before the window begins.
            "valid_days": max(1, math.ceil((ends - begins) / timedelta(days=1))),
            "per_user_limit": per_user,
        }
        # The whole request takes part in re-entry: any other content is another request.
        asked = {name: value for name, value in data.items() if name != "out_request_no"}
        batch, _ = sim.create_batch(request_no, terms, begins, ends, {"request": asked})
        return {
            "stock_id": batch["batch_id"],
            "create_time": rfc3339(datetime.fromisoformat(batch["created_at"])),
        }

    def _stock_view(self, batch: Mapping[str, Any]) -> Payload:
        asked = batch["extra"].get("request", {})
        amount, quantity = batch["face_value_cents"], batch["quantity"]
        use_rule = asked.get("stock_use_rule", {})
        return {
            "stock_id": batch["batch_id"],
            "stock_creator_mchid": SIM_MCHID,
            "stock_name": batch["name"],
            "status": _STOCK_STATUS[batch["status"]],
            "create_time": rfc3339(datetime.fromisoformat(batch["created_at"])),
            "description": str(asked.get("pattern_info", {}).get("description", "")),
            "stock_use_rule": {
                "max_coupons": quantity,
                "max_amount": amount * quantity,
                "max_amount_by_day": use_rule.get("max_amount_by_day", amount * quantity),
                "fixed_normal_coupon": {
                    "coupon_amount": amount,
                    "transaction_minimum": batch["min_spend_cents"],
                },
                "max_coupons_per_user": batch["per_user_limit"],
                "coupon_type": "NORMAL",
                "trade_type": [],
                "combine_use": False,
            },
            "available_begin_time": rfc3339(datetime.fromisoformat(batch["starts_at"])),
            "available_end_time": rfc3339(datetime.fromisoformat(batch["ends_at"])),
            "distributed_coupons": quantity - batch["remaining"],
            "no_cash": bool(asked.get("no_cash", False)),
            "singleitem": False,
            "stock_type": "NORMAL",
        }

    async def _get_stock(self, sim: Simulator, request: Request, body: bytes) -> Payload:
        self._check_creator(request.query_params.get("stock_creator_mchid"))
        return self._stock_view(sim.batch(request.path_params["stock_id"]))

    def _action(self, verb: str) -> Handler:
        action, time_field, _ = _ACTIONS[verb]

        async def change(sim: Simulator, request: Request, body: bytes) -> Payload:
            data = _object(body)
            _only(data, frozenset({"stock_creator_mchid"}))
            self._check_creator(data.get("stock_creator_mchid"))
            stock_id = request.path_params["stock_id"]
            batch = sim.batch(stock_id)
            if action == "start" and batch["status"] == "created":
                self._check_startable(sim, batch)
            if action == "stop" and batch["status"] not in ("created", "stopped"):
                # Only a stock never started can be stopped (终止未激活的代金券批次).
                raise SimError("BATCH_STATE_INVALID", "仅未激活的批次可以终止")
            sim.change_batch(stock_id, action)
            return {time_field: rfc3339(sim.now()), "stock_id": stock_id}

        return change

    def _check_startable(self, sim: Simulator, batch: Mapping[str, Any]) -> None:
        """A new stock starts once WeChat Pay registered it; a 预充值 one locks its budget."""
        created = datetime.fromisoformat(batch["created_at"])
        delay = timedelta(seconds=float(self._knob("wechat_start_delay_s")))
        if sim.now() < created + delay:
            raise SimError("STOCK_REGISTERING", "卡包信息尚未注册完成,请稍后重试")
        if batch["extra"].get("request", {}).get("no_cash") is False:
            budget = batch["face_value_cents"] * batch["quantity"]
            balance = int(self._knob("wechat_balance_cents"))
            if budget > balance:
                raise SimError("BALANCE_NOT_ENOUGH", "账户余额不足,请充值")
            sim.knobs.face["wechat_balance_cents"] = balance - budget

    # -- coupons ----------------------------------------------------------------

    async def _send(self, sim: Simulator, request: Request, body: bytes) -> Payload:
        openid = request.path_params["openid"]
        if len(openid) > 128:
            raise _param("openid长度不能超过128")
        data = _object(body)
        _only(data, _SEND_FIELDS)
        stock_id = _text(data, "stock_id", longest=20)
        request_no = _request_no(data)
        if _text(data, "appid") != SIM_APPID:
            raise SimError("APPID_MCHID_NOT_MATCH", "商户号与appid不匹配")
        self._check_creator(data.get("stock_creator_mchid"))
        for name in ("coupon_value", "coupon_minimum"):
            if name in data:
                _integer(data, name, (1, 2**63))  # documented as not yet open: checked, unused
        coupon, _ = await sim.send(stock_id, openid, request_no)
        return {"coupon_id": coupon["coupon_id"]}

    def _coupon_view(self, coupon: Mapping[str, Any], batch: Mapping[str, Any]) -> Payload:
        """The coupon as the query answers it: the official SDKs' Coupon model, which has no
        consume_information (the notification adds it)."""
        asked = batch["extra"].get("request", {})
        sent_at = datetime.fromisoformat(coupon["sent_at"])
        return {
            "stock_creator_mchid": SIM_MCHID,
            "stock_id": coupon["batch_id"],
            "coupon_id": coupon["coupon_id"],
            "coupon_name": batch["name"],
            "status": _COUPON_STATUS[coupon["status"]],
            "description": str(asked.get("pattern_info", {}).get("description", "")),
            "create_time": rfc3339(sent_at),
            "coupon_type": "NORMAL",
            "no_cash": bool(asked.get("no_cash", False)),
            "available_begin_time": rfc3339(
                max(sent_at, datetime.fromisoformat(batch["starts_at"]))
            ),
            "available_end_time": _end_time(datetime.fromisoformat(coupon["valid_until"])),
            "singleitem": False,
            "normal_coupon_information": {
                "coupon_amount": batch["face_value_cents"],
                "transaction_minimum": batch["min_spend_cents"],
            },
        }

    async def _coupon_detail(self, sim: Simulator, request: Request, body: bytes) -> Payload:
        appid = request.query_params.get("appid")
        if not appid:
            raise _param("appid必填")
        if appid != SIM_APPID:
            raise SimError("APPID_MCHID_NOT_MATCH", "商户号与appid不匹配")
        coupon = sim.lookup(request.path_params["coupon_id"], request.path_params["openid"])
        return self._coupon_view(coupon, sim.batch(coupon["batch_id"]))

    # -- the use flow -----------------------------------------------------------

    async def _use_flow(self, sim: Simulator, request: Request, body: bytes) -> Payload:
        stock_id = request.path_params["stock_id"]
        batch = sim.batch(stock_id)
        flow = sim.flow(stock_id, "used")
        if sim.now() < _flow_published_at(datetime.fromisoformat(batch["ends_at"])) or not (
            flow.records
        ):
            raise SimError("FLOW_NOT_YET", "账单文件不存在")
        content = self._use_flow_file(batch, flow.content)
        token = secrets.token_urlsafe(24)
        self._files[token] = (time.monotonic() + _FLOW_URL_LIFE_S, content)
        while len(self._files) > _FLOW_FILES_KEPT:
            self._files.popitem(last=False)
        base = str(request.base_url).rstrip("/")
        return {
            "url": f"{base}/v3/billdownload/file?token={token}",
            "hash_value": hashlib.sha1(content, usedforsecurity=False).hexdigest(),
            "hash_type": "SHA1",
        }

    @staticmethod
    def _use_flow_file(batch: Mapping[str, Any], neutral: bytes) -> bytes:
        """The core's used flow (coupon_id, batch_id, user_id, idempotency_key, at) in WeChat's
        columns; a "`" before each value, as bills have, except the last three columns."""
        amount, threshold = batch["face_value_cents"], batch["min_spend_cents"]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(_USE_FLOW_COLUMNS)
        for row in csv.DictReader(io.StringIO(neutral.decode(), newline="")):
            used_at = datetime.fromisoformat(row["at"])
            local = rfc3339(used_at)[:19].replace("T", " ")
            writer.writerow(
                [
                    *(
                        f"`{value}"
                        for value in (
                            row["batch_id"],
                            row["coupon_id"],
                            "全场代金券",
                            _yuan(amount),
                            _yuan(threshold),
                            "支付",
                            _transaction_id(row["coupon_id"]),
                            local,
                            SIM_MCHID,
                        )
                    ),
                    "",
                    "",
                    "",
                ]
            )
        return out.getvalue().encode()

    async def _download(self, sim: Simulator, request: Request, body: bytes) -> Response:
        token = request.query_params.get("token", "")
        held = self._files.get(token)
        if held is None or time.monotonic() > held[0]:
            raise SimError("FILE_NOT_FOUND", "no such file, or its URL expired")
        # Documented: this answer carries no signature; the SHA1 given with the URL vouches.
        return Response(held[1], 200, media_type="application/octet-stream")

    # -- where notifications go -------------------------------------------------

    async def _get_callbacks(self, sim: Simulator, request: Request, body: bytes) -> Payload:
        mchid = request.query_params.get("mchid")
        if not mchid:
            raise _param("商户号必填")
        if mchid != SIM_MCHID:
            raise SimError("MCH_INVALID", "非法的商户号")
        return {"mchid": SIM_MCHID, "notify_url": sim.knobs.callback_url}

    async def _set_callbacks(self, sim: Simulator, request: Request, body: bytes) -> Payload:
        data = _object(body)
        _only(data, frozenset({"mchid", "notify_url", "switch"}))
        if _text(data, "mchid", longest=20) != SIM_MCHID:
            raise SimError("MCH_INVALID", "非法的商户号")
        url = _text(data, "notify_url", longest=256)
        if data.get("switch", True) is not True:
            # Documented: "switch … 暂不支持使用" false; notifications are turned off in the
            # merchant platform instead.
            raise _param("switch暂不支持false,如需关闭通知请在商户平台操作")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.query:
            raise _param("回调url须为https地址,且不能携带参数")
        try:
            sim.knobs.update({"callback_url": url})
        except SimError:
            raise _param("回调url不合法") from None
        sim.notifier.wake()
        return {"update_time": rfc3339(sim.now()), "notify_url": url}

    # -- notifications ----------------------------------------------------------

    def notification(self, notification_id: str, coupon: Mapping[str, Any], now: datetime) -> bytes:
        assert self._sim is not None  # routes() ran before any coupon could be used
        resource = self._coupon_view(coupon, self._sim.batch(coupon["batch_id"]))
        resource["consume_information"] = {
            "consume_time": rfc3339(datetime.fromisoformat(coupon["used_at"])),
            "consume_mchid": SIM_MCHID,
            "transaction_id": _transaction_id(coupon["coupon_id"]),
        }
        sealed = aead_encrypt(self._keys.apiv3_key, json_body(resource), _ASSOCIATED_DATA)
        return json_body(
            {
                "id": notification_id,
                "create_time": rfc3339(now),
                "resource_type": "encrypt-resource",
                "event_type": "COUPON.USE",
                "summary": "用券成功",
                "resource": {"original_type": "coupon", **sealed},
            }
        )

    def delivery_body(self, body: bytes) -> bytes:
        return body  # WeChat Pay signs in the headers: every attempt sends the stored bytes

    def delivery_headers(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json", **self._signed(body, notification=True)}

    def forged(self, body: bytes, n: int) -> tuple[bytes, dict[str, str]]:
        """Alternately: the genuine body signed with a key that is not the platform's (the
        public key's id as its serial), or the genuine headers over a tampered body (a new
        notification id, so a receiver cannot hide an acceptance behind its duplicate
        check)."""
        if n % 2 == 0:
            if self._wrong_key is None:
                self._wrong_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            headers = signed_headers(self._wrong_key, self._keys.key_id, body)
            return body, {
                "Content-Type": "application/json",
                REQUEST_ID_HEADER: _request_id(),
                **headers,
            }
        tampered = {**json.loads(body), "id": f"ntf_{secrets.token_hex(16)}"}
        return json_body(tampered), self.delivery_headers(body)

    def acknowledged(self, response: httpx.Response) -> bool:
        # Documented: a receiver takes a notification by answering 200 or 204.
        return response.status_code in (200, 204)


def _known_request(sim: Simulator, request_key: str) -> bool:
    """Whether a stock was created with this out_request_no (only a new stock's window is
    checked)."""
    return sim.batch_by_request_key(request_key) is not None
