"""The simulator's wechat face over real HTTP: request signatures checked as WeChat Pay checks
them, signed answers, the documented fields, statuses and errors, the use flow, COUPON.USE
notifications, and the independent `wechatpayv3` SDK as a client that is not ours."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from wechatpayv3 import WeChatPay, WeChatPayType  # type: ignore[import-untyped]
from wechatpayv3 import utils as sdk_utils

from app.embedded import SimulatorProcess
from coupons.platforms.rsa_keys import new_rsa_key, private_pem, public_pem, rsa_sign
from coupons.platforms.wechat.adapter import WechatPayPlatform
from coupons.platforms.wechat.protocol import (
    APIV3_KEY_FILE,
    BEIJING,
    KEY_FOLDER,
    MERCHANT_KEY_FILE,
    PLATFORM_PUBLIC_KEY_FILE,
    SIM_APPID,
    SIM_MCHID,
    Authorization,
    WechatMerchant,
    json_body,
    load_platform_keys,
    new_nonce,
    request_message,
    rfc3339,
    verify_signed,
)

from ..conftest import SimControl, coupon_use
from .conftest import Receiver, at_least, eventually, verifying

FAVOR = "/v3/marketing/favor"


# ---------------------------------------------------------------- raw requests


@dataclass
class Wire:
    """Signed requests built by hand, so each part of the signature can be got wrong."""

    url: str
    merchant: WechatMerchant

    async def call(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        signed_body: bytes | None = None,
        signed_path: str | None = None,
        timestamp: str | None = None,
        serial: str | None = None,
        mchid: str | None = None,
        signature: str | None = None,
        authorization: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        body = json_body(payload) if payload is not None else b""
        stamp = timestamp or str(int(time.time()))
        nonce = new_nonce()
        message = request_message(
            method, signed_path or path, stamp, nonce, body if signed_body is None else signed_body
        )
        header = (
            authorization
            or Authorization(
                mchid=mchid or self.merchant.mchid,
                nonce_str=nonce,
                timestamp=stamp,
                serial_no=serial or self.merchant.serial,
                signature=signature or rsa_sign(self.merchant.private_key, message),
            ).header()
        )
        sent = {"Authorization": header, "Accept": "application/json", **(headers or {})}
        if payload is not None:
            sent["Content-Type"] = "application/json"
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as http:
            return await http.request(method, path, content=body, headers=sent)


@pytest.fixture
def wire(wechat_simulator: SimulatorProcess, merchant: WechatMerchant) -> Wire:
    return Wire(wechat_simulator.url, merchant)


def stock_request(**changes: Any) -> dict[str, Any]:
    begins = datetime.now(UTC).replace(microsecond=0)
    request: dict[str, Any] = {
        "stock_name": "满50减10",
        "belong_merchant": SIM_MCHID,
        "available_begin_time": rfc3339(begins),
        "available_end_time": rfc3339(begins + timedelta(days=7)),
        "stock_use_rule": {
            "max_coupons": 10,
            "max_amount": 10_000,
            "max_coupons_per_user": 1,
            "natural_person_limit": False,
            "prevent_api_abuse": False,
        },
        "coupon_use_rule": {
            "fixed_normal_coupon": {"coupon_amount": 1000, "transaction_minimum": 5000},
            "available_merchants": [SIM_MCHID],
        },
        "no_cash": False,
        "stock_type": "NORMAL",
        "out_request_no": uuid.uuid4().hex,
    }
    request.update(changes)
    return request


async def running_stock(wire: Wire) -> str:
    created = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request())
    assert created.status_code == 200, created.text
    stock_id: str = created.json()["stock_id"]
    started = await wire.call(
        "POST", f"{FAVOR}/stocks/{stock_id}/start", {"stock_creator_mchid": SIM_MCHID}
    )
    assert started.status_code == 200, started.text
    return stock_id


def assert_signed_by_platform(response: httpx.Response, merchant: WechatMerchant) -> None:
    assert merchant.platform_public_key is not None and merchant.platform_public_key_id
    verify_signed(
        response.headers,
        response.content,
        keys={merchant.platform_public_key_id: merchant.platform_public_key},
    )
    assert response.headers["Wechatpay-Signature-Type"] == "WECHATPAY2-SHA256-RSA2048"
    assert response.headers["Request-ID"]


# ---------------------------------------------------------------- signatures


async def test_a_signed_request_gets_a_signed_answer(wire: Wire, merchant: WechatMerchant) -> None:
    created = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request())
    assert created.status_code == 200, created.text
    answer = created.json()
    assert answer["stock_id"].isdigit() and answer["create_time"].endswith("+08:00")
    assert_signed_by_platform(created, merchant)

    path = f"{FAVOR}/stocks/{answer['stock_id']}?stock_creator_mchid={SIM_MCHID}"
    stock = await wire.call("GET", path)
    assert stock.status_code == 200, stock.text
    assert_signed_by_platform(stock, merchant)
    assert stock.json()["status"] == "unactivated"


async def test_requests_that_do_not_verify_are_refused_401_sign_error(
    wire: Wire, control: SimControl
) -> None:
    before = (await control.stats())["batches"]
    body = stock_request()
    create = f"{FAVOR}/coupon-stocks"
    get = f"{FAVOR}/stocks/1234567890?stock_creator_mchid={SIM_MCHID}"
    tampered = json_body({**body, "stock_name": "满50减40"})
    attempts = {
        "tampered body": wire.call("POST", create, body, signed_body=tampered),
        "tampered signature": wire.call(
            "POST", create, body, signature=rsa_sign(wire.merchant.private_key, b"other")
        ),
        "wrong serial": wire.call("GET", get, serial="0" * 39 + "1"),
        "garbled serial": wire.call("GET", get, serial="not-hex"),
        "stale timestamp": wire.call("GET", get, timestamp=str(int(time.time()) - 400)),
        "future timestamp": wire.call("GET", get, timestamp=str(int(time.time()) + 400)),
        "another merchant": wire.call("GET", get, mchid="1900000002"),
        "query not signed": wire.call("GET", get, signed_path=get.partition("?")[0]),
        "no scheme": wire.call("GET", get, authorization='mchid="1900000001"'),
    }
    for kind, attempt in attempts.items():
        response = await attempt
        assert response.status_code == 401, (kind, response.text)
        assert response.json()["code"] == "SIGN_ERROR", kind
        # WeChat Pay signs only for a merchant it authenticated.
        assert "Wechatpay-Signature" not in response.headers, kind
    assert (await control.stats())["batches"] == before


def official_sdk(
    url: str,
    folder: Path,
    merchant: WechatMerchant,
    *,
    public_key: bool,
    cert_dir: Path | None = None,
    private_key: str | None = None,
    platform_public_key: str | None = None,
) -> WeChatPay:
    """wechatpayv3 configured as a merchant configures it, from the files the README names,
    pointed at `url`. `public_key` False: a merchant on platform certificates, whose
    `cert_dir` holds the certificates it downloaded (as the SDK itself writes them)."""
    wxpay = WeChatPay(
        wechatpay_type=WeChatPayType.MINIPROG,
        mchid=SIM_MCHID,
        private_key=private_key or (folder / MERCHANT_KEY_FILE).read_text(),
        cert_serial_no=merchant.serial,
        appid=SIM_APPID,
        apiv3_key=(folder / APIV3_KEY_FILE).read_text(),
        cert_dir=str(cert_dir) if cert_dir else None,
        public_key=(platform_public_key or (folder / PLATFORM_PUBLIC_KEY_FILE).read_text())
        if public_key
        else None,
        public_key_id=merchant.platform_public_key_id if public_key else None,
        timeout=(5, 5),
    )
    # The SDK takes no base URL: its one seam for another host is the gateway every request
    # is built on, Core._gate_way (what a merchant pointing it at a test host would set).
    wxpay._core._gate_way = url
    return wxpay


async def sdk_call(call: Callable[..., tuple[int, Any]], *args: Any, **kwargs: Any) -> Any:
    code, answer = await asyncio.to_thread(call, *args, **kwargs)
    assert code == 200, (call.__name__, answer)
    return json.loads(answer) if isinstance(answer, str) else answer


async def downloaded_certificates(wire: Wire, apiv3_key: str, into: Path) -> list[str]:
    """What a merchant on platform certificates holds before the SDK starts: the certificates
    of `GET /v3/certificates`, opened with the APIv3 key by the SDK's own code and written as
    `<serial>.pem` (as the SDK's download does)."""
    answer = await wire.call("GET", "/v3/certificates")
    assert answer.status_code == 200, answer.text
    opened = {
        entry["serial_no"]: sdk_utils.aes_decrypt(
            entry["encrypt_certificate"]["nonce"],
            entry["encrypt_certificate"]["ciphertext"],
            entry["encrypt_certificate"]["associated_data"],
            apiv3_key,
        )
        for entry in answer.json()["data"]
    }

    def write() -> None:
        into.mkdir(parents=True, exist_ok=True)
        for serial, pem in opened.items():
            (into / f"{serial}.pem").write_text(pem)

    await asyncio.to_thread(write)
    return list(opened)


@pytest.mark.parametrize("signer", ["public_key", "certificates", "switching"])
async def test_the_official_sdk_is_served_unchanged(
    wechat_simulator: SimulatorProcess,
    merchant: WechatMerchant,
    control: SimControl,
    wire: Wire,
    tmp_path: Path,
    signer: str,
) -> None:
    """wechatpayv3, pointed at the simulator as a merchant points it at WeChat Pay, with a
    merchant on the public key, on platform certificates, and in the middle of the switch:
    it creates and starts a stock, sends twice with one out_request_no (one coupon), queries
    the coupon and the stock, verifies and decrypts a COUPON.USE, downloads the use flow, and
    verifies every answer's signature itself; a request signed with another key is refused."""
    folder = wechat_simulator.keys_dir / KEY_FOLDER
    # Switching: notifications signed with the certificate, which the SDK then fetches itself.
    await control.knobs(wechat_signer=signer, wechat_switch_public_share=0)
    cert_dir = tmp_path / "certs"
    if signer == "certificates":
        assert await downloaded_certificates(wire, (folder / APIV3_KEY_FILE).read_text(), cert_dir)
    wxpay = official_sdk(
        wechat_simulator.url, folder, merchant, public_key=signer != "certificates",
        cert_dir=cert_dir,
    )  # fmt: skip
    receiver = Receiver()
    await receiver.start()
    try:
        begins = datetime.now(UTC).replace(microsecond=0)
        created = await sdk_call(
            wxpay.marketing_favor_stock_create,
            stock_name="SDK满20减10",
            belong_merchant=SIM_MCHID,
            available_begin_time=rfc3339(begins),
            available_end_time=rfc3339(begins + timedelta(days=3)),
            stock_use_rule={
                "max_coupons": 5,
                "max_amount": 5000,
                "max_coupons_per_user": 1,
                "natural_person_limit": False,
                "prevent_api_abuse": True,
            },
            coupon_use_rule={
                "fixed_normal_coupon": {"coupon_amount": 1000, "transaction_minimum": 2000},
                "available_merchants": [SIM_MCHID],
            },
            out_request_no=uuid.uuid4().hex,
            no_cash=True,
        )
        stock_id = created["stock_id"]
        started = await sdk_call(wxpay.marketing_favor_stock_start, SIM_MCHID, stock_id)
        assert started["stock_id"] == stock_id and started["start_time"]
        # Documented: the notify URL must be https; the simulator's receiver is set behind it.
        code, refused = await asyncio.to_thread(
            wxpay.marketing_favor_callback_update, notify_url=receiver.url
        )
        assert (code, json.loads(refused)["code"]) == (400, "PARAM_ERROR")
        await control.knobs(callback_url=receiver.url)

        openid, request_no = f"o{uuid.uuid4().hex[:27]}", uuid.uuid4().hex
        send = partial(wxpay.marketing_favor_stock_send, stock_id, openid, request_no, SIM_MCHID)
        sent, again = await sdk_call(send), await sdk_call(send)
        coupon_id = sent["coupon_id"]
        assert again == {"coupon_id": coupon_id}
        held = (await control.http.get(f"/sim/batches/{stock_id}/coupons")).json()["coupons"]
        assert [c["coupon_id"] for c in held] == [coupon_id]
        detail = await sdk_call(wxpay.marketing_favor_coupon_detail, coupon_id, openid)
        assert (detail["status"], detail["stock_id"]) == ("SENDED", stock_id)
        assert detail["normal_coupon_information"] == {
            "coupon_amount": 1000,
            "transaction_minimum": 2000,
        }
        assert detail["available_end_time"] == rfc3339(begins + timedelta(days=3))
        stock = await sdk_call(wxpay.marketing_favor_stock_detail, SIM_MCHID, stock_id)
        assert (stock["status"], stock["distributed_coupons"]) == ("running", 1)

        assert (await control.use(coupon_id)).status_code == 200
        await eventually(lambda: len(receiver.received) >= 1)
        delivered = receiver.received[0]
        serial = delivered.headers["wechatpay-serial"]
        assert serial.startswith("PUB_KEY_ID_") == (signer == "public_key"), serial
        opened = await asyncio.to_thread(wxpay.callback, delivered.headers, delivered.body)
        assert opened is not None, "the SDK did not verify or decrypt our notification"
        assert opened["event_type"] == "COUPON.USE"
        assert opened["resource"]["coupon_id"] == coupon_id
        assert opened["resource"]["status"] == "USED"
        assert opened["resource"]["consume_information"]["consume_time"]

        # The use flow is published from 10:00 the day after the stock ends.
        code, not_yet = await asyncio.to_thread(wxpay.marketing_favor_use_flow, stock_id)
        assert (code, json.loads(not_yet)["code"]) == (404, "RESOURCE_NOT_EXISTS")
        await control.knobs(clock_offset_s=timedelta(days=4, hours=10).total_seconds())
        flow = await sdk_call(wxpay.marketing_favor_use_flow, stock_id)
        assert flow["hash_type"] == "SHA1"
        content = await sdk_call(wxpay.download_bill, flow["url"])
        assert hashlib.sha1(content, usedforsecurity=False).hexdigest() == flow["hash_value"]
        assert coupon_id in content.decode()

        stranger = official_sdk(
            wechat_simulator.url, folder, merchant, public_key=signer != "certificates",
            cert_dir=cert_dir, private_key=private_pem(new_rsa_key()).decode(),
        )  # fmt: skip
        code, answer = await asyncio.to_thread(
            stranger.marketing_favor_stock_detail, SIM_MCHID, stock_id
        )
        assert (code, json.loads(answer)["code"]) == (401, "SIGN_ERROR")
    finally:
        await receiver.stop()


async def test_the_official_sdk_refuses_an_answer_another_key_signed(
    wechat_simulator: SimulatorProcess, merchant: WechatMerchant, wire: Wire
) -> None:
    """The SDK verifies answers itself: configured with a public key that is not WeChat Pay's,
    it refuses the simulator's (correctly signed) answer."""
    stock_id = await running_stock(wire)
    folder = wechat_simulator.keys_dir / KEY_FOLDER
    wrong = public_pem(new_rsa_key().public_key()).decode()
    wxpay = official_sdk(
        wechat_simulator.url, folder, merchant, public_key=True, platform_public_key=wrong
    )
    with pytest.raises(Exception, match="failed to verify the signature"):
        await asyncio.to_thread(wxpay.marketing_favor_stock_detail, SIM_MCHID, stock_id)


# ---------------------------------------------------------------- stocks


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stock_name": "batch_1"}, "特殊字符"),
        ({"stock_name": "一二三四五六七八九十"}, "9个中文汉字"),
        ({"stock_name": "x" * 21}, "长度"),
        ({"out_request_no": "batch.1@x"}, "out_request_no"),
        ({"stock_type": "DISCOUNT"}, "NORMAL"),
        ({"no_cash": None}, "no_cash"),
        ({"extra_field": 1}, "未在API文档中定义"),
        ({"available_begin_time": "2030-01-01 00:00:00"}, "时间格式"),
    ],
)
async def test_creation_rules_are_checked(
    wire: Wire, changes: dict[str, Any], message: str
) -> None:
    response = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request(**changes))
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "PARAM_ERROR"
    assert message in response.json()["message"]


