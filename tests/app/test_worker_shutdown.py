"""`worker.py` stopped as a rolling deploy stops it (SIGTERM): the send in flight finishes
and its receipt is recorded, no new work is taken, and the process exits 0.

A real worker process on the dev server, PostgreSQL and the simulator, whose latency knob
keeps the send in flight when the signal comes. Before the graceful stop every deploy
cancelled the sends in flight, to be sent again by another worker (issue 17, item 5).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from app.claims import ClaimService
from coupons import contract as act
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    Handle,
    close_workflows,
    handle_of,
    new_campaign,
    new_id,
    sim_stats,
    wait_for_stat,
)

ROOT = Path(__file__).resolve().parents[2]
# The send's answer, and the lookup's after it, each come this late: the send is in flight
# for seconds after the worker takes it.
LATENCY_MS = 1500


@asynccontextmanager
async def worker_process(
    dev_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python worker.py` on the test's queues and schema, its log in `tmp_path`; killed
    if the test leaves it running, its schedules deleted."""
    env = {
        **os.environ,
        **settings.to_env(),
        "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "PLATFORM_TIMEOUT_S": "5",  # over the latency
        "WORKER_METRICS_PORT": "off",
        # Its own: no running stack of this machine is followed, no key ring is read.
        "DATA_DIR": str(tmp_path / "data"),
        "COUPONS_STATE_DIR": str(tmp_path / "state"),
        "COUPONS_CONFIG": "",
    }
    with (tmp_path / "worker.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "worker.py", cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for schedule_id in (act.CATALOG_SYNC_SCHEDULE, act.RECONCILE_SCHEDULE):
            try:
                await dev_env.client.get_schedule_handle(schedule_id).delete()
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise


def worker_log(tmp_path: Path) -> str:
    return (tmp_path / "worker.log").read_text(errors="replace")


async def until_sending(simulator: httpx.AsyncClient, sends_before: int) -> None:
    """Until the worker process's send has reached the platform, which holds its answer
    LATENCY_MS. (Temporal's word that the activity started comes a moment earlier: a task
    handed to a poll the stop cancels is not in flight, and runs again after its timeout.)"""
    # The process starts first.
    await wait_for_stat(simulator, "sends_applied", sends_before + 1, timeout_s=60)


async def until_logged(tmp_path: Path, line: str, times: int) -> None:
    async with asyncio.timeout(30):
        while True:
            if worker_log(tmp_path).count(line) >= times:
                return
            await asyncio.sleep(0.05)


async def event_types(handle: Handle) -> list[EventType.ValueType]:
    return [e.event_type for e in (await handle.fetch_history()).events]


async def test_sigterm_lets_the_send_in_flight_finish_and_takes_no_new_work(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    client: Client = dev_env.client
    claims = ClaimService(pool, client, settings)
    campaign = await new_campaign(pool, platform, required_tasks=[])
    await simulator.put("/sim/knobs", json={"latency_ms": LATENCY_MS})
    before = await sim_stats(simulator)
    ids: list[str] = []
    try:
        async with worker_process(dev_env, settings, tmp_path) as worker:
            in_flight = await claims.claim_started(campaign.id, new_id("u"))
            ids.append(in_flight.workflow_id)
            sending = handle_of(client, in_flight.workflow_id)
            await until_sending(simulator, before["sends_applied"])

            worker.send_signal(signal.SIGTERM)
            # Both workers have stopped polling once the SDK says it waits for activities.
            await until_logged(tmp_path, "Beginning worker shutdown", times=2)
            later = await claims.claim_started(campaign.id, new_id("u"))
            ids.append(later.workflow_id)
            async with asyncio.timeout(60):
                code = await worker.wait()
            assert code == 0, worker_log(tmp_path)

        # The send in flight finished on its first attempt, receipt and all...
        found = await ledger.get_claim(pool, in_flight.coupon_id)
        assert found is not None and found.state == "issued", worker_log(tmp_path)
        events = await event_types(sending)
        assert EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED in events
        assert not (await sending.describe()).raw_description.pending_activities
        after = await sim_stats(simulator)
        assert after["sends_applied"] - before["sends_applied"] == 1
        assert after["sends_replayed"] == before["sends_replayed"]  # never sent again
        # ...and the coupon claimed during the stop was left for the other workers.
        assert EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED not in await event_types(
            handle_of(client, later.workflow_id)
        )
    finally:
        await close_workflows(client, ids)


async def test_a_second_sigterm_stops_it_at_once(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    client: Client = dev_env.client
    campaign = await new_campaign(pool, platform, required_tasks=[])
    await simulator.put("/sim/knobs", json={"latency_ms": LATENCY_MS})
    before = await sim_stats(simulator)
    claimed = await ClaimService(pool, client, settings).claim_started(campaign.id, new_id("u"))
    try:
        async with worker_process(dev_env, settings, tmp_path) as worker:
            await until_sending(simulator, before["sends_applied"])
            worker.send_signal(signal.SIGTERM)
            await until_logged(tmp_path, "Beginning worker shutdown", times=2)
            worker.send_signal(signal.SIGTERM)
            async with asyncio.timeout(60):
                code = await worker.wait()
        # Killed by the signal itself: it did not wait for the send to finish.
        assert code == -signal.SIGTERM, worker_log(tmp_path)
    finally:
        await close_workflows(client, [claimed.workflow_id])
