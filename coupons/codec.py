"""Payload encryption: an AES-256-GCM payload codec and the key ring it reads.

Every payload the service hands Temporal (workflow inputs and results, activity inputs
and results, signals, updates, queries, summaries) is stored encrypted, so user ids and
receipts do not sit in Temporal's history in clear. Search attributes are not payloads
the codec sees: they stay readable, as they must to be searched.

An encrypted payload is the whole original payload (proto bytes), sealed under a fresh
12-byte nonce (`nonce || ciphertext || tag`), with the metadata `encoding:
binary/encrypted` and `encryption-key-id: <id>`: the shape Temporal's encryption samples
use. Encoding always uses the ring's current key; decoding picks the key by its id, so
keys rotated out keep decrypting, and passes through payloads that are not encrypted
(histories written before the codec was on).

The key ring is a JSON file, owner-only: `{"current": "<id>", "keys": {"<id>": "<base64
of 32 bytes>", ...}}`. `python -m coupons.codec init|rotate|show [--keys PATH]` manages it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

from coupons.config import ConfigError, Settings

log = logging.getLogger(__name__)

ENCODING = "encoding"
ENCRYPTED = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
TAG_BYTES = 16
# Key ids travel in clear in every payload's metadata and in error messages: short,
# printable, no spaces.
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CodecError(ValueError):
    """A payload that cannot be decrypted; the message names its key id, never a key."""


@dataclass(frozen=True)
class KeyRing:
    """The keys payloads may be encrypted with, by id; `current` encrypts new ones."""

    current: str
    keys: Mapping[str, bytes] = field(repr=False)  # never in a repr, a log or an error

    def with_new_key(self) -> tuple[KeyRing, str]:
        """This ring plus a fresh random key, which becomes the current one."""
        key_id = new_key_id()
        while key_id in self.keys:
            key_id = new_key_id()
        return KeyRing(key_id, {**self.keys, key_id: AESGCM.generate_key(bit_length=256)}), key_id

    def to_json(self) -> str:
        keys = {key_id: base64.b64encode(key).decode() for key_id, key in self.keys.items()}
        return json.dumps({"current": self.current, "keys": keys}, indent=2) + "\n"


def new_key_id() -> str:
    """`k<date>-<random>`: the date tells an operator how old a key is."""
    return f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"


def new_ring() -> KeyRing:
    key_id = new_key_id()
    return KeyRing(key_id, {key_id: AESGCM.generate_key(bit_length=256)})


# ------------------------------------------------------------------ the key ring file


def load_keys(path: Path) -> KeyRing:
    """The key ring in `path`; ConfigError naming the file and what is wrong with it."""
    where = f"codec keys {path}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory, not a key ring file") from None
    except PermissionError:
        raise ConfigError(f"{where}: cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a text file") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        # err.msg and the position only: the text around the error could be a key.
        raise ConfigError(f"{where}: not JSON ({err.msg} at line {err.lineno})") from None
    ring = _ring_of(raw, where)
    _warn_if_readable_by_others(path)
    return ring


def _ring_of(raw: object, where: str) -> KeyRing:
    shape = '{"current": "<id>", "keys": {"<id>": "<base64 of 32 bytes>", ...}}'
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a JSON object {shape}")
    current, keys = raw.get("current"), raw.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise ConfigError(f"{where}: 'keys' must be a non-empty object {shape}")
    ring: dict[str, bytes] = {}
    for key_id, encoded in keys.items():
        if not _KEY_ID.fullmatch(key_id):
            raise ConfigError(
                f"{where}: key id {key_id[:70]!r} must be 1 to 64 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit"
            )
        try:
            key = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else None
        except binascii.Error:
            key = None
        if key is None:
            raise ConfigError(f"{where}: key {key_id!r} is not a base64 string")
        if len(key) != KEY_BYTES:
            raise ConfigError(
                f"{where}: key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}"
            )
        ring[key_id] = key
    if not isinstance(current, str) or current not in ring:
        raise ConfigError(
            f"{where}: 'current' must name one of its keys ({', '.join(sorted(ring))}), "
            f"not {current!r}"
        )
    return KeyRing(current, ring)


def _warn_if_readable_by_others(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("codec keys %s are readable by others (mode %03o): chmod 600 it", path, mode)


def ensure_keys(path: Path) -> None:
    """Create `path` with one random key (mode 0600) unless it exists; never overwrites."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _written(path, new_ring()) as temporary, contextlib.suppress(FileExistsError):
        # A link fails if another process created the file meanwhile: its keys stay.
        os.link(temporary, path)
        log.info("created the payload key ring %s", path)


def rotate_keys(path: Path) -> str:
    """Add a new random key to the ring in `path` and make it the current one; the old
    keys stay, so what they encrypted still decrypts. Returns the new key's id."""
    with _locked(path):
        ring, key_id = load_keys(path).with_new_key()
        with _written(path, ring) as temporary:
            os.replace(temporary, path)
    log.info("payload key ring %s: new current key %s (%d keys)", path, key_id, len(ring.keys))
    return key_id