async def test_budget_threshold_and_window_rules_are_checked(wire: Wire) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    use_rule = stock_request()["stock_use_rule"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"stock_use_rule": {**use_rule, "max_amount": 9_999}}, "批次预算"),
        (
            {
                "coupon_use_rule": {
                    "fixed_normal_coupon": {"coupon_amount": 1000, "transaction_minimum": 1000}
                }
            },
            "门槛",
        ),
        ({"available_begin_time": rfc3339(now - timedelta(minutes=5))}, "不可早于"),
        ({"available_end_time": rfc3339(now + timedelta(days=91))}, "90天"),
    ]
    for changes, message in cases:
        response = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request(**changes))
        assert response.status_code == 400, (changes, response.text)
        assert message in response.json()["message"], changes
    other = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request(belong_merchant="123"))
    assert (other.status_code, other.json()["code"]) == (400, "INVALID_REQUEST")


def with_rule(rule: str, **changes: Any) -> dict[str, Any]:
    """stock_request() with fields of its `stock_use_rule` or `coupon_use_rule` changed."""
    request = stock_request()
    request[rule] = {**request[rule], **changes}
    return request


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (with_rule("stock_use_rule", max_coupons=4, max_amount=4000), "max_coupons不能小于5"),
        (
            with_rule("stock_use_rule", max_coupons=10_000_001, max_amount=10_000_001_000),
            "max_coupons不能大于10000000",
        ),
        (with_rule("stock_use_rule", max_coupons_per_user=61), "max_coupons_per_user不能大于60"),
        (with_rule("stock_use_rule", max_coupons_per_user=0), "max_coupons_per_user不能小于1"),
        (with_rule("stock_use_rule", max_amount_by_day=10_001), "单天预算不能大于总预算"),
        (with_rule("stock_use_rule", max_amount_by_day=0), "max_amount_by_day不能小于1"),
        (
            with_rule(
                "coupon_use_rule",
                fixed_normal_coupon={"coupon_amount": 1, "transaction_minimum": 100},
            ),
            "coupon_amount不能小于2",
        ),
        (
            with_rule(
                "coupon_use_rule",
                fixed_normal_coupon={"coupon_amount": 100_001, "transaction_minimum": 200_000},
            ),
            "coupon_amount不能大于100000",
        ),
        (with_rule("coupon_use_rule", available_merchants=[]), "条目个数"),
        (with_rule("coupon_use_rule", available_merchants=["1"] * 51), "条目个数"),
        (
            with_rule(
                "coupon_use_rule", coupon_available_time={"available_time_after_receive": 1441}
            ),
            "值高于最大值 1440",
        ),
        (stock_request(comment="x" * 61), "comment长度不能超过60"),
        (
            stock_request(
                available_end_time=stock_request()["available_begin_time"],
            ),
            "结束时间必须晚于开始时间",
        ),
    ],
)
async def test_the_published_ranges_of_a_stock_are_enforced(
    wire: Wire, control: SimControl, request_body: dict[str, Any], message: str
) -> None:
    before = (await control.stats())["batches"]
    response = await wire.call("POST", f"{FAVOR}/coupon-stocks", request_body)
    assert (response.status_code, response.json()["code"]) == (400, "PARAM_ERROR"), response.text
    assert message in response.json()["message"]
    assert (await control.stats())["batches"] == before


