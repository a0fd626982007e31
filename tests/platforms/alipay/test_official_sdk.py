"""Alipay's official Python SDK (PyPI `alipay-sdk-python`), unchanged, against the simulator in
alipay mode, configured exactly as a merchant configures it for the real gateway: the app id,
the app private key, Alipay's public key and the gateway URL, nothing else.

Two things a merchant also meets, and does the same way here:
- The SDK signs with a PKCS#1 key only (`util/SignatureUtils.sign_with_rsa2` reads it with
  `rsa.PrivateKey.load_pkcs1`), which is what Alipay's key tool gives non-Java merchants; the
  simulator's test merchant key is PKCS#8, so the test converts it, as such a merchant would.
- The SDK connects to port 80 (http) or 443 (https) whatever the URL says
  (`util/WebUtils.get_http_connection`), so this module's simulator listens on port 80 of a
  loopback address of its own; the gateway URL is the one thing the test changes.
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from alipay.aop.api.AlipayClientConfig import AlipayClientConfig  # type: ignore[import-untyped]
from alipay.aop.api.DefaultAlipayClient import DefaultAlipayClient  # type: ignore[import-untyped]
from alipay.aop.api.domain.AlipayMarketingActivityUserQueryvoucherModel import (  # type: ignore[import-untyped]
    AlipayMarketingActivityUserQueryvoucherModel,
)
from alipay.aop.api.domain.AlipayMarketingActivityVoucherCreateModel import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherCreateModel,
)
from alipay.aop.api.domain.AlipayMarketingActivityVoucherPublishModel import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherPublishModel,
)
from alipay.aop.api.domain.AlipayMarketingActivityVoucherQueryModel import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherQueryModel,
)
from alipay.aop.api.domain.AlipayMarketingActivityVoucherSendModel import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherSendModel,
)
from alipay.aop.api.domain.AlipayMarketingActivityVoucherStopModel import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherStopModel,
)
from alipay.aop.api.domain.PaymentFixVoucher import PaymentFixVoucher  # type: ignore[import-untyped]
from alipay.aop.api.domain.PaymentVoucherAvailableMerchant import (  # type: ignore[import-untyped]
    PaymentVoucherAvailableMerchant,
)
from alipay.aop.api.domain.PaymentVoucherBelongMerchantInfo import (  # type: ignore[import-untyped]
    PaymentVoucherBelongMerchantInfo,
)
from alipay.aop.api.domain.PaymentVoucherBudgetInfo import (  # type: ignore[import-untyped]
    PaymentVoucherBudgetInfo,
)
from alipay.aop.api.domain.PaymentVoucherDisplayInfo import (  # type: ignore[import-untyped]
    PaymentVoucherDisplayInfo,
)
from alipay.aop.api.domain.PaymentVoucherSendRule import (  # type: ignore[import-untyped]
    PaymentVoucherSendRule,
)
from alipay.aop.api.domain.PaymentVoucherUseRule import (  # type: ignore[import-untyped]
    PaymentVoucherUseRule,
)
from alipay.aop.api.domain.PaymentVoucherValidPeriod import (  # type: ignore[import-untyped]
    PaymentVoucherValidPeriod,
)
from alipay.aop.api.exception.Exception import (  # type: ignore[import-untyped]
    RequestException,
    ResponseException,
)
from alipay.aop.api.request.AlipayMarketingActivityUserQueryvoucherRequest import (  # type: ignore[import-untyped]
    AlipayMarketingActivityUserQueryvoucherRequest,
)
from alipay.aop.api.request.AlipayMarketingActivityVoucherCreateRequest import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherCreateRequest,
)
from alipay.aop.api.request.AlipayMarketingActivityVoucherPublishRequest import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherPublishRequest,
)
from alipay.aop.api.request.AlipayMarketingActivityVoucherQueryRequest import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherQueryRequest,
)
from alipay.aop.api.request.AlipayMarketingActivityVoucherSendRequest import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherSendRequest,
)
from alipay.aop.api.request.AlipayMarketingActivityVoucherStopRequest import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherStopRequest,
)
from alipay.aop.api.response.AlipayMarketingActivityUserQueryvoucherResponse import (  # type: ignore[import-untyped]
    AlipayMarketingActivityUserQueryvoucherResponse,
)
from alipay.aop.api.response.AlipayMarketingActivityVoucherCreateResponse import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherCreateResponse,
)
from alipay.aop.api.response.AlipayMarketingActivityVoucherPublishResponse import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherPublishResponse,
)
from alipay.aop.api.response.AlipayMarketingActivityVoucherQueryResponse import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherQueryResponse,
)
from alipay.aop.api.response.AlipayMarketingActivityVoucherSendResponse import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherSendResponse,
)
from alipay.aop.api.response.AlipayMarketingActivityVoucherStopResponse import (  # type: ignore[import-untyped]
    AlipayMarketingActivityVoucherStopResponse,
)
from alipay.aop.api.util.SignatureUtils import (  # type: ignore[import-untyped]
    get_sign_content,
    verify_with_rsa,
)
from cryptography.hazmat.primitives import serialization

from app.embedded import SimulatorProcess
from coupons.platforms.alipay.protocol import (
    ALIPAY_PUBLIC_KEY,
    APP_PRIVATE_KEY,
    GATEWAY_PATH,
    MESSAGE_USED,
    SIM_APP_ID,
    SIM_PID,
    format_time,
    key_file,
    load_private_key,
)
from coupons.platforms.rsa_keys import new_rsa_key, private_pem

from ..conftest import new_key, started_simulator
from .support import Receiver, alipay_user

HTTP_PORT = 80  # the only port the SDK speaks http to


def _free_loopback() -> str:
    """A loopback address 127.x.y.z whose port 80 nothing holds (binding it needs root, as
    `make test` runs here and in CI)."""
    for _ in range(50):
        second, third, fourth = (secrets.randbelow(254) + 1 for _ in range(3))
        host = f"127.{second}.{third}.{fourth}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, HTTP_PORT))
            except PermissionError:
                pytest.fail("the official SDK's test binds port 80: run the tests as root")
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
        return host
    pytest.fail("no loopback address with port 80 free")


@pytest.fixture(scope="module")
def gateway_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """The simulator in alipay mode on port 80 of a loopback address of its own."""
    yield from started_simulator(tmp_path_factory, "alipay", port=HTTP_PORT, host=_free_loopback())


@pytest.fixture
def control(gateway_host: SimulatorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_host.url, timeout=5) as client:
        client.delete("/sim/knobs").raise_for_status()
        yield client
        client.delete("/sim/knobs").raise_for_status()


def pkcs1_body(pem: bytes) -> str:
    """A private key as Alipay's key tool gives it to non-Java merchants: PKCS#1, bare base64."""
    key = load_private_key(pem)
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    return "".join(line for line in pkcs1.splitlines() if not line.startswith("-----"))


