"""Reconciliation (对账): each batch's flow files at the platform against the ledger."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import VersioningBehavior
from temporalio.exceptions import ActivityError

from workflows.policies import LEDGER_CALL, PLATFORM_RETRY

# Activities are called by reference; their module does I/O, so it (and what it imports)
# comes from outside the sandbox.
with workflow.unsafe.imports_passed_through():
    from activities.catalog import CatalogActivities
    from coupons import contract as act
    from coupons.model import BatchReconciliation, ReconcileInput, ReconcileReport, RepairCheck

# How long a repair may take to reach the ledger through its coupon's workflow.
REPAIR_WAIT_S = 60.0
# The patch that reports a batch that could not be reconciled and goes on with the others;
# runs from before it failed the whole reconciliation on the first such batch.
BATCH_FAILURE_REPORTED = "reconcile-batch-failure-reported"


# PINNED: each run stays on the worker version it started on (app/versioning.py); it is
# short, done before that version's workers are retired.
@workflow.defn(name=act.RECONCILE_WORKFLOW, versioning_behavior=VersioningBehavior.PINNED)
class ReconcileWorkflow:
    """Run daily by the `reconcile-daily` schedule and by `starter.py reconcile`.

    Safe repairs (a use we missed) go to the coupon's workflow as a redemption report;
    `repaired` counts only those the ledger then shows `redeemed`.
    """

    @workflow.run
    async def run(self, input: ReconcileInput) -> ReconcileReport:
        if input.batch_id is not None:
            batch_ids = [input.batch_id]
        else:
            batch_ids = await workflow.execute_activity_method(
                CatalogActivities.all_batches, start_to_close_timeout=LEDGER_CALL
            )
        report = ReconcileReport(batches=[])
        for batch_id in batch_ids:
            try:
                report.batches.append(await self._reconcile(batch_id, input.repair))
            except ActivityError as err:
                # Asked only when a batch fails: a run where none fails records no marker
                # and its commands are those from before the patch.
                if not workflow.patched(BATCH_FAILURE_REPORTED):
                    raise
                report.failed.append(f"{batch_id}: {err.cause or err}")
            workflow.set_current_details(_details(report, len(batch_ids)))
        return report

    async def _reconcile(self, batch_id: str, repair: bool) -> BatchReconciliation:
        found = await workflow.execute_activity_method(
            CatalogActivities.reconcile_batch,
            ReconcileInput(batch_id, repair),
            task_queue=act.platform_task_queue(workflow.info().task_queue),
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(minutes=1),
            retry_policy=PLATFORM_RETRY,
            summary=f"reconcile batch {batch_id}",
        )
        if found.repairs_requested:
            found.repaired = await workflow.execute_activity_method(
                CatalogActivities.await_states,
                RepairCheck(found.repairs_requested, "redeemed", REPAIR_WAIT_S),
                start_to_close_timeout=timedelta(seconds=REPAIR_WAIT_S + 30),
                heartbeat_timeout=timedelta(seconds=30),
                summary=f"wait for {len(found.repairs_requested)} repairs in the ledger",
            )
        return found


def _details(report: ReconcileReport, total: int) -> str:
    lines = [
        f"**{len(report.batches)}/{total} batches reconciled**: {report.mismatches} mismatches, "
        f"{report.repaired} repaired"
    ]
    for batch in report.batches:
        left = [m for m in batch.mismatches if m.repair is None]
        if left:
            lines.append(f"- `{batch.batch_id}`: {len(left)} for an operator")
    lines += [f"- failed: {why}" for why in report.failed]
    return "\n\n".join(lines)
