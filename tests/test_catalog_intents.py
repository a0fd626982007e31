"""Intent first, then the platform: a change the catalog asks of the platform is in the
ledger before the call, so a process that dies between the platform's answer and the
ledger's write leaves a pending intent that the sync finishes, never a batch at the platform
that the ledger has not heard of.

The crash is real: a child process (this module run with `python -m`) builds the real pool
and the real adapter against the real simulator and PostgreSQL, and only the ledger's
completion write is replaced by `os._exit(137)`, the one fault a test forces. The sync then
runs here, in the test process, with another adapter (which remembers nothing of the child).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.testing import WorkflowEnvironment

from app.embedded import EmbeddedPostgres, SimulatorProcess, free_port
from chaos.shells import CRASHED, dying_at_completion
from coupons import catalog
from coupons import contract as act
from coupons.config import Settings
from coupons.errors import InvalidField, Refused
from coupons.ledger import batches, db
from coupons.ledger.batches import PENDING
from coupons.ledger.campaigns import CampaignSpec
from coupons.model import SyncInput, SyncReport
from coupons.platforms.base import BatchAction, BatchStatus, Platform
from coupons.platforms.generic.adapter import RestPlatform
from coupons.platforms.wechat.adapter import WechatPayPlatform
from coupons.platforms.wechat.protocol import sim_merchant
from tests.conftest import new_id, run_workflow, running_workers, sim_stats

PROJECT = Path(__file__).resolve().parent.parent
# The wechat simulator of these tests: no frequency limits, a new stock may start at once.
WECHAT_KNOBS = {"SIM_ENDPOINT_LIMITS": "false", "SIM_WECHAT_START_DELAY_S": "0"}


# ----------------------------------------------------------------- the child that dies


def _adapter(kind: str, url: str, keys_dir: str | None) -> Platform:
    if kind in WECHAT:
        assert keys_dir is not None
        return WECHAT[kind](url, sim_merchant(Path(keys_dir)))
    return RestPlatform(url, timeout_s=5.0)


async def _child(order: dict[str, Any]) -> None:
    """Run one catalog call; die at the ledger write that completes `crash_on`."""
    platform = _adapter(order["platform"], order["platform_url"], order.get("keys_dir"))
    with dying_at_completion(order["crash_on"]):
        async with db.pool(order["database_url"], schema=order["schema"]) as pool:
            if order["operation"] == "create":
                terms = dict(order["terms"])
                for moment in ("starts_at", "ends_at"):
                    if terms.get(moment):
                        terms[moment] = datetime.fromisoformat(terms[moment])
                await catalog.batches.create_batch(pool, platform, order["batch_id"], **terms)
            else:
                action = BatchAction(order["operation"])
                await catalog.batches.change_batch(pool, platform, order["batch_id"], action)
    await platform.aclose()


async def crash_between_answer_and_ledger(**order: Any) -> None:
    """Run `_child` with `order` in another process; it must die with CRASHED."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.test_catalog_intents",
        json.dumps(order),
        cwd=PROJECT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == CRASHED, output.decode(errors="replace")


# ----------------------------------------------------------------- helpers


def sim_batches_for_key(data_file: Path, request_key: str) -> list[str]:
    """The simulator's own record: the batches it holds under `request_key`."""
    with sqlite3.connect(f"file:{data_file}?mode=ro", uri=True) as store:
        rows = store.execute("SELECT batch_id FROM batches WHERE request_key = ?", (request_key,))
        return [batch_id for (batch_id,) in rows]


def session_sim_file(run_dir: Path) -> Path:
    """The store of the session's generic simulator (tests/conftest.py starts it there)."""
    return run_dir / "simulator.sqlite3"


async def intents_of(pool: AsyncConnectionPool, batch_id: str) -> list[tuple[str, str, int]]:
    return [(i.operation, i.state, i.attempts) for i in await batches.batch_intents(pool, batch_id)]


def child_order(
    postgres: EmbeddedPostgres, schema: str, platform_url: str, **rest: Any
) -> dict[str, Any]:
    return {
        "database_url": postgres.url(),
        "schema": schema,
        "platform_url": platform_url,
        "platform": "generic",
        **rest,
    }


