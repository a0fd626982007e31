"""The worker process: what runs on which task queue (`build_workers`), and the services
around the workers (`worker_services`: the database, the client, the schedules, the
starter of claims' workflows and the wedged coupon count). `worker.py` puts them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.common import MetricMeter
from temporalio.worker import PollerBehaviorAutoscaling, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.catalog import CatalogActivities
from activities.ledger import LedgerActivities
from activities.platform import PlatformActivities
from app import versioning
from app.claims import STARTS_AT_ONCE, ClaimService
from app.heap import time_collections
from app.schedules import ensure_schedules
from app.wedged import count_by_cause, find_wedged
from coupons import metrics
from coupons.config import Settings
from coupons.ledger import db
from coupons.ledger.permits import PermitLeases, PermitPolicy
from coupons.platforms.base import Platform
from coupons.platforms.configured import make_platform
from coupons.platforms.limited import CallKind, LeasedPermits, LimitedPlatform
from coupons.platforms.metered import MeteredPlatform
from coupons.temporal import check_search_attributes, connect, worker_runtime
from workflows.catalog_sync import CatalogSyncWorkflow
from workflows.end_campaign import EndCampaignWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger(__name__)

# How often an idle starter looks for new claims: the most a granted claim waits for its
# workflow's start when nothing else is going on. One indexed read each time.
STARTS_IDLE_S = 0.2
# A scan costs a few counts and one query per wedged coupon (app/wedged.py).
WEDGED_EVERY_S = 60.0
# Workflow task pollers scaled on the server's word (a backlog asks for more): at the SDK's
# fixed five, 20,000 coupons claimed in 21 s left their first workflow tasks queued for
# minutes with the worker at 0.35 of a core, draining 37 a second; scaled, 76 a second with
# the worker at a full core (bench/results/2026-12-06-profile.md).
# The scaling is per queue, and the worker's sticky queue (every task of a cached workflow
# after its first) stayed at the minimum: at 100 lifecycles in flight its one poller fell
# behind, and for 0.2 to 0.5 of the coupons a task waited out the sticky queue's 10 s, to
# be moved to the shared queue by a timeout. At eight each none did, and workflow tasks
# waited 0.65 s on average instead of 1.8 (bench/results/2026-12-07-profile.md).
# The outbox starts STARTS_AT_ONCE workflows at a time, and the server hands their first
# tasks out in bursts: a task no poll is waiting for is written to the server's backlog and
# read back. At 64 polls waiting, 10,000 steady claims' workflows all started 72 and 76 s
# after the load against 90 and 102 at eight (drained at 108 and 105 a second against 91
# and 82), with the server's CPU per claim 11.3 ms against 13.1 and the worker's 2.1 ms
# against 3.9; lifecycles against the floor alike (the same profile notes, "At night").
WORKFLOW_TASK_POLLERS = PollerBehaviorAutoscaling(minimum=64, maximum=128, initial=64)


def workflow_runner() -> SandboxedWorkflowRunner:
    """The sandbox, its restrictions on every call a workflow makes kept, its fresh import
    of the workflow's module for each run left out.

    That import re-ran our workflow modules and `workflow.defn` for every new coupon: a
    seventh of the worker's CPU at lifecycle saturation (py-spy, 2026-12-06). Our workflow
    modules hold constants only, checked by tests/test_layers.py, so a run can share them;
    the state machine library is pure but not written for the sandbox."""
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
    )


def build_workers(
    client: Client, pool: AsyncConnectionPool, platform: Platform, settings: Settings
) -> list[Worker]:
    """What runs on which task queue: one worker per queue, with its workflows and
    activities. `worker.py` runs these; the tests and scripts build the same ones."""
    ledger = LedgerActivities(pool)
    sends = PlatformActivities(platform, pool, settings.lag_window_s)
    catalog = CatalogActivities(pool, platform, client)
    # A stopping worker takes no new task, and gives those in flight this long to finish
    # before cancelling them: a deploy would otherwise cut every send mid-way, to be resent
    # by another worker once its heartbeat times out.
    grace = timedelta(seconds=settings.worker_shutdown_grace_s)
    # Both of this process's version (app/versioning.py): a pinned run's activities go to
    # the platform workers of the version it runs on.
    deployment = versioning.deployment_config(versioning.worker_version(settings))
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
                catalog.expire_received_coupons,
            ],
            workflow_runner=workflow_runner(),
            workflow_task_poller_behavior=WORKFLOW_TASK_POLLERS,
            max_cached_workflows=settings.worker_cache_size,
            max_concurrent_workflow_tasks=settings.worker_max_concurrent_workflow_tasks,
            max_concurrent_activities=settings.worker_max_concurrent_activities,
            graceful_shutdown_timeout=grace,
            deployment_config=deployment,
        ),
        # <TASK_QUEUE>-platform: every platform call. The platform's limits are held per
        # call by `limited_platform`; each of these activities makes at least one call, so
        # dispatching more of them a second than the limit on all calls would only move the
        # queue from Temporal (durable, visible) into the workers' slots, waiting for permits.
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
            graceful_shutdown_timeout=grace,
            deployment_config=deployment,
        ),
    ]


async def start_claims_forever(claims: ClaimService, idle_s: float = STARTS_IDLE_S) -> None:
    """Start the workflows of granted claims, as fast as Temporal takes them: the claims
    answered by the ledger alone are this loop's outbox."""
    while True:
        try:
            started = await claims.start_pending()
        except Exception:
            # Postgres or Temporal may be restarting; the next round tries again.
            log.exception("starting claims' workflows failed")
            started = 0
        if started < STARTS_AT_ONCE:
            await asyncio.sleep(idle_s)


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


