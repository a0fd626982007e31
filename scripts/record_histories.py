"""Extend the replay corpus after a patched workflow change; never paper over a replay failure.

Records the histories of each workflow type (`--type`: the coupon's by default, the catalog
sync's, the reconciliation's, or all) on a stack of its own: the time-skipping Temporal
server, PostgreSQL and the platform simulator. Each path drives its workflow to the end it
is meant to reach and checks it; a path that ends otherwise writes nothing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Run as `scripts/record_histories.py`, the project root is not on the path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowHandle, WorkflowHistory, WorkflowUpdateFailedError
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.ledger import LedgerActivities
from app.claims import ClaimService
from app.embedded import EmbeddedPostgres, SimulatorProcess, find_binary, free_port
from app.wedged import recover
from app.workers import build_workers, workflow_runner
from coupons.catalog.batches import change_batch
from coupons.catalog.campaigns import ensure_campaign
from coupons.config import Settings
from coupons.ledger import db
from coupons.ledger.batches import get_batch
from coupons.ledger.campaigns import Campaign
from coupons.model import (
    SEARCH_ATTRIBUTES,
    BudgetNotice,
    CancelRequest,
    CouponStatus,
    ExpireRequest,
    ReconcileInput,
    ReconcileReport,
    RedemptionReport,
    SyncInput,
    SyncReport,
    TaskCompletion,
)
from coupons.platforms.base import BatchAction
from coupons.platforms.generic.adapter import RestPlatform
from workflows.catalog_sync import CatalogSyncWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.user_coupon import UserCouponWorkflow

ROOT = Path(__file__).resolve().parent.parent
HISTORIES = ROOT / "tests" / "histories"

Handle = WorkflowHandle[UserCouponWorkflow, CouponStatus]


class PathFailed(RuntimeError):
    """A path did not go the way it is meant to; its history is not written."""


class Recorder:
    """The running stack and the helpers every path uses (as tests/conftest.py does)."""

    def __init__(
        self,
        env: WorkflowEnvironment,
        pool: AsyncConnectionPool,
        platform: RestPlatform,
        sim: httpx.AsyncClient,
        base: Settings,
        default_knobs: dict[str, Any],
        database_url: str,
    ) -> None:
        self.env = env
        self.pool = pool
        self.platform = platform
        self.sim = sim
        self.base = base
        self.default_knobs = default_knobs
        self.database_url = database_url
        # Before each campaign id: the platform is shared by every path (its batches too).
        self.prefix = ""

    @contextlib.asynccontextmanager
    async def own_ledger(self, name: str) -> AsyncIterator[Recorder]:
        """This recorder on a ledger schema of the path's own: a run over every batch (no
        batch ids given) then reads only the path's batches, whichever paths ran before."""
        schema = f"rec_{name}"
        await db.migrate_url(self.database_url, schema=schema)
        async with db.pool(self.database_url, schema=schema) as pool:
            own = Recorder(
                self.env,
                pool,
                self.platform,
                self.sim,
                self.base,
                self.default_knobs,
                self.database_url,
            )
            own.prefix = f"{name}-"
            yield own

    def settings(self, name: str, **changes: Any) -> Settings:
        """Settings of one path: its own task queues."""
        return replace(
            self.base,
            task_queue=f"record-{name}",
            **changes,
        )

    @contextlib.asynccontextmanager
    async def workers(self, settings: Settings) -> AsyncIterator[None]:
        platform = RestPlatform(settings.platform_url, timeout_s=settings.platform_timeout_s)
        workers = build_workers(self.env.client, self.pool, platform, settings)
        try:
            async with workers[0], workers[1]:
                yield
        finally:
            await platform.aclose()

    async def knobs(self, **knobs: Any) -> None:
        response = await self.sim.put("/sim/knobs", json=knobs)
        response.raise_for_status()

    async def skew(self) -> timedelta:
        """How far the time-skipping server's clock is ahead of the wall clock."""
        return await self.env.get_current_time() - datetime.now(UTC)

    async def claim(
        self, name: str, settings: Settings, user: str = "u1", **campaign: Any
    ) -> Handle:
        return await self.claim_in(await self.campaign(f"rec-{name}", **campaign), settings, user)

    async def claim_in(self, c: Campaign, settings: Settings, user: str) -> Handle:
        """A coupon of `c` claimed by `user`, its workflow started."""
        result = await ClaimService(self.pool, self.env.client, settings).claim_started(c.id, user)
        return self.env.client.get_workflow_handle_for(UserCouponWorkflow.run, result.workflow_id)

    async def share_clock(self) -> None:
        """Earlier paths skipped the server's clock ahead: the platform must share its time,
        or a coupon's validity (and a batch's window) would already be over."""
        await self.knobs(clock_offset_s=(await self.skew()).total_seconds())

    async def campaign(self, campaign_id: str, **campaign: Any) -> Campaign:
        """A campaign and its batch, at the platform and in the ledger."""
        await self.share_clock()
        campaign.setdefault("required_tasks", ["first-order"])
        campaign.setdefault("quota", 10)
        return await ensure_campaign(
            self.pool, self.platform, self.prefix + campaign_id, **campaign
        )

    async def stats(self) -> dict[str, int]:
        response = await self.sim.get("/sim/stats")
        response.raise_for_status()
        stats: dict[str, int] = response.json()
        return stats


