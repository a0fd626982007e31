"""Coupon operations over the ledger, the coupon workflows and the settings: what the HTTP
API and the command line (`app.cli`) both call, so each exists once.

Every operation takes an optional `tenant_id`: when given, another tenant's campaign or
coupon is as unknown as one that does not exist, with the same refusal and message. An
operation on one coupon may also name the `user_id` that must hold it (an app reporting
for its user): a coupon held by someone else is unknown too.

Refusals raise `coupons.errors.Refused` with a stable code (`unknown_coupon`,
`unknown_task`, `wrong_state`, `sold_out`, ...); a part that did not answer (Temporal, a
worker) raises `Unavailable`, after which trying again may succeed.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool
from temporalio.client import (
    Client,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from app.claims import ClaimResult, ClaimService
from coupons import catalog
from coupons.config import Settings
from coupons.contract import CATALOG_SYNC_WORKFLOW, END_CAMPAIGN_WORKFLOW, REPORT_REDEMPTION
from coupons.errors import UNKNOWN_TASK, WRONG_STATE, InvalidField, Refused
from coupons.ledger import claims as ledger
from coupons.ledger import notifications
from coupons.ledger.campaigns import Batch, Campaign
from coupons.ledger.claims import Claim
from coupons.lifecycle import FINAL_STATES, STATES
from coupons.model import (
    CancelRequest,
    CouponStatus,
    EndCampaignInput,
    RedemptionReport,
    SyncInput,
    TaskCompletion,
)
from coupons.platforms.base import BatchAction, Platform
from coupons.validation import validate_id
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger(__name__)

# How long a synchronous update waits for the coupon's worker to answer.
UPDATE_WAIT = timedelta(seconds=10)
# How long reading a coupon waits for its workflow's `status` query before answering from
# the ledger alone.
QUERY_WAIT = timedelta(seconds=5)

__all__ = [
    "QUERY_WAIT",
    "UPDATE_WAIT",
    "CouponView",
    "Unavailable",
    "apply_coupon_used",
    "cancel",
    "claim",
    "complete_task",
    "end_campaign",
    "find_coupon",
    "report_task",
    "show_coupon",
    "user_coupons",
]


class Unavailable(Exception):
    """A part the operation needs did not answer (Temporal, a worker; for the command line
    also PostgreSQL or the platform); trying again later may succeed."""


# ------------------------------------------------------------------ claims and reads


async def claim(
    pool: AsyncConnectionPool,
    client: Client,
    settings: Settings,
    campaign_id: str,
    user_id: str,
    *,
    tenant_id: str | None = None,
) -> ClaimResult:
    """Claim a coupon of the campaign for the user; a repeated claim at the user's limit
    returns the coupon they hold (`created` False)."""
    validate_id("user", user_id)
    if tenant_id is not None:
        # Campaigns never change tenant, so this check holds for the claim that follows.
        await catalog.get_campaign(pool, campaign_id, tenant_id)
    try:
        return await ClaimService(pool, client, settings).claim(campaign_id, user_id)
    except RPCError as err:
        # The claim is in the ledger; the worker starts its workflow, a repeat returns it.
        raise Unavailable(
            f"the claim is recorded but its workflow could not be started yet (Temporal "
            f"answered {err.status.name}); repeat the claim to get it"
        ) from None


async def find_coupon(
    pool: AsyncConnectionPool,
    coupon_id: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
) -> Claim:
    """The coupon's claim; refused as unknown when it is not the tenant's, or not held by
    `user_id` (when given)."""
    found = await ledger.get_claim(pool, coupon_id, tenant_id)
    if found is None or (user_id is not None and found.user_id != user_id):
        raise Refused("unknown_coupon", f"no coupon {coupon_id!r}")
    return found


@dataclass
class CouponView:
    """One coupon as the ledger records it, with its workflow's view when it answered."""

    claim: Claim
    receipt: dict[str, Any] | None
    events: list[dict[str, Any]]
    workflow: CouponStatus | None


async def show_coupon(
    pool: AsyncConnectionPool,
    client: Client,
    coupon_id: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
    query_wait: timedelta = QUERY_WAIT,
) -> CouponView:
    """The coupon's claim, receipt and events, and its workflow's status (tasks done, what
    it waits for) unless the workflow cannot answer now: then that part is None."""
    view = await ledger.coupon_view(pool, coupon_id, tenant_id)
    if view is None or (user_id is not None and view["claim"].user_id != user_id):
        raise Refused("unknown_coupon", f"no coupon {coupon_id!r}")
    found: Claim = view["claim"]
    handle = client.get_workflow_handle_for(UserCouponWorkflow.run, found.workflow_id)
    workflow: CouponStatus | None = None
    try:
        workflow = await handle.query(UserCouponWorkflow.status, rpc_timeout=query_wait)
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            log.warning("status query of %s failed: %s", found.workflow_id, err)
    except WorkflowQueryFailedError as err:
        log.warning("status query of %s failed: %s", found.workflow_id, err)
    return CouponView(found, view["receipt"], view["events"], workflow)