@contextlib.contextmanager
def _written(path: Path, ring: KeyRing) -> Iterator[Path]:
    """`ring` in a temporary file (0600, synced) beside `path`, for the caller to move
    into place atomically; removed if it is still there afterwards."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask
            file.write(ring.to_json())
            file.flush()
            os.fsync(file.fileno())
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One rotation at a time: two at once would each keep only their own new key, and
    payloads encrypted with the lost one would never decrypt again."""
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the codec


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole payloads, with the key ring of a file.

    The ring is read at start and again when a payload names a key this process does not
    know, if the file changed since: a process started before a rotation decrypts what
    the new key encrypted without a restart (and from then on encrypts with it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ring = load_keys(path)
        self._stamp = _stamp(path)
        self._ciphers: dict[str, AESGCM] = {}

    @property
    def current_key_id(self) -> str:
        return self._ring.current

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        key_id = self._ring.current
        cipher = self._cipher(key_id)
        encoded = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), None)
            encoded.append(
                Payload(
                    metadata={ENCODING: ENCRYPTED, KEY_ID: key_id.encode()},
                    data=nonce + sealed,
                )
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decrypted(payload) for payload in payloads]

    def _decrypted(self, payload: Payload) -> Payload:
        if payload.metadata.get(ENCODING) != ENCRYPTED:
            return payload  # written in clear (before the codec was on): readable as is
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")[:70]
        cipher = self._cipher(key_id)
        data = payload.data
        if len(data) < NONCE_BYTES + TAG_BYTES:
            raise CodecError(
                f"a payload encrypted with key {key_id!r} is truncated ({len(data)} bytes)"
            )
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None)
        except InvalidTag:
            raise CodecError(
                f"a payload encrypted with key {key_id!r} does not authenticate: the key "
                f"under that id in {self.path} is not the one it was encrypted with, or the "
                "payload was altered"
            ) from None
        try:
            return Payload.FromString(plain)
        except DecodeError:
            raise CodecError(
                f"a payload encrypted with key {key_id!r} holds no payload once decrypted"
            ) from None

    def _cipher(self, key_id: str) -> AESGCM:
        cipher = self._ciphers.get(key_id)
        if cipher is not None:
            return cipher
        key = self._ring.keys.get(key_id)
        if key is None and self._reloaded():
            key = self._ring.keys.get(key_id)
        if key is None:
            raise CodecError(
                f"a payload is encrypted with key {key_id!r}, which the key ring {self.path} "
                f"does not hold (it holds {', '.join(sorted(self._ring.keys))})"
            )
        cipher = self._ciphers[key_id] = AESGCM(key)
        return cipher

    def _reloaded(self) -> bool:
        """Read the ring again if its file changed since it was read; whether it did."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        try:
            ring = load_keys(self.path)
        except ConfigError as err:
            log.warning("payload keys not reloaded, the old ring stays: %s", err)
            return False
        self._ring, self._stamp = ring, stamp
        log.info("payload key ring %s reloaded: current key %s", self.path, ring.current)
        return True


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten."""
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_ino, status.st_mtime_ns, status.st_size)


def encrypted_converter(path: Path) -> DataConverter:
    """The default data converter, with payloads encrypted by the key ring in `path`, and
    failure messages and stack traces moved into an encrypted payload too: they name coupons
    and users ("coupon demo:alice:1 not visible ...")."""
    return dataclasses.replace(
        DataConverter.default,
        payload_codec=EncryptionCodec(path),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


# ------------------------------------------------------------------ the command line


def add_commands(parser: argparse.ArgumentParser) -> None:
    """`init`, `rotate` and `show` under `parser` (this module's `main`, or starter.py's
    `codec`)."""
    sub = parser.add_subparsers(dest="codec_command", required=True)
    for name, help in (
        ("init", "create the key ring with one key, unless it exists"),
        ("rotate", "add a new key and make it current; the old ones keep decrypting"),
        ("show", "the key ring's key ids and which one is current (never the keys)"),
    ):
        command = sub.add_parser(name, help=help)
        command.add_argument(
            "--keys",
            type=Path,
            help="the key ring file (default: CODEC_KEYS_FILE, else DATA_DIR/codec-keys.json)",
        )


def run_command(args: argparse.Namespace, settings: Settings) -> str:
    """Run the command `add_commands` parsed; what to print. ConfigError for a bad file."""
    path: Path = args.keys or settings.codec_keys_file or settings.stack_codec_keys_file
    if args.codec_command == "init":
        existed = path.exists()
        ensure_keys(path)
        ring = load_keys(path)
        said = "exists, left as it is" if existed else "created"
        return f"{path}: {said}; current key {ring.current}"
    if args.codec_command == "rotate":
        key_id = rotate_keys(path)
        return (
            f"{path}: new current key {key_id} ({len(load_keys(path).keys)} keys).\n"
            "Processes read the ring at start, and again when they meet a key they do not "
            "know; restart the worker and the API to encrypt with the new key now. Copy the "
            "file to every machine that runs them first."
        )
    ring = load_keys(path)
    lines = [f"{path}: {len(ring.keys)} keys"]
    lines += [f"{key_id}{'  (current)' if key_id == ring.current else ''}" for key_id in ring.keys]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coupons.codec", description="The payload encryption key ring."
    )
    add_commands(parser)
    args = parser.parse_args(argv)
    try:
        print(run_command(args, Settings.from_env()))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
