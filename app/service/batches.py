"""Operations on batches: create, read, and start, pause, resume or stop at the platform
(`coupons.catalog.batches`), and a catalog sync run now."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from temporalio.service import RPCError

from app.schedules import SYNC_RUN_TIMEOUT
from app.service.backends import Backends, run_workflow
from coupons import catalog
from coupons.contract import CATALOG_SYNC_WORKFLOW
from coupons.ledger import batches
from coupons.ledger.batches import Batch
from coupons.ledger.tenants import DEFAULT_TENANT
from coupons.model import SyncInput, SyncReport
from coupons.platforms.base import BatchAction

log = logging.getLogger(__name__)


# Actions after which a batch can send again: its waiting coupons are told at once.
SENDS_AGAIN = frozenset({BatchAction.START, BatchAction.RESUME})


async def create_batch(
    b: Backends, batch_id: str, *, tenant_id: str = DEFAULT_TENANT, **fields: Any
) -> Batch:
    """Create the batch at the platform (idempotent) and, unless `start=False`, start it;
    `fields` are `coupons.catalog.batches.create_batch`'s."""
    return await catalog.batches.create_batch(
        b.pool, b.platform, batch_id, tenant_id=tenant_id, **fields
    )


async def list_batches(b: Backends, *, tenant_id: str | None = None) -> list[Batch]:
    """Every batch (the tenant's, when given) as last synced."""
    return await batches.list_batches(b.pool, tenant_id=tenant_id)


async def get_batch(b: Backends, batch_id: str, tenant_id: str | None = None) -> Batch:
    """The batch as last synced; refused `unknown_batch`."""
    return await catalog.batches.get_batch(b.pool, batch_id, tenant_id)


async def change_batch(
    b: Backends, batch_id: str, action: BatchAction, tenant_id: str | None = None
) -> Batch:
    """Start, pause, resume or stop the batch at the platform. A batch that can send again
    (started, resumed) is synced at once, so the coupons waiting for it hear now, not at the
    next scheduled sync or their own recheck."""
    # Pausing or stopping a runaway batch must not wait for Temporal: only an action after
    # which the batch sends again needs it (to wake the coupons waiting for it).
    client = await b.client() if action in SENDS_AGAIN else None
    batch = await catalog.batches.change_batch(b.pool, b.platform, batch_id, action, tenant_id)
    if client is not None:
        try:
            await client.start_workflow(
                CATALOG_SYNC_WORKFLOW,
                SyncInput([batch.id]),
                id=f"catalog-sync:{action.value}:{batch.id}:{uuid.uuid4().hex[:8]}",
                task_queue=b.settings.task_queue,
                static_summary=f"sync batch {batch.id} after its {action.value}",
                execution_timeout=SYNC_RUN_TIMEOUT,
            )
        except RPCError as err:
            # The batch did change; waiting coupons still hear at the next sync.
            log.warning("sync after %s of %s not started: %s", action.value, batch.id, err)
    return batch


async def sync_catalog(
    b: Backends, batch_ids: list[str] | None, timeout_s: float
) -> tuple[str, SyncReport]:
    """Read the batches (default: all in use) at the platform now, through the catalog
    sync workflow; its id and report."""
    for batch_id in batch_ids or ():
        # Refused here, at once: the workflow would retry an unknown batch before giving up.
        await catalog.batches.get_batch(b.pool, batch_id)
    workflow_id = f"catalog-sync:manual:{uuid.uuid4()}"
    found = await run_workflow(
        b,
        CATALOG_SYNC_WORKFLOW,
        SyncInput(batch_ids),
        workflow_id,
        SyncReport,
        timeout_s,
        run_timeout=SYNC_RUN_TIMEOUT,
    )
    return workflow_id, found
