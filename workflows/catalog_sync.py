"""The catalog sync: every batch still in use, read at the platform and upserted."""

from __future__ import annotations

import asyncio
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
    from coupons.model import BatchSync, SyncInput, SyncReport

# Batches read at once.
PARALLEL = 8


# PINNED: each run stays on the worker version it started on (app/versioning.py); it is
# short, done before that version's workers are retired.
@workflow.defn(name=act.CATALOG_SYNC_WORKFLOW, versioning_behavior=VersioningBehavior.PINNED)
class CatalogSyncWorkflow:
    """Run by the `catalog-sync` schedule and by `starter.py batch sync`; its current
    details name the batches that drifted."""

    @workflow.run
    async def run(self, input: SyncInput) -> SyncReport:
        batch_ids = input.batch_ids
        if batch_ids is None:
            batch_ids = await workflow.execute_activity_method(
                CatalogActivities.syncable_batches, start_to_close_timeout=LEDGER_CALL
            )
        report = SyncReport(batches=[])
        for start in range(0, len(batch_ids), PARALLEL):
            chunk = batch_ids[start : start + PARALLEL]
            answers = await asyncio.gather(
                *(self._sync(batch_id) for batch_id in chunk), return_exceptions=True
            )
            for batch_id, answer in zip(chunk, answers, strict=True):
                if isinstance(answer, ActivityError):
                    report.failed.append(f"{batch_id}: {answer.cause or answer}")
                elif isinstance(answer, BaseException):
                    raise answer
                else:
                    report.batches.append(answer)
        workflow.set_current_details(_details(report))
        return report

    async def _sync(self, batch_id: str) -> BatchSync:
        return await workflow.execute_activity_method(
            CatalogActivities.sync_batch,
            batch_id,
            task_queue=act.platform_task_queue(workflow.info().task_queue),
            start_to_close_timeout=timedelta(minutes=5),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=PLATFORM_RETRY,
            summary=f"sync batch {batch_id}",
        )


def _details(report: SyncReport) -> str:
    lines = [f"**{len(report.batches)} batches synced**, {len(report.drifted)} drifted"]
    lines += [f"- `{b.batch_id}`: {'; '.join(b.drift)}" for b in report.drifted]
    lines += [f"- failed: {why}" for why in report.failed]
    return "\n\n".join(lines)
