"""The simulator's Alipay face, spoken to over real HTTP: by hand, with our protocol functions,
and by python-alipay-sdk, a client that is not ours."""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from alipay import AliPay  # type: ignore[import-untyped]
from alipay.exceptions import AliPayException  # type: ignore[import-untyped]

from coupons.embedded import LOCALHOST, SimulatorProcess
from coupons.platforms.alipay.protocol import (
    ALIPAY_PRIVATE_KEY,
    ALIPAY_PUBLIC_KEY,
    APP_PRIVATE_KEY,
    CASH_TEMPLATE_CREATE,
    CASHLESS_TEMPLATE_CREATE,
    GATEWAY_PATH,
    SIM_APP_ID,
    TEMPLATE_DETAIL_QUERY,
    VOUCHER_QUERY,
    VOUCHER_SEND,
    AlipayApp,
    key_file,
    request_sign_content,
    response_key,
    rsa2_sign,
    rsa2_verify,
    signed_request,
    sim_app,
    top_level_members,
)
from coupons.platforms.rsa_keys import new_rsa_key, private_pem

from ..conftest import SimControl, controlling, new_key


class Receiver:
    """A merchant's notification URL: records each POST's body and answers what `answer`
    says of it (Alipay's `success` by default)."""

    def __init__(self, answer: Callable[[bytes], bytes] = lambda body: b"success") -> None:
        self.bodies: asyncio.Queue[bytes] = asyncio.Queue()
        self._answer = answer
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://{LOCALHOST}:{port}/alipay/notify"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            self.bodies.put_nowait(body)
            answer = self._answer(body)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )
            await writer.drain()
        finally:
            writer.close()

    async def next(self, timeout_s: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.bodies.get(), timeout_s)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def control(alipay_simulator: SimulatorProcess) -> AsyncIterator[SimControl]:
    async with controlling(alipay_simulator) as control:
        yield control


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    try:
        yield receiver
    finally:
        await receiver.close()


def alipay_user() -> str:
    return f"2088{secrets.randbelow(10**12):012d}"


def template_biz(**changes: Any) -> dict[str, Any]:
    return {
        "voucher_type": "CASHLESS_FIX_VOUCHER",
        "brand_name": "10 off 50",
        "amount": "10.00",
        "floor_amount": "50.00",
        "voucher_quantity": 10,
        "voucher_valid_period": json.dumps({"type": "RELATIVE", "duration": 7, "unit": "DAY"}),
        "voucher_description": "[]",
        "out_biz_no": new_key("tpl"),
        **changes,
    }


async def call(
    control: SimControl, params: dict[str, str]
) -> tuple[httpx.Response, dict[str, tuple[str, Any]]]:
    response = await control.http.post(GATEWAY_PATH, data=params)
    return response, top_level_members(response.text)


def verified(app: AlipayApp, members: dict[str, tuple[str, Any]], method: str) -> dict[str, Any]:
    text, answer = members[response_key(method)]
    assert rsa2_verify(app.alipay_public_key, text, members["sign"][1])
    assert isinstance(answer, dict)
    return answer


def sdk_client(keys_dir: Path, url: str, private_key_file: Path | None = None) -> Any:
    client = AliPay(
        appid=SIM_APP_ID,
        app_private_key_string=(
            private_key_file or key_file(keys_dir, APP_PRIVATE_KEY)
        ).read_text(),
        alipay_public_key_string=key_file(keys_dir, ALIPAY_PUBLIC_KEY).read_text(),
        sign_type="RSA2",
    )
    # The SDK takes no gateway URL (`debug` only picks Alipay's sandbox); every request goes
    # to its `_gateway` attribute, the one seam it offers, pointed here at the simulator.
    client._gateway = url + GATEWAY_PATH
    return client


def test_keys_are_made_on_first_start_private_ones_owner_only(
    alipay_simulator: SimulatorProcess,
) -> None:
    for name in (APP_PRIVATE_KEY, ALIPAY_PRIVATE_KEY):
        mode = key_file(alipay_simulator.keys_dir, name).stat().st_mode
        assert stat.S_IMODE(mode) & 0o077 == 0, name
    assert sim_app(alipay_simulator.keys_dir).app_id == SIM_APP_ID


