"""One real PostgreSQL, one Temporal dev server, one time-skipping server and one
platform simulator per test process (`make test` runs one per core, scripts/run_tests.py);
each test gets its own schema and task queues.

Below the fixtures are the helpers the test modules share; they import them from here,
never from one another.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, LiteralString, TypeVar

import httpx
import pytest
import pytest_asyncio
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType, IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.api.workflowservice.v1 import ListOpenWorkflowExecutionsRequest
from temporalio.client import Client, WorkflowHandle, WorkflowHistory
from temporalio.common import TypedSearchAttributes
from temporalio.converter import decode_typed_search_attributes
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from app.claims import ClaimResult, ClaimService
from app.embedded import (
    EmbeddedPostgres,
    SimulatorProcess,
    dynamic_config_args,
    find_binary,
    free_port,
)
from app.versioning import make_current, worker_version
from app.workers import build_workers, in_background, start_claims_forever
from coupons import catalog, metrics
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.ledger.batches import Batch
from coupons.ledger.campaigns import Campaign
from coupons.lifecycle import FINAL_STATES
from coupons.model import SEARCH_ATTRIBUTES, CouponStatus
from coupons.platforms.generic.adapter import RestPlatform
from coupons.platforms.metered import MeteredPlatform
from workflows.user_coupon import UserCouponWorkflow


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def postgres(run_dir: Path) -> Iterator[EmbeddedPostgres]:
    # The session's servers go with the test process however it ends (a timeout's SIGKILL
    # included): session fixtures start them from the main thread, which lives as long.
    server = EmbeddedPostgres(
        run_dir / "postgres", free_port(), log_path=run_dir / "postgres.log", die_with_parent=True
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def simulator_url(run_dir: Path) -> Iterator[str]:
    sim = SimulatorProcess(
        run_dir / "simulator.sqlite3",
        free_port(),
        log_path=run_dir / "sim.log",
        die_with_parent=True,
    )
    sim.start()
    yield sim.url
    sim.stop()


# Above two task queues for every test of the suite that runs workers.
TASK_QUEUES_IN_A_VERSION = 20_000


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server (the one `make run` starts), in memory.

    Every test's workers are the one worker version (app/versioning.py) on task queues of
    their own, and the server registers at most 100 task queues in a version by default
    (`matching.maxTaskQueuesInDeploymentVersion`): past about 50 tests the next workers'
    polls were refused and their workflows never ran. A deployment of ours uses two."""
    env = await start_dev_server(
        {"matching.maxTaskQueuesInDeploymentVersion": TASK_QUEUES_IN_A_VERSION}
    )
    yield env
    await env.shutdown()


async def start_dev_server(dynamic_config: Mapping[str, object]) -> WorkflowEnvironment:
    """A dev server in memory with our search attributes, and `dynamic_config` over the
    embedded stack's own (app.embedded.DEV_SERVER_DYNAMIC_CONFIG)."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(find_binary("temporal")),
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_extra_args=dynamic_config_args(dynamic_config),
    )


async def start_time_skipping() -> WorkflowEnvironment:
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
    return env


@dataclass
class TimeSkippingServer:
    """The run's one time-skipping server, replaced only if a test broke it."""

    env: WorkflowEnvironment


@pytest_asyncio.fixture(scope="session")
async def ts_server() -> AsyncIterator[TimeSkippingServer]:
    server = TimeSkippingServer(await start_time_skipping())
    yield server
    await server.env.shutdown()


@pytest_asyncio.fixture
async def ts_env(ts_server: TimeSkippingServer) -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping server, for deadlines and validity measured in days.

    Its clock is one for all tests: a task nobody will take any more (a workflow left
    open, a query its worker never answered) stops time skipping for every later test.
    The test that leaves the server so fails here, saying why, and the next test gets a
    fresh server, so one broken test shows as one failure and not as a dozen."""
    env = ts_server.env
    yield env
    client = env.client
    found = await client.workflow_service.list_open_workflow_executions(
        ListOpenWorkflowExecutionsRequest(namespace=client.namespace, maximum_page_size=100)
    )
    left = [(e.type.name, e.execution.workflow_id) for e in found.executions]
    for e in found.executions:
        await client.get_workflow_handle(e.execution.workflow_id).terminate("left open")
    try:
        # A day passes in milliseconds on a server that skips, and never on one that cannot.
        await asyncio.wait_for(env.sleep(timedelta(days=1)), SKIP_CHECK_S)
        skips = True
    except TimeoutError:
        skips = False
    if not skips:
        await env.shutdown()
        ts_server.env = await start_time_skipping()
    assert not left, f"workflows left open on the time-skipping server: {left}"
    assert skips, f"time skipping stopped during this test (a day not skipped in {SKIP_CHECK_S} s)"


SKIP_CHECK_S = 10


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
    client: Client, pool: AsyncConnectionPool, settings: Settings, *, starter: bool = True
) -> AsyncIterator[list[Worker]]:
    """The workers as `worker.py` runs them, and (unless not `starter`) the starter of
    claims' workflows beside them."""
    await current_before_start(client, settings)
    # As run_worker builds it: every platform call measured.
    platform = MeteredPlatform(
        RestPlatform(settings.platform_url, timeout_s=settings.platform_timeout_s),
        metrics.platform_call,
    )
    workers = build_workers(client, pool, platform, settings)
    loops = [start_claims_forever(ClaimService(pool, client, settings))] if starter else []
    try:
        async with workers[0], workers[1], in_background(*loops):
            yield workers
    finally:
        await platform.aclose()


