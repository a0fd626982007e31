"""WeChat Pay API v3's signatures, AEAD envelope, platform certificates and key files
(protocol.py), checked against themselves and against the `wechatpayv3` SDK's
implementation."""

from __future__ import annotations

import base64
import json
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from wechatpayv3 import utils as sdk  # type: ignore[import-untyped]

from coupons.platforms.rsa_keys import rsa_verify
from coupons.platforms.wechat.protocol import (
    APIV3_KEY_FILE,
    KEY_FOLDER,
    MERCHANT_CERT_FILE,
    MERCHANT_KEY_FILE,
    PLATFORM_CERT_FILE,
    PLATFORM_CERT_KEY_FILE,
    PLATFORM_KEY_ID_FILE,
    PLATFORM_PRIVATE_KEY_FILE,
    PLATFORM_PUBLIC_KEY_FILE,
    SIM_APPID,
    SIM_MCHID,
    Authorization,
    PlatformKeys,
    SignatureError,
    WechatMerchant,
    aead_decrypt,
    aead_encrypt,
    authorization,
    certificate_key,
    certificates_answer,
    ensure_test_keys,
    key_name,
    load_platform_keys,
    read_certificates,
    request_message,
    signed_headers,
    sim_merchant,
    verify_signed,
)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wechat-keys")
    ensure_test_keys(folder)
    return folder


@pytest.fixture(scope="module")
def merchant(keys_dir: Path) -> WechatMerchant:
    return sim_merchant(keys_dir)


@pytest.fixture(scope="module")
def platform(keys_dir: Path) -> PlatformKeys:
    return load_platform_keys(keys_dir)


# ---------------------------------------------------------------- key files


def test_test_keys_are_made_once_with_secret_modes(tmp_path: Path) -> None:
    ensure_test_keys(tmp_path)
    folder = tmp_path / KEY_FOLDER
    files = [
        MERCHANT_KEY_FILE,
        MERCHANT_CERT_FILE,
        APIV3_KEY_FILE,
        PLATFORM_PUBLIC_KEY_FILE,
        PLATFORM_KEY_ID_FILE,
        PLATFORM_PRIVATE_KEY_FILE,
        PLATFORM_CERT_KEY_FILE,
        PLATFORM_CERT_FILE,
    ]
    before = {name: (folder / name).read_bytes() for name in files}
    for secret in (
        MERCHANT_KEY_FILE,
        APIV3_KEY_FILE,
        PLATFORM_PRIVATE_KEY_FILE,
        PLATFORM_CERT_KEY_FILE,
    ):
        assert stat.S_IMODE((folder / secret).stat().st_mode) == 0o600, secret
    assert len(before[APIV3_KEY_FILE]) == 32 and before[APIV3_KEY_FILE].isascii()
    assert before[PLATFORM_KEY_ID_FILE].decode().startswith("PUB_KEY_ID_")

    # Again, and after one file is lost: nothing that exists is rewritten.
    (folder / PLATFORM_KEY_ID_FILE).unlink()
    ensure_test_keys(tmp_path)
    after = {name: (folder / name).read_bytes() for name in files}
    assert {n: v for n, v in after.items() if n != PLATFORM_KEY_ID_FILE} == {
        n: v for n, v in before.items() if n != PLATFORM_KEY_ID_FILE
    }
    assert after[PLATFORM_KEY_ID_FILE].decode().startswith("PUB_KEY_ID_")


def test_a_public_key_without_its_private_key_is_not_papered_over(tmp_path: Path) -> None:
    ensure_test_keys(tmp_path)
    (tmp_path / KEY_FOLDER / PLATFORM_PRIVATE_KEY_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=PLATFORM_PRIVATE_KEY_FILE):
        ensure_test_keys(tmp_path)