async def user_coupons(
    pool: AsyncConnectionPool,
    tenant_id: str,
    user_id: str,
    *,
    campaign_id: str | None = None,
    state: str | None = None,
    limit: int = 100,
) -> list[Claim]:
    """The user's coupons in the tenant's campaigns, newest first."""
    validate_id("user", user_id)
    if campaign_id is not None:
        validate_id("campaign", campaign_id)
    if state is not None and state not in STATES:
        raise InvalidField("state", f"{state!r} is not one of {', '.join(STATES)}")
    if not 1 <= limit <= 1000:
        raise InvalidField("limit", f"{limit} must be between 1 and 1000")
    return await ledger.claims_of_user(
        pool, tenant_id, user_id, campaign_id=campaign_id, state=state, limit=limit
    )


# ------------------------------------------------------------------ task completion, cancel


def _check_task(found: Claim, task: str) -> None:
    validate_id("task", task)
    if task not in found.required_tasks:
        known = ", ".join(found.required_tasks) or "none"
        raise Refused(UNKNOWN_TASK, f"unknown task {task!r}; this coupon's tasks are: {known}")


async def complete_task(
    pool: AsyncConnectionPool,
    client: Client,
    coupon_id: str,
    task: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
    wait: timedelta = UPDATE_WAIT,
) -> CouponStatus:
    """Report the task done through the workflow's update: the coupon's new status, or the
    workflow's refusal (`unknown_task`, `wrong_state`) with nothing written."""
    found = await find_coupon(pool, coupon_id, tenant_id=tenant_id, user_id=user_id)
    _check_task(found, task)
    handle = client.get_workflow_handle_for(UserCouponWorkflow.run, found.workflow_id)
    async with _coupon_workflow(pool, found):
        return await handle.execute_update(
            UserCouponWorkflow.complete_task, TaskCompletion(task), rpc_timeout=wait
        )


async def report_task(
    pool: AsyncConnectionPool,
    client: Client,
    coupon_id: str,
    task: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
) -> None:
    """Report the task done through the workflow's signal (fire and forget): refused here
    only for what the ledger already tells (unknown coupon or task, a finished coupon)."""
    found = await find_coupon(pool, coupon_id, tenant_id=tenant_id, user_id=user_id)
    _check_task(found, task)
    if found.state in FINAL_STATES:
        raise Refused(WRONG_STATE, f"coupon {coupon_id!r} is {found.state}: it is finished")
    handle = client.get_workflow_handle_for(UserCouponWorkflow.run, found.workflow_id)
    async with _coupon_workflow(pool, found):
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(task))


async def cancel(
    pool: AsyncConnectionPool,
    client: Client,
    coupon_id: str,
    reason: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
    wait: timedelta | None = UPDATE_WAIT,
) -> CouponStatus | None:
    """Cancel a coupon not yet sent, through the update (its new status) or, with `wait`
    None, through the signal (None)."""
    found = await find_coupon(pool, coupon_id, tenant_id=tenant_id, user_id=user_id)
    handle = client.get_workflow_handle_for(UserCouponWorkflow.run, found.workflow_id)
    async with _coupon_workflow(pool, found):
        if wait is None:
            await handle.signal(UserCouponWorkflow.cancel, CancelRequest(reason))
            return None
        return await handle.execute_update(
            UserCouponWorkflow.cancel_coupon, CancelRequest(reason), rpc_timeout=wait
        )


@contextlib.asynccontextmanager
async def _coupon_workflow(pool: AsyncConnectionPool, found: Claim) -> AsyncIterator[None]:
    """Turn what Temporal answers about a coupon's workflow into refusals a caller can act
    on, and a workflow or worker that cannot answer into `Unavailable`."""
    try:
        yield
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type:
            # The workflow's validator refused: nothing was written to its history.
            raise Refused(cause.type, cause.message) from None
        raise
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise Unavailable(
            "no worker answered in time; the request stays queued and may still apply"
        ) from None
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise Unavailable(f"Temporal answered {err.status.name}: {err.message}") from None
        if not found.workflow_started:
            raise Unavailable(
                f"coupon {found.coupon_id!r} has no workflow yet; the worker starts it "
                "shortly, then try again"
            ) from None
        # The workflow is closed: the coupon reached a final state, which the ledger
        # recorded before the workflow closed.
        now = await ledger.get_claim(pool, found.coupon_id)
        state = now.state if now is not None else found.state
        raise Refused(
            WRONG_STATE, f"coupon {found.coupon_id!r} is {state}: it is finished"
        ) from None


