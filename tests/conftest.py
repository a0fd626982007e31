"""One real PostgreSQL, one Temporal dev server, one time-skipping server and one
platform simulator per test run; each test gets its own schema and task queues."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from coupons.catalog import ensure_campaign
from coupons.claims import ClaimService
from coupons.config import Settings
from coupons.embedded import EmbeddedPostgres, SimulatorProcess, find_binary, free_port
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.ledger.campaigns import Campaign
from coupons.lifecycle import FINAL_STATES
from coupons.model import SEARCH_ATTRIBUTES, CouponStatus
from coupons.platforms.rest import RestPlatform
from coupons.workers import build_workers
from workflows.user_coupon import UserCouponWorkflow


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def postgres(run_dir: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(run_dir / "postgres", free_port(), log_path=run_dir / "postgres.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def simulator_url(run_dir: Path) -> Iterator[str]:
    sim = SimulatorProcess(run_dir / "simulator.sqlite3", free_port(), log_path=run_dir / "sim.log")
    sim.start()
    yield sim.url
    sim.stop()


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server (the one `make run` starts), in memory."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(find_binary("temporal")),
        search_attributes=SEARCH_ATTRIBUTES,
    )
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server, for deadlines and validity measured in days."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(find_binary("temporal-test-server"))
    )
    # It hangs on search attributes it does not know: register ours first.
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in SEARCH_ATTRIBUTES
            },
        )
    )
    yield env
    await env.shutdown()


@pytest_asyncio.fixture
async def schema(postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    await db.migrate_url(postgres.url(), schema=name)
    yield name
    async with await AsyncConnection.connect(postgres.url(), autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest_asyncio.fixture
async def pool(postgres: EmbeddedPostgres, schema: str) -> AsyncIterator[AsyncConnectionPool]:
    async with db.pool(postgres.url(), schema=schema, max_size=20) as p:
        yield p


@pytest_asyncio.fixture
async def simulator(simulator_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The simulator's control plane, knobs reset before and after each test."""
    async with httpx.AsyncClient(base_url=simulator_url, timeout=10) as control:
        await control.put("/sim/knobs", json=DEFAULT_KNOBS)
        yield control
        await control.put("/sim/knobs", json=DEFAULT_KNOBS)


DEFAULT_KNOBS = {
    "latency_ms": 0,
    "error_rate": 0.0,
    "ambiguous_rate": 0.0,
    "ambiguous_mode": "hang",
    "ambiguous_hang_s": 10.0,
    "lookup_lag_s": 0.0,
    "rate_limit_per_s": 0,
    "restricted_users": [],
    "clock_offset_s": 0.0,
}


@pytest.fixture
def settings(postgres: EmbeddedPostgres, schema: str, simulator_url: str) -> Settings:
    """Settings of one test: its own task queues, its own schema."""
    tag = uuid.uuid4().hex[:8]
    return replace(
        Settings(),
        database_url_override=f"{postgres.url()}?options=-csearch_path%3D{schema}",
        task_queue=f"coupons-{tag}",
        platform_url_override=simulator_url,
        platform_timeout_s=2.0,
        lag_window_s=3.0,
        claim_repair_after_s=0.5,
    )


@asynccontextmanager
async def running_workers(
    client: Client, pool: AsyncConnectionPool, settings: Settings
) -> AsyncIterator[list[Worker]]:
    platform = RestPlatform(settings.platform_url, timeout_s=settings.platform_timeout_s)
    workers = build_workers(client, pool, platform, settings)
    try:
        async with workers[0], workers[1]:
            yield workers
    finally:
        await platform.aclose()


@pytest_asyncio.fixture
async def platform(simulator_url: str) -> AsyncIterator[RestPlatform]:
    p = RestPlatform(simulator_url, timeout_s=5.0)
    yield p
    await p.aclose()


async def new_campaign(
    pool: AsyncConnectionPool, platform: RestPlatform, **kwargs: Any
) -> Campaign:
    """A campaign (and its batch at the simulator) with an id no other test uses."""
    kwargs.setdefault("required_tasks", ["first-order"])
    kwargs.setdefault("quota", 10)
    return await ensure_campaign(pool, platform, f"c-{uuid.uuid4().hex[:10]}", **kwargs)


def claims_of(pool: AsyncConnectionPool, client: Client, settings: Settings) -> ClaimService:
    return ClaimService(pool, client, settings)


async def sim_stats(control: httpx.AsyncClient) -> dict[str, int]:
    response = await control.get("/sim/stats")
    response.raise_for_status()
    stats: dict[str, int] = response.json()
    return stats


Handle = WorkflowHandle[UserCouponWorkflow, CouponStatus]


async def wait_for_state(handle: Handle, state: str, timeout_s: float = 30.0) -> CouponStatus:
    """Poll the `status` query until the coupon is in `state`; fails after `timeout_s`."""
    last: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                status = await handle.query(UserCouponWorkflow.status)
                last = status.state
                if last == state:
                    return status
                if last in FINAL_STATES:
                    pytest.fail(f"{handle.id} ended {last} ({status.transitions[-1].cause})")
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"{handle.id} still {last} after {timeout_s}s, expected {state}")


async def ledger_states(pool: AsyncConnectionPool, coupon_id: str) -> list[tuple[str | None, str]]:
    view = await ledger.coupon_view(pool, coupon_id)
    assert view is not None
    return [(e["from_state"], e["to_state"]) for e in view["events"]]