def sdk(
    process: SimulatorProcess,
    app_private_key: str | None = None,
    alipay_public_key: str | None = None,
) -> Any:
    """The SDK's client as a merchant sets it up: only the gateway URL points elsewhere."""
    config = AlipayClientConfig()
    config.server_url = f"http://{process.host}{GATEWAY_PATH}"
    config.app_id = SIM_APP_ID
    config.app_private_key = app_private_key or pkcs1_body(
        key_file(process.keys_dir, APP_PRIVATE_KEY).read_bytes()
    )
    config.alipay_public_key = (
        alipay_public_key or key_file(process.keys_dir, ALIPAY_PUBLIC_KEY).read_text()
    )
    return DefaultAlipayClient(config)


def execute(client: Any, request: Any, response: Any) -> Any:
    """`client.execute(request)` (which returns only an answer whose signature verified with
    Alipay's public key), parsed into the SDK's `response` object."""
    response.parse_response_content(client.execute(request))
    return response


def create_request() -> Any:
    now = datetime.now(UTC).replace(microsecond=0)
    owner = PaymentVoucherBelongMerchantInfo()
    owner.merchant_id, owner.merchant_id_type = SIM_PID, "PID"
    send_rule = PaymentVoucherSendRule()
    send_rule.voucher_quantity = 10
    send_rule.voucher_quantity_limit_per_user = 1
    fix = PaymentFixVoucher()
    fix.amount, fix.floor_amount = "10.00", "50.00"
    period = PaymentVoucherValidPeriod()
    period.type, period.valid_days_after_receive = "RELATIVE", 7
    merchants = PaymentVoucherAvailableMerchant()
    merchants.available_pids = [SIM_PID]
    use_rule = PaymentVoucherUseRule()
    use_rule.fix_voucher, use_rule.voucher_valid_period = fix, period
    use_rule.available_merchant = merchants
    budget = PaymentVoucherBudgetInfo()
    budget.budget_type, budget.amount = "NO_CASH", "100.00"
    display = PaymentVoucherDisplayInfo()
    display.brand_name, display.voucher_description = "Shop", "10 off 50"
    model = AlipayMarketingActivityVoucherCreateModel()
    model.activity_name = "10 off 50"
    model.out_biz_no = new_key("sdk")
    model.belong_merchant_info = owner
    model.publish_start_time = format_time(now)
    model.publish_end_time = format_time(now + timedelta(days=7))
    model.voucher_type = "FIX_VOUCHER"
    model.voucher_send_rule = send_rule
    model.voucher_use_rule = use_rule
    model.voucher_budget_info = budget
    model.voucher_display_info = display
    return AlipayMarketingActivityVoucherCreateRequest(biz_model=model)