# ----------------------------------------------------------------- create, generic


async def test_a_create_whose_answer_never_reached_the_ledger_is_finished_by_the_sync(
    dev_env: WorkflowEnvironment,
    postgres: EmbeddedPostgres,
    schema: str,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator_url: str,
    simulator: httpx.AsyncClient,
    run_dir: Path,
) -> None:
    """The platform created the batch, the process died before the ledger heard: the batch
    is pending in the ledger (visible as such), and the catalog sync workflow (all batches,
    as the schedule runs it) sends the kept request again under the same key and stores the
    first batch. One batch at the platform for the key, before and after."""
    batch_id = new_id("b")
    before = (await sim_stats(simulator))["batches"]
    order = child_order(postgres, schema, simulator_url, batch_id=batch_id)
    await crash_between_answer_and_ledger(
        **order, operation="create", crash_on="create", terms={"quantity": 7}
    )

    created_there = sim_batches_for_key(session_sim_file(run_dir), f"batch-{batch_id}")
    assert len(created_there) == 1
    pending = await catalog.batches.get_batch(pool, batch_id)
    assert (pending.status, pending.platform_batch_id, pending.quantity) == (PENDING, "", 7)
    assert pending.drift == [batches.PENDING_NOTE]
    assert [b.id for b in await batches.list_batches(pool)] == [batch_id]
    assert await intents_of(pool, batch_id) == [("create", "pending", 0)]

    async with running_workers(dev_env.client, pool, settings):
        report = await run_workflow(
            dev_env.client, settings, act.CATALOG_SYNC_WORKFLOW, SyncInput(), SyncReport
        )
    assert report.failed == []
    (synced,) = report.batches
    stored = await catalog.batches.get_batch(pool, batch_id)
    assert synced.platform_batch_id == stored.platform_batch_id == created_there[0]
    # The start was never asked (the child died first): created, as the platform holds it.
    assert (stored.status, stored.quantity, stored.drift) == ("created", 7, [])
    assert await intents_of(pool, batch_id) == [("create", "done", 1)]
    assert sim_batches_for_key(session_sim_file(run_dir), f"batch-{batch_id}") == created_there
    assert (await sim_stats(simulator))["batches"] == before + 1

    # `batch create` again starts it, still the same one batch.
    started = await catalog.batches.create_batch(pool, platform, batch_id, quantity=7)
    assert (started.status, started.platform_batch_id) == ("running", created_there[0])
    assert (await sim_stats(simulator))["batches"] == before + 1


async def test_batch_create_again_finishes_a_pending_create_and_refuses_other_terms(
    postgres: EmbeddedPostgres,
    schema: str,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    simulator_url: str,
    simulator: httpx.AsyncClient,
    run_dir: Path,
) -> None:
    batch_id = new_id("b")
    order = child_order(postgres, schema, simulator_url, batch_id=batch_id)
    await crash_between_answer_and_ledger(
        **order, operation="create", crash_on="create", terms={"quantity": 9, "valid_days": 10}
    )
    before = (await sim_stats(simulator))["batches"]
    with pytest.raises(Refused, match="quantity 9, not 8; valid_days 10, not 30") as other:
        await catalog.batches.create_batch(pool, platform, batch_id, quantity=8)
    assert other.value.code == "batch_exists"
    assert (await catalog.batches.get_batch(pool, batch_id)).status == PENDING  # nothing asked

    # A campaign cannot use it yet: its coupons could not be sent.
    spec = CampaignSpec(id=new_id("c"), batch_id=batch_id, quota=1)
    with pytest.raises(InvalidField, match="not created at the platform yet"):
        await catalog.campaigns.create_campaign(pool, spec)

    finished = await catalog.batches.create_batch(
        pool, platform, batch_id, quantity=9, valid_days=10
    )
    (at_platform,) = sim_batches_for_key(session_sim_file(run_dir), f"batch-{batch_id}")
    assert (finished.status, finished.platform_batch_id) == ("running", at_platform)
    assert await intents_of(pool, batch_id) == [("create", "done", 1), ("start", "done", 1)]
    assert (await sim_stats(simulator))["batches"] == before