async def wait_for_state(handle: Handle, state: str, timeout_s: float = 60) -> CouponStatus:
    async with asyncio.timeout(timeout_s):
        while True:
            status = await handle.query(UserCouponWorkflow.status)
            if status.state == state:
                return status
            await asyncio.sleep(0.2)


async def refused(update: Awaitable[Any], expected: str) -> None:
    """The update must be rejected, with `expected` in the reason."""
    try:
        await update
    except WorkflowUpdateFailedError as err:
        if expected not in str(err.cause):
            raise PathFailed(f"update refused for another reason: {err.cause}") from err
        return
    raise PathFailed(f"update was accepted; expected a refusal with {expected!r}")


def check(condition: bool, what: str) -> None:
    if not condition:
        raise PathFailed(what)


# ----- the paths ----------------------------------------------------------------------
# Each drives one coupon and returns its handle once the workflow has closed.


async def issued_redeemed_by_poll(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s)
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion("first-order"))
        issued = await wait_for_state(handle, "issued")
        assert issued.receipt is not None
        used = await r.sim.post(f"/v1/coupons/{issued.receipt.platform_coupon_id}/use")
        used.raise_for_status()
        # The first poll comes right after the send; the next after the 5-minute backoff.
        await r.env.sleep(timedelta(minutes=6))
        status = await handle.result()
    check(status.transitions[-1].cause == "redeemed (platform lookup)", "not found by polling")
    return handle


async def issued_redeemed_by_signal(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s)
        await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion("first-order"))
        await wait_for_state(handle, "issued")
        status = await redeemed_by_callback(r, handle)
    check(status.transitions[-1].cause == "redeemed (callback)", "not redeemed by the report")
    return handle


async def issued_lapsed(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s, valid_days=30)
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion("first-order"))
        await wait_for_state(handle, "issued")
        await r.env.sleep(timedelta(days=31))
        await handle.result()
    return handle


async def received_expired(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        # The ledger computes the deadline from its own clock; the workflow reads the
        # server's, which earlier paths moved ahead. Three days on the server's clock:
        deadline = await r.skew() + timedelta(days=3)
        handle = await r.claim(name, s, task_deadline=deadline)
        await r.env.sleep(timedelta(days=3, minutes=1))
        status = await handle.result()
    check(status.transitions[-1].cause == "task deadline passed", "not expired by the deadline")
    return handle


async def received_cancelled(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s)
        status = await handle.execute_update(
            UserCouponWorkflow.cancel_coupon, CancelRequest("user left")
        )
        check(status.state == "cancelled", f"cancel update answered {status.state}")
        await handle.result()
    return handle


async def received_cancelled_by_signal(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s)
        await handle.signal(UserCouponWorkflow.cancel, CancelRequest("campaign withdrawn"))
        await handle.result()
    return handle


async def two_tasks_partial_then_done(r: Recorder, name: str) -> Handle:
    # A one-day validity: the validity timer ends the polling, the final lookup decides.
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s, required_tasks=["first-order", "survey"], valid_days=1)
        partial = await handle.execute_update(
            UserCouponWorkflow.complete_task, TaskCompletion("survey")
        )
        check(partial.state == "received", f"one task of two made it {partial.state}")
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion("first-order"))
        await wait_for_state(handle, "issued")
        await r.env.sleep(timedelta(days=1, hours=1))
        status = await handle.result()
    check(status.tasks_done == ["survey", "first-order"], f"tasks done: {status.tasks_done}")
    return handle


async def no_task_usable_issued(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s, required_tasks=[])
        issued = await wait_for_state(handle, "issued")
        check(
            [t.to_state for t in issued.transitions] == ["issued"],
            f"transitions: {issued.transitions}",
        )
        await redeemed_by_callback(r, handle)
    return handle