def created_and_published(client: Any) -> str:
    created = execute(client, create_request(), AlipayMarketingActivityVoucherCreateResponse())
    assert created.is_success(), created.body
    publish = AlipayMarketingActivityVoucherPublishModel()
    publish.activity_id, publish.out_biz_no = created.activity_id, new_key("pub")
    published = execute(
        client,
        AlipayMarketingActivityVoucherPublishRequest(biz_model=publish),
        AlipayMarketingActivityVoucherPublishResponse(),
    )
    assert published.is_success(), published.body
    activity_id: str = created.activity_id
    return activity_id


def send_request(activity_id: str, user: str, out_biz_no: str) -> Any:
    model = AlipayMarketingActivityVoucherSendModel()
    model.activity_id, model.out_biz_no, model.user_id = activity_id, out_biz_no, user
    return AlipayMarketingActivityVoucherSendRequest(biz_model=model)


def query_request(activity_id: str) -> Any:
    model = AlipayMarketingActivityVoucherQueryModel()
    model.activity_id = activity_id
    return AlipayMarketingActivityVoucherQueryRequest(biz_model=model)


def test_the_sdk_creates_publishes_queries_sends_once_and_reads_the_voucher(
    gateway_host: SimulatorProcess, control: httpx.Client
) -> None:
    client = sdk(gateway_host)
    user, out_biz_no = alipay_user(), uuid.uuid4().hex

    activity_id = created_and_published(client)
    activity = execute(
        client, query_request(activity_id), AlipayMarketingActivityVoucherQueryResponse()
    )
    sent = execute(
        client,
        send_request(activity_id, user, out_biz_no),
        AlipayMarketingActivityVoucherSendResponse(),
    )
    again = execute(
        client,
        send_request(activity_id, user, out_biz_no),
        AlipayMarketingActivityVoucherSendResponse(),
    )
    asked = AlipayMarketingActivityUserQueryvoucherModel()
    asked.voucher_id, asked.user_id = sent.voucher_id, user
    voucher = execute(
        client,
        AlipayMarketingActivityUserQueryvoucherRequest(biz_model=asked),
        AlipayMarketingActivityUserQueryvoucherResponse(),
    )
    held = control.get(f"/sim/batches/{activity_id}/coupons").json()["coupons"]

    assert activity.is_success() and activity.activity_status == "ACTIVE"
    assert activity.voucher_send_rule.voucher_quantity == 10
    assert activity.voucher_use_rule.voucher_valid_period.valid_days_after_receive == 7
    assert sent.is_success() and again.is_success()
    assert again.voucher_id == sent.voucher_id  # one out_biz_no, one voucher
    assert [coupon["coupon_id"] for coupon in held] == [sent.voucher_id]
    assert voucher.is_success() and voucher.voucher_status == "SENDED"
    assert voucher.activity_id == activity_id
    assert voucher.user_voucher_base_info.voucher_id == sent.voucher_id


