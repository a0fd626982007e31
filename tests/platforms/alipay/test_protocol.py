"""The Alipay gateway protocol on its own: keys, RSA2 signatures, answers, formats."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from coupons.platforms.alipay.protocol import (
    ALIPAY_PRIVATE_KEY,
    ALIPAY_PUBLIC_KEY,
    APP_PRIVATE_KEY,
    APP_PUBLIC_KEY,
    SHANGHAI,
    SIM_APP_ID,
    VOUCHER_SEND,
    AlipayApp,
    cents,
    ensure_test_keys,
    epoch_ms,
    format_time,
    key_file,
    load_private_key,
    load_public_key,
    notify_sign_content,
    parse_epoch,
    parse_time,
    request_sign_content,
    response_key,
    response_text,
    rsa2_sign,
    rsa2_verify,
    signed_request,
    sim_app,
    top_level_members,
    unwrapped_sub_code,
    yuan,
)
from coupons.platforms.rsa_keys import new_rsa_key


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("keys")
    ensure_test_keys(keys)
    return keys


def test_test_keys_are_made_once_private_ones_owner_only(tmp_path: Path) -> None:
    ensure_test_keys(tmp_path)
    files = {
        name: key_file(tmp_path, name)
        for name in (APP_PRIVATE_KEY, APP_PUBLIC_KEY, ALIPAY_PRIVATE_KEY, ALIPAY_PUBLIC_KEY)
    }
    before = {name: path.read_bytes() for name, path in files.items()}

    ensure_test_keys(tmp_path)

    assert {name: path.read_bytes() for name, path in files.items()} == before
    for name in (APP_PRIVATE_KEY, ALIPAY_PRIVATE_KEY):
        assert stat.S_IMODE(files[name].stat().st_mode) & 0o077 == 0, name
    # Each public file is the other half of its private file.
    app_key = load_private_key(before[APP_PRIVATE_KEY])
    alipay_key = load_private_key(before[ALIPAY_PRIVATE_KEY])
    assert rsa2_verify(load_public_key(before[APP_PUBLIC_KEY]), "x", rsa2_sign(app_key, "x"))
    assert rsa2_verify(load_public_key(before[ALIPAY_PUBLIC_KEY]), "x", rsa2_sign(alipay_key, "x"))
    assert not rsa2_verify(load_public_key(before[APP_PUBLIC_KEY]), "x", rsa2_sign(alipay_key, "x"))
    assert not list(tmp_path.glob(".alipay-*"))  # no staging directory left behind


def test_a_key_dir_missing_a_file_is_an_error_not_a_mismatched_key(tmp_path: Path) -> None:
    ensure_test_keys(tmp_path)
    key_file(tmp_path, ALIPAY_PRIVATE_KEY).unlink()

    with pytest.raises(FileNotFoundError, match=ALIPAY_PRIVATE_KEY):
        ensure_test_keys(tmp_path)
    assert not key_file(tmp_path, ALIPAY_PRIVATE_KEY).exists()


def test_app_repr_hides_keys_and_bare_base64_keys_load(keys_dir: Path, tmp_path: Path) -> None:
    app = sim_app(keys_dir)
    # Alipay's console gives keys as bare base64: the armour stripped, the lines joined.
    bare = tmp_path / "bare_private.txt"
    pem_lines = key_file(keys_dir, APP_PRIVATE_KEY).read_text().splitlines()
    bare.write_text("".join(line for line in pem_lines if not line.startswith("-----")))
    from_bare = AlipayApp.from_files(
        app_id="2021x",
        private_key_file=bare,
        alipay_public_key_file=key_file(keys_dir, ALIPAY_PUBLIC_KEY),
    )

    assert app.app_id == SIM_APP_ID
    assert repr(app) == f"AlipayApp(app_id='{SIM_APP_ID}')"
    assert rsa2_verify(
        load_public_key(key_file(keys_dir, APP_PUBLIC_KEY).read_bytes()),
        "content",
        rsa2_sign(from_bare.private_key, "content"),
    )


def test_a_bad_key_file_is_named_never_quoted(tmp_path: Path) -> None:
    secret_looking = tmp_path / "broken.pem"
    secret_looking.write_text("-----BEGIN PRIVATE KEY-----\nTOPSECRETMATERIAL\n")

    with pytest.raises(ValueError) as refused:
        AlipayApp.from_files(
            app_id="x", private_key_file=secret_looking, alipay_public_key_file=secret_looking
        )

    assert str(secret_looking) in str(refused.value)
    assert "TOPSECRET" not in str(refused.value)


def test_request_sign_content_skips_sign_and_empty_values() -> None:
    params = {"method": "m", "app_id": "1", "sign": "s", "notify_url": "", "biz_content": "{}"}

    assert request_sign_content(params) == "app_id=1&biz_content={}&method=m"


def test_notify_sign_content_skips_sign_and_sign_type_only() -> None:
    params = {"sign_type": "RSA2", "b": "", "a": "1", "sign": "s"}

    assert notify_sign_content(params) == "a=1&b="


def test_signed_request_verifies_and_any_change_breaks_it(keys_dir: Path) -> None:
    app = sim_app(keys_dir)
    app_public = load_public_key(key_file(keys_dir, APP_PUBLIC_KEY).read_bytes())
    params = signed_request(
        app, VOUCHER_SEND, {"activity_id": "A1", "user_id": "2088"}, datetime.now(UTC)
    )
    tampered = {**params, "biz_content": params["biz_content"].replace("A1", "A2")}
    flipped = (
        params["sign"][:10] + ("A" if params["sign"][10] != "A" else "B") + params["sign"][11:]
    )

    assert params["sign_type"] == "RSA2" and params["charset"] == "utf-8"
    assert json.loads(params["biz_content"]) == {"activity_id": "A1", "user_id": "2088"}
    assert rsa2_verify(app_public, request_sign_content(params), params["sign"])
    assert not rsa2_verify(app_public, request_sign_content(tampered), params["sign"])
    assert not rsa2_verify(app_public, request_sign_content(params), flipped)
    assert not rsa2_verify(app_public, request_sign_content(params), "not base64 at all!")
    other = rsa2_sign(new_rsa_key(), request_sign_content(params))
    assert not rsa2_verify(app_public, request_sign_content(params), other)


def test_an_answer_is_signed_over_the_exact_text_of_its_response_member(keys_dir: Path) -> None:
    alipay_key = load_private_key(key_file(keys_dir, ALIPAY_PRIVATE_KEY).read_bytes())
    alipay_public = sim_app(keys_dir).alipay_public_key
    key = response_key(VOUCHER_SEND)
    # Braces and quotes inside strings must not confuse where the member's text ends.
    payload = {"code": "40004", "sub_code": "X", "sub_msg": '模板 {"已过期"} }', "n": [1, {}]}
    text = response_text(key, payload, alipay_key)

    members = top_level_members(text)
    member_text, value = members[key]

    assert key == "alipay_marketing_activity_voucher_send_response"
    assert value == payload
    assert member_text == json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    assert rsa2_verify(alipay_public, member_text, members["sign"][1])
    assert not rsa2_verify(alipay_public, member_text.replace("40004", "10000"), members["sign"][1])
    assert "sign" not in top_level_members(response_text(key, payload, None))


@pytest.mark.parametrize(
    "text",
    ['{"a":1,"a":2}', '{"a":1} x', "[1]", '{"a" 1}', '{"a":1', ""],
)
def test_top_level_members_refuses_anything_but_one_plain_object(text: str) -> None:
    with pytest.raises(ValueError):
        top_level_members(text)


def test_times_are_beijing_time_to_the_second() -> None:
    moment = datetime(2024, 1, 1, 0, 0, 30, 999_999, tzinfo=UTC)

    assert format_time(moment) == "2024-01-01 08:00:30"
    assert parse_time("2024-01-01 08:00:30") == moment.replace(microsecond=0)
    assert parse_time("2024-01-01 08:00:30").tzinfo == SHANGHAI
    for garbled in ("2024-01-01T08:00:30", "2024-1-1 8:00:30", "2024-01-01 08:00:30+08:00"):
        with pytest.raises(ValueError):
            parse_time(garbled)


def test_amounts_are_yuan_with_two_decimals() -> None:
    assert yuan(1000) == "10.00" and yuan(5) == "0.05" and yuan(0) == "0.00"
    assert cents("10") == 1000 and cents("10.5") == 1050 and cents("0.05") == 5
    for garbled in ("10.123", "-1", "01", "1e3", "", " 1"):
        with pytest.raises(ValueError):
            cents(garbled)
    with pytest.raises(ValueError):
        yuan(-1)


def test_the_unknown_sub_code_wrapper_is_read_through() -> None:
    # The wrapper as Alipay's own support pages show it (AlipayDocs/open-docs).
    assert unwrapped_sub_code("unknown-sub-code", "未知的错误码BUDGET_NOT_ENOUGH") == (
        "BUDGET_NOT_ENOUGH"
    )
    assert unwrapped_sub_code("unknown-sub-code", "系统繁忙") == "unknown-sub-code"
    assert unwrapped_sub_code("ACTIVITY_IS_END", "未知的错误码X") == "ACTIVITY_IS_END"


def test_message_times_are_epoch_milliseconds_and_seconds_are_read_too() -> None:
    moment = datetime(2021, 4, 25, 8, 11, 11, 731_000, tzinfo=UTC)

    assert epoch_ms(moment) == "1619338271731"
    assert parse_epoch("1619338271731") == moment
    # The message page's own event_time example is in seconds, though it says milliseconds.
    assert parse_epoch("1619338271") == moment.replace(microsecond=0)
    for garbled in ("", "-1", "1.5", "16193382717310000000", "2021-04-25 16:11:11"):
        with pytest.raises(ValueError):
            parse_epoch(garbled)


@pytest.mark.parametrize("armour", [True, False], ids=["pem", "bare-base64"])
def test_a_pkcs1_app_key_as_alipays_key_tool_gives_it_loads(
    keys_dir: Path, tmp_path: Path, armour: bool
) -> None:
    """Alipay's key tool gives non-Java merchants a PKCS#1 key, as bare base64."""
    app_key = load_private_key(key_file(keys_dir, APP_PRIVATE_KEY).read_bytes())
    pem = app_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    assert pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    text = pem if armour else "".join(line for line in pem.splitlines() if "-----" not in line)
    (tmp_path / "app_private_key.txt").write_text(text)

    app = AlipayApp.from_files(
        app_id=SIM_APP_ID,
        private_key_file=tmp_path / "app_private_key.txt",
        alipay_public_key_file=key_file(keys_dir, ALIPAY_PUBLIC_KEY),
    )

    app_public = load_public_key(key_file(keys_dir, APP_PUBLIC_KEY).read_bytes())
    assert rsa2_verify(app_public, "content", rsa2_sign(app.private_key, "content"))