async def platform_refused_failed(r: Recorder, name: str) -> Handle:
    await r.knobs(restricted_users=["risky"])
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s, user="risky", required_tasks=[])
        status = await handle.result()
    check("USER_RESTRICTED" in status.transitions[-1].cause, status.transitions[-1].cause)
    return handle


async def lag_window_resend(r: Recorder, name: str) -> Handle:
    # The lookup lags 4 s behind a send and the lag window is 1.5 s: the first attempt
    # gives up looking, the retry resends the same key and then sees the coupon.
    await r.knobs(lookup_lag_s=4.0)
    s = r.settings(name, lag_window_s=1.5)
    before = await r.stats()
    async with r.workers(s):
        handle = await r.claim(name, s)
        await handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion("first-order"))
        await wait_for_state(handle, "issued")
        status = await redeemed_by_callback(r, handle)
    after = await r.stats()
    check(after["sends_applied"] - before["sends_applied"] == 1, "sent more than once")
    check(after["sends_replayed"] - before["sends_replayed"] >= 1, "no resend of the same key")
    check(
        [t.to_state for t in status.transitions] == ["usable", "issued", "redeemed"],
        f"transitions: {status.transitions}",
    )
    return handle


async def rejected_updates(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    client = r.env.client
    # The workflow's worker first, without the ledger activity: after the cancel the
    # workflow then stays open (cancelled, its ledger write pending), so the wrong-state
    # updates reach a running workflow, not a closed one.
    async with Worker(
        client,
        task_queue=s.task_queue,
        workflows=[UserCouponWorkflow],
        workflow_runner=workflow_runner(),
    ):
        handle = await r.claim(name, s, required_tasks=["first-order", "survey"])
        await refused(
            handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion("share")),
            "unknown task 'share'",
        )
        status = await handle.execute_update(
            UserCouponWorkflow.cancel_coupon, CancelRequest("user left")
        )
        check(status.state == "cancelled", f"cancel update answered {status.state}")
        await refused(
            handle.execute_update(UserCouponWorkflow.complete_task, TaskCompletion("survey")),
            "coupon is cancelled",
        )
        await refused(
            handle.execute_update(UserCouponWorkflow.cancel_coupon, CancelRequest()),
            "only received coupons, or usable ones not yet sent",
        )
        async with Worker(
            client,
            task_queue=s.task_queue,
            activities=[LedgerActivities(r.pool).record_transition],
        ):
            await handle.result()
    return handle


async def ignored_signals(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s)
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion("share"))
        early = await r.env.get_current_time()
        await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(early))
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion("first-order"))
        await wait_for_state(handle, "issued")
        await handle.signal(UserCouponWorkflow.cancel, CancelRequest("too late"))
        issued = await wait_for_state(handle, "issued")
        # The cancel of an issued coupon is ignored like the two early signals.
        for _ in range(50):
            if len(issued.ignored_signals) == 3:
                break
            await asyncio.sleep(0.2)
            issued = await handle.query(UserCouponWorkflow.status)
        check(len(issued.ignored_signals) == 3, f"ignored: {issued.ignored_signals}")
        await redeemed_by_callback(r, handle)
    return handle


async def received_expired_by_operator(r: Recorder, name: str) -> Handle:
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s)
        status = await handle.execute_update(
            UserCouponWorkflow.expire_coupon, ExpireRequest("campaign ended")
        )
        check(status.state == "expired", f"expire update answered {status.state}")
        await handle.result()
    return handle


async def budget_wait_then_issued(r: Recorder, name: str) -> Handle:
    # The batch is paused at the platform when the task is done: the coupon waits for it,
    # tries again when its recheck timer fires (still paused), and is sent once the
    # catalog sync's notice arrives after the batch resumed.
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s)
        batch = await get_batch(r.pool, f"rec-{name}")
        assert batch is not None
        await r.platform.change_batch(batch.platform_batch_id, BatchAction.PAUSE)
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion("first-order"))
        await wait_for_waiting(handle, "budget")
        await r.env.sleep(timedelta(minutes=11))
        await wait_for_waiting(handle, "budget")
        await r.platform.change_batch(batch.platform_batch_id, BatchAction.RESUME)
        await woken_issued_and_redeemed(r, handle, batch.platform_batch_id)
    return handle


