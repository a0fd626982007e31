"""WeChat Pay API v3 as both sides of our voucher (代金券) integration speak it: request and
answer signatures, the AEAD envelope of notifications and of platform certificates, and the
key files.

`WechatPayPlatform` (adapter.py) signs requests and verifies answers and notifications with
these functions; the simulator's wechat face (simulator.py) verifies requests and signs
answers and notifications with the same ones, so each side is checked by the other's code and,
in the tests, by the official `wechatpayv3` SDK. docs/platforms/wechat.md cites the source of
every rule.

- A request carries `Authorization: WECHATPAY2-SHA256-RSA2048 mchid="..",nonce_str="..",
  signature="..",timestamp="..",serial_no=".."`: an RSA-SHA256 (PKCS#1 v1.5) signature,
  base64, by the merchant's API key over `METHOD\\nURL\\ntimestamp\\nnonce\\nbody\\n`, where URL
  is the path with its query as sent and body the exact bytes sent (empty for a GET).
  `serial_no` is the merchant API certificate's serial, upper-case hex.
- Answers and notifications are signed by WeChat Pay over `timestamp\\nnonce\\nbody\\n` in
  `Wechatpay-Timestamp`, `-Nonce`, `-Signature` (base64), `-Serial` and `-Signature-Type`.
  `-Serial` names the key that signed: the WeChat Pay public key's id (`PUB_KEY_ID_` and
  digits) or a platform certificate's serial (hex). A receiver verifies with the key that
  serial names, refuses a serial it does not hold (after fetching the certificates once more)
  and a timestamp more than 5 minutes from its clock either way. Probe traffic signed
  `WECHATPAY/SIGNTEST/..` never verifies, as it must not.
- A merchant signed by platform certificates downloads them from `GET /v3/certificates`:
  each `encrypt_certificate` is AEAD_AES_256_GCM under the APIv3 key with associated data
  `certificate`; the answer itself is signed by one of the certificates it carries. Trust
  comes from the AEAD: only WeChat Pay and the merchant hold the APIv3 key.
- A notification's `resource` is AEAD_AES_256_GCM with the 32-byte APIv3 key, a 12-byte
  `nonce` and `associated_data` (may be empty); `ciphertext` is base64 of ciphertext + tag.

Key files live in `<keys dir>/wechat/` as a merchant has them: `apiclient_key.pem` (merchant
private key, RSA 2048), `apiclient_cert.pem` (its certificate; the serial is the merchant
serial), `apiv3_key` (32 ASCII characters), `pub_key.pem` and `pub_key_id` (the WeChat Pay
public key and its id), plus the simulator-only platform secrets: `platform_private_key.pem`
(the public key's private half) and `platform_cert_key.pem` with `platform_cert.pem` (the
platform certificate merchants download). Test keys are made at run time by
`ensure_test_keys`, never committed; secrets are written mode 0600.

Over 500 lines on purpose: both sides of one signed protocol in one place, so the adapter and
the simulator can only ever speak the same one.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import shutil
import string
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from coupons.platforms.rsa_keys import new_rsa_key, private_pem, public_pem, rsa_sign, rsa_verify

# The test merchant the simulator knows and `sim_merchant` loads.
SIM_MCHID = "1900000001"
SIM_APPID = "wx8888888888888888"

SCHEME = "WECHATPAY2-SHA256-RSA2048"
AEAD_ALGORITHM = "AEAD_AES_256_GCM"
# WeChat Pay refuses (and tells receivers to refuse) a signature this far from its clock.
MAX_CLOCK_OFFSET_S = 300
TIMESTAMP_HEADER = "Wechatpay-Timestamp"
NONCE_HEADER = "Wechatpay-Nonce"
SIGNATURE_HEADER = "Wechatpay-Signature"
SERIAL_HEADER = "Wechatpay-Serial"
SIGNATURE_TYPE_HEADER = "Wechatpay-Signature-Type"
REQUEST_ID_HEADER = "Request-ID"
# Times in WeChat Pay's answers: RFC 3339, Beijing time.
BEIJING = timezone(timedelta(hours=8))

KEY_FOLDER = "wechat"
MERCHANT_KEY_FILE = "apiclient_key.pem"
MERCHANT_CERT_FILE = "apiclient_cert.pem"
APIV3_KEY_FILE = "apiv3_key"
PLATFORM_PUBLIC_KEY_FILE = "pub_key.pem"
PLATFORM_KEY_ID_FILE = "pub_key_id"
PLATFORM_PRIVATE_KEY_FILE = "platform_private_key.pem"
PLATFORM_CERT_KEY_FILE = "platform_cert_key.pem"
PLATFORM_CERT_FILE = "platform_cert.pem"
# The prefix of a WeChat Pay public key's id; any other serial names a platform certificate.
PUBLIC_KEY_ID_PREFIX = "PUB_KEY_ID_"
CERTIFICATE_ASSOCIATED_DATA = "certificate"

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# Printable ASCII without whitespace or quotes: the nonce sits inside a quoted header value
# and on its own line of the signed message, so it can shift nothing between fields.
_NONCE = re.compile(r"[!#-~]{1,64}")
_AUTH_PARAM = re.compile(r'\s*([a-z_]+)="([^"]*)"\s*(?:,|$)')
_AUTH_FIELDS = ("mchid", "nonce_str", "signature", "timestamp", "serial_no")


class SignatureError(ValueError):
    """A signature, or what it signs, cannot be believed. `reason` names what failed, never a
    key or an expected signature; `unknown_key` says the serial named a key we do not hold
    (a platform certificate we have not downloaded yet may be it)."""

    def __init__(self, reason: str, *, unknown_key: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown_key = unknown_key


# ---------------------------------------------------------------- small formats


def rfc3339(moment: datetime) -> str:
    """A moment as WeChat Pay writes it: `2015-05-20T13:29:35+08:00`."""
    return moment.astimezone(BEIJING).isoformat(timespec="seconds")


def parse_time(value: Any) -> datetime:
    """An RFC 3339 time with its offset (a time without one is refused: no guessing)."""
    if not isinstance(value, str):
        raise ValueError("a time must be an RFC 3339 string")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"time {value[:40]!r} has no offset")
    return moment


def json_body(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes sent and signed: compact JSON, UTF-8."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def new_nonce() -> str:
    return secrets.token_hex(16).upper()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


# ---------------------------------------------------------------- signatures


def request_message(method: str, url: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What a merchant signs: `METHOD\\nURL\\ntimestamp\\nnonce\\nbody\\n`, URL as sent."""
    return b"%s\n%s\n%s\n%s\n%s\n" % (
        method.upper().encode(),
        url.encode(),
        timestamp.encode(),
        nonce.encode(),
        body,
    )