async def test_validity_after_receipt_is_not_open_coupons_last_as_the_window(
    wire: Wire, merchant: WechatMerchant
) -> None:
    """1440 minutes or less is taken (the field is "暂未开放") and changes nothing: the coupon is
    valid until the stock's window ends, as the coupon query shows."""
    request = with_rule(
        "coupon_use_rule", coupon_available_time={"available_time_after_receive": 60}
    )
    created = await wire.call("POST", f"{FAVOR}/coupon-stocks", request)
    assert created.status_code == 200, created.text
    stock_id = created.json()["stock_id"]
    body = {"stock_creator_mchid": SIM_MCHID}
    assert (await wire.call("POST", f"{FAVOR}/stocks/{stock_id}/start", body)).status_code == 200
    path = f"{FAVOR}/users/o-window/coupons"
    sent = await wire.call(
        "POST",
        path,
        {
            "stock_id": stock_id,
            "out_request_no": uuid.uuid4().hex,
            "appid": SIM_APPID,
            "stock_creator_mchid": SIM_MCHID,
        },
    )
    detail = await wire.call("GET", f"{path}/{sent.json()['coupon_id']}?appid={SIM_APPID}")
    assert detail.json()["available_end_time"] == request["available_end_time"]


async def test_a_new_stock_starts_once_registered_and_a_prepaid_one_locks_its_budget(
    wire: Wire, control: SimControl
) -> None:
    body = {"stock_creator_mchid": SIM_MCHID}
    await control.knobs(wechat_start_delay_s=1.5)
    created = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request())
    stock_id = created.json()["stock_id"]
    early = await wire.call("POST", f"{FAVOR}/stocks/{stock_id}/start", body)
    assert (early.status_code, early.json()) == (
        400,
        {"code": "INVALID_REQUEST", "message": "卡包信息尚未注册完成,请稍后重试"},
    )
    await asyncio.sleep(1.6)
    # 预充值 (no_cash false): starting locks the budget (10 x 10.00 yuan) from the balance.
    await control.knobs(wechat_start_delay_s=0, wechat_balance_cents=9_999)
    short = await wire.call("POST", f"{FAVOR}/stocks/{stock_id}/start", body)
    assert (short.status_code, short.json()["code"]) == (403, "NOT_ENOUGH"), short.text
    await control.knobs(wechat_balance_cents=10_000)
    assert (await wire.call("POST", f"{FAVOR}/stocks/{stock_id}/start", body)).status_code == 200
    # Re-entrant: a second start is no second debit.
    assert (await wire.call("POST", f"{FAVOR}/stocks/{stock_id}/start", body)).status_code == 200
    assert (await control.knobs())["wechat_balance_cents"] == 0
    # 免充值 (no_cash true) locks nothing.
    free = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request(no_cash=True))
    started = await wire.call("POST", f"{FAVOR}/stocks/{free.json()['stock_id']}/start", body)
    assert started.status_code == 200, started.text