async def test_a_signed_request_is_served_and_the_answer_verifies(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    biz = template_biz()

    response, members = await call(
        control, signed_request(app, CASHLESS_TEMPLATE_CREATE, biz, datetime.now(UTC))
    )
    created = verified(app, members, CASHLESS_TEMPLATE_CREATE)
    _, members = await call(
        control,
        signed_request(
            app, TEMPLATE_DETAIL_QUERY, {"template_id": created["template_id"]}, datetime.now(UTC)
        ),
    )
    detail = verified(app, members, TEMPLATE_DETAIL_QUERY)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html;charset=utf-8"
    assert created["code"] == "10000" and created["msg"] == "Success"
    assert len(created["template_id"]) == 28
    assert detail["status"] == "S"  # a cashless template publishes at once
    assert (detail["amount"], detail["floor_amount"]) == ("10.00", "50.00")
    assert (detail["voucher_quantity"], detail["publish_count"]) == (10, 0)
    assert json.loads(detail["voucher_valid_period"]) == {
        "type": "RELATIVE",
        "duration": 7,
        "unit": "DAY",
    }


async def test_common_params_in_the_query_and_biz_content_in_the_body_are_one_request(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    """Alipay's Java SDK sends the common parameters in the URL and biz_content as the form."""
    app = sim_app(alipay_simulator.keys_dir)
    params = signed_request(app, CASHLESS_TEMPLATE_CREATE, template_biz(), datetime.now(UTC))
    biz_content = params.pop("biz_content")

    response = await control.http.post(
        GATEWAY_PATH, params=params, data={"biz_content": biz_content}
    )

    assert verified(app, top_level_members(response.text), CASHLESS_TEMPLATE_CREATE)["code"] == (
        "10000"
    )


def _tampered_biz(app: AlipayApp, params: dict[str, str]) -> dict[str, str]:
    tampered = params["biz_content"].replace('"voucher_quantity":10', '"voucher_quantity":99')
    assert tampered != params["biz_content"]
    return {**params, "biz_content": tampered}


def _flipped_sign(app: AlipayApp, params: dict[str, str]) -> dict[str, str]:
    sign = params["sign"]
    return {**params, "sign": sign[:20] + ("A" if sign[20] != "A" else "B") + sign[21:]}


def _other_key(app: AlipayApp, params: dict[str, str]) -> dict[str, str]:
    return {**params, "sign": rsa2_sign(new_rsa_key(), request_sign_content(params))}


def _resigned(app: AlipayApp, params: dict[str, str], **changes: str) -> dict[str, str]:
    changed = {name: value for name, value in {**params, **changes}.items() if name != "sign"}
    return {**changed, "sign": rsa2_sign(app.private_key, request_sign_content(changed))}


def _without_sign(app: AlipayApp, params: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in params.items() if name != "sign"}


@pytest.mark.parametrize(
    ("change", "code", "sub_code"),
    [
        (_tampered_biz, "40002", "isv.invalid-signature"),
        (_flipped_sign, "40002", "isv.invalid-signature"),
        (_other_key, "40002", "isv.invalid-signature"),
        (_without_sign, "40001", "isv.missing-signature"),
        (
            lambda app, p: _resigned(app, p, app_id="2021000000009999"),
            "40002",
            "isv.invalid-app-id",
        ),
        (lambda app, p: _resigned(app, p, sign_type="RSA"), "40002", "isv.invalid-signature-type"),
        (
            lambda app, p: _resigned(app, p, timestamp="2024/01/01"),
            "40002",
            "isv.invalid-timestamp",
        ),
        (lambda app, p: _resigned(app, p, charset="gbk"), "40002", "isv.invalid-charset"),
    ],
    ids=[
        "tampered-param",
        "tampered-signature",
        "wrong-key",
        "no-signature",
        "unknown-app",
        "rsa1",
        "timestamp",
        "charset",
    ],
)
async def test_a_request_that_fails_the_gateways_checks_is_refused_unsigned_and_not_applied(
    control: SimControl,
    alipay_simulator: SimulatorProcess,
    change: Callable[[AlipayApp, dict[str, str]], dict[str, str]],
    code: str,
    sub_code: str,
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    params = signed_request(
        app, CASHLESS_TEMPLATE_CREATE, template_biz(voucher_quantity=10), datetime.now(UTC)
    )
    before = await control.stats()

    response, members = await call(control, change(app, params))

    _, answer = members[response_key(CASHLESS_TEMPLATE_CREATE)]
    assert response.status_code == 200
    assert (answer["code"], answer["sub_code"]) == (code, sub_code)
    assert "sign" not in members  # the gateway's own refusals are not signed
    assert (await control.stats())["batches"] == before["batches"]


@pytest.mark.parametrize(
    ("method", "code", "sub_code"),
    [("", "40001", "isv.missing-method"), ("alipay.no.such", "40002", "isv.invalid-method")],
)
async def test_an_unknown_method_is_refused_as_error_response(
    control: SimControl, alipay_simulator: SimulatorProcess, method: str, code: str, sub_code: str
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    params = {**signed_request(app, VOUCHER_QUERY, {}, datetime.now(UTC)), "method": method}

    _, members = await call(control, params)

    _, answer = members["error_response"]
    assert (answer["code"], answer["sub_code"]) == (code, sub_code)


async def test_the_frequency_limit_answers_40005(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    await control.knobs(rate_limit_per_s=1)
    answers = []
    for _ in range(3):
        params = signed_request(app, VOUCHER_QUERY, {"voucher_id": "x"}, datetime.now(UTC))
        _, members = await call(control, params)
        answers.append(members)

    limited = [members["error_response"][1] for members in answers if "error_response" in members]
    assert limited and all(
        (answer["code"], answer["sub_code"]) == ("40005", "isv.app-call-limited")
        for answer in limited
    )


async def test_a_resent_out_biz_no_answers_the_same_voucher(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    _, members = await call(
        control, signed_request(app, CASHLESS_TEMPLATE_CREATE, template_biz(), datetime.now(UTC))
    )
    template_id = verified(app, members, CASHLESS_TEMPLATE_CREATE)["template_id"]
    send = {"template_id": template_id, "out_biz_no": uuid.uuid4().hex, "user_id": alipay_user()}

    answers = []
    for _ in range(2):
        _, members = await call(control, signed_request(app, VOUCHER_SEND, send, datetime.now(UTC)))
        answers.append(verified(app, members, VOUCHER_SEND))
    _, members = await call(
        control,
        signed_request(app, TEMPLATE_DETAIL_QUERY, {"template_id": template_id}, datetime.now(UTC)),
    )

    assert answers[0]["voucher_id"] == answers[1]["voucher_id"]
    assert answers[0]["user_id"] == send["user_id"]
    assert verified(app, members, TEMPLATE_DETAIL_QUERY)["publish_count"] == 1


async def test_a_cash_template_is_a_draft_until_its_fund_order_is_paid(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    biz = template_biz(voucher_type="FIX_VOUCHER")
    _, members = await call(
        control, signed_request(app, CASH_TEMPLATE_CREATE, biz, datetime.now(UTC))
    )
    created = verified(app, members, CASH_TEMPLATE_CREATE)
    send = {"template_id": created["template_id"], "out_biz_no": uuid.uuid4().hex}
    send["user_id"] = alipay_user()

    _, draft_send = await call(control, signed_request(app, VOUCHER_SEND, send, datetime.now(UTC)))
    # Paying the fund order is what the operator's control plane stands for here.
    paid = await control.change_batch(created["template_id"], status="running")
    _, paid_send = await call(control, signed_request(app, VOUCHER_SEND, send, datetime.now(UTC)))

    assert created["confirm_uri"] and created["fund_order_no"]
    assert verified(app, draft_send, VOUCHER_SEND)["sub_code"] == "TEMPLATE_NOT_ACTIVE"
    assert paid.status_code == 200
    assert verified(app, paid_send, VOUCHER_SEND)["code"] == "10000"


async def test_python_alipay_sdk_creates_sends_and_queries_against_the_simulator(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    sdk = sdk_client(alipay_simulator.keys_dir, alipay_simulator.url)
    user = alipay_user()

    created = await asyncio.to_thread(sdk.server_api, CASHLESS_TEMPLATE_CREATE, template_biz())
    template_id = created["template_id"]
    detail = await asyncio.to_thread(
        sdk.server_api, TEMPLATE_DETAIL_QUERY, {"template_id": template_id}
    )
    send = {"template_id": template_id, "out_biz_no": uuid.uuid4().hex, "user_id": user}
    sent = await asyncio.to_thread(sdk.server_api, VOUCHER_SEND, send)
    again = await asyncio.to_thread(sdk.server_api, VOUCHER_SEND, send)
    voucher = await asyncio.to_thread(
        sdk.server_api, VOUCHER_QUERY, {"voucher_id": sent["voucher_id"]}
    )

    # server_api returns only what verified against Alipay's (the simulator's) public key.
    assert created["code"] == detail["code"] == sent["code"] == voucher["code"] == "10000"
    assert detail["status"] == "S" and detail["voucher_quantity"] == 10
    assert again["voucher_id"] == sent["voucher_id"]
    assert (voucher["status"], voucher["template_id"], voucher["user_id"]) == (
        "ENABLED",
        template_id,
        user,
    )


async def test_python_alipay_sdk_signed_with_a_wrong_key_is_refused(
    control: SimControl, alipay_simulator: SimulatorProcess, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(private_pem(new_rsa_key()))
    sdk = sdk_client(alipay_simulator.keys_dir, alipay_simulator.url, private_key_file=wrong)

    with pytest.raises(AliPayException) as refused:
        await asyncio.to_thread(sdk.server_api, TEMPLATE_DETAIL_QUERY, {"template_id": "x"})

    assert "isv.invalid-signature" in str(refused.value)


async def test_python_alipay_sdk_verifies_a_notification_the_simulator_sent(
    control: SimControl, alipay_simulator: SimulatorProcess, receiver: Receiver
) -> None:
    sdk = sdk_client(alipay_simulator.keys_dir, alipay_simulator.url)
    await control.knobs(callback_url=await receiver.start())
    created = await asyncio.to_thread(sdk.server_api, CASHLESS_TEMPLATE_CREATE, template_biz())
    send = {"template_id": created["template_id"], "out_biz_no": uuid.uuid4().hex}
    sent = await asyncio.to_thread(sdk.server_api, VOUCHER_SEND, {**send, "user_id": alipay_user()})

    used = await control.use(sent["voucher_id"])
    body = await receiver.next()
    fields = dict(parse_qsl(body.decode(), keep_blank_values=True))
    signature = fields.pop("sign")

    assert used.status_code == 200
    assert (fields["biz_type"], fields["voucher_id"]) == ("V_USE", sent["voucher_id"])
    assert sdk.verify(dict(fields), signature)
    assert not sdk.verify({**fields, "voucher_id": created["template_id"]}, signature)
