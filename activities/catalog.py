"""Catalog activities: batch sync, reconciliation, and expiring a campaign's pending coupons.

They reach coupon workflows by handler name (from `coupons.contract`), through the
worker's Temporal client: repairs and expiries go through the workflows, never around them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.converter import value_to_type
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from coupons import catalog, metrics
from coupons import contract as act
from coupons.errors import Refused
from coupons.ledger import batches, claims
from coupons.ledger.claims import LedgerCoupon
from coupons.model import (
    UPDATE_TIMEOUT_S,
    BatchReconciliation,
    BatchSync,
    BudgetNotice,
    ExpireCoupons,
    ExpiredCoupons,
    ExpirePage,
    ExpirePageResult,
    ExpireRequest,
    PageCoupon,
    PageTally,
    ReconcileInput,
    RedemptionReport,
    RepairCheck,
    StuckCoupon,
)
from coupons.platforms.base import (
    BatchStatus,
    FlowKind,
    FlowRecord,
    FlowUnavailable,
    Platform,
    PlatformCoupon,
    PlatformCouponStatus,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
)
from coupons.reconcile import REDEEM, compare

# Signals and updates to coupon workflows in flight at once: enough to be quick, few
# enough that a bulk operation never crowds out the app's own traffic.
FAN_OUT = 32
PAGE = 500


class CatalogActivities:
    def __init__(self, pool: AsyncConnectionPool, platform: Platform, client: Client) -> None:
        self._pool = pool
        self._platform = platform
        self._client = client

    # ----- sync ---------------------------------------------------------------------

    @activity.defn(name=act.SYNCABLE_BATCHES)
    async def syncable_batches(self) -> list[str]:
        return [b.id for b in await batches.list_batches(self._pool, syncable_only=True)]

    @activity.defn(name=act.ALL_BATCHES)
    async def all_batches(self) -> list[str]:
        """Every batch the platform holds (reconciliation reads its flow files): not one
        whose create is still pending, which the sync finishes first."""
        found = await batches.list_batches(self._pool)
        return [b.id for b in found if b.status != batches.PENDING]

    @activity.defn(name=act.SYNC_BATCH)
    async def sync_batch(self, batch_id: str) -> BatchSync:
        """Upsert the platform's figures and flag drift; when budget is back, tell as many
        coupons waiting for it to try again as it can pay."""
        try:
            synced = await catalog.batches.sync_batch(self._pool, self._platform, batch_id)
        except Refused as err:
            raise ApplicationError(str(err), type=err.code, non_retryable=True) from err
        if synced.backlog and synced.remaining > 0 and synced.status == BatchStatus.RUNNING:
            synced.woken = await self._wake_waiters(
                batch_id, synced.platform_batch_id, synced.remaining
            )
        metrics.batch_synced(synced)
        return synced

    async def _wake_waiters(self, batch_id: str, platform_batch_id: str, budget: int) -> int:
        """Wake at most `budget` of the batch's usable coupons, in coupon id order: a coupon
        woken beyond what the batch can pay would only be refused again, one more send at
        the platform and more events in its history. The rest wait for their own recheck
        or a later sync that sees budget left."""
        notice = BudgetNotice(platform_batch_id)

        async def wake(claim: claims.Claim) -> bool:
            handle = self._client.get_workflow_handle(claim.workflow_id)
            try:
                await handle.signal(act.BUDGET_AVAILABLE, notice)
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                return False  # not started yet (the repair starts it) or closed since
            return True

        woken = 0
        after = ""
        while woken < budget:
            # A coupon that is not waiting (no workflow yet, closed since) takes none of the
            # budget, so a page holds no more coupons than the budget still to hand out.
            page = await claims.coupons_in_state(
                self._pool,
                "usable",
                batch_id=batch_id,
                after=after,
                limit=min(PAGE, budget - woken),
            )
            if not page:
                return woken
            woken += sum(await _each(page, wake))
            after = page[-1].coupon_id
            activity.heartbeat(after)
        return woken

    # ----- reconciliation -------------------------------------------------------------

    @activity.defn(name=act.RECONCILE_BATCH)
    async def reconcile_batch(self, input: ReconcileInput) -> BatchReconciliation:
        assert input.batch_id is not None  # the workflow runs one batch per activity
        batch = await _known_batch(self._pool, input.batch_id)
        ours = await claims.batch_coupons(self._pool, batch.id)
        sent = await self._flow(batch.platform_batch_id, FlowKind.SENT)
        activity.heartbeat("sent flow read")
        used = await self._flow(batch.platform_batch_id, FlowKind.USED)
        used_from = "flow"
        if used is None:
            used, used_from = await self._uses_by_lookup(batch.platform_batch_id, ours), "lookups"
        activity.heartbeat("uses read")
        mismatches = compare(ours, sent, used)
        used_at = {record.coupon_id: record.at for record in used}
        to_redeem = [m for m in mismatches if m.repair == REDEEM]
        if not input.repair:
            for mismatch in to_redeem:
                mismatch.repair = None  # found, left for an operator as asked
            to_redeem = []
        workflow_of = {c.coupon_id: c.workflow_id for c in ours}

        async def redeem(coupon_id: str, platform_coupon_id: str) -> bool:
            handle = self._client.get_workflow_handle(workflow_of[coupon_id])
            report = RedemptionReport(used_at[platform_coupon_id], source="reconciliation")
            try:
                await handle.signal(act.REPORT_REDEMPTION, report)
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                return False  # closed since: the ledger already moved on
            return True

        requested = await _each(
            [(m.coupon_id or "", m.platform_coupon_id or "") for m in to_redeem],
            lambda pair: redeem(*pair),
        )
        for mismatch, signalled in zip(to_redeem, requested, strict=True):
            mismatch.repair = "redeem requested" if signalled else None
        result = BatchReconciliation(
            batch_id=batch.id,
            platform_sent=None if sent is None else len(sent),
            platform_used=len(used),
            used_from=used_from,
            ledger_coupons=len(ours),
            mismatches=mismatches,
            repairs_requested=[
                m.coupon_id for m in to_redeem if m.repair is not None and m.coupon_id
            ],
        )
        metrics.reconciled(result)
        return result

    async def _flow(self, platform_batch_id: str, kind: FlowKind) -> list[FlowRecord] | None:
        try:
            return await self._platform.batch_flow(platform_batch_id, kind)
        except FlowUnavailable:
            return None
        except PlatformRefused as err:
            # Definitive (the platform knows no such batch): no retry changes the answer.
            raise ApplicationError(str(err), type=err.code, non_retryable=True) from err

    async def _uses_by_lookup(
        self, platform_batch_id: str, ours: list[LedgerCoupon]
    ) -> list[FlowRecord]:
        """The uses the platform shows for the coupons we hold receipts of, asked one by one.

        Every answer is a heartbeat (a big batch takes a while); a lookup the platform
        throttles or fails is asked again a few times before the attempt gives up."""
        held = [c for c in ours if c.platform_coupon_id is not None]
        asked = 0

        async def look(coupon: LedgerCoupon) -> PlatformCoupon | None:
            assert coupon.platform_coupon_id is not None
            for wait_s in LOOKUP_RETRY_S:
                try:
                    return await self._platform.get_coupon(
                        coupon.user_id, coupon.platform_coupon_id
                    )
                except (PlatformRateLimited, PlatformUnavailable):
                    await asyncio.sleep(wait_s)
            return await self._platform.get_coupon(coupon.user_id, coupon.platform_coupon_id)

        async def used(coupon: LedgerCoupon) -> FlowRecord | None:
            nonlocal asked
            found = await look(coupon)
            asked += 1
            activity.heartbeat(f"{asked}/{len(held)} coupons asked")
            if found is None or found.status != PlatformCouponStatus.USED:
                return None
            return FlowRecord(
                coupon_id=found.coupon_id,
                batch_id=platform_batch_id,
                user_id=coupon.user_id,
                idempotency_key=None,
                # A use with no time of its own: known only to have happened by now.
                at=found.used_at or datetime.now(UTC),
            )

        return [record for record in await _each(held, used) if record is not None]

    @activity.defn(name=act.AWAIT_STATES)
    async def await_states(self, check: RepairCheck) -> int:
        """How many of the coupons reached `state` in the ledger within the timeout."""

        def beat(reached: int) -> None:
            activity.heartbeat(f"{reached}/{len(check.coupon_ids)} {check.state}")

        return len(await self._reached(check, beat))

    async def _reached(self, check: RepairCheck, beat: Callable[[int], None]) -> set[str]:
        """The coupons in `check.state` in the ledger once all are, or once `timeout_s` has
        passed; `beat` (a heartbeat) at each look."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + check.timeout_s
        while True:
            states = await claims.states_of(self._pool, check.coupon_ids)
            reached = {coupon for coupon, state in states.items() if state == check.state}
            if len(reached) == len(check.coupon_ids) or loop.time() >= give_up:
                return reached
            beat(len(reached))
            await asyncio.sleep(0.2)

    # ----- ending a campaign ------------------------------------------------------------

    @activity.defn(name=act.COUNT_RECEIVED)
    async def count_received(self, campaign_id: str) -> int:
        return (await claims.count_by_state(self._pool, campaign_id)).get("received", 0)

    @activity.defn(name=act.EXPIRE_RECEIVED_COUPONS)
    async def expire_received_coupons(self, page: ExpireCoupons) -> ExpiredCoupons:
        """Expire one page of the campaign's received coupons through their workflows, then
        wait for the ledger to show them expired.

        No coupon holds the page up: each update is bounded by `update_timeout_s`, and a
        coupon that cannot take it (no workflow yet, no worker on its queue, a failing
        workflow task) comes back stuck with its reason. Each outcome is a heartbeat of the
        whole tally, and a retry resumes from the last one."""
        details = activity.info().heartbeat_details
        tally = value_to_type(PageTally, details[0]) if details else await self._read_page(page)
        request = ExpireRequest(page.reason)
        within = timedelta(seconds=page.update_timeout_s)

        async def expire(coupon: PageCoupon) -> None:
            update_id = f"{page.update_key}:{coupon.coupon_id}"
            tally.note(coupon, await self._expire_one(coupon, request, update_id, within))
            activity.heartbeat(tally)

        await _each(tally.untouched(), expire)
        check = RepairCheck(tally.accepted, "expired", page.ledger_wait_s)
        confirmed = await self._reached(check, lambda _: activity.heartbeat(tally))
        lagging = [
            StuckCoupon(c, act.STUCK_LEDGER_LAG, f"still not expired after {check.timeout_s:g} s")
            for c in tally.accepted
            if c not in confirmed
        ]
        return ExpiredCoupons(
            expired=len(confirmed),
            skipped=len(tally.skipped),
            stuck=[*tally.stuck, *lagging],
            last=tally.last,
            done=tally.done,
        )

    async def _read_page(self, page: ExpireCoupons) -> PageTally:
        found = await claims.coupons_in_state(
            self._pool, "received", campaign_id=page.campaign_id, after=page.after, limit=page.limit
        )
        return PageTally(
            coupons=[PageCoupon(c.coupon_id, c.workflow_id, c.workflow_started) for c in found],
            last=found[-1].coupon_id if found else page.after,
            done=len(found) < page.limit,
        )

    async def _expire_one(
        self,
        coupon: PageCoupon,
        request: ExpireRequest,
        update_id: str | None,
        within: timedelta,
    ) -> bool | StuckCoupon:
        """True: the workflow took the expiry; False: it is no longer received; else why not."""
        handle = self._client.get_workflow_handle(coupon.workflow_id)
        try:
            # rpc_timeout bounds each call; the client calls again while the server has only
            # admitted the update, then polls for its outcome: the whole is bounded here.
            async with asyncio.timeout(within.total_seconds()):
                await handle.execute_update(
                    act.EXPIRE_COUPON, request, id=update_id, rpc_timeout=within
                )
        except WorkflowUpdateFailedError:
            return False  # refused by its validator: the task was done, or it was cancelled
        except (WorkflowUpdateRPCTimeoutOrCancelledError, TimeoutError):
            if _cancelled():
                raise asyncio.CancelledError from None  # the page itself is cancelled
            detail = f"no answer within {within.total_seconds():g} s"
            return StuckCoupon(coupon.coupon_id, act.STUCK_NO_ANSWER, detail)
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                return StuckCoupon(coupon.coupon_id, act.STUCK_REFUSED, err.status.name)
            if coupon.workflow_started:
                return False  # finished since the page was read
            # Claimed a moment ago: the workers' starter starts it shortly.
            return StuckCoupon(coupon.coupon_id, act.STUCK_NOT_STARTED, "no workflow yet")
        return True

    @activity.defn(name=act.EXPIRE_RECEIVED_PAGE)
    async def expire_received_page(self, page: ExpirePage) -> ExpirePageResult:
        """Expire one page of the campaign's received coupons through their workflows: for
        EndCampaignWorkflow runs started before the patch `end-campaign-counts`.

        Each update is bounded as in `expire_received_coupons` and each outcome is a
        heartbeat; one that gets no answer or is refused counts as skipped (the only outcome
        besides `expired` these runs know), so the page ends."""
        found = await claims.coupons_in_state(
            self._pool, "received", campaign_id=page.campaign_id, after=page.after, limit=page.limit
        )
        request = ExpireRequest(page.reason)
        within = timedelta(seconds=UPDATE_TIMEOUT_S)
        answered = 0

        async def expire(claim: claims.Claim) -> bool:
            nonlocal answered
            coupon = PageCoupon(claim.coupon_id, claim.workflow_id, claim.workflow_started)
            outcome = await self._expire_one(coupon, request, None, within)
            answered += 1
            activity.heartbeat(f"{answered}/{len(found)} coupons asked")
            if isinstance(outcome, StuckCoupon) and outcome.reason == act.STUCK_NOT_STARTED:
                # The page's retry expires it once the workers' starter has started it.
                raise ApplicationError(
                    f"coupon {claim.coupon_id!r} has no workflow yet", type="not_started"
                )
            return outcome is True

        accepted = await _each(found, expire)
        expired = [c.coupon_id for c, ok in zip(found, accepted, strict=True) if ok]
        return ExpirePageResult(
            expired=expired,
            skipped=len(found) - len(expired),
            last=found[-1].coupon_id if found else page.after,
            done=len(found) < page.limit,
        )