def test_a_refusal_comes_signed_and_the_sdk_returns_it_verified(
    gateway_host: SimulatorProcess, control: httpx.Client
) -> None:
    client = sdk(gateway_host)
    activity_id = created_and_published(client)
    stop = AlipayMarketingActivityVoucherStopModel()
    stop.activity_id, stop.out_biz_no = activity_id, new_key("stop")
    stopped = execute(
        client,
        AlipayMarketingActivityVoucherStopRequest(biz_model=stop),
        AlipayMarketingActivityVoucherStopResponse(),
    )

    refused = execute(
        client,
        send_request(activity_id, alipay_user(), uuid.uuid4().hex),
        AlipayMarketingActivityVoucherSendResponse(),
    )
    finished = execute(
        client, query_request(activity_id), AlipayMarketingActivityVoucherQueryResponse()
    )

    assert stopped.is_success()
    assert not refused.is_success()
    assert (refused.code, refused.sub_code) == ("40004", "ACTIVITY_IS_STOPED")
    assert finished.activity_status == "FINISHED"


def test_a_request_signed_with_the_wrong_key_is_refused_and_nothing_is_created(
    gateway_host: SimulatorProcess, control: httpx.Client
) -> None:
    wrong = sdk(gateway_host, app_private_key=pkcs1_body(private_pem(new_rsa_key())))
    before = control.get("/sim/stats").json()["batches"]

    # The gateway's refusal comes unsigned, which the SDK will not take as an answer: it
    # raises, quoting what the gateway said.
    with pytest.raises(ResponseException) as refused:
        wrong.execute(create_request())

    assert "isv.invalid-signature" in str(refused.value)
    assert control.get("/sim/stats").json()["batches"] == before


def test_an_answer_that_fails_alipays_public_key_is_rejected_by_the_sdk(
    gateway_host: SimulatorProcess, control: httpx.Client
) -> None:
    activity_id = created_and_published(sdk(gateway_host))
    other_public = (
        new_rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    misconfigured = sdk(gateway_host, alipay_public_key=other_public)

    with pytest.raises(ResponseException, match="sign verify failed"):
        misconfigured.execute(query_request(activity_id))


def test_the_sdk_cannot_sign_with_a_pkcs8_key(
    gateway_host: SimulatorProcess, control: httpx.Client, tmp_path: Path
) -> None:
    """Why the tests convert the key: the SDK reads PKCS#1 only (a Java merchant's PKCS#8 key
    fails inside signing, before anything is sent)."""
    pkcs8 = key_file(gateway_host.keys_dir, APP_PRIVATE_KEY).read_text()
    body = "".join(line for line in pkcs8.splitlines() if not line.startswith("-----"))
    before = control.get("/sim/stats").json()["batches"]

    with pytest.raises(RequestException, match="request sign failed"):
        sdk(gateway_host, app_private_key=body).execute(create_request())

    assert control.get("/sim/stats").json()["batches"] == before


async def test_the_used_message_verifies_with_the_sdks_own_signature_check(
    gateway_host: SimulatorProcess, receiver: Receiver
) -> None:
    """The SDK has no message helper; its own sign content (`SignatureUtils.get_sign_content`:
    every field, sorted, `k=v` joined by `&`) over the fields but sign and sign_type, and its
    RSA2 check (`verify_with_rsa`), take the simulator's message and refuse a tampered one."""
    client = sdk(gateway_host)
    async with httpx.AsyncClient(base_url=gateway_host.url, timeout=5) as control:
        await control.put("/sim/knobs", json={"callback_url": await receiver.start()})
        try:
            activity_id = await asyncio.to_thread(created_and_published, client)
            sent = await asyncio.to_thread(
                execute,
                client,
                send_request(activity_id, alipay_user(), uuid.uuid4().hex),
                AlipayMarketingActivityVoucherSendResponse(),
            )
            (await control.post(f"/sim/coupons/{sent.voucher_id}/use")).raise_for_status()
            body = await receiver.next()
        finally:
            (await control.delete("/sim/knobs")).raise_for_status()

    fields = dict(parse_qsl(body.decode(), keep_blank_values=True))
    public_key = key_file(gateway_host.keys_dir, ALIPAY_PUBLIC_KEY).read_text()
    signed = {name: value for name, value in fields.items() if name not in ("sign", "sign_type")}
    content = get_sign_content(signed).encode()
    tampered = get_sign_content({**signed, "biz_content": "{}"}).encode()

    assert fields["msg_method"] == MESSAGE_USED
    assert json.loads(fields["biz_content"])["voucher_id"] == sent.voucher_id
    assert verify_with_rsa(public_key, content, fields["sign"])
    with pytest.raises(Exception, match="Verification failed"):
        verify_with_rsa(public_key, tampered, fields["sign"])