def answer_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """What WeChat Pay signs in an answer or a notification: `timestamp\\nnonce\\nbody\\n`."""
    return b"%s\n%s\n%s\n" % (timestamp.encode(), nonce.encode(), body)


@dataclass(frozen=True)
class Authorization:
    """The parts of a request's `Authorization` header."""

    mchid: str
    nonce_str: str
    timestamp: str
    serial_no: str
    signature: str = field(repr=False)

    def header(self) -> str:
        return (
            f'{SCHEME} mchid="{self.mchid}",nonce_str="{self.nonce_str}",'
            f'signature="{self.signature}",timestamp="{self.timestamp}",'
            f'serial_no="{self.serial_no}"'
        )

    @classmethod
    def parse(cls, header: str | None) -> Authorization:
        """The header's parts, or SignatureError naming what is wrong with it."""
        if not header:
            raise SignatureError("no Authorization header")
        scheme, _, params = header.strip().partition(" ")
        if scheme != SCHEME:
            raise SignatureError(f"Authorization scheme is not {SCHEME}")
        found: dict[str, str] = {}
        position = 0
        params = params.strip()
        while position < len(params):
            match = _AUTH_PARAM.match(params, position)
            if match is None:
                raise SignatureError('Authorization is not key="value" pairs')
            name, value = match.groups()
            if name in found:
                raise SignatureError(f"Authorization repeats {name}")
            found[name] = value
            position = match.end()
        missing = [name for name in _AUTH_FIELDS if not found.get(name)]
        if missing:
            raise SignatureError(f"Authorization lacks {', '.join(missing)}")
        if not _TIMESTAMP.fullmatch(found["timestamp"]):
            raise SignatureError("Authorization timestamp is not a unix time")
        if not _NONCE.fullmatch(found["nonce_str"]):
            raise SignatureError("Authorization nonce_str is garbled")
        return cls(
            mchid=found["mchid"],
            nonce_str=found["nonce_str"],
            timestamp=found["timestamp"],
            serial_no=found["serial_no"],
            signature=found["signature"],
        )