# Waits before asking a throttled or failing lookup again, during per-coupon reconciliation.
LOOKUP_RETRY_S = (1.0, 2.0, 4.0)

T = TypeVar("T")
R = TypeVar("R")


async def _known_batch(pool: AsyncConnectionPool, batch_id: str) -> batches.Batch:
    """The batch, or a non-retryable failure: no retry makes an unknown batch known, nor
    one whose create is pending (no platform id yet) reconcilable."""
    try:
        batch = await catalog.batches.get_batch(pool, batch_id)
    except Refused as err:
        raise ApplicationError(str(err), type=err.code, non_retryable=True) from err
    if batch.status == batches.PENDING:
        # Retried, it would fail the same way until a sync finishes the create.
        raise ApplicationError(
            f"batch {batch_id!r} is {batches.PENDING_NOTE}",
            type="batch_pending",
            non_retryable=True,
        )
    return batch


def _cancelled() -> bool:
    """Whether the running task is being cancelled (the activity, not a timeout of ours:
    `asyncio.timeout` takes back the cancellation it made before the error leaves it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _each(items: Iterable[T], call: Callable[[T], Awaitable[R]]) -> list[R]:
    """`call` for every item, at most FAN_OUT at once, answers in order."""
    gate = asyncio.Semaphore(FAN_OUT)

    async def one(item: T) -> R:
        async with gate:
            return await call(item)

    return list(await asyncio.gather(*(one(item) for item in items)))
