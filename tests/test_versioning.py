"""Worker versioning (app/versioning.py) on the dev server: two versions of the real workers
in one deployment. A pinned catalog sync started on v1 finishes on v1 while v2 is current;
a coupon (auto-upgrade) started on v1 moves to v2 at its next workflow task; v1, replaced,
is not made current again by a worker of it that starts later.

Each test has a deployment of its own: the server refuses a new current version that does
not poll every task queue the current one did, and other tests' queues come and go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from app import versioning
from app.workers import build_workers
from coupons import contract as act
from coupons import metrics
from coupons.config import ConfigError, Settings
from coupons.model import SyncInput, SyncReport, TaskCompletion
from coupons.platforms.generic.adapter import RestPlatform
from coupons.platforms.metered import MeteredPlatform
from tests.conftest import (
    TASK,
    claims_of,
    close_workflows,
    handle_of,
    new_campaign,
    new_id,
    start_workflow,
    wait_for_state,
)
from workflows import catalog_sync, end_campaign, reconcile, user_coupon
from workflows.user_coupon import UserCouponWorkflow

PINNED = VersioningBehavior.PINNED.value
AUTO_UPGRADE = VersioningBehavior.AUTO_UPGRADE.value


def version_settings(settings: Settings, deployment: str, build_id: str) -> Settings:
    return replace(
        settings, temporal_deployment_name=deployment, temporal_build_id_override=build_id
    )


class Versions:
    """The workers of each version, started one task queue at a time."""

    def __init__(self, client: Client, pool: AsyncConnectionPool, stack: AsyncExitStack) -> None:
        self.client, self.pool, self.stack = client, pool, stack
        self.workers: dict[str, list[Worker]] = {}

    async def start(self, settings: Settings, which: int) -> WorkerDeploymentVersion:
        """Start the main (0) or platform (1) worker of the version `settings` name."""
        version = versioning.worker_version(settings)
        if version.build_id not in self.workers:
            platform = MeteredPlatform(
                RestPlatform(settings.platform_url, timeout_s=settings.platform_timeout_s),
                metrics.platform_call,
            )
            self.stack.push_async_callback(platform.aclose)
            self.workers[version.build_id] = build_workers(
                self.client, self.pool, platform, settings
            )
        await self.stack.enter_async_context(self.workers[version.build_id][which])
        return version


@asynccontextmanager
async def versions(client: Client, pool: AsyncConnectionPool) -> AsyncIterator[Versions]:
    async with AsyncExitStack() as stack:
        yield Versions(client, pool, stack)


async def task_versions(handle: WorkflowHandle[Any, Any]) -> list[tuple[str, int]]:
    """(build id, versioning behavior) of each workflow task completed, in order."""
    history = await handle.fetch_history()
    return [
        (
            e.workflow_task_completed_event_attributes.deployment_version.build_id,
            e.workflow_task_completed_event_attributes.versioning_behavior,
        )
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]


async def wait_for_event(handle: WorkflowHandle[Any, Any], event_type: int) -> None:
    async with asyncio.timeout(30):
        while True:
            events = (await handle.fetch_history()).events
            if any(e.event_type == event_type for e in events):
                return
            await asyncio.sleep(0.1)


async def test_a_pinned_sync_stays_on_v1_and_a_coupon_moves_to_v2(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    client = dev_env.client
    deployment = new_id("deploy")
    v1_settings = version_settings(settings, deployment, "v1")
    v2_settings = version_settings(settings, deployment, "v2")
    campaign = await new_campaign(pool, platform, required_tasks=[TASK], quota=5)
    coupon = None
    async with versions(client, pool) as running:
        try:
            # v1 current, its workflow worker alone: the sync's batch read waits on the
            # platform queue, which nothing polls yet.
            v1 = await running.start(v1_settings, 0)
            await versioning.make_current(client, v1)
            sync = await start_workflow(
                client,
                settings,
                act.CATALOG_SYNC_WORKFLOW,
                SyncInput([campaign.batch_id]),
                SyncReport,
            )
            await wait_for_event(sync, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
            coupon = await claims_of(pool, client, v1_settings).claim_started(
                campaign.id, "shopper"
            )
            handle = handle_of(client, coupon.workflow_id)
            await wait_for_state(handle, "received")

            # v2 becomes current; then the platform queue gets workers of both versions.
            v2 = await running.start(v2_settings, 0)
            await versioning.make_current(client, v2)
            await running.start(v1_settings, 1)
            await running.start(v2_settings, 1)

            report = await sync.result()
            await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(TASK))
            await wait_for_state(handle, "issued")
        finally:
            if coupon is not None:
                await close_workflows(client, [coupon.workflow_id])

    assert [b.batch_id for b in report.batches] == [campaign.batch_id]
    # Every task of the sync ran on v1, the one after its batch read while v2 was current.
    synced = await task_versions(sync)
    assert len(synced) >= 2 and set(synced) == {("v1", PINNED)}, synced
    # The coupon's first task ran on v1; from the task done on, it runs on v2.
    moved = await task_versions(handle)
    assert moved[0] == ("v1", AUTO_UPGRADE), moved
    assert moved[-1] == ("v2", AUTO_UPGRADE) and ("v1", AUTO_UPGRADE) not in moved[1:], moved


async def test_roll_out_makes_a_new_version_current_and_never_a_replaced_one(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    settings: Settings,
) -> None:
    """WORKER_VERSION_ROLLOUT=auto: a worker of a new version makes it current; a worker of
    v1 restarted after v2 replaced it leaves v2 current (coupons would otherwise move back
    to older code, past patches it does not know)."""
    client = dev_env.client
    deployment = new_id("deploy")
    async with versions(client, pool) as running:
        v1 = await running.start(version_settings(settings, deployment, "v1"), 0)
        assert (await versioning.roll_out(client, v1)).outcome == "made current"
        assert (await versioning.roll_out(client, v1)).outcome == "already current"
        v2 = await running.start(version_settings(settings, deployment, "v2"), 0)
        assert (await versioning.roll_out(client, v2)).outcome == "made current"
        assert (await versioning.roll_out(client, v1)).outcome == "left"
    current = await versioning.current_version(client, deployment)
    assert current == v2


async def test_a_worker_rollout_that_failed_is_tried_again_until_its_version_is_current(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's rollout beside it survives a failed try (Temporal restarting as the
    worker starts: forced here, the first try refused as the restart refuses it): it tries
    again and the version becomes current, instead of leaving its tasks undispatched."""
    client = dev_env.client
    deployment = new_id("deploy")
    real = versioning.roll_out
    tries = 0

    async def refused_once(client: Client, version: WorkerDeploymentVersion) -> Any:
        nonlocal tries
        tries += 1
        if tries == 1:
            raise RPCError("transport error", RPCStatusCode.UNKNOWN, b"")
        return await real(client, version)

    monkeypatch.setattr(versioning, "roll_out", refused_once)
    async with versions(client, pool) as running:
        v1 = await running.start(version_settings(settings, deployment, "v1"), 0)
        await asyncio.wait_for(versioning.roll_out_beside(client, v1, retry_s=0.1), 60)
    assert tries == 2
    assert await versioning.current_version(client, deployment) == v1