async def budget_wait_continued_as_new(r: Recorder, name: str) -> Handle:
    # The batch has no budget left when the task is done: the coupon waits, its recheck
    # backing off to the cap, until its run's history is long enough to continue as new.
    # The next run sends first (refused), waits, and is sent once the sync's notice comes
    # after budget returned. Both runs are written (the first as __run1).
    s = r.settings(name)
    c = await r.campaign(f"rec-{name}", valid_days=60)
    await set_at_platform(r, c, remaining=0)
    async with r.workers(s):
        handle = await r.claim_in(c, s, "u1")
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion("first-order"))
        await wait_for_waiting(handle, "budget")
        first_run = (await handle.describe()).run_id
        for _ in range(30):
            await r.env.sleep(timedelta(days=1))
            if (await handle.describe()).run_id != first_run:
                break
        else:
            raise PathFailed("the waiting coupon never continued as new")
        await wait_for_waiting(handle, "budget")
        await set_at_platform(r, c, remaining=5)
        await r.share_clock()
        batch = await get_batch(r.pool, c.batch_id)
        assert batch is not None
        await woken_issued_and_redeemed(r, handle, batch.platform_batch_id)
    return handle


async def late_callback_at_validity_end(r: Recorder, name: str) -> Handle:
    # The platform's lookups fail as the validity ends, so the final lookup is still
    # retrying when the shop's callback reports the use; the lookup then answers `sent`.
    # From the patch `report-during-final-lookup` on the report redeems the coupon; before
    # it, the coupon lapsed.
    s = r.settings(name)
    async with r.workers(s):
        handle = await r.claim(name, s, required_tasks=[])
        issued = await wait_for_state(handle, "issued")
        assert issued.receipt is not None
        await r.knobs(lookup_error_status=500)
        until_end = issued.receipt.valid_until - await r.env.get_current_time()
        await r.env.sleep(until_end + timedelta(hours=1))
        used_at = await r.env.get_current_time()
        await handle.signal(
            UserCouponWorkflow.report_redemption, RedemptionReport(used_at, "callback")
        )
        await r.knobs(lookup_error_status=0)
        await r.env.sleep(timedelta(minutes=15))  # past the final lookup's longest backoff
        await handle.result()
    return handle


async def resumed_usable_issued(r: Recorder, name: str) -> Handle:
    # The first run is lost before its send (no worker ran it; terminated): `coupon recover`
    # starts a fresh run that resumes the ledger's `usable`, sends and is redeemed.
    s = r.settings(name)
    first = await r.claim(name, s, required_tasks=[])
    await first.terminate("lost before its send")
    async with r.workers(s):
        return await _recovered_then_redeemed(r, s, first)


async def resumed_issued_redeemed(r: Recorder, name: str) -> Handle:
    # An issued coupon whose run Temporal lost (terminated here): the fresh run resumes
    # `issued` with the ledger's receipt, and a redemption reaches it.
    s = r.settings(name)
    async with r.workers(s):
        first = await r.claim(name, s, required_tasks=[])
        await wait_for_state(first, "issued")
        await first.terminate("Temporal's data lost")
        return await _recovered_then_redeemed(r, s, first)


async def _recovered_then_redeemed(r: Recorder, s: Settings, first: Handle) -> Handle:
    coupon_id = first.id.removeprefix("coupon:")
    recovery = await recover(r.pool, r.env.client, s, coupon_id)
    check(recovery.action == "restarted", f"recovery: {recovery}")
    resumed: Handle = r.env.client.get_workflow_handle_for(UserCouponWorkflow.run, first.id)
    await wait_for_state(resumed, "issued")
    status = await redeemed_by_callback(r, resumed)
    check(
        [t.to_state for t in status.transitions][-1:] == ["redeemed"],
        f"transitions: {status.transitions}",
    )
    return resumed


