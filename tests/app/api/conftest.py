"""The API against the real parts: PostgreSQL (a schema per test), the Temporal dev server
with the real workers, and a simulator that signs its redemption callbacks.

Most tests drive the app in process (httpx over ASGI, with the test's pool and client);
`served` also puts it on a real port, for the simulator's callbacks and schemathesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, LiteralString, TypeVar

import httpx
import pytest
import pytest_asyncio
import uvicorn
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from app.api.app import create_app
from app.embedded import SimulatorProcess, free_port
from app.service import Backends
from coupons.config import Settings
from coupons.platforms.configured import make_platform
from coupons.tenants import create_key, create_tenant
from tests.conftest import TASK, new_id, row_count, running_workers

T = TypeVar("T")
CALLBACK_SECRET = f"api-callback-secret-{uuid.uuid4().hex}"
CALLBACK_PATH = "/callbacks/generic/coupon-used"
# The simulator's callback knobs as it starts (the session's `simulator` fixture resets
# only the others): no callbacks.
CALLBACK_KNOBS = {
    "callback_url": "",
    "callback_retry_s": 1.0,
    "callback_duplicate_rate": 0.0,
    "callback_forged_rate": 0.0,
    "callback_delay_ms": 0.0,
}


@pytest.fixture(scope="session")
def simulator_url(run_dir: Path) -> Iterator[str]:
    """This package's own simulator (it replaces the session's for these tests): it signs
    COUPON.USED callbacks with CALLBACK_SECRET, sent where its `callback_url` knob says."""
    sim = SimulatorProcess(
        run_dir / "api-simulator.sqlite3",
        free_port(),
        env={"PLATFORM_CALLBACK_SECRET": CALLBACK_SECRET},
        log_path=run_dir / "api-simulator.log",
        inherit_knobs=False,
        die_with_parent=True,  # gone with the test process, however it ends
    )
    sim.start()
    yield sim.url
    sim.stop()


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return replace(settings, platform_callback_secret=CALLBACK_SECRET, api_port=free_port())


@dataclass
class Tenant:
    id: str
    admin: dict[str, str]  # headers with the admin key
    app: dict[str, str]  # headers with an app key


async def new_tenant(pool: AsyncConnectionPool) -> Tenant:
    tenant, admin = await create_tenant(pool, new_id("tenant"))
    app = await create_key(pool, tenant.id, "app")
    return Tenant(
        tenant.id,
        {"Authorization": f"Bearer {admin.api_key}"},
        {"Authorization": f"Bearer {app.api_key}"},
    )


@pytest_asyncio.fixture
async def tenant_a(pool: AsyncConnectionPool) -> Tenant:
    return await new_tenant(pool)


@pytest_asyncio.fixture
async def tenant_b(pool: AsyncConnectionPool) -> Tenant:
    return await new_tenant(pool)


@dataclass
class Api:
    http: httpx.AsyncClient
    settings: Settings
    backends: Backends
    client: Client

    @property
    def pool(self) -> AsyncConnectionPool:
        return self.backends.pool


@pytest_asyncio.fixture
async def backends(
    pool: AsyncConnectionPool, dev_env: WorkflowEnvironment, api_settings: Settings
) -> AsyncIterator[Backends]:
    platform = make_platform(api_settings)
    yield Backends(api_settings, pool, dev_env.client, platform)
    await platform.aclose()


@pytest_asyncio.fixture
async def api(backends: Backends, dev_env: WorkflowEnvironment) -> AsyncIterator[Api]:
    """The app in process, over the test's schema, task queue and simulator."""
    app = create_app(backends.settings, backends)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30) as http:
        yield Api(http, backends.settings, backends, dev_env.client)


@pytest_asyncio.fixture
async def workers(api: Api) -> AsyncIterator[None]:
    async with running_workers(api.client, api.pool, api.settings):
        yield


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # pytest keeps its own signal handlers


@pytest_asyncio.fixture
async def served(api: Api, simulator: httpx.AsyncClient) -> AsyncIterator[str]:
    """The same app on a real port of this event loop, the simulator's callbacks sent to
    it; yields its base URL."""
    app = create_app(api.settings, api.backends)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=api.settings.api_port, lifespan="off", log_config=None
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            assert not serving.done(), serving
            await asyncio.sleep(0.02)
    url = api.settings.api_url
    knobs = {"callback_url": f"{url}{CALLBACK_PATH}", "callback_retry_s": 0.2}
    (await simulator.put("/sim/knobs", json=knobs)).raise_for_status()
    try:
        yield url
    finally:
        (await simulator.put("/sim/knobs", json=CALLBACK_KNOBS)).raise_for_status()
        server.should_exit = True
        await serving


# ----------------------------------------------------------------- helpers the tests import


async def make_campaign(api: Api, tenant: Tenant, **fields: Any) -> dict[str, Any]:
    """A running batch and a campaign on it, made through the API by the tenant's admin."""
    batch = await api.http.post(
        "/v1/batches",
        json={"quantity": fields.pop("quantity", 20), "per_user_limit": 5},
        headers=tenant.admin,
    )
    assert batch.status_code == 201, batch.text
    body = {"batch_id": batch.json()["id"], "quota": 10, "tasks": [{"key": TASK}], **fields}
    campaign = await api.http.post("/v1/campaigns", json=body, headers=tenant.admin)
    assert campaign.status_code == 201, campaign.text
    created: dict[str, Any] = campaign.json()
    return created


async def claim(api: Api, tenant: Tenant, campaign_id: str, user: str) -> dict[str, Any]:
    response = await api.http.post(
        f"/v1/campaigns/{campaign_id}/claims", json={"user_id": user}, headers=tenant.app
    )
    assert response.status_code in (200, 201), response.text
    claimed: dict[str, Any] = response.json()
    return claimed


TABLES: tuple[LiteralString, ...] = (
    "tenants",
    "api_keys",
    "batches",
    "campaigns",
    "claims",
    "coupon_events",
    "receipts",
    "idempotency_keys",
    "callback_notifications",
)


async def ledger_counts(pool: AsyncConnectionPool) -> dict[str, int]:
    """Rows of every table a request could write."""
    return {table: await row_count(pool, table) for table in TABLES}


async def until(check: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Poll `check` until it answers something true, and return that; fails after
    `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            if value := await check():
                return value
            await asyncio.sleep(0.05)


async def history_length(client: Client, workflow_id: str) -> int:
    """Events in a workflow's history: a signal or an accepted update adds some."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return len(history.events)