async def test_only_a_stock_never_started_is_stopped(wire: Wire) -> None:
    body = {"stock_creator_mchid": SIM_MCHID}
    created = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request())
    unstarted = created.json()["stock_id"]
    stopped = await wire.call("POST", f"{FAVOR}/stocks/{unstarted}/stop", body)
    assert stopped.status_code == 200 and stopped.json()["stop_time"], stopped.text
    running = await running_stock(wire)
    refused = await wire.call("POST", f"{FAVOR}/stocks/{running}/stop", body)
    assert (refused.status_code, refused.json()["code"]) == (400, "INVALID_REQUEST")


@pytest.mark.parametrize(
    ("path", "method", "limit"),
    [
        ("/v3/marketing/favor/coupon-stocks", "POST", 60),  # 单个商户号调用频率60/min
        ("/v3/marketing/favor/stocks/{stock}/use-flow", "GET", 5),  # 单ip 5/min
        ("/v3/marketing/favor/callbacks", "POST", 5),  # 单ip 5/min
    ],
)
async def test_each_endpoint_has_its_own_published_limit(
    wire: Wire, control: SimControl, path: str, method: str, limit: int
) -> None:
    stock_id = await running_stock(wire)
    await control.knobs(endpoint_limits=True)
    callbacks = {"mchid": SIM_MCHID, "notify_url": "https://x.example"}

    def body() -> dict[str, Any] | None:
        if path.endswith("coupon-stocks"):
            return stock_request()  # a new stock each time
        return callbacks if path.endswith("callbacks") else None

    answers = [
        await wire.call(method, path.format(stock=stock_id), body()) for _ in range(limit + 1)
    ]
    assert all(answer.status_code != 429 for answer in answers[:limit])
    assert answers[-1].status_code == 429
    assert answers[-1].json() == {"code": "FREQUENCY_LIMIT_EXCEED", "message": "接口限频"}
    # Another endpoint's limit is its own: querying the stock still answers.
    stock = await wire.call("GET", f"{FAVOR}/stocks/{stock_id}?stock_creator_mchid={SIM_MCHID}")
    assert stock.status_code == 200