def test_merchant_from_files_reads_serial_and_key_id_beside_the_keys(
    keys_dir: Path, merchant: WechatMerchant, platform: PlatformKeys
) -> None:
    assert (merchant.mchid, merchant.appid) == (SIM_MCHID, SIM_APPID)
    assert int(merchant.serial, 16) == platform.merchant_serial
    assert len(merchant.serial) == 40 and merchant.serial == merchant.serial.upper()
    assert merchant.platform_public_key_id == platform.key_id
    folder = keys_dir / KEY_FOLDER
    explicit = WechatMerchant.from_files(
        mchid="1900000002",
        appid=SIM_APPID,
        private_key_file=folder / MERCHANT_KEY_FILE,
        serial="abc123",
        apiv3_key_file=folder / APIV3_KEY_FILE,
        platform_public_key_file=folder / PLATFORM_PUBLIC_KEY_FILE,
        platform_public_key_id="PUB_KEY_ID_1",
    )
    assert (explicit.serial, explicit.platform_public_key_id) == ("ABC123", "PUB_KEY_ID_1")


def test_repr_and_load_errors_show_no_key_material(
    keys_dir: Path, merchant: WechatMerchant
) -> None:
    folder = keys_dir / KEY_FOLDER
    apiv3 = (folder / APIV3_KEY_FILE).read_text()
    shown = repr(merchant)
    assert SIM_MCHID in shown and merchant.serial in shown
    assert apiv3 not in shown and "PRIVATE" not in shown and "private_key" not in shown
    assert apiv3 not in repr(load_platform_keys(keys_dir))

    bad = keys_dir / "short_apiv3_key"
    bad.write_text(apiv3[:20])
    with pytest.raises(ValueError) as raised:
        WechatMerchant.from_files(
            mchid=SIM_MCHID,
            appid=SIM_APPID,
            private_key_file=folder / MERCHANT_KEY_FILE,
            serial=None,
            apiv3_key_file=bad,
            platform_public_key_file=folder / PLATFORM_PUBLIC_KEY_FILE,
            platform_public_key_id=None,
        )
    assert apiv3[:20] not in str(raised.value) and "32 ASCII" in str(raised.value)


# ---------------------------------------------------------------- request signatures


def test_our_authorization_verifies_with_the_merchant_certificate(
    merchant: WechatMerchant, platform: PlatformKeys
) -> None:
    body = b'{"stock_id":"9856000","appid":"wx8888888888888888"}'
    url = "/v3/marketing/favor/users/o-user/coupons?x=1"
    header = authorization(merchant, "POST", url, body)
    auth = Authorization.parse(header)
    assert header.startswith("WECHATPAY2-SHA256-RSA2048 mchid=")
    assert (auth.mchid, int(auth.serial_no, 16)) == (SIM_MCHID, platform.merchant_serial)
    assert abs(int(auth.timestamp) - time.time()) < 5
    signed = request_message("POST", url, auth.timestamp, auth.nonce_str, body)
    assert rsa_verify(platform.merchant_public_key, signed, auth.signature)
    for wrong in (
        request_message("POST", url, auth.timestamp, auth.nonce_str, body + b" "),
        request_message("GET", url, auth.timestamp, auth.nonce_str, body),
        request_message("POST", url.partition("?")[0], auth.timestamp, auth.nonce_str, body),
    ):
        assert not rsa_verify(platform.merchant_public_key, wrong, auth.signature)