# ----------------------------------------------------------------- changes


@pytest.mark.parametrize("action", [BatchAction.PAUSE, BatchAction.STOP])
async def test_a_change_whose_answer_never_reached_the_ledger_is_finished_by_the_sync(
    postgres: EmbeddedPostgres,
    schema: str,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    simulator_url: str,
    action: BatchAction,
) -> None:
    batch = await catalog.batches.create_batch(pool, platform, new_id("b"), quantity=5)
    order = child_order(postgres, schema, simulator_url, batch_id=batch.id)
    await crash_between_answer_and_ledger(**order, operation=action.value, crash_on=action.value)
    target = {BatchAction.PAUSE: BatchStatus.PAUSED, BatchAction.STOP: BatchStatus.STOPPED}[action]
    assert (await platform.get_batch(batch.platform_batch_id)).status == target
    assert (await catalog.batches.get_batch(pool, batch.id)).status == "running"  # never heard
    # Still read by the sync, even when the change was a stop.
    assert batch.id in [b.id for b in await batches.list_batches(pool, syncable_only=True)]

    synced = await catalog.batches.sync_batch(pool, platform, batch.id)
    assert synced.status == target.value and synced.drift == []
    assert (await catalog.batches.get_batch(pool, batch.id)).status == target.value
    # Sent again, the change was a no-op at the platform: done, not refused.
    assert (await intents_of(pool, batch.id))[-1] == (action.value, "done", 1)
    assert await batches.pending_intents(pool, batch.id) == []


async def test_a_pending_change_is_sent_before_the_next_one(
    postgres: EmbeddedPostgres,
    schema: str,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    simulator_url: str,
) -> None:
    """The pause's answer was lost; the resume asked after it must not be overtaken by it:
    the pause goes first, the resume last, and the batch runs."""
    batch = await catalog.batches.create_batch(pool, platform, new_id("b"), quantity=5)
    order = child_order(postgres, schema, simulator_url, batch_id=batch.id)
    await crash_between_answer_and_ledger(**order, operation="pause", crash_on="pause")
    resumed = await catalog.batches.change_batch(pool, platform, batch.id, BatchAction.RESUME)
    assert resumed.status == "running"
    assert await intents_of(pool, batch.id) == [
        ("create", "done", 1),
        ("start", "done", 1),
        ("pause", "done", 1),
        ("resume", "done", 1),
    ]
    keys = [i.request_key for i in await batches.batch_intents(pool, batch.id)]
    assert keys[0] == catalog.batches.batch_request_key(batch.id) and len(set(keys)) == 4
    assert (await catalog.batches.sync_batch(pool, platform, batch.id)).status == "running"