async def test_the_callback_address_is_https_and_cannot_be_switched_off(wire: Wire) -> None:
    path = f"{FAVOR}/callbacks"
    for body, message in (
        ({"mchid": SIM_MCHID, "notify_url": "http://example.com/cb"}, "https"),
        ({"mchid": SIM_MCHID, "notify_url": "https://example.com/cb?x=1"}, "参数"),
        ({"mchid": SIM_MCHID, "notify_url": "https://example.com/cb", "switch": False}, "switch"),
    ):
        refused = await wire.call("POST", path, body)
        assert (refused.status_code, refused.json()["code"]) == (400, "PARAM_ERROR"), body
        assert message in refused.json()["message"]
    taken = await wire.call("POST", path, {"mchid": SIM_MCHID, "notify_url": "https://e.x/cb"})
    assert taken.status_code == 200 and taken.json()["notify_url"] == "https://e.x/cb"


@pytest.mark.parametrize(
    ("signer", "named", "signed_by_public_key"),
    [
        ("public_key", None, True),
        ("certificates", "public key", False),  # a merchant whose switch is not turned on
        ("switching", None, False),
        ("switching", "public key", True),
        ("switching", "certificate", False),
    ],
)
async def test_answers_are_signed_with_the_key_the_mode_and_the_request_name(
    wire: Wire,
    control: SimControl,
    wechat_simulator: SimulatorProcess,
    signer: str,
    named: str | None,
    signed_by_public_key: bool,
) -> None:
    keys = load_platform_keys(wechat_simulator.keys_dir)
    await control.knobs(wechat_signer=signer)
    serial = {"public key": keys.key_id, "certificate": keys.cert_serial}.get(named or "")
    headers = {"Wechatpay-Serial": serial} if serial else {}
    answer = await wire.call("GET", "/v3/certificates", headers=headers)
    assert answer.status_code == 200, answer.text
    expected = keys.key_id if signed_by_public_key else keys.cert_serial
    assert answer.headers["Wechatpay-Serial"] == expected
    verify_signed(
        answer.headers,
        answer.content,
        keys={
            keys.key_id: keys.private_key.public_key(),
            keys.cert_serial: keys.cert_private_key.public_key(),
        },
    )


