"""The worker process: what runs on which task queue (`build_workers`), and the services
around the workers (`worker_services`: the database, the client, the schedules, the claim
repair loop and the wedged coupon count). `worker.py` puts them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.common import MetricMeter
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.catalog import CatalogActivities
from activities.ledger import LedgerActivities
from activities.platform import PlatformActivities
from app.claims import ClaimService
from app.schedules import ensure_schedules
from app.wedged import count_by_cause, find_wedged
from coupons import metrics
from coupons.config import Settings
from coupons.ledger import db
from coupons.platforms.base import Platform
from coupons.platforms.configured import make_platform
from coupons.platforms.metered import MeteredPlatform
from coupons.temporal import check_search_attributes, connect, worker_runtime
from workflows.catalog_sync import CatalogSyncWorkflow
from workflows.end_campaign import EndCampaignWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger(__name__)

REPAIR_EVERY_S = 10.0
# A scan costs a few counts and one query per wedged coupon (app/wedged.py).
WEDGED_EVERY_S = 60.0


def workflow_runner() -> SandboxedWorkflowRunner:
    # The state machine library is pure but not written for the sandbox: pass it through.
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("statemachine")
    )


def build_workers(
    client: Client, pool: AsyncConnectionPool, platform: Platform, settings: Settings
) -> list[Worker]:
    """What runs on which task queue: one worker per queue, with its workflows and
    activities. `worker.py` runs these; the tests and scripts build the same ones."""
    ledger = LedgerActivities(pool)
    sends = PlatformActivities(platform, pool, settings.lag_window_s)
    catalog = CatalogActivities(pool, platform, client)
    return [
        # TASK_QUEUE: every workflow, and the activities that only touch the ledger.
        Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[
                UserCouponWorkflow,
                CatalogSyncWorkflow,
                ReconcileWorkflow,
                EndCampaignWorkflow,
            ],
            activities=[
                ledger.record_transition,
                catalog.syncable_batches,
                catalog.all_batches,
                catalog.await_states,
                catalog.count_received,
                catalog.expire_received_page,
            ],
            workflow_runner=workflow_runner(),
            max_cached_workflows=settings.worker_cache_size,
            max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
            max_concurrent_activities=settings.worker_max_concurrent_activities,
        ),
        # <TASK_QUEUE>-platform: every platform call, at most the platform's published
        # rate, so a burst of unlocks queues in Temporal instead of drawing the platform's
        # frequency-limit refusals.
        Worker(
            client,
            task_queue=settings.platform_task_queue,
            activities=[
                sends.issue_coupon,
                sends.wait_for_redemption,
                sends.lookup_coupon,
                catalog.sync_batch,
                catalog.reconcile_batch,
            ],
            max_task_queue_activities_per_second=settings.platform_rate_limit,
            max_concurrent_activities=settings.worker_max_concurrent_activities,
        ),
    ]


async def repair_forever(claims: ClaimService, every_s: float) -> None:
    while True:
        try:
            repaired = await claims.repair()
            if repaired:
                log.info("repaired %d claims without a workflow", repaired)
        except Exception:
            # Postgres or Temporal may be restarting; the next round tries again.
            log.exception("claim repair round failed")
        await asyncio.sleep(every_s)


async def watch_wedged_forever(
    pool: AsyncConnectionPool,
    client: Client,
    settings: Settings,
    meter: MetricMeter,
    every_s: float = WEDGED_EVERY_S,
) -> None:
    """Count the wedged coupons into the `coupons_wedged` gauge, and say so in the log;
    recovering them is an operator's command (`starter.py coupon recover`)."""
    while True:
        try:
            found = await find_wedged(pool, client, settings)
            metrics.wedged(meter, count_by_cause(found))
            if found:
                causes = ", ".join(f"{c} {n}" for c, n in count_by_cause(found).items() if n)
                log.warning(
                    "%d wedged coupons (%s): `starter.py coupon wedged` lists them, "
                    "`starter.py coupon recover` recovers them",
                    len(found),
                    causes,
                )
        except Exception:
            # Postgres or Temporal may be restarting; the next round tries again.
            log.exception("wedged coupon scan failed")
        await asyncio.sleep(every_s)


@dataclass
class WorkerServices:
    """What a worker process gives its workers: built by `worker_services`."""

    client: Client
    pool: AsyncConnectionPool
    platform: Platform
    stop: asyncio.Event  # set by SIGINT or SIGTERM


@contextlib.asynccontextmanager
async def worker_services(settings: Settings) -> AsyncIterator[WorkerServices]:
    """Everything around the workers: SIGINT and SIGTERM handled (a graceful stop, even
    during start-up), the database migrated and pooled, the client (with the worker's
    metrics), the search attributes checked, the schedules in place, the platform metered,
    and the claim repair and wedged-coupon loops running until the block ends."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await db.migrate_url(settings.database_url)
    runtime = worker_runtime(settings)
    client = await connect(settings, runtime)
    if runtime is not None:
        log.info(
            "metrics at http://%s:%s/metrics", settings.metrics_host, settings.worker_metrics_port
        )
    await check_search_attributes(client, settings.temporal_namespace)
    await ensure_schedules(client, settings)
    platform = MeteredPlatform(make_platform(settings), metrics.platform_call)
    async with db.pool(settings.database_url, max_size=settings.db_pool_size) as pool:
        repair = asyncio.create_task(
            repair_forever(
                ClaimService(pool, client, settings),
                min(REPAIR_EVERY_S, settings.claim_repair_after_s),
            )
        )
        meter = runtime.metric_meter if runtime is not None else MetricMeter.noop
        watch = asyncio.create_task(watch_wedged_forever(pool, client, settings, meter))
        try:
            yield WorkerServices(client, pool, platform, stop)
        finally:
            for task in (repair, watch):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await platform.aclose()


async def run_until_stopped(workers: list[Worker], stop: asyncio.Event) -> None:
    """Poll with every worker until `stop` is set, then shut them down gracefully."""
    async with contextlib.AsyncExitStack() as running:
        for worker in workers:
            await running.enter_async_context(worker)
        log.info(
            "worker polling %s on %s",
            " and ".join(worker.task_queue for worker in workers),
            workers[0].client.service_client.config.target_host,
        )
        await stop.wait()
        log.info("shutting down")
