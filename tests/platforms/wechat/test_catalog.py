"""Creating a batch on WeChat Pay through the catalog: the stock is in the ledger before it
is started, the registration wait after creation is waited out, and a start the platform
refuses leaves a batch the ledger knows, with the command that starts it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from app.embedded import SimulatorProcess
from coupons import catalog
from coupons.errors import Refused
from coupons.ledger import batches
from coupons.platforms.base import BatchStatus, PlatformUnavailable
from coupons.platforms.wechat.adapter import WechatPayPlatform
from coupons.platforms.wechat.protocol import sim_merchant
from tests.conftest import new_id

from ..conftest import SimControl


async def test_the_catalog_waits_for_a_new_stock_to_be_registered_then_starts_it(
    pool: AsyncConnectionPool, adapter: WechatPayPlatform, control: SimControl
) -> None:
    await control.knobs(wechat_start_delay_s=1.5)
    began = time.monotonic()
    batch = await catalog.batches.create_batch(
        pool, adapter, new_id("batch"), quantity=5, valid_days=30
    )
    assert time.monotonic() - began >= 1.5
    assert batch.status == BatchStatus.RUNNING.value
    assert batch.starts_at is not None and batch.ends_at is not None
    assert batch.ends_at - batch.starts_at == timedelta(days=30)


async def test_a_refused_start_leaves_the_batch_in_the_ledger_and_says_how_to_start_it(
    pool: AsyncConnectionPool, adapter: WechatPayPlatform, control: SimControl
) -> None:
    await control.knobs(wechat_balance_cents=100)  # a 预充值 stock of 5 x 5.00 yuan needs 2,500
    batch_id = new_id("batch")
    with pytest.raises(Refused) as refused:
        await catalog.batches.create_batch(pool, adapter, batch_id, quantity=5)
    assert refused.value.code == "platform_refused"
    assert "balance" in refused.value.message and f"batch start {batch_id}" in refused.value.message
    stored = await batches.get_batch(pool, batch_id)
    assert stored is not None and stored.status == BatchStatus.CREATED.value
    at_platform = await adapter.get_batch(stored.platform_batch_id)
    assert at_platform.status == BatchStatus.CREATED


async def test_a_start_that_gave_up_is_finished_by_asking_again_from_another_process(
    pool: AsyncConnectionPool,
    adapter: WechatPayPlatform,
    control: SimControl,
    wechat_simulator: SimulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registration outlasts the catalog's patience: the error says the batch exists and
    how to finish it; `batch create` run again (a new process: another adapter, which holds no
    remembered window) finds the batch in the ledger, asks nothing new of WeChat Pay, and
    starts it."""
    monkeypatch.setattr(catalog.batches, "START_PATIENCE", timedelta(seconds=1))
    await control.knobs(wechat_start_delay_s=3)
    batch_id = new_id("batch")
    with pytest.raises(PlatformUnavailable, match=f"batch start {batch_id}"):
        await catalog.batches.create_batch(pool, adapter, batch_id, quantity=5)
    stored = await batches.get_batch(pool, batch_id)
    assert stored is not None and stored.status == BatchStatus.CREATED.value
    created = (await control.stats())["batches"]

    await asyncio.sleep(3)
    another = WechatPayPlatform(wechat_simulator.url, sim_merchant(wechat_simulator.keys_dir))
    try:
        again = await catalog.batches.create_batch(pool, another, batch_id, quantity=5)
    finally:
        await another.aclose()
    assert again.status == BatchStatus.RUNNING.value
    assert again.platform_batch_id == stored.platform_batch_id
    assert (await control.stats())["batches"] == created
    with pytest.raises(Refused, match="quantity 5, not 6") as other:
        await catalog.batches.create_batch(pool, adapter, batch_id, quantity=6)
    assert other.value.code == "batch_exists"


async def test_a_window_given_without_valid_days_is_the_coupons_validity(
    pool: AsyncConnectionPool, adapter: WechatPayPlatform, control: SimControl
) -> None:
    """On WeChat Pay a coupon lasts as its stock's window: a window of 60 days with no
    valid_days given is valid 60 days, not refused for the 30-day default."""
    begins = datetime.now(UTC).replace(microsecond=0)
    batch = await catalog.batches.create_batch(
        pool,
        adapter,
        new_id("batch"),
        quantity=5,
        starts_at=begins,
        ends_at=begins + timedelta(days=60),
    )
    assert batch.valid_days == 60 and batch.status == BatchStatus.RUNNING.value