def authorization(
    merchant: WechatMerchant,
    method: str,
    url: str,
    body: bytes,
    *,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> str:
    """The `Authorization` header of one request; `url` is the path and query as sent."""
    timestamp = timestamp if timestamp is not None else str(int(time.time()))
    nonce = nonce if nonce is not None else new_nonce()
    message = request_message(method, url, timestamp, nonce, body)
    return Authorization(
        mchid=merchant.mchid,
        nonce_str=nonce,
        timestamp=timestamp,
        serial_no=merchant.serial,
        signature=rsa_sign(merchant.private_key, message),
    ).header()


def signed_headers(
    private_key: rsa.RSAPrivateKey,
    key_id: str,
    body: bytes,
    *,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The Wechatpay-* headers the platform puts on an answer or a notification."""
    timestamp = timestamp if timestamp is not None else str(int(time.time()))
    nonce = nonce if nonce is not None else secrets.token_hex(16)
    return {
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: rsa_sign(private_key, answer_message(timestamp, nonce, body)),
        SERIAL_HEADER: key_id,
        SIGNATURE_TYPE_HEADER: SCHEME,
    }


def key_name(serial: str) -> str:
    """The name `Wechatpay-Serial` gives a key, as `VerifyingKeys` files it: a public key's id
    as it is; a certificate's serial as upper-case hex without leading zeros (serials are hex
    numbers, and SDKs write them in either case)."""
    if serial.startswith(PUBLIC_KEY_ID_PREFIX):
        return serial
    try:
        return f"{int(serial, 16):X}"
    except ValueError:
        return serial


def certificate_serial(certificate: x509.Certificate) -> str:
    return f"{certificate.serial_number:X}"


VerifyingKeys = Mapping[str, rsa.RSAPublicKey]


def verify_signed(
    headers: Mapping[str, str],
    body: bytes,
    *,
    keys: VerifyingKeys,
    max_skew_s: float = MAX_CLOCK_OFFSET_S,
    now: float | None = None,
) -> str:
    """Check an answer's or a notification's Wechatpay-* signature over `body` (its exact
    bytes) with the key its `Wechatpay-Serial` names in `keys` (by `key_name`); SignatureError
    if anything is missing, garbled, from a key we do not hold, wrong or stale. Header names
    match in any case. Answers the serial that signed."""
    values = {
        name: _header(headers, name)
        for name in (TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER, SERIAL_HEADER)
    }
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise SignatureError(f"missing header {', '.join(missing)}")
    timestamp, nonce = values[TIMESTAMP_HEADER] or "", values[NONCE_HEADER] or ""
    signature, serial = values[SIGNATURE_HEADER] or "", values[SERIAL_HEADER] or ""
    signature_type = _header(headers, SIGNATURE_TYPE_HEADER)
    if signature_type is not None and signature_type != SCHEME:
        raise SignatureError(f"signature type {signature_type[:40]!r} is not {SCHEME}")
    key = keys.get(key_name(serial))
    if key is None:
        raise SignatureError(f"signed with {serial[:64]!r}, a key we do not hold", unknown_key=True)
    if not _TIMESTAMP.fullmatch(timestamp):
        raise SignatureError("garbled timestamp header")
    if not _NONCE.fullmatch(nonce):
        raise SignatureError("garbled nonce header")
    if not rsa_verify(key, answer_message(timestamp, nonce, body), signature):
        raise SignatureError("bad signature")
    # Checked once the signature holds: a stale message is then a replay of a genuine one (or
    # a clock far off), which is what the log should say.
    skew = (time.time() if now is None else now) - int(timestamp)
    if skew > max_skew_s:
        raise SignatureError(f"stale: signed {skew:.0f} s ago")
    if -skew > max_skew_s:
        raise SignatureError(f"from the future: signed {-skew:.0f} s ahead of our clock")
    return serial


# ---------------------------------------------------------------- the AEAD envelope


def aead_encrypt(
    key: bytes, plaintext: bytes, associated_data: str, nonce: str | None = None
) -> dict[str, str]:
    """A notification's `resource` fields (all but `original_type`) for `plaintext`."""
    nonce = nonce if nonce is not None else _random_text(12)
    sealed = AESGCM(key).encrypt(nonce.encode(), plaintext, associated_data.encode())
    return {
        "algorithm": AEAD_ALGORITHM,
        "ciphertext": base64.b64encode(sealed).decode(),
        "associated_data": associated_data,
        "nonce": nonce,
    }


def aead_decrypt(key: bytes, *, nonce: str, ciphertext: str, associated_data: str) -> bytes:
    """The plaintext of a `resource`; ValueError when it does not open with `key` (a wrong
    key, a tampered ciphertext, nonce or associated data)."""
    try:
        sealed = base64.b64decode(ciphertext, validate=True)
        return AESGCM(key).decrypt(nonce.encode(), sealed, associated_data.encode())
    except (binascii.Error, InvalidTag) as exc:
        raise ValueError("the resource does not decrypt with the APIv3 key") from exc


def _random_text(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


# ---------------------------------------------------------------- platform certificates


def certificates_answer(certificates: list[x509.Certificate], apiv3_key: bytes) -> dict[str, Any]:
    """The body of `GET /v3/certificates` for `certificates`: each sealed under the APIv3 key."""
    return {
        "data": [
            {
                "serial_no": certificate_serial(certificate),
                "effective_time": rfc3339(certificate.not_valid_before_utc),
                "expire_time": rfc3339(certificate.not_valid_after_utc),
                "encrypt_certificate": aead_encrypt(
                    apiv3_key,
                    certificate.public_bytes(serialization.Encoding.PEM),
                    CERTIFICATE_ASSOCIATED_DATA,
                ),
            }
            for certificate in certificates
        ]
    }


def read_certificates(
    answer: Mapping[str, Any], apiv3_key: bytes, now: datetime
) -> dict[str, x509.Certificate]:
    """The platform certificates in a `GET /v3/certificates` answer that open with the APIv3
    key and are valid `now`, by serial (`key_name`). ValueError for an answer that is not one:
    a certificate that does not open, or whose serial is not the one it is filed under."""
    entries = answer.get("data")
    if not isinstance(entries, list):
        raise ValueError("no certificate list")
    found: dict[str, x509.Certificate] = {}
    for entry in entries:
        sealed = entry.get("encrypt_certificate") if isinstance(entry, dict) else None
        if not isinstance(sealed, dict) or sealed.get("algorithm") != AEAD_ALGORITHM:
            raise ValueError("a certificate is not sealed with AEAD_AES_256_GCM")
        if sealed.get("associated_data") != CERTIFICATE_ASSOCIATED_DATA:
            raise ValueError("a certificate is not sealed as a certificate")
        pem = aead_decrypt(
            apiv3_key,
            nonce=str(sealed.get("nonce", "")),
            ciphertext=str(sealed.get("ciphertext", "")),
            associated_data=CERTIFICATE_ASSOCIATED_DATA,
        )
        certificate = x509.load_pem_x509_certificate(pem)
        serial = certificate_serial(certificate)
        if key_name(str(entry.get("serial_no", ""))) != serial:
            raise ValueError(f"certificate {serial} is filed under another serial")
        if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
            raise ValueError(f"certificate {serial} holds no RSA key")
        if certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            found[serial] = certificate
    return found


def certificate_key(certificate: x509.Certificate) -> rsa.RSAPublicKey:
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"certificate {certificate_serial(certificate)} holds no RSA key")
    return key


# ---------------------------------------------------------------- key material


@dataclass(frozen=True)
class WechatMerchant:
    """What a merchant holds: its ids, API private key and certificate serial, APIv3 key,
    and WeChat Pay's public key with its id, unless the merchant is still on platform
    certificates alone (then both are None, and answers verify with the certificates
    downloaded with the APIv3 key). Its repr shows no key."""

    mchid: str
    appid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    serial: str
    apiv3_key: bytes = field(repr=False)
    platform_public_key: rsa.RSAPublicKey | None = field(repr=False)
    platform_public_key_id: str | None

    @classmethod
    def from_files(
        cls,
        *,
        mchid: str,
        appid: str,
        private_key_file: Path,
        serial: str | None,
        apiv3_key_file: Path,
        platform_public_key_file: Path | None,
        platform_public_key_id: str | None,
    ) -> WechatMerchant:
        """The merchant from its files. `serial` None: the serial of `apiclient_cert.pem`
        beside the private key; `platform_public_key_file` None: a merchant on platform
        certificates only; `platform_public_key_id` None: `pub_key_id` beside the public
        key. Errors name the file, never its content."""
        if serial is None:
            try:
                certificate = _certificate(private_key_file.parent / MERCHANT_CERT_FILE)
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"{exc}; give the merchant serial (WECHAT_MERCHANT_SERIAL) or put "
                    f"{MERCHANT_CERT_FILE} beside the key"
                ) from None
            serial = f"{certificate.serial_number:X}"
        public_key = None
        if platform_public_key_file is not None:
            public_key = _public_key(platform_public_key_file)
            if platform_public_key_id is None:
                platform_public_key_id = _text_file(
                    platform_public_key_file.parent / PLATFORM_KEY_ID_FILE
                )
            if not platform_public_key_id.startswith(PUBLIC_KEY_ID_PREFIX):
                raise ValueError(
                    f"a WeChat Pay public key id starts with {PUBLIC_KEY_ID_PREFIX}, not "
                    f"{platform_public_key_id[:20]!r}"
                )
        else:
            platform_public_key_id = None
        return cls(
            mchid=mchid,
            appid=appid,
            private_key=_private_key(private_key_file),
            serial=serial.upper(),
            apiv3_key=_apiv3_key(apiv3_key_file),
            platform_public_key=public_key,
            platform_public_key_id=platform_public_key_id,
        )


