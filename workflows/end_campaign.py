"""Expiring an ended campaign's pending coupons, page by page, through their workflows."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta

from temporalio import workflow
from temporalio.common import VersioningBehavior

from workflows.policies import LEDGER_CALL

# Activities are called by reference; their module does I/O, so it (and what it imports)
# comes from outside the sandbox.
with workflow.unsafe.imports_passed_through():
    from activities.catalog import CatalogActivities
    from coupons import contract as act
    from coupons.model import (
        UPDATE_TIMEOUT_S,
        EndCampaignInput,
        EndProgress,
        ExpireCoupons,
        ExpiredCoupons,
        ExpirePage,
        RepairCheck,
        StuckCoupon,
    )

LEDGER_WAIT_S = 60.0
# The patch that brought counts: runs from before it (`_run_before_counts`) expired by id
# lists in one pass and retried a page for ever on a coupon with no workflow yet.
COUNTS = "end-campaign-counts"
# Waits before each pass after the first: the claims a pass found not started get started by
# the workers' starter meanwhile (a flash sale may leave it minutes behind).
PASS_WAITS_S = (10.0, 60.0, 300.0)
# Pages per run before it continues as new, unless Temporal suggests it sooner: about 600
# events, far from the 10K-event warning however large the campaign.
PAGES_PER_RUN = 100
# The stuck coupons the result names; the count covers them all.
STUCK_KEPT = 100
PAGE_HEARTBEAT = timedelta(minutes=1)


@dataclass
class EndCampaignProgress(EndProgress):
    """EndProgress (what the command line draws) and what a campaign end reports besides:
    the coupons the current pass left `received` (`stuck`, the first STUCK_KEPT named
    with their reason; once `done`, the campaign end's last word on them), the pass and
    the run it is in."""

    stuck: int = 0
    stuck_coupons: list[StuckCoupon] = field(default_factory=list)
    passes: int = 0
    runs: int = 1

    def add(self, page: ExpiredCoupons) -> None:
        self.expired += page.expired
        self.skipped += page.skipped
        self.stuck += len(page.stuck)
        self.stuck_coupons += page.stuck[: max(0, STUCK_KEPT - len(self.stuck_coupons))]

    def next_pass(self) -> None:
        self.passes += 1
        self.stuck = 0
        self.stuck_coupons = []


@dataclass
class EndCampaignRun(EndCampaignInput):
    """A run's input: a start gives EndCampaignInput (the rest defaults); a run that
    continues as new hands on its progress (counts, never lists of ids) and where its pass
    stands."""

    progress: EndCampaignProgress | None = None
    after: str = ""
    page_size: int = 200
    pages_per_run: int = PAGES_PER_RUN
    update_timeout_s: float = UPDATE_TIMEOUT_S
    pass_waits_s: list[float] = field(default_factory=lambda: list(PASS_WAITS_S))


# AUTO_UPGRADE, like the coupon's: ending a large campaign continues as new page after page
# and waits minutes between passes, and a pinned run (its continuations too) would wait for
# ever once its version's workers were retired mid-way. Its changes go behind patches.
@workflow.defn(name=act.END_CAMPAIGN_WORKFLOW, versioning_behavior=VersioningBehavior.AUTO_UPGRADE)
class EndCampaignWorkflow:
    """Started by `app.service.end_campaign` (the CLI's `campaign end --expire-pending`,
    the API's `end` with `expire_pending`) once the campaign is ended (so no new claim
    arrives); the `progress` query drives the command's progress bar.

    A pass reads the received coupons page by page; each page is one activity that
    expires them through their workflows, bounded per coupon, and hands back counts and
    the coupons it could not expire. While a pass leaves some (a claim whose workflow the
    starter has not started yet, a workflow that takes no update), the next pass, after a
    wait, reads what is still received; after the last, those are reported and the
    workflow finishes. The run continues as new every PAGES_PER_RUN pages, or sooner when
    Temporal suggests it, so a campaign of any size keeps each history short."""

    @workflow.init
    def __init__(self, input: EndCampaignRun) -> None:
        self._progress = input.progress or EndCampaignProgress(
            campaign_id=input.campaign_id, total=0
        )

    @workflow.run
    async def run(self, input: EndCampaignRun) -> EndCampaignProgress:
        if not workflow.patched(COUNTS):
            return await self._run_before_counts(input)
        return await self._run_with_counts(input)

    async def _run_with_counts(self, input: EndCampaignRun) -> EndCampaignProgress:
        progress = self._progress
        if input.progress is None:
            progress.total = await workflow.execute_activity_method(
                CatalogActivities.count_received,
                input.campaign_id,
                start_to_close_timeout=LEDGER_CALL,
            )
            progress.passes = 1
        after, pages = input.after, 0
        while True:
            page = await self._expire_page(input, after)
            progress.add(page)
            after, pages = page.last, pages + 1
            if page.done:
                if not progress.stuck or progress.passes > len(input.pass_waits_s):
                    break
                wait_s = input.pass_waits_s[progress.passes - 1]
                await workflow.sleep(
                    timedelta(seconds=wait_s),
                    summary=f"{progress.stuck} coupons left received: look again",
                )
                progress.next_pass()
                after = ""
            if pages >= input.pages_per_run or workflow.info().is_continue_as_new_suggested():
                progress.runs += 1
                workflow.continue_as_new(replace(input, progress=progress, after=after))
        progress.done = True
        self._show()
        return progress

    async def _expire_page(self, input: EndCampaignRun, after: str) -> ExpiredCoupons:
        self._show()
        return await workflow.execute_activity_method(
            CatalogActivities.expire_received_coupons,
            ExpireCoupons(
                campaign_id=input.campaign_id,
                after=after,
                reason=input.reason,
                # One per workflow id: a later run of this id (or a retry, or a later pass)
                # joins an update still waiting at a stuck coupon instead of adding one.
                update_key=workflow.info().workflow_id,
                limit=input.page_size,
                update_timeout_s=input.update_timeout_s,
                ledger_wait_s=LEDGER_WAIT_S,
            ),
            # The updates take at most ceil(page / FAN_OUT) update timeouts, then the ledger
            # wait: minutes at most. Every coupon's outcome is a heartbeat.
            start_to_close_timeout=timedelta(minutes=10),
            # A heartbeat comes at least once per update timeout (each update ends by then).
            heartbeat_timeout=max(PAGE_HEARTBEAT, timedelta(seconds=3 * input.update_timeout_s)),
            summary=f"pass {self._progress.passes}: expire received coupons after "
            f"{after or 'the start'}",
        )

    def _show(self) -> None:
        p = self._progress
        workflow.set_current_details(
            f"campaign `{p.campaign_id}`{' (done)' if p.done else ''}, pass {p.passes}: "
            f"{p.expired} expired, {p.skipped} skipped, {p.stuck} left received "
            f"of {p.total} received"
        )

    async def _run_before_counts(self, input: EndCampaignInput) -> EndCampaignProgress:
        """The run as recorded before COUNTS, command for command (replay)."""
        progress = self._progress
        progress.total = await workflow.execute_activity_method(
            CatalogActivities.count_received,
            input.campaign_id,
            start_to_close_timeout=LEDGER_CALL,
        )
        after = ""
        while True:
            workflow.set_current_details(
                f"campaign `{input.campaign_id}`: {progress.expired} expired, "
                f"{progress.skipped} skipped of {progress.total} received"
            )
            page = await workflow.execute_activity_method(
                CatalogActivities.expire_received_page,
                ExpirePage(input.campaign_id, after, input.reason),
                start_to_close_timeout=timedelta(minutes=5),
                heartbeat_timeout=timedelta(minutes=1),
                summary=f"expire received coupons after {after or 'the start'}",
            )
            if page.expired:
                # Done means done in the ledger too: the workflows write `expired` a
                # moment after accepting it.
                await workflow.execute_activity_method(
                    CatalogActivities.await_states,
                    RepairCheck(page.expired, "expired", LEDGER_WAIT_S),
                    start_to_close_timeout=timedelta(seconds=LEDGER_WAIT_S + 30),
                    heartbeat_timeout=timedelta(seconds=30),
                    summary=f"wait for {len(page.expired)} expiries in the ledger",
                )
            progress.expired += len(page.expired)
            progress.skipped += page.skipped
            after = page.last
            if page.done:
                break
        progress.done = True
        return progress

    @workflow.query
    def progress(self) -> EndCampaignProgress:
        return self._progress