async def test_reentry_finds_the_same_stock_and_other_content_is_refused(wire: Wire) -> None:
    request = stock_request()
    first = await wire.call("POST", f"{FAVOR}/coupon-stocks", request)
    again = await wire.call("POST", f"{FAVOR}/coupon-stocks", request)
    assert first.status_code == again.status_code == 200
    assert first.json()["stock_id"] == again.json()["stock_id"]
    other = await wire.call("POST", f"{FAVOR}/coupon-stocks", {**request, "stock_name": "满50减11"})
    assert other.status_code == 400
    assert other.json()["code"] == "RESOURCE_ALREADY_EXISTS"


async def test_stock_statuses_speak_wechat(wire: Wire, control: SimControl) -> None:
    created = await wire.call("POST", f"{FAVOR}/coupon-stocks", stock_request())
    stock_id = created.json()["stock_id"]
    body = {"stock_creator_mchid": SIM_MCHID}

    async def status() -> str:
        stock = await wire.call("GET", f"{FAVOR}/stocks/{stock_id}?stock_creator_mchid={SIM_MCHID}")
        found: str = stock.json()["status"]
        return found

    assert await status() == "unactivated"
    for verb, field_name, expected in (
        ("start", "start_time", "running"),
        ("pause", "pause_time", "paused"),
        ("restart", "restart_time", "running"),
        ("restart", "restart_time", "running"),  # documented as re-entrant
    ):
        answer = await wire.call("POST", f"{FAVOR}/stocks/{stock_id}/{verb}", body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["stock_id"] == stock_id and answer.json()[field_name]
        assert await status() == expected
    assert (await control.change_batch(stock_id, status="stopped")).status_code == 200
    assert await status() == "stoped"
    refused = await wire.call("POST", f"{FAVOR}/stocks/{stock_id}/restart", body)
    assert (refused.status_code, refused.json()["code"]) == (400, "INVALID_REQUEST")
    wrong = await wire.call(
        "POST", f"{FAVOR}/stocks/{stock_id}/start", {"stock_creator_mchid": "1"}
    )
    assert (wrong.status_code, wrong.json()["message"]) == (400, "非法的商户号")


# ---------------------------------------------------------------- coupons


async def test_send_query_and_their_refusals(wire: Wire, merchant: WechatMerchant) -> None:
    stock_id = await running_stock(wire)
    openid, request_no = f"o{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    send: dict[str, Any] = {
        "stock_id": stock_id,
        "out_request_no": request_no,
        "appid": SIM_APPID,
        "stock_creator_mchid": SIM_MCHID,
    }
    path = f"{FAVOR}/users/{openid}/coupons"
    first, again = await wire.call("POST", path, send), await wire.call("POST", path, send)
    assert first.status_code == again.status_code == 200, first.text
    coupon_id = first.json()["coupon_id"]
    assert coupon_id.isdigit() and again.json() == {"coupon_id": coupon_id}
    assert_signed_by_platform(first, merchant)

    detail = await wire.call("GET", f"{path}/{coupon_id}?appid={SIM_APPID}")
    assert detail.status_code == 200, detail.text
    shown = detail.json()
    assert (shown["status"], shown["stock_id"], shown["coupon_id"]) == (
        "SENDED",
        stock_id,
        coupon_id,
    )
    assert "consume_information" not in shown

    fresh = {**send, "out_request_no": uuid.uuid4().hex}
    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({**fresh, "appid": "wx0000000000000000"}, 400, "APPID_MCHID_NOT_MATCH"),
        ({**fresh, "stock_creator_mchid": "1900000002"}, 400, "INVALID_REQUEST"),
        ({**fresh, "stock_id": "1"}, 404, "RESOURCE_NOT_EXISTS"),
        ({**fresh, "x": 1}, 400, "PARAM_ERROR"),
        (fresh, 403, "REQUEST_BLOCKED"),  # the user holds the stock's limit already
    ]
    for body, status, code in refusals:
        response = await wire.call("POST", path, body)
        assert (response.status_code, response.json()["code"]) == (status, code), body
        assert_signed_by_platform(response, merchant)
    reused = await wire.call("POST", f"{FAVOR}/users/other-user/coupons", send)
    assert (reused.status_code, reused.json()["code"]) == (400, "RESOURCE_ALREADY_EXISTS")
    missing = await wire.call("GET", f"{path}/{coupon_id}")
    assert (missing.status_code, missing.json()["code"]) == (400, "PARAM_ERROR")
    stranger = await wire.call(
        "GET", f"{FAVOR}/users/someone/coupons/{coupon_id}?appid={SIM_APPID}"
    )
    assert (stranger.status_code, stranger.json()["code"]) == (404, "RESOURCE_NOT_EXISTS")