@dataclass(frozen=True)
class PlatformKeys:
    """What the simulated WeChat Pay holds: its public key's private half and id, its platform
    certificate with that certificate's private key, the test merchant's APIv3 key, and the
    merchant's certificate (to check request signatures)."""

    private_key: rsa.RSAPrivateKey = field(repr=False)
    key_id: str
    cert_private_key: rsa.RSAPrivateKey = field(repr=False)
    certificate: x509.Certificate
    apiv3_key: bytes = field(repr=False)
    merchant_public_key: rsa.RSAPublicKey = field(repr=False)
    merchant_serial: int

    @property
    def cert_serial(self) -> str:
        return certificate_serial(self.certificate)


def sim_merchant(keys_dir: Path, *, public_key: bool = True) -> WechatMerchant:
    """The simulator's test merchant (SIM_MCHID, SIM_APPID), its keys made if missing;
    `public_key` False: the merchant as it was before WeChat Pay gave it a public key
    (platform certificates only)."""
    ensure_test_keys(keys_dir)
    folder = keys_dir / KEY_FOLDER
    return WechatMerchant.from_files(
        mchid=SIM_MCHID,
        appid=SIM_APPID,
        private_key_file=folder / MERCHANT_KEY_FILE,
        serial=None,
        apiv3_key_file=folder / APIV3_KEY_FILE,
        platform_public_key_file=folder / PLATFORM_PUBLIC_KEY_FILE if public_key else None,
        platform_public_key_id=None,
    )