@contextlib.asynccontextmanager
async def in_background(*loops: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """`loops` running beside the block, cancelled when it ends."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class WorkerServices:
    """What a worker process gives its workers: built by `worker_services`."""

    client: Client
    pool: AsyncConnectionPool
    platform: Platform
    stop: asyncio.Event  # set by the first SIGINT or SIGTERM


@contextlib.asynccontextmanager
async def worker_services(settings: Settings) -> AsyncIterator[WorkerServices]:
    """Everything around the workers: SIGINT and SIGTERM handled (the first a graceful stop,
    even during start-up; a second one stops at once), the database migrated and pooled, the
    client (with the worker's metrics), the search attributes checked, the schedules in
    place, the platform metered and limited (`limited_platform`), and the claims' workflow
    starter and the wedged-coupon loops running until the block ends."""
    stop = asyncio.Event()
    _stop_on_signal(stop)
    await db.migrate_url(settings.database_url)
    runtime = worker_runtime(settings)
    client = await connect(settings, runtime)
    if runtime is not None:
        log.info("metrics at %s", settings.worker_metrics_url)
    await check_search_attributes(client, settings.temporal_namespace)
    await ensure_schedules(client, settings)
    async with db.pool(settings.database_url, max_size=settings.db_pool_size) as pool:
        platform = limited_platform(
            MeteredPlatform(make_platform(settings), metrics.platform_call), pool, settings
        )
        meter = runtime.metric_meter if runtime is not None else MetricMeter.noop
        untime = time_collections(metrics.gc_pause_recorder(meter)) if runtime else None
        try:
            async with in_background(
                start_claims_forever(ClaimService(pool, client, settings)),
                watch_wedged_forever(pool, client, settings, meter),
                *_rollout(client, settings),
            ):
                yield WorkerServices(client, pool, platform, stop)
        finally:
            if untime is not None:
                untime()
            await platform.aclose()


def limited_platform(inner: Platform, pool: AsyncConnectionPool, settings: Settings) -> Platform:
    """`inner` (measured: what it counts are the calls that reach the platform), taking a
    permit before each call from the limits every worker shares through PostgreSQL, sends
    before queries. A call waits for its permit at most PLATFORM_TIMEOUT_S: with the call's
    own timeout, inside the issue activity's heartbeat timeout (Settings.check)."""
    policy = PermitPolicy(
        limits={
            CallKind.SEND: int(settings.platform_send_rate_limit),
            CallKind.QUERY: int(settings.platform_query_rate_limit),
        },
        total=int(settings.platform_rate_limit),
        yields_to={CallKind.QUERY: CallKind.SEND},
    )
    permits = LeasedPermits(PermitLeases(pool, policy), settings.platform_timeout_s)
    return LimitedPlatform(inner, permits)


def _rollout(client: Client, settings: Settings) -> list[Coroutine[Any, Any, None]]:
    """WORKER_VERSION_ROLLOUT=auto: this version made current once its workers poll."""
    if settings.worker_version_rollout != "auto":
        return []
    return [versioning.roll_out_beside(client, versioning.worker_version(settings))]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_on_signal(stop: asyncio.Event) -> None:
    """The first SIGINT or SIGTERM sets `stop`; after it both have their default effect
    again, so a second one (an impatient operator, an orchestrator's last word) ends the
    process at once rather than waiting for the work in flight."""
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        stop.set()
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            # Not Python's SIGINT handler: its KeyboardInterrupt would wait for the
            # cancelled work to wind down, the very wait a second Ctrl-C means to skip.
            signal.signal(sig, signal.SIG_DFL)

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping)


async def run_until_stopped(workers: list[Worker], stop: asyncio.Event) -> None:
    """Poll with every worker until `stop` is set, then shut them down gracefully: none
    takes new work, the activities in flight finish (within WORKER_SHUTDOWN_GRACE_S, then
    they are cancelled), and this returns."""
    async with contextlib.AsyncExitStack() as running:
        for worker in workers:
            await running.enter_async_context(worker)
        log.info(
            "worker polling %s on %s",
            " and ".join(worker.task_queue for worker in workers),
            workers[0].client.service_client.config.target_host,
        )
        await stop.wait()
        log.info("shutting down: no new work taken, the work in flight finishing")
        # All at once: leaving the exit stack would stop the workers one after the other,
        # each with its own grace, and a queue still polled meanwhile takes new work.
        await asyncio.gather(*(worker.shutdown() for worker in workers))