# ------------------------------------------------------------------ batches

# Actions after which a batch can send again: its waiting coupons are told at once.
SENDS_AGAIN = frozenset({BatchAction.START, BatchAction.RESUME})


async def change_batch(
    pool: AsyncConnectionPool,
    client: Client | None,
    settings: Settings,
    platform: Platform,
    batch_id: str,
    action: BatchAction,
    tenant_id: str | None = None,
) -> Batch:
    """Start, pause, resume or stop the batch at the platform. A batch that can send again
    (started, resumed) is synced at once, so the coupons waiting for it hear now, not at the
    next scheduled sync or their own recheck (`client` None: no sync now; the schedule's next
    one tells them)."""
    batch = await catalog.change_batch(pool, platform, batch_id, action, tenant_id)
    if client is not None and action in SENDS_AGAIN:
        try:
            await client.start_workflow(
                CATALOG_SYNC_WORKFLOW,
                SyncInput([batch.id]),
                id=f"catalog-sync:{action.value}:{batch.id}:{uuid.uuid4().hex[:8]}",
                task_queue=settings.task_queue,
                static_summary=f"sync batch {batch.id} after its {action.value}",
            )
        except RPCError as err:
            # The batch did change; waiting coupons still hear at the next sync.
            log.warning("sync after %s of %s not started: %s", action.value, batch.id, err)
    return batch


# ------------------------------------------------------------------ campaigns


async def end_campaign(
    pool: AsyncConnectionPool,
    client: Client,
    settings: Settings,
    campaign_id: str,
    *,
    tenant_id: str | None = None,
    expire_pending: bool = False,
    reason: str | None = None,
) -> tuple[Campaign, str | None]:
    """End the campaign (no more claims); with `expire_pending`, also start the workflow
    that expires its `received` coupons. Returns the campaign and that workflow's id."""
    if reason is not None and not expire_pending:
        raise InvalidField("reason", "applies only with expire_pending")
    campaign = await catalog.change_campaign_status(pool, campaign_id, "end", tenant_id)
    if not expire_pending:
        return campaign, None
    expire = EndCampaignInput(campaign.id)
    if reason is not None:
        expire.reason = reason
    workflow_id = f"end-campaign:{campaign.id}"
    try:
        await client.start_workflow(
            END_CAMPAIGN_WORKFLOW,
            expire,
            id=workflow_id,
            task_queue=settings.task_queue,
            # One expiry at a time; a later run (the campaign already ended) catches coupons
            # that were still being claimed when the first one read the ledger.
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=f"expire the received coupons of ended campaign {campaign.id}",
        )
    except RPCError as err:
        raise Unavailable(
            f"the campaign has ended, but the expiry of its received coupons could not be "
            f"started (Temporal answered {err.status.name}); repeat the request"
        ) from None
    return campaign, workflow_id


# ------------------------------------------------------------------ redemption callbacks


async def apply_coupon_used(
    pool: AsyncConnectionPool,
    client: Client,
    notification_id: str,
    platform_coupon_id: str,
    used_at: datetime,
) -> str:
    """Apply the platform's notice that one of its coupons was used: signal the coupon's
    workflow, once per notification. Returns "applied", "duplicate" (applied before) or
    "finished" (the coupon is final already: nothing to apply).

    Refused (`unknown_platform_coupon`) while no receipt names the platform coupon: the
    notice may have overtaken our own confirmation of the send, so the platform should
    deliver it again later.
    """
    holder = await notifications.coupon_of(pool, platform_coupon_id)
    if holder is None:
        raise Refused(
            "unknown_platform_coupon",
            "no receipt names this platform coupon (yet); deliver the notification again later",
        )
    outcome = "applied"

    async def signal() -> None:
        nonlocal outcome
        handle = client.get_workflow_handle(holder.workflow_id)
        try:
            await handle.signal(REPORT_REDEMPTION, RedemptionReport(used_at, "callback"))
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise Unavailable(f"Temporal answered {err.status.name}: {err.message}") from None
            outcome = "finished"  # the workflow closed: the coupon is final

    if not await notifications.apply_once(pool, notification_id, platform_coupon_id, signal):
        return "duplicate"
    return outcome