async def current_before_start(client: Client, settings: Settings) -> None:
    """The workers are versioned (app/versioning.py) and a version takes work only once it
    is current (worker.py makes its own current): the tests' version is made current before
    their workers start. The time-skipping server has no deployments: it routes by task
    queue alone."""
    try:
        await make_current(client, worker_version(settings), allow_no_pollers=True)
    except RPCError as err:
        if err.status != RPCStatusCode.UNIMPLEMENTED:
            raise


@pytest_asyncio.fixture
async def platform(simulator_url: str) -> AsyncIterator[RestPlatform]:
    p = RestPlatform(simulator_url, timeout_s=5.0)
    yield p
    await p.aclose()


# ----------------------------------------------------------------- helpers the tests import

R = TypeVar("R")
# The task `new_campaign`'s campaigns require unless told otherwise.
TASK = "first-order"
# When a test's coupon is used at the till (any moment will do).
USED_AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)


def new_id(prefix: str) -> str:
    """An id no other test uses (batches, campaigns, users, workflows)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def scalar(pool: AsyncConnectionPool, query: LiteralString, *params: Any) -> Any:
    """The one value a query answers, straight from the test's schema."""
    async with pool.connection() as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def row_count(pool: AsyncConnectionPool, table: LiteralString) -> int:
    """How many rows `table` holds in the test's schema."""
    n: int = await scalar(pool, "SELECT count(*) FROM " + table)
    return n


async def execute(pool: AsyncConnectionPool, statement: LiteralString, *params: Any) -> None:
    """Change the ledger behind the service's back (time passing, a crash's leftovers)."""
    async with pool.connection() as conn:
        await conn.execute(statement, params)


async def claim_workflow_ids(pool: AsyncConnectionPool, campaign_id: str) -> set[str]:
    """The workflow ids of every claim on the campaign, as the ledger holds them."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT workflow_id FROM claims WHERE campaign_id = %s", (campaign_id,)
        )
        return {wid for (wid,) in await cur.fetchall()}


async def ledger_states(pool: AsyncConnectionPool, coupon_id: str) -> list[tuple[str | None, str]]:
    view = await ledger.coupon_view(pool, coupon_id)
    assert view is not None
    return [(e["from_state"], e["to_state"]) for e in view["events"]]


# ----------------------------------------------------------------- the catalog and the simulator


async def new_batch(pool: AsyncConnectionPool, platform: RestPlatform, **kwargs: Any) -> Batch:
    """A batch (20 coupons unless told otherwise) at the simulator and in the ledger."""
    kwargs.setdefault("quantity", 20)
    return await catalog.batches.create_batch(pool, platform, new_id("b"), **kwargs)


async def new_campaign(
    pool: AsyncConnectionPool, platform: RestPlatform, **kwargs: Any
) -> Campaign:
    """A campaign (and its batch at the simulator) with an id no other test uses."""
    kwargs.setdefault("required_tasks", [TASK])
    kwargs.setdefault("quota", 10)
    return await catalog.campaigns.ensure_campaign(pool, platform, new_id("c"), **kwargs)


async def set_at_platform(
    pool: AsyncConnectionPool, simulator: httpx.AsyncClient, batch_id: str, **changes: object
) -> None:
    """Change our batch `batch_id` at the simulator behind the service's back, as the
    platform's own operator can (`remaining`, `status`); the ledger learns it at a sync."""
    batch = await catalog.batches.get_batch(pool, batch_id)
    response = await simulator.put(f"/sim/batches/{batch.platform_batch_id}", json=changes)
    response.raise_for_status()


async def sim_stats(control: httpx.AsyncClient) -> dict[str, int]:
    response = await control.get("/sim/stats")
    response.raise_for_status()
    stats: dict[str, int] = response.json()
    return stats


