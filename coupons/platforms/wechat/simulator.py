"""The simulator's wechat face: WeChat Pay API v3 vouchers (代金券) over the neutral core.

It speaks the documented paths, field names, statuses, error codes and HTTP statuses of
/v3/marketing/favor (see adapter.py's docstring for the list and sources), verifies every
request's `Authorization` the way WeChat Pay does (401 SIGN_ERROR for a bad format, another
merchant, another certificate serial, a timestamp more than 5 minutes off, or a signature
that does not verify; such answers are not signed) and signs every other answer with the
platform key (Wechatpay-Timestamp/-Nonce/-Signature/-Serial/-Signature-Type, Request-ID).
The test merchant is SIM_MCHID with SIM_APPID; every openid belongs to that appid.

How the core's words become WeChat's:

- Batch status: created → unactivated, running → running, paused → paused, stopped and
  expired → stoped [sic] (WeChat has no "expired": a client reads the window's end).
- Refusals of a send: no budget → 403 NOT_ENOUGH 批次预算不足; restricted user → 403
  USER_ACCOUNT_ABNORMAL 用户非法; per-user limit → 403 REQUEST_BLOCKED 用户被限领拦截; window
  not open yet → 403 REQUEST_BLOCKED 活动未开始或已结束; paused → 400 PARAM_ERROR 非法的批次状态;
  unactivated, stopped or expired → 400 INVALID_REQUEST 活动已结束或未激活; unknown stock →
  404 RESOURCE_NOT_EXISTS; an out_request_no reused with other content → 400
  RESOURCE_ALREADY_EXISTS; rate limit → 429 FREQUENCY_LIMIT_EXCEED (the code the favor API
  tables list); injected errors → 500 SYSTEM_ERROR.
- Creation checks what WeChat documents: stock_name (≤ 20 characters, ≤ 9 Chinese, none of
  `_ , ; |`), belong_merchant = the caller, max_amount = coupon_amount * max_coupons, a
  threshold above the face value, stock_type NORMAL, no_cash given, a window that starts no
  earlier than now (a minute of grace for clocks) and lasts at most 90 days, an
  out_request_no of letters, digits and `| _ * -`, and no field the API does not define.
  `coupon_available_time.available_time_after_receive` (minutes) becomes the core's
  valid_days (rounded up to whole days); without it coupons last until the window ends.
- The use flow is a CSV with WeChat's twelve columns (批次id, 优惠id, 优惠类型, the amounts in
  yuan, 交易类型, 支付单号, 消耗时间, 消耗商户号, 设备号, 银行流水号, 单品信息), values after a "`"
  except the last three, times in Beijing time; its URL lives 30 s and the download, a
  signed GET of /v3/billdownload/file, is answered unsigned, as documented.
- COUPON.USE notifications: the documented envelope (id, create_time, event_type,
  resource_type encrypt-resource, summary, resource) with the coupon's detail (no openid:
  the documented resource has none) sealed with AEAD_AES_256_GCM under the APIv3 key, signed
  with the platform key. They go wherever the `callback_url` knob points; POST
  /v3/marketing/favor/callbacks (设置消息通知地址) sets that knob too. A receiver takes one by
  answering 200 or 204.

What is not faithful: the use flow is published at once (WeChat Pay publishes it the day
after the stock ends); a stock is never `audit`; notify URLs may be http; transaction ids,
order amounts and consume merchants in notifications and flows are made up; times are
truncated to whole seconds (window and validity ends rounded up).
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
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from coupons.platforms.rsa_keys import rsa_verify
from coupons.platforms.simcore.core import Simulator
from coupons.platforms.simcore.errors import SimError
from coupons.platforms.wechat.protocol import (
    MAX_CLOCK_OFFSET_S,
    REQUEST_ID_HEADER,
    SIM_APPID,
    SIM_MCHID,
    Authorization,
    SignatureError,
    aead_encrypt,
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
# The documented actions and the field their answer times them with.
_ACTIONS = {"start": ("start", "start_time"), "pause": ("pause", "pause_time"),
            "restart": ("resume", "restart_time")}  # fmt: skip
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
_START_GRACE = timedelta(minutes=1)
_LONGEST_WINDOW = timedelta(days=90)
_FURTHEST_START = timedelta(days=365)
_ASSOCIATED_DATA = "coupon"
_MINUTES_PER_DAY = 24 * 60


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


def _integer(data: Mapping[str, Any], name: str, minimum: int = 0) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _param(f"{name}必填,且必须是整数")
    if value < minimum:
        raise _param(f"{name}不能小于{minimum}")
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


class WechatFace:
    name = "wechat"

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

        def wechat(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                body = await request.body()
                self._authenticate(request, body)
                answer = await handler(sim, request, body)
                return answer if isinstance(answer, Response) else self._answer(answer)

            return sim.protocol(self, endpoint)

        favor = "/v3/marketing/favor"
        return [
            Route(f"{favor}/coupon-stocks", wechat(self._create_stock), methods=["POST"]),
            Route(f"{favor}/stocks/{{stock_id}}", wechat(self._get_stock), methods=["GET"]),
            Route(f"{favor}/stocks/{{stock_id}}/use-flow", wechat(self._use_flow), methods=["GET"]),
            *(
                Route(
                    f"{favor}/stocks/{{stock_id}}/{verb}",
                    wechat(self._action(verb)),
                    methods=["POST"],
                )
                for verb in _ACTIONS
            ),
            Route(f"{favor}/users/{{openid}}/coupons", wechat(self._send), methods=["POST"]),
            Route(
                f"{favor}/users/{{openid}}/coupons/{{coupon_id}}",
                wechat(self._coupon_detail),
                methods=["GET"],
            ),
            Route(f"{favor}/callbacks", wechat(self._get_callbacks), methods=["GET"]),
            Route(f"{favor}/callbacks", wechat(self._set_callbacks), methods=["POST"]),
            Route("/v3/billdownload/file", wechat(self._download), methods=["GET"]),
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

    def _signed(self, body: bytes) -> dict[str, str]:
        return {
            REQUEST_ID_HEADER: _request_id(),
            **signed_headers(self._keys.private_key, self._keys.key_id, body),
        }

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
        if _text(data, "belong_merchant", longest=20) != SIM_MCHID:
            raise SimError("MCH_INVALID", "非法的商户号")
        begins, ends = _moment(data, "available_begin_time"), _moment(data, "available_end_time")
        use_rule = _member(data, "stock_use_rule")
        _only(use_rule, _STOCK_USE_FIELDS)
        quantity = _integer(use_rule, "max_coupons", minimum=1)
        budget = _integer(use_rule, "max_amount", minimum=1)
        per_user = _integer(use_rule, "max_coupons_per_user", minimum=1)
        _boolean(use_rule, "natural_person_limit")
        _boolean(use_rule, "prevent_api_abuse")
        coupon_rule = _member(data, "coupon_use_rule")
        _only(coupon_rule, _COUPON_USE_FIELDS)
        fixed = _member(coupon_rule, "fixed_normal_coupon")
        amount = _integer(fixed, "coupon_amount", minimum=1)
        threshold = _integer(fixed, "transaction_minimum")
        if threshold <= amount:
            raise _param("使用门槛必须大于优惠金额")
        if budget != amount * quantity:
            raise _param("批次预算等于批次面额乘以发券数")
        if per_user > quantity:
            raise _param("单个用户可领个数不能大于发放总上限")
        _boolean(data, "no_cash")
        if _text(data, "stock_type") != "NORMAL":
            raise _param("stock_type仅支持NORMAL")
        request_no = _request_no(data)
        available = _member(coupon_rule, "coupon_available_time", required=False)
        after = available.get("available_time_after_receive")
        if after is not None:
            minutes = _integer(available, "available_time_after_receive", minimum=1)
            valid_days = math.ceil(minutes / _MINUTES_PER_DAY)
        else:
            valid_days = max(1, math.ceil((ends - begins) / timedelta(days=1)))
        if ends <= begins:
            raise _param("可用结束时间必须晚于开始时间")
        if not _known_request(sim, request_no):
            # A re-entry finds its stock whatever the time; only a new stock is checked.
            now = sim.now()
            if begins < now - _START_GRACE:
                raise _param("开始时间不可早于当前时间")
            if begins > now + _FURTHEST_START:
                raise _param("不能创建365天后开始的批次")
            if ends - begins > _LONGEST_WINDOW:
                raise _param("批次可用时间范围最长为90天")
        terms = {
            "name": stock_name,
            "face_value_cents": amount,
            "min_spend_cents": threshold,
            "quantity": quantity,
            "valid_days": valid_days,
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
                "max_amount_by_day": amount * quantity,
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
        action, time_field = _ACTIONS[verb]

        async def change(sim: Simulator, request: Request, body: bytes) -> Payload:
            data = _object(body)
            _only(data, frozenset({"stock_creator_mchid"}))
            self._check_creator(data.get("stock_creator_mchid"))
            stock_id = request.path_params["stock_id"]
            sim.change_batch(stock_id, action)
            return {time_field: rfc3339(sim.now()), "stock_id": stock_id}

        return change

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
                _integer(data, name, minimum=1)  # documented as not yet open: checked, unused
        coupon, _ = await sim.send(stock_id, openid, request_no)
        return {"coupon_id": coupon["coupon_id"]}

    def _coupon_view(self, coupon: Mapping[str, Any], batch: Mapping[str, Any]) -> Payload:
        asked = batch["extra"].get("request", {})
        sent_at = datetime.fromisoformat(coupon["sent_at"])
        view: Payload = {
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
        if coupon["used_at"] is not None:
            view["consume_information"] = {
                "consume_time": rfc3339(datetime.fromisoformat(coupon["used_at"])),
                "consume_mchid": SIM_MCHID,
                "transaction_id": _transaction_id(coupon["coupon_id"]),
            }
        return view

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
        switch = data.get("switch", True)
        if not isinstance(switch, bool):
            raise _param("switch必须是布尔值")
        try:
            sim.knobs.update({"callback_url": url if switch else ""})
        except SimError:
            raise _param("回调url不合法") from None
        sim.notifier.wake()
        return {"update_time": rfc3339(sim.now()), "notify_url": url}

    # -- notifications ----------------------------------------------------------

    def notification(self, notification_id: str, coupon: Mapping[str, Any], now: datetime) -> bytes:
        assert self._sim is not None  # routes() ran before any coupon could be used
        resource = self._coupon_view(coupon, self._sim.batch(coupon["batch_id"]))
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
        return {"Content-Type": "application/json", **self._signed(body)}

    def forged(self, body: bytes, n: int) -> tuple[bytes, dict[str, str]]:
        """Alternately: the genuine body signed with a key that is not the platform's (same
        serial), or the genuine headers over a tampered body (a new notification id, so a
        receiver cannot hide an acceptance behind its duplicate check)."""
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
