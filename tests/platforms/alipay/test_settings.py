"""The Alipay settings: the merchant's PID and the field that names users, checked at start and
carried to the adapter the settings build (`coupons/platforms/configured.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from coupons.config import ConfigError, Settings
from coupons.platforms.alipay.protocol import (
    ALIPAY_PUBLIC_KEY,
    APP_PRIVATE_KEY,
    SIM_PID,
    ensure_test_keys,
    key_file,
)
from coupons.platforms.base import PlatformUnavailable, SendRequest
from coupons.platforms.configured import make_platform

from ..conftest import batch_spec


def real_merchant(keys: Path, **more: str) -> dict[str, str]:
    return {
        "PLATFORM": "alipay",
        "PLATFORM_URL": "https://openapi.alipay.com/gateway.do",
        "ALIPAY_APP_ID": "2021000000000042",
        "ALIPAY_PRIVATE_KEY_FILE": str(key_file(keys, APP_PRIVATE_KEY)),
        "ALIPAY_PUBLIC_KEY_FILE": str(key_file(keys, ALIPAY_PUBLIC_KEY)),
        **more,
    }


async def _what_it_sends(settings: Settings) -> dict[str, dict[str, Any]]:
    """The biz_content of a create and a send by the adapter `settings` build, by method; the
    requests go nowhere (every answer is a 503, which the adapter takes for unavailable)."""
    sent: dict[str, dict[str, Any]] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        sent[form["method"]] = json.loads(form["biz_content"])
        return httpx.Response(503)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        platform = make_platform(settings, client)
        for call in (
            platform.create_batch(batch_spec()),
            platform.send_coupon(SendRequest("2026010100000000000000000001", "ann", "k" * 32)),
        ):
            with pytest.raises(PlatformUnavailable):
                await call
        await platform.aclose()
    return sent


async def test_alipay_settings_are_checked_and_reach_the_adapter(tmp_path: Path) -> None:
    ensure_test_keys(tmp_path)
    real = Settings.from_env(
        real_merchant(tmp_path, ALIPAY_PID="2088123412341234", ALIPAY_USER_ID_TYPE="open_id")
    )
    embedded = Settings(
        data_dir=tmp_path / "data", platform="alipay", alipay_user_id_type="user_id"
    )
    ensure_test_keys(embedded.platform_keys_dir)

    by_real = await _what_it_sends(real)
    by_embedded = await _what_it_sends(embedded)

    create = "alipay.marketing.activity.voucher.create"
    send = "alipay.marketing.activity.voucher.send"
    assert real.user_id_type == "open_id"
    assert by_real[create]["belong_merchant_info"]["merchant_id"] == "2088123412341234"
    assert by_real[send]["open_id"] == "ann" and "user_id" not in by_real[send]
    # The embedded simulator's test merchant has a fixed PID.
    assert by_embedded[create]["voucher_use_rule"]["available_merchant"] == {
        "available_pids": [SIM_PID]
    }
    assert by_embedded[send]["user_id"] == "ann" and "open_id" not in by_embedded[send]
    assert Settings.from_env(real.to_env()) == real


@pytest.mark.parametrize(
    ("more", "message"),
    [
        ({"ALIPAY_USER_ID_TYPE": "open_id"}, "needs ALIPAY_PID"),
        ({"ALIPAY_PID": "2088123412341234"}, "needs ALIPAY_USER_ID_TYPE"),
        (
            {"ALIPAY_PID": "1234", "ALIPAY_USER_ID_TYPE": "user_id"},
            "ALIPAY_PID='1234' is not a PID",
        ),
        ({"ALIPAY_PID": "2088123412341234", "ALIPAY_USER_ID_TYPE": "uid"}, "ALIPAY_USER_ID_TYPE"),
    ],
    ids=["no-pid", "no-id-type", "bad-pid", "bad-id-type"],
)
def test_a_real_alipay_merchant_needs_a_pid_and_a_known_id_type(
    tmp_path: Path, more: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(real_merchant(tmp_path, **more))
