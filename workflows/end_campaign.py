"""Expiring an ended campaign's pending coupons, page by page, through their workflows."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

from workflows.policies import LEDGER_CALL

# Activities are called by reference; their module does I/O, so it (and what it imports)
# comes from outside the sandbox.
with workflow.unsafe.imports_passed_through():
    from activities.catalog import CatalogActivities
    from coupons import contract as act
    from coupons.model import (
        EndCampaignInput,
        EndProgress,
        ExpirePage,
        RepairCheck,
    )

LEDGER_WAIT_S = 60.0


@workflow.defn(name=act.END_CAMPAIGN_WORKFLOW)
class EndCampaignWorkflow:
    """Started by `app.service.end_campaign` (the CLI's `campaign end --expire-pending`,
    the API's `end` with `expire_pending`) once the campaign is ended (so
    no new claim arrives); the `progress` query drives the command's progress bar."""

    @workflow.init
    def __init__(self, input: EndCampaignInput) -> None:
        self._progress = EndProgress(campaign_id=input.campaign_id, total=0)

    @workflow.run
    async def run(self, input: EndCampaignInput) -> EndProgress:
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
    def progress(self) -> EndProgress:
        return self._progress