def test_the_sdks_authorization_parses_and_verifies_like_ours(
    keys_dir: Path, merchant: WechatMerchant, platform: PlatformKeys
) -> None:
    """The independent implementation signs what we verify: the same message format."""
    private_pem = (keys_dir / KEY_FOLDER / MERCHANT_KEY_FILE).read_text()
    body = json.dumps({"stock_creator_mchid": SIM_MCHID})
    header = sdk.build_authorization(
        "/v3/marketing/favor/stocks/123/start",
        "POST",
        SIM_MCHID,
        merchant.serial,
        sdk.load_private_key(private_pem),
        data=body,
    )
    auth = Authorization.parse(header)
    signed = request_message(
        "POST",
        "/v3/marketing/favor/stocks/123/start",
        auth.timestamp,
        auth.nonce_str,
        body.encode(),
    )
    assert rsa_verify(platform.merchant_public_key, signed, auth.signature)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "no Authorization"),
        ('Bearer mchid="1"', "scheme"),
        ('WECHATPAY2-SHA256-RSA2048 mchid="1",nonce_str="n",timestamp="1"', "lacks"),
        (
            'WECHATPAY2-SHA256-RSA2048 mchid="1",nonce_str="n",signature="s",'
            'timestamp="soon",serial_no="AB"',
            "timestamp",
        ),
        ('WECHATPAY2-SHA256-RSA2048 mchid=1,nonce_str="n"', "pairs"),
    ],
)
def test_a_garbled_authorization_is_refused(header: str | None, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        Authorization.parse(header)


# ---------------------------------------------------------------- answer signatures


def _signed(platform: PlatformKeys, body: bytes, **kwargs: str) -> dict[str, str]:
    return signed_headers(platform.private_key, platform.key_id, body, **kwargs)


def _check(platform: PlatformKeys, headers: dict[str, str], body: bytes) -> str:
    return verify_signed(headers, body, keys={platform.key_id: _public(platform)}, max_skew_s=300)


def _public(platform: PlatformKeys) -> rsa.RSAPublicKey:
    return platform.private_key.public_key()


def test_a_signed_answer_verifies_in_any_header_case(platform: PlatformKeys) -> None:
    body = '{"coupon_id":"98674556","名":"券"}'.encode()
    headers = _signed(platform, body)
    _check(platform, headers, body)
    _check(platform, {name.lower(): value for name, value in headers.items()}, body)
    # The SDK verifies our answers with its own code.
    assert sdk.rsa_verify(
        headers["Wechatpay-Timestamp"],
        headers["Wechatpay-Nonce"],
        body.decode(),
        headers["Wechatpay-Signature"],
        _public(platform),
    )


def test_tampered_wrong_key_wrong_serial_and_stale_answers_are_refused(
    platform: PlatformKeys,
) -> None:
    body = b'{"stock_id":"1"}'
    good = _signed(platform, body)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stale = str(int(time.time()) - 301)
    future = str(int(time.time()) + 301)
    flipped = bytearray(base64.b64decode(good["Wechatpay-Signature"]))
    flipped[5] ^= 1
    cases: list[tuple[dict[str, str], bytes, str]] = [
        (good, b'{"stock_id":"2"}', "bad signature"),
        ({**good, "Wechatpay-Signature": base64.b64encode(bytes(flipped)).decode()}, body, "bad"),
        (signed_headers(other, platform.key_id, body), body, "bad signature"),
        ({**good, "Wechatpay-Signature": "WECHATPAY/SIGNTEST/abc"}, body, "bad signature"),
        ({**good, "Wechatpay-Serial": "PUB_KEY_ID_0000"}, body, "a key we do not hold"),
        (_signed(platform, body, timestamp=stale), body, "stale"),
        (_signed(platform, body, timestamp=future), body, "future"),
        ({k: v for k, v in good.items() if k != "Wechatpay-Nonce"}, body, "missing header"),
        ({**good, "Wechatpay-Signature-Type": "WECHATPAY2-SM2-WITH-SM3"}, body, "type"),
    ]
    for headers, sent, reason in cases:
        with pytest.raises(SignatureError, match=reason) as raised:
            _check(platform, headers, sent)
        assert good["Wechatpay-Signature"] not in raised.value.reason
        # Only a key we do not hold is worth fetching the certificates again for.
        assert raised.value.unknown_key == (reason == "a key we do not hold")


def test_the_key_a_serial_names_verifies_it_whatever_the_case(platform: PlatformKeys) -> None:
    """Public key mode, certificate mode, and both at once during the switch: the serial in
    Wechatpay-Serial picks the key; a certificate serial matches in either case."""
    body = b'{"stock_id":"1"}'
    keys = {
        platform.key_id: _public(platform),
        platform.cert_serial: certificate_key(platform.certificate),
    }
    by_public = _signed(platform, body)
    by_certificate = signed_headers(platform.cert_private_key, platform.cert_serial, body)
    lower = {**by_certificate, "Wechatpay-Serial": platform.cert_serial.lower()}
    assert verify_signed(by_public, body, keys=keys) == platform.key_id
    assert verify_signed(by_certificate, body, keys=keys) == platform.cert_serial
    assert key_name(verify_signed(lower, body, keys=keys)) == platform.cert_serial
    # The certificate's serial with the public key's signature is a bad signature.
    mixed = {**by_public, "Wechatpay-Serial": platform.cert_serial}
    with pytest.raises(SignatureError, match="bad signature"):
        verify_signed(mixed, body, keys=keys)


# ---------------------------------------------------------------- platform certificates


def _certificate(days: tuple[int, int]) -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com sign")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days[0]))
        .not_valid_after(now + timedelta(days=days[1]))
        .sign(key, hashes.SHA256())
    )