# ----- what is versioned how ------------------------------------------------------------------


def test_the_short_workflows_are_pinned_and_the_long_ones_auto_upgrade() -> None:
    behavior = {
        cls.__name__: versioning.behavior_of(cls)
        for cls in (
            catalog_sync.CatalogSyncWorkflow,
            reconcile.ReconcileWorkflow,
            end_campaign.EndCampaignWorkflow,
            user_coupon.UserCouponWorkflow,
        )
    }
    assert behavior == {
        "CatalogSyncWorkflow": VersioningBehavior.PINNED,
        "ReconcileWorkflow": VersioningBehavior.PINNED,
        "EndCampaignWorkflow": VersioningBehavior.AUTO_UPGRADE,
        # Its own declaration, or the workers' default.
        "UserCouponWorkflow": VersioningBehavior.AUTO_UPGRADE,
    }


def test_the_build_id_is_the_package_version_and_a_hash_of_the_workflow_code() -> None:
    build_id = versioning.code_build_id()
    version, digest = build_id.rsplit("-", 1)
    assert version and len(digest) == 12 and int(digest, 16) >= 0
    hashed = {str(p.relative_to(versioning.ROOT)) for p in versioning.workflow_sources()}
    # Every workflow module, and what they import of ours: the machine and the data shapes.
    assert {"workflows/user_coupon.py", "workflows/reconcile.py"} <= hashed
    assert {"coupons/lifecycle.py", "coupons/model.py", "activities/catalog.py"} <= hashed
    # Not what no workflow runs: the API, the ledger.
    assert not any(p.startswith(("app/", "coupons/ledger/")) for p in hashed)


def test_settings_name_the_version_and_its_rollout() -> None:
    s = Settings.from_env({})
    assert (s.temporal_deployment_name, s.worker_version_rollout) == ("coupon-lifecycle", "auto")
    assert versioning.worker_version(s).build_id == versioning.code_build_id()
    given = Settings.from_env(
        {
            "TEMPORAL_DEPLOYMENT_NAME": "coupons-eu",
            "TEMPORAL_BUILD_ID": "2026-12-06.1",
            "WORKER_VERSION_ROLLOUT": "manual",
        }
    )
    assert versioning.worker_version(given) == WorkerDeploymentVersion("coupons-eu", "2026-12-06.1")
    assert Settings.from_env(given.to_env()) == given
    for env, error in (
        ({"TEMPORAL_DEPLOYMENT_NAME": "coupons.eu"}, "must be a name with no dot"),
        ({"WORKER_VERSION_ROLLOUT": "sometimes"}, "must be one of auto, manual"),
    ):
        with pytest.raises(ConfigError, match=error):
            Settings.from_env(env)