async def test_the_use_flow_is_wechats_file_downloaded_signed_and_answered_unsigned(
    wire: Wire, control: SimControl
) -> None:
    stock_id = await running_stock(wire)
    send: dict[str, Any] = {
        "stock_id": stock_id,
        "appid": SIM_APPID,
        "stock_creator_mchid": SIM_MCHID,
    }
    used = []
    for user in ("u-flow-1", "u-flow-2"):
        sent = await wire.call(
            "POST", f"{FAVOR}/users/{user}/coupons", {**send, "out_request_no": uuid.uuid4().hex}
        )
        used.append(sent.json()["coupon_id"])
    # Published from 10:00 the day after the stock ends, and only once a coupon was used.
    flow_path = f"{FAVOR}/stocks/{stock_id}/use-flow"
    ended = await wire.call("GET", f"{FAVOR}/stocks/{stock_id}?stock_creator_mchid={SIM_MCHID}")
    ends_at = datetime.fromisoformat(ended.json()["available_end_time"])
    published_at = ends_at.astimezone(BEIJING).replace(hour=10, minute=0, second=0) + timedelta(
        days=1
    )
    for offset in (0.0, (published_at - datetime.now(UTC)).total_seconds() + 5):
        await control.knobs(clock_offset_s=offset)
        early = await wire.call("GET", flow_path)
        assert (early.status_code, early.json()) == (
            404,
            {"code": "RESOURCE_NOT_EXISTS", "message": "账单文件不存在"},
        )
    await control.knobs(clock_offset_s=0)
    for coupon_id in used[:1]:
        assert (await control.use(coupon_id)).status_code == 200
    before = (published_at - datetime.now(UTC)).total_seconds() - 5
    await control.knobs(clock_offset_s=before)
    assert (await wire.call("GET", flow_path)).status_code == 404
    await control.knobs(clock_offset_s=before + 10)

    described = await wire.call("GET", flow_path)
    assert described.status_code == 200, described.text
    flow = described.json()
    assert set(flow) == {"url", "hash_value", "hash_type"} and flow["hash_type"] == "SHA1"
    path = flow["url"].removeprefix(wire.url)
    assert path.startswith("/v3/billdownload/file?token=")
    downloaded = await wire.call("GET", path)
    assert downloaded.status_code == 200
    assert "Wechatpay-Signature" not in downloaded.headers  # documented: not signed
    assert hashlib.sha1(downloaded.content, usedforsecurity=False).hexdigest() == flow["hash_value"]
    rows = list(csv.reader(io.StringIO(downloaded.content.decode())))
    assert rows[0][:3] == ["批次id", "优惠id", "优惠类型"] and len(rows[0]) == 12
    assert len(rows) == 2  # only the used coupon
    assert rows[1][0] == f"`{stock_id}" and rows[1][1] == f"`{used[0]}"
    datetime.strptime(rows[1][7].lstrip("`"), "%Y-%m-%d %H:%M:%S")

    unsigned = await httpx.AsyncClient().get(flow["url"])
    assert unsigned.status_code == 401
    unknown = await wire.call("GET", "/v3/billdownload/file?token=nope")
    assert (unknown.status_code, unknown.json()["code"]) == (400, "INVALID_REQUEST")


