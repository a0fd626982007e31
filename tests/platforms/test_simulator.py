"""The simulator's behaviour, observed through the RestPlatform adapter over real HTTP."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from coupons.platforms.base import (
    BatchStatus,
    PlatformBudgetExhausted,
    PlatformCouponStatus,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
)
from coupons.platforms.generic.adapter import RestPlatform

from .conftest import (
    SimControl,
    StartSimulator,
    batch_spec,
    new_key,
    running_batch,
    simulator_process,
)


async def test_batch_create_is_idempotent(platform: RestPlatform, sim: SimControl) -> None:
    spec = batch_spec(quantity=5)
    before = await sim.stats()

    first = await platform.create_batch(spec)
    again = await platform.create_batch(spec)

    assert again.batch_id == first.batch_id
    assert (first.status, first.quantity, first.remaining) == (BatchStatus.CREATED, 5, 5)
    assert (await sim.stats())["batches"] == before["batches"] + 1


async def test_batch_request_key_reused_for_another_batch_is_refused(
    platform: RestPlatform,
) -> None:
    spec = batch_spec(quantity=5)
    await platform.create_batch(spec)
    other = batch_spec(quantity=6)

    with pytest.raises(PlatformRefused) as refused:
        await platform.create_batch(replace(other, request_key=spec.request_key))

    assert refused.value.code == "IDEMPOTENCY_KEY_REUSED"


async def test_invalid_batch_is_refused_naming_the_field(platform: RestPlatform) -> None:
    with pytest.raises(PlatformRefused) as refused:
        await platform.create_batch(batch_spec(quantity=0))

    assert refused.value.code == "INVALID_REQUEST"
    assert "quantity" in refused.value.message


async def test_unknown_batch_is_refused(platform: RestPlatform) -> None:
    with pytest.raises(PlatformRefused) as on_get:
        await platform.get_batch("bat_nope")
    with pytest.raises(PlatformRefused) as on_send:
        await platform.send_coupon(SendRequest("bat_nope", "u1", new_key("send")))

    assert on_get.value.code == on_send.value.code == "BATCH_NOT_FOUND"


async def test_send_is_idempotent(platform: RestPlatform, sim: SimControl) -> None:
    batch = await running_batch(platform, batch_spec(quantity=3))
    request = SendRequest(batch.batch_id, new_key("user"), new_key("send"))
    before = await sim.stats()

    first = await platform.send_coupon(request)
    again = await platform.send_coupon(request)

    after = await sim.stats()
    assert again.coupon_id == first.coupon_id
    assert again.raw == first.raw
    assert (await platform.get_batch(batch.batch_id)).remaining == 2
    assert after["sends_applied"] - before["sends_applied"] == 1
    assert after["sends_replayed"] - before["sends_replayed"] == 1


async def test_twenty_concurrent_sends_with_one_key_make_one_coupon(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec(quantity=50, per_user_limit=50))
    request = SendRequest(batch.batch_id, new_key("user"), new_key("send"))
    before = await sim.stats()

    coupons = await asyncio.gather(*(platform.send_coupon(request) for _ in range(20)))

    after = await sim.stats()
    assert len({coupon.coupon_id for coupon in coupons}) == 1
    assert after["coupons"] - before["coupons"] == 1
    assert after["sends_applied"] - before["sends_applied"] == 1
    assert after["sends_replayed"] - before["sends_replayed"] == 19
    assert (await platform.get_batch(batch.batch_id)).remaining == 49


async def test_idempotency_key_reused_with_another_user_or_batch_is_refused(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec())
    other_batch = await running_batch(platform, batch_spec())
    key = new_key("send")
    await platform.send_coupon(SendRequest(batch.batch_id, "alice", key))
    before = await sim.stats()

    with pytest.raises(PlatformRefused) as other_user:
        await platform.send_coupon(SendRequest(batch.batch_id, "bob", key))
    with pytest.raises(PlatformRefused) as other_batch_refused:
        await platform.send_coupon(SendRequest(other_batch.batch_id, "alice", key))

    assert other_user.value.code == other_batch_refused.value.code == "IDEMPOTENCY_KEY_REUSED"
    assert (await sim.stats())["coupons"] == before["coupons"]


async def test_budget_exhausted_raises_budget_exhausted(platform: RestPlatform) -> None:
    batch = await running_batch(platform, batch_spec(quantity=1))
    await platform.send_coupon(SendRequest(batch.batch_id, new_key("user"), new_key("send")))

    with pytest.raises(PlatformBudgetExhausted) as exhausted:
        await platform.send_coupon(SendRequest(batch.batch_id, new_key("user"), new_key("send")))

    assert exhausted.value.code == "BUDGET_EXHAUSTED"
    assert (await platform.get_batch(batch.batch_id)).remaining == 0


async def test_user_limit_reached_is_refused(platform: RestPlatform) -> None:
    batch = await running_batch(platform, batch_spec(per_user_limit=2))
    user = new_key("user")
    for _ in range(2):
        await platform.send_coupon(SendRequest(batch.batch_id, user, new_key("send")))

    with pytest.raises(PlatformRefused) as refused:
        await platform.send_coupon(SendRequest(batch.batch_id, user, new_key("send")))

    assert refused.value.code == "USER_LIMIT_REACHED"
    assert (await platform.get_batch(batch.batch_id)).remaining == 8


async def test_restricted_user_is_refused_with_code(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec())
    await sim.knobs(restricted_users=["mallory"])

    with pytest.raises(PlatformRefused) as refused:
        await platform.send_coupon(SendRequest(batch.batch_id, "mallory", new_key("send")))

    assert refused.value.code == "USER_RESTRICTED"
    assert (await platform.get_batch(batch.batch_id)).remaining == 10


async def test_lookup_lag_hides_a_new_coupon_then_shows_it(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec())
    await sim.knobs(lookup_lag_s=1.0)
    coupon = await platform.send_coupon(SendRequest(batch.batch_id, "lag", new_key("send")))
    before = await sim.stats()

    assert await platform.get_coupon("lag", coupon.coupon_id) is None
    assert (await sim.stats())["lookups_not_found"] == before["lookups_not_found"] + 1
    await asyncio.sleep(1.1)
    visible = await platform.get_coupon("lag", coupon.coupon_id)

    assert visible is not None
    assert visible.coupon_id == coupon.coupon_id
    assert visible.status is PlatformCouponStatus.SENT


async def test_use_marks_the_coupon_used(platform: RestPlatform, sim: SimControl) -> None:
    batch = await running_batch(platform, batch_spec())
    coupon = await platform.send_coupon(SendRequest(batch.batch_id, "till", new_key("send")))

    used = await sim.use(coupon.coupon_id)
    used_again = await sim.use(coupon.coupon_id)
    seen = await platform.get_coupon("till", coupon.coupon_id)

    assert used.status_code == used_again.status_code == 200
    assert used.json()["status"] == "used"
    assert used_again.json() == used.json()
    assert seen is not None
    assert seen.status is PlatformCouponStatus.USED
    assert seen.used_at is not None
    assert (await sim.use("cpn_nope")).json()["code"] == "COUPON_NOT_FOUND"


async def test_coupon_expires_after_its_validity(platform: RestPlatform, sim: SimControl) -> None:
    batch = await running_batch(platform, batch_spec(valid_days=1))
    coupon = await platform.send_coupon(SendRequest(batch.batch_id, "late", new_key("send")))
    await sim.knobs(clock_offset_s=86_400 + 60)

    seen = await platform.get_coupon("late", coupon.coupon_id)
    use = await sim.use(coupon.coupon_id)

    assert seen is not None
    assert seen.status is PlatformCouponStatus.EXPIRED
    assert (use.status_code, use.json()["code"]) == (409, "COUPON_EXPIRED")


async def test_latency_is_added_to_every_v1_answer(platform: RestPlatform, sim: SimControl) -> None:
    batch = await platform.create_batch(batch_spec())
    await sim.knobs(latency_ms=300)

    started = time.monotonic()
    await platform.get_batch(batch.batch_id)
    assert await platform.get_coupon("nobody", "cpn_nope") is None

    assert time.monotonic() - started >= 0.6


async def test_seeded_error_injection_repeats(platform: RestPlatform, sim: SimControl) -> None:
    batch = await running_batch(platform, batch_spec(quantity=50))

    async def outcomes() -> list[bool]:
        await sim.knobs(seed=42, error_rate=0.5)
        failed = []
        for _ in range(12):
            request = SendRequest(batch.batch_id, new_key("user"), new_key("send"))
            try:
                await platform.send_coupon(request)
                failed.append(False)
            except PlatformUnavailable:
                failed.append(True)
        return failed

    first = await outcomes()

    assert await outcomes() == first
    assert True in first and False in first


async def test_state_survives_a_restart(start_simulator: StartSimulator) -> None:
    process = start_simulator()
    platform = RestPlatform(process.url, timeout_s=5.0)
    try:
        spec = batch_spec(quantity=4)
        batch = await running_batch(platform, spec)
        request = SendRequest(batch.batch_id, "durable", new_key("send"))
        coupon = await platform.send_coupon(request)
        await platform.aclose()

        await asyncio.to_thread(process.restart)
        platform = RestPlatform(process.url, timeout_s=5.0)

        assert (await platform.create_batch(spec)).batch_id == batch.batch_id
        assert (await platform.get_batch(batch.batch_id)).remaining == 3
        seen = await platform.get_coupon("durable", coupon.coupon_id)
        assert seen is not None and seen.sent_at == coupon.sent_at
        assert (await platform.send_coupon(request)).coupon_id == coupon.coupon_id
        assert (await platform.get_batch(batch.batch_id)).remaining == 3
    finally:
        await platform.aclose()


async def test_control_plane_lists_a_batch_coupons_with_their_keys(
    platform: RestPlatform, sim: SimControl
) -> None:
    batch = await running_batch(platform, batch_spec())
    keys = [new_key("send"), new_key("send")]
    sent = [
        await platform.send_coupon(SendRequest(batch.batch_id, f"user-{i}", key))
        for i, key in enumerate(keys)
    ]
    await platform.send_coupon(SendRequest(batch.batch_id, "user-0", keys[0]))  # replayed
    listed = (await sim.http.get(f"/sim/batches/{batch.batch_id}/coupons")).json()["coupons"]
    assert [c["coupon_id"] for c in listed] == [c.coupon_id for c in sent]
    assert [c["idempotency_key"] for c in listed] == keys


# The schema of data files written before batches had windows and a lifecycle.
_OLD_SCHEMA = """
CREATE TABLE batches (
    batch_id TEXT PRIMARY KEY, request_key TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    status TEXT NOT NULL, face_value_cents INTEGER NOT NULL, min_spend_cents INTEGER NOT NULL,
    quantity INTEGER NOT NULL, remaining INTEGER NOT NULL CHECK (remaining >= 0),
    valid_days INTEGER NOT NULL, per_user_limit INTEGER NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE coupons (
    coupon_id TEXT PRIMARY KEY, idempotency_key TEXT NOT NULL UNIQUE,
    batch_id TEXT NOT NULL REFERENCES batches (batch_id), user_id TEXT NOT NULL,
    sent_at TEXT NOT NULL, valid_until TEXT NOT NULL, used_at TEXT
);
"""


async def test_an_old_data_file_keeps_its_batches_sending(tmp_path: Path) -> None:
    data = tmp_path / "old.sqlite3"
    spec = batch_spec(quantity=4, valid_days=7)
    created = datetime.now(UTC)
    with closing(sqlite3.connect(data)) as db, db:
        db.executescript(_OLD_SCHEMA)
        db.execute(
            "INSERT INTO batches VALUES ('bat_old', ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?)",
            (
                spec.request_key,
                spec.name,
                spec.face_value_cents,
                spec.min_spend_cents,
                spec.quantity,
                spec.quantity,
                spec.valid_days,
                spec.per_user_limit,
                created.isoformat(),
            ),
        )
    process = simulator_process(data)
    await asyncio.to_thread(process.start)
    platform = RestPlatform(process.url, timeout_s=5.0)
    try:
        batch = await platform.get_batch("bat_old")
        retried = await platform.create_batch(spec)
        await platform.send_coupon(SendRequest("bat_old", "old-user", new_key("send")))
        remaining = (await platform.get_batch("bat_old")).remaining
    finally:
        await platform.aclose()
        await asyncio.to_thread(process.stop)

    # `active` meant sending: it reads running, in the default window it would have had.
    assert batch.status is BatchStatus.RUNNING
    assert (batch.starts_at, batch.ends_at) == (created, created + timedelta(days=7))
    assert retried.batch_id == "bat_old"
    assert remaining == 3