async def test_a_refused_change_is_marked_so_and_changes_nothing_else(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    batch = await catalog.batches.create_batch(pool, platform, new_id("b"), quantity=5, start=False)
    with pytest.raises(Refused) as refused:
        await catalog.batches.change_batch(pool, platform, batch.id, BatchAction.PAUSE)
    assert refused.value.code == "wrong_state"
    stored = await catalog.batches.get_batch(pool, batch.id)
    assert (stored.status, stored.synced_at) == ("created", batch.synced_at)
    (*_, pause) = await batches.batch_intents(pool, batch.id)
    assert (pause.operation, pause.state, pause.attempts) == ("pause", "refused", 1)
    assert pause.last_error is not None and "BATCH_STATE_INVALID" in pause.last_error


# ----------------------------------------------------------------- the ledger fails first


async def test_a_ledger_that_cannot_write_the_intent_means_no_platform_call(
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    simulator: httpx.AsyncClient,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The quantity that once overflowed the ledger after the platform had made (and
    started) the batch: now the ledger refuses it first and the platform hears nothing. And
    a ledger that is down at the intent's write: the same."""
    before = (await sim_stats(simulator))["batches"]
    overflow = new_id("b")
    with pytest.raises((psycopg.errors.NumericValueOutOfRange, InvalidField)):
        await catalog.batches.create_batch(pool, platform, overflow, quantity=2**31)

    async def ledger_down(*_: Any) -> None:
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(batches, "begin_create", ledger_down)
    down = new_id("b")
    with pytest.raises(psycopg.OperationalError):
        await catalog.batches.create_batch(pool, platform, down, quantity=5)

    assert (await sim_stats(simulator))["batches"] == before
    for batch_id in (overflow, down):
        assert sim_batches_for_key(session_sim_file(run_dir), f"batch-{batch_id}") == []
        assert await batches.get_batch(pool, batch_id) is None


# ----------------------------------------------------------------- WeChat Pay


@pytest.fixture(scope="module")
def wechat_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    data = tmp_path_factory.mktemp("wechat") / "sim.sqlite3"
    process = SimulatorProcess(
        data,
        free_port(),
        WECHAT_KNOBS,
        log_path=data.with_suffix(".log"),
        inherit_knobs=False,
        mode="wechat",
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def test_a_wechat_create_lost_after_the_answer_is_finished_with_the_same_request(
    postgres: EmbeddedPostgres,
    schema: str,
    pool: AsyncConnectionPool,
    wechat_sim: SimulatorProcess,
) -> None:
    """WeChat Pay takes the whole request as out_request_no's content (its window
    included): the sync's resend, from another process and seconds later, is the kept
    request, so WeChat Pay answers the first stock instead of refusing the key as reused."""
    batch_id = new_id("b")
    begins = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    terms = {
        "quantity": 5,
        "starts_at": begins.isoformat(),
        "ends_at": (begins + timedelta(days=20)).isoformat(),
        "name": "lost answer",
    }
    order = child_order(
        postgres,
        schema,
        wechat_sim.url,
        platform="wechat",
        keys_dir=str(wechat_sim.keys_dir),
        batch_id=batch_id,
    )
    await crash_between_answer_and_ledger(
        **order, operation="create", crash_on="create", terms=terms
    )
    (stock,) = sim_batches_for_key(wechat_sim.data_file, f"batch-{batch_id}")
    await asyncio.sleep(1.1)  # another second: a window made anew would differ
    another = WechatPayPlatform(wechat_sim.url, sim_merchant(wechat_sim.keys_dir))
    try:
        synced = await catalog.batches.sync_batch(pool, another, batch_id)
        assert synced.platform_batch_id == stock and synced.status == "created"
        assert (await catalog.batches.get_batch(pool, batch_id)).platform_batch_id == stock
        assert await intents_of(pool, batch_id) == [("create", "done", 1)]
        assert sim_batches_for_key(wechat_sim.data_file, f"batch-{batch_id}") == [stock]
    finally:
        await another.aclose()


WECHAT: dict[str, type[WechatPayPlatform]] = {"wechat": WechatPayPlatform}


async def test_a_wechat_create_with_no_window_lost_after_the_answer_is_finished(
    postgres: EmbeddedPostgres,
    schema: str,
    pool: AsyncConnectionPool,
    wechat_sim: SimulatorProcess,
) -> None:
    """No window given: the window WeChat Pay receives is chosen at the call, so the intent
    must keep the one sent (the adapter says it through `batch_request`), and the resend,
    seconds later from another process, is the same request."""
    batch_id = new_id("b")
    order = child_order(
        postgres,
        schema,
        wechat_sim.url,
        platform="wechat",
        keys_dir=str(wechat_sim.keys_dir),
        batch_id=batch_id,
    )
    await crash_between_answer_and_ledger(
        **order, operation="create", crash_on="create", terms={"quantity": 5}
    )
    (stock,) = sim_batches_for_key(wechat_sim.data_file, f"batch-{batch_id}")
    await asyncio.sleep(1.1)  # another second: a window made anew would differ
    another = WechatPayPlatform(wechat_sim.url, sim_merchant(wechat_sim.keys_dir))
    try:
        synced = await catalog.batches.sync_batch(pool, another, batch_id)
    finally:
        await another.aclose()
    assert synced.platform_batch_id == stock
    assert await intents_of(pool, batch_id) == [("create", "done", 1)]
    assert sim_batches_for_key(wechat_sim.data_file, f"batch-{batch_id}") == [stock]


if __name__ == "__main__":
    asyncio.run(_child(json.loads(sys.argv[1])))