# ---------------------------------------------------------------- notifications


async def test_notifications_and_forged_probes(
    wire: Wire, merchant: WechatMerchant, control: SimControl
) -> None:
    """Every forged probe (alternately a wrong key, a tampered body) fails a correct receiver;
    every genuine notification passes it and decrypts to the coupon that was used."""
    adapter = WechatPayPlatform(wire.url, merchant)
    receiver = Receiver(answer=verifying(adapter))
    await receiver.start()
    try:
        await control.knobs(callback_url=receiver.url, callback_forged_rate=1)
        before = await control.stats()
        stock_id = await running_stock(wire)
        coupons = []
        for expected, user in ((2, "u-probe-1"), (4, "u-probe-2")):
            sent = await wire.call(
                "POST",
                f"{FAVOR}/users/{user}/coupons",
                {
                    "stock_id": stock_id,
                    "out_request_no": uuid.uuid4().hex,
                    "appid": SIM_APPID,
                    "stock_creator_mchid": SIM_MCHID,
                },
            )
            coupons.append(sent.json()["coupon_id"])
            assert (await control.use(coupons[-1])).status_code == 200
            # The probe, then the genuine notification.
            await eventually(partial(at_least, receiver.received, expected))

        async def both_delivered() -> bool:
            # Counted once the receiver's answer is back: a moment after it has the request.
            delivered = (await control.stats())["callbacks_delivered"]
            return delivered - before["callbacks_delivered"] >= 2

        await eventually(both_delivered)
        stats = await control.stats()
        for counter, grew in (
            ("callbacks_forged_sent", 2),
            ("callbacks_forged_accepted", 0),
            ("callbacks_delivered", 2),
        ):
            assert stats[counter] - before[counter] == grew, counter
        statuses = [request.status for request in receiver.received]
        assert statuses.count(401) == 2 and statuses.count(200) == 2
        genuine = [json.loads(r.body) for r in receiver.received if r.status == 200]
        assert all(body["event_type"] == "COUPON.USE" for body in genuine)
        seen = [
            coupon_use(adapter, r.headers, r.body) for r in receiver.received if r.status == 200
        ]
        assert sorted(notice.platform_coupon_id for notice in seen) == sorted(coupons)
    finally:
        await receiver.stop()
        await adapter.aclose()