async def wait_for_stat(
    simulator: httpx.AsyncClient, name: str, at_least: int, timeout_s: float = 10.0
) -> None:
    """Until the simulator's counter `name` reaches `at_least`; fails after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            if (await sim_stats(simulator))[name] >= at_least:
                return
            await asyncio.sleep(0.05)


async def share_clock(env: WorkflowEnvironment, simulator: httpx.AsyncClient) -> timedelta:
    """Set the simulator's clock to the time-skipping server's, which earlier tests skipped
    ahead; returns how far ahead that is (PostgreSQL's clock stayed behind)."""
    skew = await env.get_current_time() - datetime.now(UTC)
    knobs = {"clock_offset_s": skew.total_seconds()}
    (await simulator.put("/sim/knobs", json=knobs)).raise_for_status()
    return skew


# ----------------------------------------------------------------- claims and workflows


class StartedClaims(ClaimService):
    """Claims as most tests want them: answered by the ledger, then waited on until the
    starter running beside the test's workers has started the coupon's workflow (what a
    user sees a moment after the answer). The tests of the answer itself use ClaimService."""

    async def claim(self, campaign_id: str, user_id: str) -> ClaimResult:
        result = await super().claim(campaign_id, user_id)
        await wait_started(self._pool, result.coupon_id)
        return result


async def wait_started(pool: AsyncConnectionPool, coupon_id: str) -> None:
    """Until the ledger says the claim's workflow is started; fails after STARTED_WITHIN_S."""
    async with asyncio.timeout(STARTED_WITHIN_S):
        while True:
            found = await ledger.get_claim(pool, coupon_id)
            if found is not None and found.workflow_started:
                return
            await asyncio.sleep(0.02)


# Far more than the starter takes (it looks every 0.2 s): a claim not started by then means
# no starter runs beside the test.
STARTED_WITHIN_S = 15.0


def claims_of(pool: AsyncConnectionPool, client: Client, settings: Settings) -> ClaimService:
    return StartedClaims(pool, client, settings)


Handle = WorkflowHandle[UserCouponWorkflow, CouponStatus]


def handle_of(client: Client, workflow_id: str) -> Handle:
    """The typed handle of a coupon's workflow."""
    return client.get_workflow_handle_for(UserCouponWorkflow.run, workflow_id)


async def wait_for_state(handle: Handle, state: str, timeout_s: float = 30.0) -> CouponStatus:
    """Poll the `status` query until the coupon is in `state` (its workflow may start a moment
    after the claim's answer); fails after `timeout_s`."""
    last: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    status = await handle.query(UserCouponWorkflow.status)
                except RPCError as err:
                    if err.status != RPCStatusCode.NOT_FOUND:
                        raise
                    last = "not started"
                    await asyncio.sleep(0.05)
                    continue
                last = status.state
                if last == state:
                    return status
                if last in FINAL_STATES:
                    pytest.fail(f"{handle.id} ended {last} ({status.transitions[-1].cause})")
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"{handle.id} still {last} after {timeout_s}s, expected {state}")


async def wait_for_budget(handle: Handle, timeout_s: float = 15.0) -> CouponStatus:
    """Until the coupon says it waits for budget; it must stay `usable` all along."""
    async with asyncio.timeout(timeout_s):
        while True:
            status = await handle.query(UserCouponWorkflow.status)
            assert status.state == "usable", status
            if "budget" in status.waiting_for:
                return status
            await asyncio.sleep(0.1)


async def start_workflow(
    client: Client, settings: Settings, workflow: str, arg: object, result_type: type[R]
) -> WorkflowHandle[Any, R]:
    """Start one of the service's workflows (by name) on the test's task queue, under an id
    no other test uses, bounded to a minute."""
    handle: WorkflowHandle[Any, R] = await client.start_workflow(
        workflow,
        arg,
        id=new_id(workflow),
        task_queue=settings.task_queue,
        result_type=result_type,
        execution_timeout=timedelta(seconds=60),
    )
    return handle


async def run_workflow(
    client: Client, settings: Settings, workflow: str, arg: object, result_type: type[R]
) -> R:
    """`start_workflow`, then its result."""
    return await (await start_workflow(client, settings, workflow, arg, result_type)).result()


async def close_workflows(client: Client, workflow_ids: Iterable[str]) -> None:
    """Terminate what a test left open on the dev server; closed ones are fine as they are."""
    gate = asyncio.Semaphore(50)

    async def close(workflow_id: str) -> None:
        async with gate:
            try:
                await client.get_workflow_handle(workflow_id).terminate("test over")
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise

    await asyncio.gather(*(close(w) for w in workflow_ids))


def published_search_attributes(history: WorkflowHistory) -> list[TypedSearchAttributes]:
    """The search attributes a workflow set, at its start and at each upsert, in order."""
    published: list[TypedSearchAttributes] = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            attributes = event.workflow_execution_started_event_attributes.search_attributes
        elif event.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            attributes = event.upsert_workflow_search_attributes_event_attributes.search_attributes
        else:
            continue
        published.append(decode_typed_search_attributes(attributes))
    return published
