"""Reports: a campaign's funnel (`coupons.report`), and the reconciliation of the
platform's flow files with the ledger, run now."""

from __future__ import annotations

import uuid

from app.schedules import RECONCILE_RUN_TIMEOUT
from app.service.backends import Backends, run_workflow
from coupons import catalog, report
from coupons.contract import RECONCILE_WORKFLOW
from coupons.model import ReconcileInput, ReconcileReport


async def funnel_report(
    b: Backends, campaign_id: str, tenant_id: str | None = None
) -> report.FunnelReport:
    """The campaign's funnel from the ledger (`coupons.report`)."""
    return await report.funnel_report(b.pool, campaign_id, tenant_id)


async def reconcile(
    b: Backends, batch_id: str | None, *, repair: bool, timeout_s: float
) -> tuple[str, ReconcileReport]:
    """Compare the platform's flow files of the batch (default: every batch) with the
    ledger, through the reconciliation workflow; its id and report."""
    if batch_id is not None:
        # Refused here, at once: the workflow would retry an unknown batch before giving up.
        await catalog.batches.get_batch(b.pool, batch_id)
    workflow_id = f"reconcile:manual:{uuid.uuid4()}"
    found = await run_workflow(
        b,
        RECONCILE_WORKFLOW,
        ReconcileInput(batch_id, repair=repair),
        workflow_id,
        ReconcileReport,
        timeout_s,
        run_timeout=RECONCILE_RUN_TIMEOUT,
    )
    return workflow_id, found