async def wait_for_waiting(handle: Handle, what: str, timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if what in (await handle.query(UserCouponWorkflow.status)).waiting_for:
                return
            await asyncio.sleep(0.2)


async def redeemed_by_callback(r: Recorder, handle: Handle) -> CouponStatus:
    """The shop's callback reports the use now; the coupon's last status, once it ends."""
    used_at = await r.env.get_current_time()
    await handle.signal(UserCouponWorkflow.report_redemption, RedemptionReport(used_at, "callback"))
    return await handle.result()


async def woken_issued_and_redeemed(r: Recorder, handle: Handle, platform_batch_id: str) -> None:
    """The sync's notice of budget wakes the waiting coupon: it is sent, then redeemed."""
    await handle.signal(UserCouponWorkflow.budget_available, BudgetNotice(platform_batch_id))
    await wait_for_state(handle, "issued")
    status = await redeemed_by_callback(r, handle)
    check(
        [t.to_state for t in status.transitions] == ["usable", "issued", "redeemed"],
        f"transitions: {status.transitions}",
    )


# ----- the catalog sync -----------------------------------------------------------------
# Each path runs on a ledger of its own, drives one CatalogSyncWorkflow and checks its report.

SyncHandle = WorkflowHandle[CatalogSyncWorkflow, SyncReport]


async def set_at_platform(r: Recorder, c: Campaign, **changes: Any) -> None:
    """Change the campaign's batch at the platform behind the ledger's back, as the
    platform's own operator can (`remaining`, `status`)."""
    batch = await get_batch(r.pool, c.batch_id)
    assert batch is not None
    response = await r.sim.put(f"/sim/batches/{batch.platform_batch_id}", json=changes)
    response.raise_for_status()


async def short_of_what_we_owe(r: Recorder, campaign_id: str) -> Campaign:
    """A batch the platform has 1 coupon left of while we owe 3 claims (drift). The claims
    are the ledger's alone: no workflow of theirs outlives the path."""
    c = await r.campaign(campaign_id, quota=5)
    for i in range(3):
        await ClaimService(r.pool, r.env.client, r.base).claim(c.id, f"owed-{i}")
    await set_at_platform(r, c, remaining=1)
    return c


async def sync(r: Recorder, name: str, s: Settings, input: SyncInput) -> SyncHandle:
    """Run the sync to its end in real time: no timer of the coupons around it fires."""
    handle = await r.env.client.start_workflow(
        CatalogSyncWorkflow.run,
        input,
        id=f"record-catalog-sync-{name}",
        task_queue=s.task_queue,
        execution_timeout=timedelta(minutes=5),
    )
    with r.env.auto_time_skipping_disabled():
        await handle.result()
    return handle


async def every_batch_in_two_rounds(r: Recorder, name: str) -> Recorded:
    # Nine batches in use (two rounds of PARALLEL): six fine, one short of what we owe, one
    # stopped at the platform behind our back, one a coupon waits on that the platform
    # resumed behind our back (the sync wakes the coupon). One we stopped is not read.
    async with r.own_ledger(name) as r:
        s = r.settings(name)
        fine = [await r.campaign(f"fine-{i}") for i in range(6)]
        short = await short_of_what_we_owe(r, "short")
        stopped = await r.campaign("stopped")
        await set_at_platform(r, stopped, status="stopped")
        retired = await r.campaign("retired")
        await change_batch(r.pool, r.platform, retired.batch_id, BatchAction.STOP)
        resumed = await r.campaign("resumed", required_tasks=[])
        await set_at_platform(r, resumed, status="paused")
        async with r.workers(s):
            coupon = await r.claim_in(resumed, s, "waits-for-budget")
            await wait_for_waiting(coupon, "budget")
            await set_at_platform(r, resumed, status="running")
            handle = await sync(r, name, s, SyncInput())
            await wait_for_state(coupon, "issued")
            await redeemed_by_callback(r, coupon)
        report = await handle.result()
    by_id = {b.batch_id: b for b in report.batches}
    read = {c.batch_id for c in [*fine, short, stopped, resumed]}
    check(set(by_id) == read, f"synced {sorted(by_id)}, expected {sorted(read)}")
    check(report.failed == [], f"failed: {report.failed}")
    drifted = {b.batch_id for b in report.drifted}
    check(drifted == {short.batch_id, stopped.batch_id}, f"drifted: {sorted(drifted)}")
    check(by_id[resumed.batch_id].woken == 1, f"woken: {by_id[resumed.batch_id].woken}")
    return Recorded(handle, sync_outcome(report))


async def named_batches_one_failed(r: Recorder, name: str) -> Recorded:
    # The operator names three batches; the ledger knows no batch of the second name. That
    # batch is reported failed, the two others are synced (one has drifted).
    async with r.own_ledger(name) as r:
        s = r.settings(name)
        fine = await r.campaign("fine")
        short = await short_of_what_we_owe(r, "short")
        named = [fine.batch_id, "b-gone", short.batch_id]
        async with r.workers(s):
            handle = await sync(r, name, s, SyncInput(batch_ids=named))
        report = await handle.result()
    synced = [b.batch_id for b in report.batches]
    check(synced == [fine.batch_id, short.batch_id], f"synced: {synced}")
    check(len(report.failed) == 1, f"failed: {report.failed}")
    check(report.failed[0].startswith("b-gone: "), f"failed: {report.failed}")
    check([b.batch_id for b in report.drifted] == [short.batch_id], "drift not found")
    return Recorded(handle, sync_outcome(report))


def sync_outcome(report: SyncReport) -> str:
    return (
        f"{len(report.batches)} synced, {len(report.drifted)} drifted, {len(report.failed)} failed"
    )


# ----- reconciliation ------------------------------------------------------------------
# Each path runs on a ledger of its own: coupons issued, some used at the platform behind
# our back (no callback, and long before their workflow's first poll), then one
# ReconcileWorkflow whose report is checked.

ReconcileHandle = WorkflowHandle[ReconcileWorkflow, ReconcileReport]


async def issued_coupons(r: Recorder, c: Campaign, s: Settings, count: int) -> list[Handle]:
    handles = [await r.claim_in(c, s, f"shopper-{i}") for i in range(count)]
    for handle in handles:
        await wait_for_state(handle, "issued")
    return handles


async def used_behind_our_back(r: Recorder, handles: list[Handle]) -> None:
    for handle in handles:
        status = await handle.query(UserCouponWorkflow.status)
        assert status.receipt is not None
        used = await r.sim.post(f"/sim/coupons/{status.receipt.platform_coupon_id}/use")
        used.raise_for_status()


async def reconcile(r: Recorder, name: str, s: Settings, input: ReconcileInput) -> ReconcileHandle:
    """Run the reconciliation to its end in real time: no coupon's poll finds a use first."""
    handle = await r.env.client.start_workflow(
        ReconcileWorkflow.run,
        input,
        id=f"record-reconcile-{name}",
        task_queue=s.task_queue,
        execution_timeout=timedelta(minutes=5),
    )
    with r.env.auto_time_skipping_disabled():
        await handle.result()
    return handle


async def close_issued(handles: list[Handle]) -> None:
    """The coupons the path left issued: their histories are not recorded, and their
    timers must not fire in a later path's time skips."""
    for handle in handles:
        if (await handle.query(UserCouponWorkflow.status)).state == "issued":
            await handle.terminate("recording over")


async def one_batch_uses_repaired(r: Recorder, name: str) -> Recorded:
    # Four coupons issued, two used at the till: both found and repaired to redeemed.
    async with r.own_ledger(name) as r:
        s = r.settings(name)
        c = await r.campaign("till", required_tasks=[])
        async with r.workers(s):
            coupons = await issued_coupons(r, c, s, 4)
            await used_behind_our_back(r, coupons[:2])
            handle = await reconcile(r, name, s, ReconcileInput(c.batch_id))
            await close_issued(coupons)
        report = await handle.result()
    [batch] = report.batches
    check(len(batch.repairs_requested) == 2, f"repairs: {batch.repairs_requested}")
    check((report.mismatches, report.repaired) == (2, 2), reconcile_outcome(report))
    return Recorded(handle, reconcile_outcome(report))


async def every_batch_one_repaired_one_clean(r: Recorder, name: str) -> Recorded:
    # Every batch (none named): one with a use behind our back, repaired; one clean.
    async with r.own_ledger(name) as r:
        s = r.settings(name)
        used = await r.campaign("used", required_tasks=[])
        clean = await r.campaign("clean", required_tasks=[])
        async with r.workers(s):
            in_used = await issued_coupons(r, used, s, 2)
            in_clean = await issued_coupons(r, clean, s, 2)
            await used_behind_our_back(r, in_used[:1])
            handle = await reconcile(r, name, s, ReconcileInput())
            await close_issued([*in_used, *in_clean])
        report = await handle.result()
    by_id = {b.batch_id: b for b in report.batches}
    check(set(by_id) == {used.batch_id, clean.batch_id}, f"reconciled: {sorted(by_id)}")
    check(by_id[used.batch_id].repaired == 1, f"{used.batch_id}: {by_id[used.batch_id]}")
    check(by_id[clean.batch_id].mismatches == [], f"{clean.batch_id}: {by_id[clean.batch_id]}")
    return Recorded(handle, reconcile_outcome(report))


async def one_batch_found_not_repaired(r: Recorder, name: str) -> Recorded:
    # Asked not to repair: the use is found and left for an operator (no wait for repairs).
    async with r.own_ledger(name) as r:
        s = r.settings(name)
        c = await r.campaign("till", required_tasks=[])
        async with r.workers(s):
            coupons = await issued_coupons(r, c, s, 2)
            await used_behind_our_back(r, coupons[:1])
            handle = await reconcile(r, name, s, ReconcileInput(c.batch_id, repair=False))
            await close_issued(coupons)
        report = await handle.result()
    [batch] = report.batches
    check(len(batch.mismatches) == 1, f"mismatches: {batch.mismatches}")
    check(batch.mismatches[0].repair is None, f"repair: {batch.mismatches[0].repair}")
    check(batch.repairs_requested == [], f"repairs: {batch.repairs_requested}")
    return Recorded(handle, reconcile_outcome(report))


async def every_batch_one_failed(r: Recorder, name: str) -> Recorded:
    # Every batch: the first one's id is unknown at the platform (its flow files answer
    # BATCH_NOT_FOUND) and is reported failed; the one after it is reconciled and repaired.
    async with r.own_ledger(name) as r:
        s = r.settings(name)
        gone = await r.campaign("gone", required_tasks=[])
        kept = await r.campaign("kept", required_tasks=[])
        async with r.pool.connection() as conn:
            await conn.execute(
                "UPDATE batches SET platform_batch_id = %s WHERE id = %s",
                (f"{name}-unknown-at-platform", gone.batch_id),
            )
        async with r.workers(s):
            coupons = await issued_coupons(r, kept, s, 2)
            await used_behind_our_back(r, coupons[:1])
            handle = await reconcile(r, name, s, ReconcileInput())
            await close_issued(coupons)
        report = await handle.result()
    check([b.batch_id for b in report.batches] == [kept.batch_id], reconcile_outcome(report))
    check(report.repaired == 1, reconcile_outcome(report))
    check(
        len(report.failed) == 1 and report.failed[0].startswith(f"{gone.batch_id}: "),
        f"failed: {report.failed}",
    )
    return Recorded(handle, reconcile_outcome(report))


def reconcile_outcome(report: ReconcileReport) -> str:
    return (
        f"{len(report.batches)} reconciled, {report.mismatches} mismatches, "
        f"{report.repaired} repaired, {len(report.failed)} failed"
    )


# ----- what is recorded where ----------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """A path's workflow once closed as the path meant it to, and one line on how it ended."""

    handle: WorkflowHandle[Any, Any]
    outcome: str


@dataclass(frozen=True)
class Recording:
    """One stored history: `drive` runs its workflow to its end and checks the end."""

    name: str
    drive: Callable[[Recorder, str], Awaitable[Recorded]]


@dataclass(frozen=True)
class Scenario:
    """A coupon's path, and the state its workflow must end in."""

    name: str
    final_state: str
    drive: Callable[[Recorder, str], Awaitable[Handle]]

    def recording(self) -> Recording:
        async def drive(r: Recorder, name: str) -> Recorded:
            handle = await self.drive(r, name)
            status = await handle.result()
            if status.state != self.final_state:
                raise PathFailed(f"{name} ended {status.state}, expected {self.final_state}")
            return Recorded(handle, status.state)

        return Recording(self.name, drive)


PATHS = [
    Scenario("issued_redeemed_by_poll", "redeemed", issued_redeemed_by_poll),
    Scenario("issued_redeemed_by_signal", "redeemed", issued_redeemed_by_signal),
    Scenario("issued_lapsed", "lapsed", issued_lapsed),
    Scenario("received_expired", "expired", received_expired),
    Scenario("received_cancelled", "cancelled", received_cancelled),
    Scenario("received_cancelled_by_signal", "cancelled", received_cancelled_by_signal),
    Scenario("two_tasks_partial_then_done", "lapsed", two_tasks_partial_then_done),
    Scenario("no_task_usable_issued", "redeemed", no_task_usable_issued),
    Scenario("platform_refused_failed", "failed", platform_refused_failed),
    Scenario("lag_window_resend", "redeemed", lag_window_resend),
    Scenario("rejected_updates", "cancelled", rejected_updates),
    Scenario("ignored_signals", "redeemed", ignored_signals),
    Scenario("received_expired_by_operator", "expired", received_expired_by_operator),
    Scenario("budget_wait_then_issued", "redeemed", budget_wait_then_issued),
    Scenario("resumed_usable_issued", "redeemed", resumed_usable_issued),
    Scenario("resumed_issued_redeemed", "redeemed", resumed_issued_redeemed),
    Scenario(
        "budget_wait_continued_as_new__budget_wait_bounded",
        "redeemed",
        budget_wait_continued_as_new,
    ),
    Scenario(
        "late_callback_at_validity_end__report_during_final_lookup",
        "redeemed",
        late_callback_at_validity_end,
    ),
]


SYNC_PATHS = [
    Recording("every_batch_in_two_rounds", every_batch_in_two_rounds),
    Recording("named_batches_one_failed", named_batches_one_failed),
]

RECONCILE_PATHS = [
    Recording("one_batch_uses_repaired", one_batch_uses_repaired),
    Recording("every_batch_one_repaired_one_clean", every_batch_one_repaired_one_clean),
    Recording("one_batch_found_not_repaired", one_batch_found_not_repaired),
    Recording("every_batch_one_failed", every_batch_one_failed),
]

# Each workflow type's histories, and their folder under --out: the coupon's at its top
# (where tests/test_replay.py reads them), the others in a folder each.
TYPES: dict[str, tuple[str, list[Recording]]] = {
    "coupon": ("", [p.recording() for p in PATHS]),
    "catalog_sync": ("catalog_sync", SYNC_PATHS),
    "reconcile": ("reconcile", RECONCILE_PATHS),
}


async def record(r: Recorder, recording: Recording, out: Path) -> None:
    began = time.monotonic()
    await r.knobs(**r.default_knobs)
    recorded = await asyncio.wait_for(recording.drive(r, recording.name), timeout=300)
    runs = await runs_of(r.env.client, recorded.handle.id)
    # A workflow that continued as new: each earlier run beside its last, as <name>__run<i>.
    names = [f"{recording.name}__run{i}" for i in range(1, len(runs))] + [recording.name]
    for name, history in zip(names, runs, strict=True):
        target = out / f"{name}.json"
        target.write_text(history.to_json() + "\n")
        print(
            f"  {name:<36} {recorded.outcome:<44} {len(history.events):>3} events "
            f"{target.stat().st_size:>7,} bytes  {time.monotonic() - began:5.1f} s",
            flush=True,
        )


async def runs_of(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """Every run of the workflow, oldest first: its latest run, then each run that one
    continued from."""
    runs = [await client.get_workflow_handle(workflow_id).fetch_history()]
    while True:
        started = runs[0].events[0].workflow_execution_started_event_attributes
        if not started.continued_execution_run_id:
            return runs
        earlier = client.get_workflow_handle(workflow_id, run_id=started.continued_execution_run_id)
        runs.insert(0, await earlier.fetch_history())


async def start_time_skipping() -> WorkflowEnvironment:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(find_binary("temporal-test-server"))
    )
    try:
        # It hangs on search attributes it does not know: register ours first.
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={
                    k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in SEARCH_ATTRIBUTES
                },
            )
        )
    except BaseException:
        await env.shutdown()
        raise
    return env


