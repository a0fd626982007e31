"""The simulator's Alipay face, spoken to over real HTTP with signed gateway calls made by hand:
the gateway's checks, the payment voucher activity family's rules and refusals, and the
used-voucher message. (Our adapter's view is test_adapter.py; Alipay's official SDK's is
test_official_sdk.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest

from app.embedded import SimulatorProcess
from coupons.platforms.alipay.protocol import (
    ACTIVITY_CREATE,
    ACTIVITY_PUBLISH,
    ACTIVITY_QUERY,
    ACTIVITY_STOP,
    ALIPAY_PRIVATE_KEY,
    APP_PRIVATE_KEY,
    GATEWAY_PATH,
    MESSAGE_USED,
    SIM_APP_ID,
    USER_QUERY_VOUCHER,
    VOUCHER_SEND,
    AlipayApp,
    format_time,
    key_file,
    notify_sign_content,
    parse_epoch,
    request_sign_content,
    response_key,
    rsa2_sign,
    rsa2_verify,
    signed_request,
    sim_app,
    top_level_members,
)
from coupons.platforms.rsa_keys import new_rsa_key

from ..conftest import SimControl, new_key
from .support import Receiver, activity_biz, alipay_user, call, open_id, verified


async def gateway_call(
    control: SimControl, app: AlipayApp, method: str, biz: dict[str, Any]
) -> dict[str, Any]:
    """A signed call whose answer must verify; its `_response` object."""
    _, members = await call(control.http, signed_request(app, method, biz, datetime.now(UTC)))
    return verified(app, members, method)


async def new_activity(control: SimControl, app: AlipayApp, **changes: Any) -> str:
    created = await gateway_call(control, app, ACTIVITY_CREATE, activity_biz(**changes))
    assert created["code"] == "10000", created
    activity_id: str = created["activity_id"]
    return activity_id


async def published(control: SimControl, app: AlipayApp, **changes: Any) -> str:
    activity_id = await new_activity(control, app, **changes)
    publish = {"activity_id": activity_id, "out_biz_no": new_key("pub")}
    assert (await gateway_call(control, app, ACTIVITY_PUBLISH, publish))["code"] == "10000"
    return activity_id


def send_biz(activity_id: str, user: str, field: str = "user_id") -> dict[str, str]:
    return {"activity_id": activity_id, "out_biz_no": uuid.uuid4().hex, field: user}


def test_keys_are_made_on_first_start_private_ones_owner_only(
    alipay_simulator: SimulatorProcess,
) -> None:
    for name in (APP_PRIVATE_KEY, ALIPAY_PRIVATE_KEY):
        mode = key_file(alipay_simulator.keys_dir, name).stat().st_mode
        assert stat.S_IMODE(mode) & 0o077 == 0, name
    assert sim_app(alipay_simulator.keys_dir).app_id == SIM_APP_ID


# ---------------------------------------------------------------- the activity's life


async def test_an_activity_is_init_until_published_then_active_then_finished_when_stopped(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    response, members = await call(
        control.http, signed_request(app, ACTIVITY_CREATE, activity_biz(), datetime.now(UTC))
    )
    created = verified(app, members, ACTIVITY_CREATE)
    activity_id = created["activity_id"]
    query = {"activity_id": activity_id}

    new = await gateway_call(control, app, ACTIVITY_QUERY, query)
    publish = {"activity_id": activity_id, "out_biz_no": new_key("pub")}
    first_publish = await gateway_call(control, app, ACTIVITY_PUBLISH, publish)
    again = await gateway_call(control, app, ACTIVITY_PUBLISH, publish)
    active = await gateway_call(control, app, ACTIVITY_QUERY, query)
    stop = {"activity_id": activity_id, "out_biz_no": new_key("stop")}
    stopped = await gateway_call(control, app, ACTIVITY_STOP, stop)
    stopped_again = await gateway_call(control, app, ACTIVITY_STOP, stop)
    finished = await gateway_call(control, app, ACTIVITY_QUERY, query)
    republish = await gateway_call(control, app, ACTIVITY_PUBLISH, publish)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html;charset=utf-8"
    assert created["code"] == "10000" and created["msg"] == "Success"
    assert set(created) == {"code", "msg", "activity_id"}  # the published answer: activity_id
    assert len(activity_id) == 28 and activity_id.isdigit()
    assert new["activity_status"] == "INIT"
    assert first_publish["code"] == again["code"] == "10000"
    assert active["activity_status"] == "ACTIVE"
    assert stopped["code"] == stopped_again["code"] == "10000"
    assert finished["activity_status"] == "FINISHED"
    assert (republish["code"], republish["sub_code"]) == ("40004", "BIZ_ERROR")
    assert active["voucher_type"] == "FIX_VOUCHER"
    assert active["voucher_send_rule"] == {
        "voucher_quantity": 10,
        "voucher_quantity_limit_per_user": 1,
        "voucher_quantity_limit_per_user_period_type": "LIFE_CYCLE",
    }
    assert active["voucher_use_rule"] == {
        "fix_voucher": {"amount": "10.00", "floor_amount": "50.00"},
        "voucher_valid_period": {"type": "RELATIVE", "valid_days_after_receive": 7},
    }
    assert active["voucher_budget_info"] == {"budget_type": "NO_CASH", "amount": "100.00"}
    assert active["belong_merchant_info"] == {
        "merchant_id": "2088000000000001",
        "merchant_id_type": "PID",
    }
    assert active["summary"] == {"publish_count": 0, "used_count": 0}


async def test_a_paused_activity_reads_pause_and_its_sends_wait(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    activity_id = await published(control, app)
    (await control.change_batch(activity_id, status="paused")).raise_for_status()

    paused = await gateway_call(control, app, ACTIVITY_QUERY, {"activity_id": activity_id})
    refused = await gateway_call(control, app, VOUCHER_SEND, send_biz(activity_id, alipay_user()))

    assert paused["activity_status"] == "PAUSE"
    assert (refused["code"], refused["sub_code"]) == ("40004", "ACTIVITY_NOT_ACTIVE")


async def test_common_params_in_the_query_and_biz_content_in_the_body_are_one_request(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    """Alipay's Python and Java SDKs send the common parameters in the URL, biz_content as the
    form."""
    app = sim_app(alipay_simulator.keys_dir)
    params = signed_request(app, ACTIVITY_CREATE, activity_biz(), datetime.now(UTC))
    biz_content = params.pop("biz_content")

    response = await control.http.post(
        GATEWAY_PATH, params=params, data={"biz_content": biz_content}
    )

    assert verified(app, top_level_members(response.text), ACTIVITY_CREATE)["code"] == "10000"


def _raw_post(host: str, port: int, target: str, body: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(
            f"POST {target} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/x-www-form-urlencoded;charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_a_request_line_in_absolute_form_reaches_the_gateway(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    """`POST http://host/gateway.do?... HTTP/1.1`, as Alipay's Python SDK writes it (RFC 9112
    3.2.2: a server accepts the absolute form)."""
    app = sim_app(alipay_simulator.keys_dir)
    params = signed_request(app, ACTIVITY_CREATE, activity_biz(), datetime.now(UTC))
    biz_content = params.pop("biz_content")
    host, port = alipay_simulator.host, alipay_simulator.port
    target = f"http://{host}:{port}{GATEWAY_PATH}?{urlencode(params)}"

    raw = await asyncio.to_thread(
        _raw_post, host, port, target, urlencode({"biz_content": biz_content}).encode()
    )

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert verified(app, top_level_members(body.decode()), ACTIVITY_CREATE)["code"] == "10000"


# ---------------------------------------------------------------- the gateway's checks


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
    params = signed_request(app, ACTIVITY_CREATE, activity_biz(), datetime.now(UTC))
    before = await control.stats()

    response, members = await call(control.http, change(app, params))

    _, answer = members[response_key(ACTIVITY_CREATE)]
    assert response.status_code == 200
    assert (answer["code"], answer["sub_code"]) == (code, sub_code)
    assert "sign" not in members  # the gateway's own refusals are not signed here
    assert (await control.stats())["batches"] == before["batches"]


@pytest.mark.parametrize(
    ("method", "code", "sub_code"),
    [
        ("", "40001", "isv.missing-method"),
        ("alipay.no.such", "40002", "isv.invalid-method"),
        # The older family is not served: no merchant needs it to run this service.
        ("alipay.marketing.voucher.send", "40002", "isv.invalid-method"),
        ("alipay.marketing.cashlessvoucher.template.create", "40002", "isv.invalid-method"),
    ],
)
async def test_an_unknown_method_is_refused_as_error_response(
    control: SimControl, alipay_simulator: SimulatorProcess, method: str, code: str, sub_code: str
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    params = {**signed_request(app, ACTIVITY_QUERY, {}, datetime.now(UTC)), "method": method}

    _, members = await call(control.http, params)

    _, answer = members["error_response"]
    assert (answer["code"], answer["sub_code"]) == (code, sub_code)


async def test_the_frequency_limit_answers_40005(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    await control.knobs(rate_limit_per_s=1)
    answers = []
    for _ in range(3):
        params = signed_request(app, ACTIVITY_QUERY, {"activity_id": "1"}, datetime.now(UTC))
        _, members = await call(control.http, params)
        answers.append(members)

    limited = [members["error_response"][1] for members in answers if "error_response" in members]
    assert limited and all(
        (answer["code"], answer["sub_code"]) == ("40005", "isv.app-call-limited")
        for answer in limited
    )


# ---------------------------------------------------------------- create's published rules


def _window(days: float) -> dict[str, str]:
    start = datetime.now(UTC).replace(microsecond=0)
    return {
        "publish_start_time": format_time(start),
        "publish_end_time": format_time(start + timedelta(days=days)),
    }


def _use_rule(**fix: str) -> dict[str, Any]:
    return {
        "fix_voucher": fix,
        "voucher_valid_period": {"type": "RELATIVE", "valid_days_after_receive": 7},
        "available_merchant": {"available_pids": ["2088000000000001"]},
    }


def _send_rule(**rule: Any) -> dict[str, Any]:
    return {"voucher_quantity": 10, **rule}


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"voucher_use_rule": _use_rule(amount="0.09")}, "amount below 0.1"),
        ({"voucher_use_rule": _use_rule(amount="3000.01")}, "amount above 3000"),
        ({"voucher_use_rule": _use_rule(amount="1.001")}, "amount with 3 decimals"),
        ({"voucher_send_rule": _send_rule(voucher_quantity=0)}, "quantity 0"),
        ({"voucher_send_rule": _send_rule(voucher_quantity=100_000_000)}, "quantity > 99999999"),
        (
            {"voucher_send_rule": _send_rule(voucher_quantity_limit_per_user=-1)},
            "negative per-user limit",
        ),
        (_window(180.01), "window over 180 days"),
        (_window(-1), "window ending before it starts"),
        ({"publish_end_time": "2030-01-01T00:00:00"}, "time not yyyy-MM-dd HH:mm:ss"),
        ({"publish_start_time": None}, "no window"),
        ({"belong_merchant_info": None}, "no owner"),
        (
            {
                "belong_merchant_info": {
                    "merchant_id": "2088000000009999",
                    "merchant_id_type": "PID",
                }
            },
            "another merchant",
        ),
        (
            {
                "voucher_use_rule": {
                    "fix_voucher": {"amount": "10.00"},
                    "voucher_valid_period": {"type": "RELATIVE", "valid_days_after_receive": 7},
                    "available_merchant": {},
                }
            },
            "no available_pids nor smids",
        ),
        (
            {
                "voucher_use_rule": {
                    "fix_voucher": {"amount": "10.00"},
                    "voucher_valid_period": {"type": "RELATIVE", "valid_days_after_receive": 0},
                    "available_merchant": {"available_pids": ["2088000000000001"]},
                }
            },
            "valid 0 days",
        ),
        ({"voucher_budget_info": {"budget_type": "NO_CASH", "amount": "1.00"}}, "budget"),
        ({"voucher_type": "DISCOUNT_VOUCHER"}, "a type the simulator does not model"),
        ({"voucher_display_info": {"voucher_description": "x"}}, "no brand name"),
        ({"out_biz_no": "x" * 65}, "out_biz_no over 64"),
    ],
)
async def test_create_refuses_what_breaks_a_published_rule_and_creates_nothing(
    control: SimControl, alipay_simulator: SimulatorProcess, changes: dict[str, Any], rule: str
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    before = await control.stats()
    biz = {name: value for name, value in activity_biz(**changes).items() if value is not None}

    answer = await gateway_call(control, app, ACTIVITY_CREATE, biz)

    assert (answer["code"], answer["sub_code"]) == ("40004", "INVALID_PARAMETER"), rule
    assert answer["sub_msg"]
    assert (await control.stats())["batches"] == before["batches"]


async def test_the_published_limits_themselves_are_taken(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    low = await new_activity(
        control,
        app,
        voucher_use_rule=_use_rule(amount="0.1"),
        voucher_budget_info={"budget_type": "NO_CASH", "amount": "1.00"},
        **_window(180),
    )
    high = await new_activity(
        control,
        app,
        voucher_use_rule=_use_rule(amount="3000"),
        voucher_send_rule=_send_rule(voucher_quantity=99_999_999),
        voucher_budget_info=None,
    )

    assert low and high


async def test_a_retried_create_finds_the_first_activity_and_other_terms_are_refused(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    biz = activity_biz()

    first = await gateway_call(control, app, ACTIVITY_CREATE, biz)
    again = await gateway_call(control, app, ACTIVITY_CREATE, biz)
    other = await gateway_call(control, app, ACTIVITY_CREATE, {**biz, "activity_name": "other"})

    assert first["activity_id"] == again["activity_id"]
    assert (other["code"], other["sub_code"]) == ("40004", "INVALID_PARAMETER")


# ---------------------------------------------------------------- sending and querying


async def test_a_resent_out_biz_no_answers_the_same_voucher_and_sends_one(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    activity_id = await published(control, app)
    send = send_biz(activity_id, alipay_user())

    answers = [await gateway_call(control, app, VOUCHER_SEND, send) for _ in range(2)]
    activity = await gateway_call(control, app, ACTIVITY_QUERY, {"activity_id": activity_id})

    assert answers[0]["voucher_id"] == answers[1]["voucher_id"]
    assert set(answers[0]) == {"code", "msg", "voucher_id"}  # the published answer
    assert activity["summary"]["publish_count"] == 1


async def _stopped(control: SimControl, activity_id: str) -> None:
    (await control.change_batch(activity_id, status="stopped")).raise_for_status()


async def _expired(control: SimControl, activity_id: str) -> None:
    (await control.change_batch(activity_id, status="expired")).raise_for_status()


async def _no_budget(control: SimControl, activity_id: str) -> None:
    (await control.change_batch(activity_id, remaining=0)).raise_for_status()


async def _failing(control: SimControl, activity_id: str) -> None:
    await control.knobs(error_rate=1.0)


@pytest.mark.parametrize(
    ("setup", "sub_code"),
    [
        (_stopped, "ACTIVITY_IS_STOPED"),
        (_expired, "ACTIVITY_IS_END"),
        (_no_budget, "BUDGET_NOT_ENOUGH"),
        (_failing, "SYSTEM_ERROR"),
    ],
)
async def test_each_published_send_refusal(
    control: SimControl,
    alipay_simulator: SimulatorProcess,
    setup: Callable[[SimControl, str], Any],
    sub_code: str,
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    activity_id = await published(control, app)
    await setup(control, activity_id)

    answer = await gateway_call(control, app, VOUCHER_SEND, send_biz(activity_id, alipay_user()))

    assert (answer["code"], answer["sub_code"]) == ("40004", sub_code)


async def test_an_unpublished_activity_and_an_unopened_window_make_sends_wait(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    unpublished = await new_activity(control, app)
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    later = await published(
        control,
        app,
        publish_start_time=format_time(start),
        publish_end_time=format_time(start + timedelta(days=3)),
    )

    init = await gateway_call(control, app, VOUCHER_SEND, send_biz(unpublished, alipay_user()))
    early = await gateway_call(control, app, VOUCHER_SEND, send_biz(later, alipay_user()))

    assert init["sub_code"] == "ACTIVITY_NOT_ACTIVE"
    assert early["sub_code"] == "ACTIVITY_NOT_START"


async def test_the_per_user_limit_is_count_over_limit_and_zero_means_none(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    limited = await published(control, app)
    unlimited = await published(
        control, app, voucher_send_rule=_send_rule(voucher_quantity_limit_per_user=0)
    )
    user = alipay_user()

    first = await gateway_call(control, app, VOUCHER_SEND, send_biz(limited, user))
    second = await gateway_call(control, app, VOUCHER_SEND, send_biz(limited, user))
    many = [
        await gateway_call(control, app, VOUCHER_SEND, send_biz(unlimited, user)) for _ in range(3)
    ]

    assert first["code"] == "10000"
    assert (second["code"], second["sub_code"]) == ("40004", "COUNT_OVER_LIMIT")
    assert [answer["code"] for answer in many] == ["10000"] * 3


@pytest.mark.parametrize(
    ("fields", "sub_code"),
    [
        ({"user_id": "ann"}, "INVALID_PARAMETER"),  # not a user_id Alipay has
        ({"user_id": "20881234"}, "INVALID_PARAMETER"),
        ({"open_id": "not an open id!"}, "openid-error"),
        ({"open_id": "x" * 129}, "openid-error"),
        ({"user_id": "2088000000000123", "open_id": "074abc"}, "INVALID_PARAMETER"),
        ({}, "INVALID_PARAMETER"),
    ],
    ids=["name", "short-user-id", "open-id-characters", "open-id-length", "both", "neither"],
)
async def test_a_user_alipay_does_not_know_is_refused(
    control: SimControl,
    alipay_simulator: SimulatorProcess,
    fields: dict[str, str],
    sub_code: str,
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    activity_id = await published(control, app)
    send = {"activity_id": activity_id, "out_biz_no": uuid.uuid4().hex, **fields}

    answer = await gateway_call(control, app, VOUCHER_SEND, send)

    assert (answer["code"], answer["sub_code"]) == ("40004", sub_code)
    assert (await gateway_call(control, app, ACTIVITY_QUERY, {"activity_id": activity_id}))[
        "summary"
    ]["publish_count"] == 0


async def test_the_voucher_query_is_by_user_and_answers_the_published_fields(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    activity_id = await published(control, app)
    user = open_id()
    sent = await gateway_call(
        control, app, VOUCHER_SEND, send_biz(activity_id, user, field="open_id")
    )
    voucher_id = sent["voucher_id"]
    asked = {"voucher_id": voucher_id, "open_id": user}

    found = await gateway_call(control, app, USER_QUERY_VOUCHER, asked)
    other_user = await gateway_call(
        control, app, USER_QUERY_VOUCHER, {"voucher_id": voucher_id, "open_id": open_id()}
    )
    other_activity = await gateway_call(
        control, app, USER_QUERY_VOUCHER, {**asked, "activity_id": "20990101000000000000000000"}
    )
    (await control.use(voucher_id)).raise_for_status()
    used = await gateway_call(control, app, USER_QUERY_VOUCHER, asked)

    base = found["user_voucher_base_info"]
    assert (found["activity_id"], found["voucher_status"]) == (activity_id, "SENDED")
    assert (base["voucher_id"], base["voucher_status"]) == (voucher_id, "SENDED")
    assert base["create_time"] == found["create_time"]
    end = datetime.fromisoformat(base["valid_end_time"].replace(" ", "T"))
    start = datetime.fromisoformat(base["create_time"].replace(" ", "T"))
    assert end - start == timedelta(days=7)
    assert "user_id" not in found and "open_id" not in found  # it names no user
    assert (other_user["sub_code"], other_activity["sub_code"]) == (
        "VOUCHER_NOT_EXIST",
        "VOUCHER_NOT_EXIST",
    )
    assert used["voucher_status"] == used["user_voucher_base_info"]["voucher_status"] == "USED"
    assert used["user_voucher_base_info"]["voucher_used_times"] == 1
    assert not any("use_time" in name or "gmt" in name for name in used)


async def test_a_voucher_the_lag_hides_is_voucher_not_exist(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    activity_id = await published(control, app)
    user = alipay_user()
    await control.knobs(lookup_lag_s=30)
    sent = await gateway_call(control, app, VOUCHER_SEND, send_biz(activity_id, user))

    hidden = await gateway_call(
        control, app, USER_QUERY_VOUCHER, {"voucher_id": sent["voucher_id"], "user_id": user}
    )

    assert (hidden["code"], hidden["sub_code"]) == ("40004", "VOUCHER_NOT_EXIST")


# ---------------------------------------------------------------- the used-voucher message


async def used_voucher(
    control: SimControl, app: AlipayApp, callback_url: str, user: str, field: str
) -> tuple[str, str]:
    """A published activity's voucher sent to `user` (named by `field`) and used at the till,
    with messages going to `callback_url`: (the activity id, the voucher id)."""
    await control.knobs(callback_url=callback_url)
    activity_id = await published(control, app)
    sent = await gateway_call(control, app, VOUCHER_SEND, send_biz(activity_id, user, field))
    (await control.use(sent["voucher_id"])).raise_for_status()
    return activity_id, sent["voucher_id"]


async def test_the_used_message_has_the_published_envelope_and_verifies(
    control: SimControl, alipay_simulator: SimulatorProcess, receiver: Receiver
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    user = open_id()
    before = datetime.now(UTC)

    activity_id, voucher_id = await used_voucher(
        control, app, await receiver.start(), user, "open_id"
    )
    body = await receiver.next()

    fields = dict(parse_qsl(body.decode(), keep_blank_values=True))
    biz = json.loads(fields["biz_content"])
    assert set(fields) == {
        "notify_id",
        "utc_timestamp",
        "msg_method",
        "app_id",
        "version",
        "charset",
        "sign_type",
        "sign",
        "biz_content",
    }
    assert (fields["msg_method"], fields["app_id"], fields["version"]) == (
        MESSAGE_USED,
        SIM_APP_ID,
        "1.1",
    )
    assert len(fields["utc_timestamp"]) == 13  # epoch milliseconds
    assert abs(parse_epoch(fields["utc_timestamp"]) - datetime.now(UTC)) < timedelta(seconds=5)
    assert rsa2_verify(app.alipay_public_key, notify_sign_content(fields), fields["sign"])
    assert biz["id"] and biz["activity_id"] == activity_id
    assert (biz["voucher_id"], biz["open_id"]) == (voucher_id, user)
    assert "user_id" not in biz
    assert before - timedelta(seconds=1) <= parse_epoch(biz["event_time"]) <= datetime.now(UTC)


async def test_a_user_id_voucher_is_named_by_user_id_in_its_message(
    control: SimControl, alipay_simulator: SimulatorProcess, receiver: Receiver
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    user = alipay_user()

    await used_voucher(control, app, await receiver.start(), user, "user_id")
    biz = json.loads(dict(parse_qsl((await receiver.next()).decode()))["biz_content"])

    assert biz["user_id"] == user and "open_id" not in biz


async def test_a_message_not_answered_success_is_delivered_again_stamped_afresh(
    control: SimControl, alipay_simulator: SimulatorProcess
) -> None:
    app = sim_app(alipay_simulator.keys_dir)
    answers = iter([b"ok", b"success"])  # "ok" is not Alipay's word: delivered again
    receiver = Receiver(lambda body: next(answers))
    try:
        await control.knobs(callback_retry_s=0.5)
        await used_voucher(control, app, await receiver.start(), alipay_user(), "user_id")
        first, second = await receiver.next(), await receiver.next(timeout_s=10)
    finally:
        await receiver.close()

    one, two = (dict(parse_qsl(body.decode())) for body in (first, second))
    assert one["notify_id"] == two["notify_id"]
    assert one["biz_content"] == two["biz_content"]
    assert int(two["utc_timestamp"]) > int(one["utc_timestamp"])
    for fields in (one, two):
        assert rsa2_verify(app.alipay_public_key, notify_sign_content(fields), fields["sign"])
