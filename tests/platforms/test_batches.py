"""A batch's life at the simulator: its actions, its window, which batches send, and what the
platform's operator changes behind the service's back (the /sim control plane)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from coupons.platforms.base import (
    BatchAction,
    BatchStatus,
    PlatformBatch,
    PlatformBatchUnavailable,
    PlatformBudgetExhausted,
    PlatformError,
    PlatformRefused,
    SendRequest,
)
from coupons.platforms.generic.adapter import RestPlatform

from .conftest import SimControl, batch_spec, new_key, running_batch

CREATED, RUNNING, PAUSED = BatchStatus.CREATED, BatchStatus.RUNNING, BatchStatus.PAUSED
STOPPED, EXPIRED = BatchStatus.STOPPED, BatchStatus.EXPIRED
START, PAUSE, RESUME, STOP = (
    BatchAction.START,
    BatchAction.PAUSE,
    BatchAction.RESUME,
    BatchAction.STOP,
)

# The actions that lead a new batch to each status; an expired one is created past its window.
_PATHS: dict[BatchStatus, tuple[BatchAction, ...]] = {
    CREATED: (),
    RUNNING: (START,),
    PAUSED: (START, PAUSE),
    STOPPED: (START, STOP),
}


async def batch_in(platform: RestPlatform, status: BatchStatus) -> PlatformBatch:
    """A fresh batch in `status`, reached through the protocol only (no clock to turn)."""
    if status is EXPIRED:
        now = datetime.now(UTC)
        past = batch_spec(starts_at=now - timedelta(days=2), ends_at=now - timedelta(days=1))
        batch = await platform.create_batch(past)
    else:
        batch = await platform.create_batch(batch_spec())
        for action in _PATHS[status]:
            batch = await platform.change_batch(batch.batch_id, action)
    assert batch.status is status
    return batch


def send(batch: PlatformBatch, user: str | None = None) -> SendRequest:
    return SendRequest(batch.batch_id, user or new_key("user"), new_key("send"))


# From each status, where each action leads; None: refused with BATCH_STATE_INVALID. An action
# already in effect (start on running, stop on stopped...) is a no-op.
TRANSITIONS: dict[BatchStatus, dict[BatchAction, BatchStatus | None]] = {
    CREATED: {START: RUNNING, PAUSE: None, RESUME: None, STOP: STOPPED},
    RUNNING: {START: RUNNING, PAUSE: PAUSED, RESUME: RUNNING, STOP: STOPPED},
    PAUSED: {START: None, PAUSE: PAUSED, RESUME: RUNNING, STOP: STOPPED},
    STOPPED: {START: None, PAUSE: None, RESUME: None, STOP: STOPPED},
    EXPIRED: dict.fromkeys(BatchAction),
}


@pytest.mark.parametrize(
    ("status", "action", "after"),
    [
        (status, action, after)
        for status, row in TRANSITIONS.items()
        for action, after in row.items()
    ],
    ids=lambda value: str(value),
)
async def test_every_action_in_every_status(
    platform: RestPlatform, status: BatchStatus, action: BatchAction, after: BatchStatus | None
) -> None:
    batch = await batch_in(platform, status)

    if after is None:
        with pytest.raises(PlatformRefused) as refused:
            await platform.change_batch(batch.batch_id, action)
        assert refused.value.code == "BATCH_STATE_INVALID"
        assert f"cannot {action}" in refused.value.message and str(status) in refused.value.message
    else:
        assert (await platform.change_batch(batch.batch_id, action)).status is after

    assert (await platform.get_batch(batch.batch_id)).status is (after or status)


async def test_a_repeated_action_is_a_no_op(platform: RestPlatform) -> None:
    batch = await running_batch(platform)

    again = await platform.change_batch(batch.batch_id, START)
    paused = await platform.change_batch(batch.batch_id, PAUSE)
    paused_again = await platform.change_batch(batch.batch_id, PAUSE)

    assert again == batch
    assert paused_again == paused


async def test_an_action_names_what_it_cannot_do(platform: RestPlatform, sim: SimControl) -> None:
    batch = await platform.create_batch(batch_spec())

    with pytest.raises(PlatformRefused) as refused:
        await platform.change_batch(batch.batch_id, PAUSE)
    with pytest.raises(PlatformRefused) as unknown:
        await platform.change_batch("bat_nope", START)
    answer = await sim.http.post(f"/v1/batches/{batch.batch_id}/archive")

    assert refused.value.message == "cannot pause a created batch"
    assert unknown.value.code == "BATCH_NOT_FOUND"
    assert answer.status_code == 404


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (PAUSED, PlatformBatchUnavailable, "BATCH_PAUSED"),
        (CREATED, PlatformRefused, "BATCH_NOT_RUNNING"),
        (STOPPED, PlatformRefused, "BATCH_NOT_RUNNING"),
        (EXPIRED, PlatformRefused, "BATCH_NOT_RUNNING"),
    ],
    ids=lambda value: str(getattr(value, "__name__", value)),
)
async def test_only_a_running_batch_sends(
    platform: RestPlatform,
    sim: SimControl,
    status: BatchStatus,
    error: type[PlatformError],
    code: str,
) -> None:
    batch = await batch_in(platform, status)
    before = await sim.stats()

    with pytest.raises(PlatformError) as raised:
        await platform.send_coupon(send(batch))

    # Exactly this class: a paused batch is not out of budget, and a refusal is final.
    assert type(raised.value) is error
    assert raised.value.code == code
    assert (await sim.stats())["coupons"] == before["coupons"]
    assert (await platform.get_batch(batch.batch_id)).remaining == batch.quantity


async def test_a_running_batch_does_not_send_before_its_window(platform: RestPlatform) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    batch = await running_batch(platform, batch_spec(starts_at=later))

    # Not a refusal: the window opens later, and the coupon waits for it.
    with pytest.raises(PlatformBatchUnavailable) as early:
        await platform.send_coupon(send(batch))

    assert batch.status is RUNNING
    assert early.value.code == "BATCH_NOT_STARTED"
    assert "starts at" in early.value.message


async def test_a_paused_batch_sends_again_once_resumed(platform: RestPlatform) -> None:
    batch = await running_batch(platform)
    request = send(batch)
    await platform.change_batch(batch.batch_id, PAUSE)
    with pytest.raises(PlatformBatchUnavailable):
        await platform.send_coupon(request)

    await platform.change_batch(batch.batch_id, RESUME)
    coupon = await platform.send_coupon(request)

    assert coupon.batch_id == batch.batch_id
    assert (await platform.get_batch(batch.batch_id)).remaining == 9


async def test_a_replay_answers_its_coupon_whatever_the_batch_became(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform)
    request = send(batch)
    coupon = await platform.send_coupon(request)

    await platform.change_batch(batch.batch_id, PAUSE)
    after_pause = await platform.send_coupon(request)
    await platform.change_batch(batch.batch_id, STOP)
    after_stop = await platform.send_coupon(request)
    await sim.change_batch(batch.batch_id, status="expired")
    after_expiry = await platform.send_coupon(request)

    # A replay is not a new send: it reports the one that happened.
    assert after_pause == after_stop == after_expiry == coupon
    assert (await platform.get_batch(batch.batch_id)).remaining == 9


async def test_a_batch_reads_expired_once_its_window_is_over(
    platform: RestPlatform, sim: SimControl
) -> None:
    running = await running_batch(platform, batch_spec(valid_days=1))
    stopped = await batch_in(platform, STOPPED)

    await sim.knobs(clock_offset_s=8 * 86_400)

    assert (await platform.get_batch(running.batch_id)).status is EXPIRED
    # Stopped by hand stays stopped: its window ending changes nothing.
    assert (await platform.get_batch(stopped.batch_id)).status is STOPPED
    with pytest.raises(PlatformRefused) as on_send:
        await platform.send_coupon(send(running))
    with pytest.raises(PlatformRefused) as on_stop:
        await platform.change_batch(running.batch_id, STOP)
    assert on_send.value.code == "BATCH_NOT_RUNNING"
    assert on_stop.value.code == "BATCH_STATE_INVALID"


# ---------------------------------------------------------------- windows


async def test_coupon_validity_never_outlives_the_batch_window(platform: RestPlatform) -> None:
    now = datetime.now(UTC)
    short = batch_spec(
        valid_days=7, starts_at=now - timedelta(minutes=1), ends_at=now + timedelta(days=1)
    )
    long = batch_spec(
        valid_days=2, starts_at=now - timedelta(minutes=1), ends_at=now + timedelta(days=30)
    )
    short_batch = await running_batch(platform, short)
    long_batch = await running_batch(platform, long)

    clamped = await platform.send_coupon(send(short_batch))
    full = await platform.send_coupon(send(long_batch))

    assert (short_batch.starts_at, short_batch.ends_at) == (short.starts_at, short.ends_at)
    assert clamped.valid_until == short.ends_at
    assert full.valid_until - full.sent_at == timedelta(days=2)


async def test_default_window_runs_valid_days_from_creation(platform: RestPlatform) -> None:
    before = datetime.now(UTC)
    batch = await platform.create_batch(batch_spec(valid_days=3))

    assert before <= batch.starts_at <= datetime.now(UTC)
    assert batch.ends_at - batch.starts_at == timedelta(days=3)


async def test_a_window_that_ends_before_it_starts_is_refused(
    platform: RestPlatform, sim: SimControl
) -> None:
    now = datetime.now(UTC)
    before = await sim.stats()
    bad = (
        batch_spec(starts_at=now, ends_at=now),
        batch_spec(starts_at=now, ends_at=now - timedelta(hours=1)),
        batch_spec(ends_at=now - timedelta(hours=1)),  # before its default start: now
    )

    for spec in bad:
        with pytest.raises(PlatformRefused) as refused:
            await platform.create_batch(spec)
        assert refused.value.code == "INVALID_REQUEST"
        assert "ends_at" in refused.value.message

    assert (await sim.stats())["batches"] == before["batches"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("starts_at", "2030-01-01T00:00:00"),  # no timezone: the platform cannot guess it
        ("ends_at", "next tuesday"),
        ("starts_at", 1_900_000_000),
    ],
)
async def test_a_window_time_must_be_iso_with_a_timezone(
    sim: SimControl, field: str, value: Any
) -> None:
    body = {
        "request_key": new_key("batch"),
        "name": "n",
        "face_value_cents": 100,
        "min_spend_cents": 0,
        "quantity": 1,
        "valid_days": 1,
        "per_user_limit": 1,
        field: value,
    }

    answer = await sim.http.post("/v1/batches", json=body)

    assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_REQUEST")
    assert field in answer.json()["message"]


async def test_a_retried_create_finds_the_batch_it_asked_for(
    platform: RestPlatform, sim: SimControl
) -> None:
    plain = batch_spec()
    first = await platform.create_batch(plain)
    # An hour later the default window of a new request would differ; a retry must not care.
    await sim.knobs(clock_offset_s=3600)
    retried = await platform.create_batch(plain)
    # Nor must it care that the operator changed the budget since.
    await sim.change_batch(first.batch_id, remaining=3)
    retried_after_change = await platform.create_batch(plain)

    assert retried.batch_id == retried_after_change.batch_id == first.batch_id
    assert (retried.starts_at, retried.ends_at) == (first.starts_at, first.ends_at)


async def test_a_retried_create_with_a_window_compares_the_window(platform: RestPlatform) -> None:
    now = datetime.now(UTC)
    spec = batch_spec(starts_at=now, ends_at=now + timedelta(days=3))
    first = await platform.create_batch(spec)
    assert spec.starts_at is not None
    # The same instants written in another timezone are the same window.
    shanghai = timezone(timedelta(hours=8))
    same = replace(spec, starts_at=spec.starts_at.astimezone(shanghai))

    assert (await platform.create_batch(same)).batch_id == first.batch_id
    for other in (
        replace(spec, ends_at=now + timedelta(days=4)),
        replace(spec, starts_at=None, ends_at=None),
    ):
        with pytest.raises(PlatformRefused) as refused:
            await platform.create_batch(other)
        assert refused.value.code == "IDEMPOTENCY_KEY_REUSED"


# ---------------------------------------------------------------- the operator's hand


async def test_a_budget_change_at_the_platform_shows_in_a_sync(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec(quantity=10))
    for _ in range(2):
        await platform.send_coupon(send(batch))

    raised = await sim.change_batch(batch.batch_id, remaining=50)
    synced = await platform.get_batch(batch.batch_id)
    await sim.change_batch(batch.batch_id, remaining=0)
    with pytest.raises(PlatformBudgetExhausted):
        await platform.send_coupon(send(batch))
    cut = await platform.get_batch(batch.batch_id)
    await sim.change_batch(batch.batch_id, remaining=1)
    await platform.send_coupon(send(batch))

    assert raised.status_code == 200 and raised.json()["remaining"] == 50
    # The total follows the budget: always sent + remaining.
    assert (synced.remaining, synced.quantity) == (50, 52)
    assert (cut.remaining, cut.quantity) == (0, 2)
    assert (await platform.get_batch(batch.batch_id)).remaining == 0


async def test_the_operator_pauses_resumes_and_stops_a_batch(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform)

    await sim.change_batch(batch.batch_id, status="paused")
    paused = await platform.get_batch(batch.batch_id)
    with pytest.raises(PlatformBatchUnavailable) as on_pause:
        await platform.send_coupon(send(batch))
    await sim.change_batch(batch.batch_id, status="running")
    await platform.send_coupon(send(batch))
    await sim.change_batch(batch.batch_id, status="stopped")
    with pytest.raises(PlatformRefused) as on_stop:
        await platform.send_coupon(send(batch))

    assert paused.status is PAUSED
    assert on_pause.value.code == "BATCH_PAUSED"
    assert on_stop.value.code == "BATCH_NOT_RUNNING"
    assert (await platform.get_batch(batch.batch_id)).status is STOPPED


async def test_an_expiry_by_the_operator_ends_the_window_now(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform)
    user = new_key("user")
    coupon = await platform.send_coupon(send(batch, user))

    await sim.change_batch(batch.batch_id, status="expired")
    expired = await platform.get_batch(batch.batch_id)
    with pytest.raises(PlatformRefused) as on_send:
        await platform.send_coupon(send(batch))
    seen = await platform.get_coupon(user, coupon.coupon_id)

    assert expired.status is EXPIRED
    assert expired.ends_at <= datetime.now(UTC) < batch.ends_at
    assert on_send.value.code == "BATCH_NOT_RUNNING"
    # A coupon already in a wallet keeps the validity it was given.
    assert seen is not None and seen.valid_until == coupon.valid_until


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"remaining": 5, "status": "archived"}, "status"),
        ({"remaining": -1, "status": "paused"}, "remaining"),
        ({"remaining": "7", "status": "paused"}, "remaining"),
        ({"remaining": True}, "remaining"),
        ({"status": None}, "status"),
        ({"remaining": 5, "colour": "red"}, "colour"),
        ({}, "remaining"),
    ],
)
async def test_an_operator_change_with_a_bad_field_changes_nothing(
    platform: RestPlatform, sim: SimControl, body: dict[str, Any], field: str
) -> None:
    batch = await running_batch(platform)

    answer = await sim.change_batch(batch.batch_id, **body)

    assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_REQUEST")
    assert field in answer.json()["message"]
    assert await platform.get_batch(batch.batch_id) == batch


async def test_the_operator_cannot_bring_back_a_finished_batch(
    platform: RestPlatform, sim: SimControl
) -> None:
    stopped = await batch_in(platform, STOPPED)
    expired = await batch_in(platform, EXPIRED)

    for batch in (stopped, expired):
        answer = await sim.change_batch(batch.batch_id, status="running", remaining=99)
        assert (answer.status_code, answer.json()["code"]) == (409, "BATCH_STATE_INVALID")
        assert await platform.get_batch(batch.batch_id) == batch


async def test_an_operator_change_to_an_unknown_batch_or_not_json_is_refused(
    sim: SimControl,
) -> None:
    unknown = await sim.change_batch("bat_nope", remaining=1)
    not_json = await sim.http.put("/sim/batches/bat_nope", content=b"nope")

    assert (unknown.status_code, unknown.json()["code"]) == (404, "BATCH_NOT_FOUND")
    assert (not_json.status_code, not_json.json()["code"]) == (400, "INVALID_REQUEST")