async def run(chosen: list[tuple[Path, Recording]]) -> None:
    with tempfile.TemporaryDirectory(prefix="record-histories-") as tmp:
        run_dir = Path(tmp)
        postgres = EmbeddedPostgres(
            run_dir / "postgres", free_port(), log_path=run_dir / "postgres.log"
        )
        simulator = SimulatorProcess(
            run_dir / "simulator.sqlite3", free_port(), log_path=run_dir / "simulator.log"
        )
        env: WorkflowEnvironment | None = None
        try:
            postgres.start()
            simulator.start()
            env = await start_time_skipping()
            await db.migrate_url(postgres.url())
            base = replace(
                Settings(),
                database_url_override=postgres.url(),
                platform_url_override=simulator.url,
                platform_timeout_s=2.0,
                lag_window_s=3.0,
            )
            print(
                f"stack up: postgres pid {postgres.pid}, simulator pid {simulator.pid}, "
                f"time-skipping server; recording {len(chosen)} paths",
                flush=True,
            )
            async with (
                db.pool(postgres.url()) as pool,
                httpx.AsyncClient(base_url=simulator.url, timeout=10) as sim,
            ):
                platform = RestPlatform(simulator.url, timeout_s=5.0)
                try:
                    default_knobs = (await sim.get("/sim/knobs")).raise_for_status().json()
                    r = Recorder(env, pool, platform, sim, base, default_knobs, postgres.url())
                    for out, recording in chosen:
                        await record(r, recording, out)
                finally:
                    await platform.aclose()
        finally:
            if env is not None:
                await env.shutdown()
            simulator.stop()
            postgres.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--type",
        choices=[*TYPES, "all"],
        default="coupon",
        help="the workflow type whose histories to record (default: %(default)s)",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="record only these: "
        + "; ".join(f"{t}: {[p.name for p in paths]}" for t, (_, paths) in TYPES.items()),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HISTORIES,
        help="the corpus: coupon histories at its top, the others in a folder per type "
        "(default: %(default)s)",
    )
    args = parser.parse_args()
    types = list(TYPES) if args.type == "all" else [args.type]
    offered = [(args.out / TYPES[t][0], p) for t in types for p in TYPES[t][1]]
    unknown = set(args.paths) - {p.name for _, p in offered}
    if unknown:
        parser.error(f"unknown paths of {args.type}: {', '.join(sorted(unknown))}")
    chosen = [(out, p) for out, p in offered if not args.paths or p.name in args.paths]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The paths fail activities and ignore signals on purpose: keep the progress readable.
    logging.getLogger("temporalio").setLevel(logging.ERROR)
    quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=quiet))))
    for out in {out for out, _ in chosen}:
        out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        asyncio.run(run(chosen))
    except PathFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    print(f"recorded {len(chosen)} histories in {time.monotonic() - began:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