def test_certificates_open_with_the_apiv3_key_and_only_valid_ones_are_kept(
    platform: PlatformKeys, merchant: WechatMerchant
) -> None:
    current, expired = platform.certificate, _certificate((-10, -1))
    answer = certificates_answer([current, expired], merchant.apiv3_key)
    entry = answer["data"][0]
    assert entry["serial_no"] == platform.cert_serial
    assert entry["encrypt_certificate"]["associated_data"] == "certificate"
    held = read_certificates(answer, merchant.apiv3_key, datetime.now(UTC))
    assert list(held) == [platform.cert_serial]
    # The SDK opens the same envelope with its own code.
    sealed = entry["encrypt_certificate"]
    opened = sdk.aes_decrypt(
        sealed["nonce"], sealed["ciphertext"], "certificate", merchant.apiv3_key.decode()
    )
    assert x509.load_pem_x509_certificate(opened.encode()) == current


def test_certificates_that_do_not_open_or_are_misfiled_are_not_believed(
    platform: PlatformKeys, merchant: WechatMerchant
) -> None:
    answer = certificates_answer([platform.certificate], merchant.apiv3_key)
    misfiled = json.loads(json.dumps(answer))
    misfiled["data"][0]["serial_no"] = "1234ABCD"
    attempts = [
        (answer, b"w" * 32, "does not decrypt"),
        (misfiled, merchant.apiv3_key, "another serial"),
        ({"data": "none"}, merchant.apiv3_key, "no certificate list"),
    ]
    for given, apiv3_key, reason in attempts:
        with pytest.raises(ValueError, match=reason):
            read_certificates(given, apiv3_key, datetime.now(UTC))


# ---------------------------------------------------------------- the AEAD envelope


def test_aead_round_trip_and_the_sdk_opens_it(merchant: WechatMerchant) -> None:
    plaintext = '{"coupon_id":"1","coupon_name":"满50减10"}'.encode()
    sealed = aead_encrypt(merchant.apiv3_key, plaintext, "coupon")
    assert sealed["algorithm"] == "AEAD_AES_256_GCM" and len(sealed["nonce"]) == 12
    opened = aead_decrypt(
        merchant.apiv3_key,
        nonce=sealed["nonce"],
        ciphertext=sealed["ciphertext"],
        associated_data="coupon",
    )
    assert opened == plaintext
    assert (
        sdk.aes_decrypt(
            sealed["nonce"], sealed["ciphertext"], "coupon", merchant.apiv3_key.decode()
        )
        == plaintext.decode()
    )


def test_wrong_key_tampered_ciphertext_or_associated_data_do_not_open(
    merchant: WechatMerchant,
) -> None:
    sealed = aead_encrypt(merchant.apiv3_key, b'{"coupon_id":"1"}', "coupon")
    raw = bytearray(base64.b64decode(sealed["ciphertext"]))
    raw[0] ^= 1
    tampered = base64.b64encode(bytes(raw)).decode()
    attempts = [
        (b"k" * 32, sealed["ciphertext"], "coupon"),
        (merchant.apiv3_key, tampered, "coupon"),
        (merchant.apiv3_key, sealed["ciphertext"], "refund"),
        (merchant.apiv3_key, "not base64!", "coupon"),
    ]
    for key, ciphertext, associated_data in attempts:
        with pytest.raises(ValueError, match="does not decrypt") as raised:
            aead_decrypt(
                key, nonce=sealed["nonce"], ciphertext=ciphertext, associated_data=associated_data
            )
        assert merchant.apiv3_key.decode() not in str(raised.value)