def load_platform_keys(keys_dir: Path) -> PlatformKeys:
    """The simulator's side of the test key material, made if missing."""
    ensure_test_keys(keys_dir)
    folder = keys_dir / KEY_FOLDER
    certificate = _certificate(folder / MERCHANT_CERT_FILE)
    merchant_key = certificate.public_key()
    if not isinstance(merchant_key, rsa.RSAPublicKey):
        raise ValueError(f"{folder / MERCHANT_CERT_FILE}: not an RSA certificate")
    return PlatformKeys(
        private_key=_private_key(folder / PLATFORM_PRIVATE_KEY_FILE),
        key_id=_text_file(folder / PLATFORM_KEY_ID_FILE),
        cert_private_key=_private_key(folder / PLATFORM_CERT_KEY_FILE),
        certificate=_certificate(folder / PLATFORM_CERT_FILE),
        apiv3_key=_apiv3_key(folder / APIV3_KEY_FILE),
        merchant_public_key=merchant_key,
        merchant_serial=certificate.serial_number,
    )


def ensure_test_keys(keys_dir: Path) -> None:
    """Make the test key files under `keys_dir/wechat` that are missing; never overwrite one.

    A first start builds the whole folder aside and renames it into place, so two processes
    starting together end up with one consistent set.
    """
    keys_dir.mkdir(parents=True, exist_ok=True)
    folder = keys_dir / KEY_FOLDER
    if not folder.exists():
        staging = Path(tempfile.mkdtemp(prefix=".wechat-", dir=keys_dir))
        try:
            _fill(staging)
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _fill(folder)


