"""The payload codec: AES-GCM round trips, key rotation, refusals, the key ring file, and a
real coupon run whose history holds no user id or receipt in clear outside the search
attributes (which must stay clear to be searched)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from psycopg_pool import AsyncConnectionPool
from temporalio.api.common.v1 import Payload, SearchAttributes
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import History, MarkerRecordedEventAttributes
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from app.workers import workflow_runner
from coupons.codec import (
    ENCRYPTED,
    KEY_ID,
    CodecError,
    EncryptionCodec,
    encrypted_converter,
    ensure_keys,
    load_keys,
    main,
    rotate_keys,
)
from coupons.config import ConfigError, Settings
from coupons.model import PLATFORM_COUPON_ID, USER_ID, CouponInput, Receipt, TaskCompletion
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    TASK,
    claims_of,
    close_workflows,
    handle_of,
    new_campaign,
    new_id,
    published_search_attributes,
    running_workers,
    wait_for_state,
)
from workflows.user_coupon import UserCouponWorkflow

HISTORIES = Path(__file__).parent / "histories"
AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
USER = "user-4f2a9c"
COUPON = CouponInput(
    coupon_id=f"spring:{USER}:1",
    campaign_id="spring",
    user_id=USER,
    batch_id="b-spring",
    required_tasks=[TASK],
    claimed_at=AT,
    task_deadline=AT + timedelta(days=7),
)
RECEIPT = Receipt(
    platform_coupon_id="pc-93c1d7e2",
    idempotency_key="idem-5b0e",
    sent_at=AT,
    valid_until=AT + timedelta(days=30),
    confirmed_at=AT,
    raw={"coupon_id": "pc-93c1d7e2", "user_id": USER},
)
# Every kind of value the workflows hand Temporal: dataclass inputs and results, None
# (an activity without a result), strings (update answers, signal names).
VALUES: list[Any] = [COUPON, RECEIPT, TaskCompletion(TASK), None, USER]
TYPES: list[type] = [CouponInput, Receipt, TaskCompletion, type(None), str]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "codec-keys.json"
    ensure_keys(path)
    return path


def codec_of(converter: DataConverter) -> EncryptionCodec:
    assert isinstance(converter.payload_codec, EncryptionCodec)
    return converter.payload_codec


# ----------------------------------------------------------------- round trips


async def test_every_value_the_workflows_use_round_trips_encrypted(keys: Path) -> None:
    converter = encrypted_converter(keys)
    payloads = await converter.encode(VALUES)
    current = load_keys(keys).current
    for payload in payloads:
        assert payload.metadata["encoding"] == ENCRYPTED
        assert payload.metadata[KEY_ID] == current.encode()
        for secret in (USER, RECEIPT.platform_coupon_id, b"json/plain"):
            assert (secret.encode() if isinstance(secret, str) else secret) not in payload.data
    assert await converter.decode(payloads, TYPES) == VALUES
    # A fresh nonce each time: the same value never encrypts to the same bytes.
    again = await converter.encode(VALUES)
    assert all(a.data != b.data for a, b in zip(payloads, again, strict=True))


async def test_payloads_in_clear_pass_through(keys: Path) -> None:
    """Histories written before the codec was on stay readable."""
    clear = await DataConverter.default.encode(VALUES)
    codec = codec_of(encrypted_converter(keys))
    assert await codec.decode(clear) == clear
    mixed = [clear[0], *(await codec.encode(clear[1:]))]
    assert await codec.decode(mixed) == clear


# ----------------------------------------------------------------- rotation


async def test_a_rotated_ring_decrypts_the_old_key_and_encrypts_with_the_new(keys: Path) -> None:
    old_id = load_keys(keys).current
    old = await encrypted_converter(keys).encode(VALUES)
    new_id_ = rotate_keys(keys)
    assert new_id_ != old_id
    ring = load_keys(keys)
    assert (ring.current, set(ring.keys)) == (new_id_, {old_id, new_id_})
    rotated = encrypted_converter(keys)
    new = await rotated.encode(VALUES)
    assert {p.metadata[KEY_ID] for p in new} == {new_id_.encode()}
    assert await rotated.decode(old, TYPES) == VALUES
    assert await rotated.decode(new, TYPES) == VALUES


async def test_a_running_codec_reads_the_ring_again_when_it_meets_a_new_key(keys: Path) -> None:
    """A worker started before a rotation decrypts what the new key encrypted, and from
    then on encrypts with it."""
    running = encrypted_converter(keys)
    new_key = rotate_keys(keys)
    new = await encrypted_converter(keys).encode(VALUES)
    assert await running.decode(new, TYPES) == VALUES
    assert codec_of(running).current_key_id == new_key


# ----------------------------------------------------------------- refusals


async def test_another_key_ring_refuses_naming_the_key_id(keys: Path, tmp_path: Path) -> None:
    payloads = await encrypted_converter(keys).encode([USER])
    key_id = load_keys(keys).current
    other = tmp_path / "other-keys.json"
    ensure_keys(other)
    with pytest.raises(CodecError) as refused:
        await codec_of(encrypted_converter(other)).decode(payloads)
    message = str(refused.value)
    assert key_id in message and str(other) in message and "does not hold" in message
    assert load_keys(other).current in message  # what it holds, by id


async def test_a_wrong_key_under_the_same_id_refuses(keys: Path, tmp_path: Path) -> None:
    payloads = await encrypted_converter(keys).encode([USER])
    ring = load_keys(keys)
    impostor = tmp_path / "impostor-keys.json"
    wrong_key = base64.b64encode(bytes(32)).decode()
    impostor.write_text(json.dumps({"current": ring.current, "keys": {ring.current: wrong_key}}))
    with pytest.raises(CodecError, match="does not authenticate") as refused:
        await codec_of(encrypted_converter(impostor)).decode(payloads)
    assert ring.current in str(refused.value)
    assert wrong_key not in str(refused.value)


async def test_a_tampered_or_truncated_payload_refuses(keys: Path) -> None:
    codec = codec_of(encrypted_converter(keys))
    [payload] = await codec.encode(await DataConverter.default.encode([USER]))
    flipped = bytearray(payload.data)
    flipped[20] ^= 1
    tampered = Payload(metadata=payload.metadata, data=bytes(flipped))
    with pytest.raises(CodecError, match="does not authenticate"):
        await codec.decode([tampered])
    truncated = Payload(metadata=payload.metadata, data=payload.data[:20])
    with pytest.raises(CodecError, match="truncated"):
        await codec.decode([truncated])


# ----------------------------------------------------------------- the key ring file


def test_ensure_keys_creates_an_owner_only_ring_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "codec-keys.json"
    ensure_keys(path)
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_text()
    ring = load_keys(path)
    assert list(ring.keys) == [ring.current] and len(ring.keys[ring.current]) == 32
    ensure_keys(path)
    assert path.read_text() == first
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert base64.b64encode(ring.keys[ring.current]).decode() not in repr(ring)


KEY = base64.b64encode(b"k" * 32).decode()
SHORT = base64.b64encode(b"k" * 16).decode()


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ("[]", "must be a JSON object"),
        ('{"current": "a", "keys": {}}', "'keys' must be a non-empty object"),
        (json.dumps({"current": "b", "keys": {"a": KEY}}), "'current' must name one of its keys"),
        (json.dumps({"current": "a", "keys": {"a": SHORT}}), "key 'a' is 16 bytes"),
        (
            json.dumps({"current": "a", "keys": {"a": KEY[:-3] + "!!="}}),
            "key 'a' is not a base64 string",
        ),
        (json.dumps({"current": "a b", "keys": {"a b": KEY}}), "key id 'a b' must be"),
    ],
)
def test_a_bad_key_ring_is_refused_naming_the_file_never_a_key(
    tmp_path: Path, content: str | None, complaint: str
) -> None:
    path = tmp_path / "codec-keys.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_keys(path)
    message = str(refused.value)
    assert str(path) in message and complaint in message, message
    assert KEY not in message and SHORT not in message and KEY[:-3] not in message


def test_the_command_line_shows_and_rotates_the_ring(
    keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = load_keys(keys).current
    assert main(["rotate", "--keys", str(keys)]) == 0
    ring = load_keys(keys)
    assert ring.current != first and set(ring.keys) == {first, ring.current}
    assert keys.stat().st_mode & 0o777 == 0o600
    assert main(["show", "--keys", str(keys)]) == 0
    shown = capsys.readouterr().out
    assert f"{ring.current}  (current)" in shown and first in shown
    assert not any(base64.b64encode(key).decode() in shown for key in ring.keys.values())
    assert main(["show", "--keys", str(keys.with_name("missing.json"))]) == 2


async def test_python_m_coupons_codec_rotates(keys: Path) -> None:
    before = set(load_keys(keys).keys)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coupons.codec", "rotate", "--keys", str(keys),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode == 0
    after = load_keys(keys)
    assert set(after.keys) - before == {after.current}
    assert f"new current key {after.current}" in output.decode()


# ----------------------------------------------------------------- histories


def replayer(keys: Path) -> Replayer:
    return Replayer(
        workflows=[UserCouponWorkflow],
        workflow_runner=workflow_runner(),
        data_converter=encrypted_converter(keys),
    )


async def test_the_stored_histories_in_clear_replay_through_the_codec(keys: Path) -> None:
    """The corpus was recorded without the codec: turning it on keeps them replayable."""
    files = sorted(HISTORIES.glob("*.json"))
    assert files
    for path in files:
        history = WorkflowHistory.from_json(path.stem, path.read_text())
        await replayer(keys).replay_workflow(history)


async def test_a_coupon_run_keeps_user_ids_and_receipts_out_of_history(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    keys: Path,
) -> None:
    config = dev_env.client.config()
    config["data_converter"] = encrypted_converter(keys)
    encrypted = Client(**config)
    async with running_workers(encrypted, pool, settings):
        campaign = await new_campaign(pool, platform)
        user = new_id("user")
        claimed = await claims_of(pool, encrypted, settings).claim(campaign.id, user)
        handle = handle_of(encrypted, claimed.workflow_id)
        await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
        status = await wait_for_state(handle, "issued")
    try:
        assert status.receipt is not None
        secrets = [user, status.receipt.platform_coupon_id, status.receipt.idempotency_key]
        # Read as someone without the keys reads it: Temporal's own store.
        history = await dev_env.client.get_workflow_handle(claimed.workflow_id).fetch_history()

        payloads = list(_payloads(History(events=history.events)))
        assert len(payloads) >= 8  # input, update, activity inputs and results, summaries
        assert all(p.metadata["encoding"] == ENCRYPTED for p in payloads)
        outside = History(events=history.events)
        _drop_workflow_ids_and_search_attributes(outside)
        stored = outside.SerializeToString()
        assert not [s for s in secrets if s.encode() in stored]
        # The clear copies are the search attributes, by design: to be found in the Web UI.
        indexed = _search_attributes(history)
        assert [indexed[USER_ID], indexed[PLATFORM_COUPON_ID]] == secrets[:2]

        started = history.events[0].workflow_execution_started_event_attributes
        with pytest.raises(KeyError, match="binary/encrypted"):
            await DataConverter.default.decode(started.input.payloads, [CouponInput])
        [coupon] = await encrypted.data_converter.decode(started.input.payloads, [CouponInput])
        assert (coupon.user_id, coupon.coupon_id) == (user, claimed.coupon_id)
        await replayer(keys).replay_workflow(history)
    finally:
        await close_workflows(dev_env.client, [claimed.workflow_id])


def _payloads(message: Message) -> list[Payload]:
    """Every payload in `message` the codec sees: not search attributes, nor the SDK's own
    patch markers (a patch id, which the SDK reads without the data converter)."""
    found: list[Payload] = []
    for value in _children(message):
        if isinstance(value, Payload):
            found.append(value)
        elif isinstance(value, MarkerRecordedEventAttributes):
            if value.marker_name != "core_patch":
                found.extend(_payloads(value))
        elif not isinstance(value, SearchAttributes):
            found.extend(_payloads(value))
    return found


def _drop_workflow_ids_and_search_attributes(message: Message) -> None:
    for descriptor, _ in message.ListFields():
        if (
            descriptor.name == "workflow_id"
            or descriptor.message_type is SearchAttributes.DESCRIPTOR
        ):
            message.ClearField(descriptor.name)
    for child in _children(message):
        _drop_workflow_ids_and_search_attributes(child)


def _children(message: Message) -> list[Message]:
    """The messages directly inside `message`: fields, repeated fields, map values."""
    children: list[Message] = []
    for descriptor, value in message.ListFields():
        if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        entry = descriptor.message_type
        assert entry is not None
        if entry.GetOptions().map_entry:
            if entry.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                children.extend(value.values())
        elif descriptor.is_repeated:
            children.extend(value)
        else:
            children.append(value)
    return children


def _search_attributes(history: WorkflowHistory) -> dict[Any, Any]:
    """The search attributes as the workflow last set each one."""
    return {
        pair.key: pair.value
        for attributes in published_search_attributes(history)
        for pair in attributes
    }


async def test_a_failure_message_is_kept_encrypted_too(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
    keys: Path,
) -> None:
    """Failure messages name coupons and users: with the codec they travel as an encrypted
    payload ("Encoded failure" in clear), and read back whole through it."""
    config = dev_env.client.config()
    config["data_converter"] = encrypted_converter(keys)
    encrypted = Client(**config)
    user = new_id("restricted")
    # The simulator fixture resets its knobs after the test.
    (await simulator.put("/sim/knobs", json={"restricted_users": [user]})).raise_for_status()
    async with running_workers(encrypted, pool, settings):
        campaign = await new_campaign(pool, platform)
        claimed = await claims_of(pool, encrypted, settings).claim(campaign.id, user)
        handle = handle_of(encrypted, claimed.workflow_id)
        await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion(TASK))
        await wait_for_state(handle, "failed")
    try:
        history = await dev_env.client.get_workflow_handle(claimed.workflow_id).fetch_history()
        [failed] = [
            e.activity_task_failed_event_attributes.failure
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
        ]
        assert failed.message == "Encoded failure"
        assert failed.encoded_attributes.metadata["encoding"] == ENCRYPTED
        assert b"USER_RESTRICTED" not in failed.SerializeToString()
        error = await encrypted.data_converter.decode_failure(failed)
        assert "USER_RESTRICTED" in str(error), error
    finally:
        await close_workflows(dev_env.client, [claimed.workflow_id])
