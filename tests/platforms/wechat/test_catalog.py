"""Creating a batch on WeChat Pay through the catalog: the stock is in the ledger before it
is started, the registration wait after creation is waited out, and a start the platform
refuses leaves a batch the ledger knows, with the command that starts it."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from coupons import catalog
from coupons.errors import Refused
from coupons.ledger import campaigns as ledger_catalog
from coupons.platforms.base import BatchStatus
from coupons.platforms.wechat.adapter import WechatPayPlatform
from tests.conftest import new_id

from ..conftest import SimControl


async def test_the_catalog_waits_for_a_new_stock_to_be_registered_then_starts_it(
    pool: AsyncConnectionPool, adapter: WechatPayPlatform, control: SimControl
) -> None:
    await control.knobs(wechat_start_delay_s=1.5)
    began = time.monotonic()
    batch = await catalog.create_batch(pool, adapter, new_id("batch"), quantity=5, valid_days=30)
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
        await catalog.create_batch(pool, adapter, batch_id, quantity=5)
    assert refused.value.code == "platform_refused"
    assert "balance" in refused.value.message and f"batch start {batch_id}" in refused.value.message
    stored = await ledger_catalog.get_batch(pool, batch_id)
    assert stored is not None and stored.status == BatchStatus.CREATED.value
    at_platform = await adapter.get_batch(stored.platform_batch_id)
    assert at_platform.status == BatchStatus.CREATED