def _fill(folder: Path) -> None:
    merchant_key = _key_pair_file(folder / MERCHANT_KEY_FILE, folder / MERCHANT_CERT_FILE)
    _write_new(folder / MERCHANT_CERT_FILE, _self_signed(merchant_key, _MERCHANT_NAME), 0o644)
    cert_key = _key_pair_file(folder / PLATFORM_CERT_KEY_FILE, folder / PLATFORM_CERT_FILE)
    _write_new(folder / PLATFORM_CERT_FILE, _self_signed(cert_key, _PLATFORM_NAME), 0o644)
    _write_new(folder / APIV3_KEY_FILE, _random_text(32).encode(), 0o600)
    platform_key = _key_pair_file(
        folder / PLATFORM_PRIVATE_KEY_FILE, folder / PLATFORM_PUBLIC_KEY_FILE
    )
    _write_new(folder / PLATFORM_PUBLIC_KEY_FILE, public_pem(platform_key.public_key()), 0o644)
    key_id = "PUB_KEY_ID_" + "0" * 14 + "".join(secrets.choice(string.digits) for _ in range(20))
    _write_new(folder / PLATFORM_KEY_ID_FILE, key_id.encode(), 0o644)


def _key_pair_file(private_file: Path, public_file: Path) -> rsa.RSAPrivateKey:
    """The private key in `private_file`, made if missing; a public half without its private
    key cannot be completed, and is an error rather than a silent mismatch."""
    if private_file.exists():
        return _private_key(private_file)
    if public_file.exists():
        raise FileNotFoundError(
            f"{public_file} exists without {private_file.name}: remove the folder to start over"
        )
    key = new_rsa_key()
    if not _write_new(private_file, private_pem(key), 0o600):
        return _private_key(private_file)  # another process made it first
    return key


_MERCHANT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, SIM_MCHID),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "coupon simulator merchant"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
    ]
)
# Like WeChat Pay's platform certificates, whose subject is Tenpay.com's; this one is signed by
# itself, not by Tenpay.com Root CA (the AEAD under the APIv3 key is what vouches for it).
_PLATFORM_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com sign (simulator)"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tenpay.com"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
    ]
)


def _self_signed(key: rsa.RSAPrivateKey, name: x509.Name) -> bytes:
    now = datetime.now(UTC)
    # 40 upper-case hex digits, as WeChat Pay's merchant and platform serials are.
    serial = secrets.randbits(159) | (1 << 156)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=5 * 365))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Write `path` only if it does not exist (False then); secrets get `mode` from birth."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return True


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read ({exc.strerror})") from None


def _private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        raise ValueError(f"{path}: not an RSA key of at least 2048 bits")
    return key


def _public_key(path: Path) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path))
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{path}: not an RSA public key")
    return key


def _certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError:
        raise ValueError(f"{path}: not a PEM certificate") from None


def _text_file(path: Path) -> str:
    text = _read(path).decode(errors="replace").strip()
    if not text or not text.isprintable():
        raise ValueError(f"{path}: empty or not one printable line")
    return text


def _apiv3_key(path: Path) -> bytes:
    key = _read(path).strip()
    if len(key) != 32 or not key.isascii():
        raise ValueError(f"{path}: an APIv3 key is 32 ASCII characters")
    return key
