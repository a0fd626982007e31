"""The operations of the service: what the HTTP API (`app.api`) and the command line
(`app.cli`) both call, so each exists once.

The rule: the entry points (`app/api/`, `app/cli/`) import nothing from `coupons.ledger`,
`coupons.catalog`, `coupons.tenants` or `app.claims`; every read and write they make, of
the ledger, of Temporal or of the platform, is an operation here. An operation holds what
belongs to the application (tenant scoping, starting and answering workflows, turning
Temporal's answers into refusals) and leaves the rest to the domain below it:
`coupons.catalog` (batches and campaigns), `coupons.tenants` (tenants and keys),
`coupons.report` (the funnel), `app.claims` and `app.wedged`, and `coupons.ledger` (all
SQL). The records the entry points render (`Batch`, `Campaign`, `Claim`, `ApiKey`, ...)
are re-exported from here.

Every operation takes one `Backends` first: the settings, the ledger's pool, Temporal's
client and the platform. An operation that scopes by tenant takes an optional `tenant_id`:
when given, another tenant's campaign, batch or coupon is as unknown as one that does not
exist, with the same refusal and message. An operation on one coupon may also name the
`user_id` that must hold it (an app reporting for its user): a coupon held by someone else
is unknown too.

Refusals raise `coupons.errors.Refused` with a stable code (`unknown_coupon`,
`unknown_task`, `wrong_state`, `sold_out`, ...); a part that did not answer (Temporal, a
worker) raises `Unavailable`, after which trying again may succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from app import wedged
from app.claims import ClaimResult as ClaimResult
from app.claims import ClaimService
from coupons import catalog, report, tenants
from coupons.config import Settings
from coupons.contract import (
    CATALOG_SYNC_WORKFLOW,
    END_CAMPAIGN_WORKFLOW,
    RECONCILE_WORKFLOW,
    REPORT_REDEMPTION,
)
from coupons.errors import UNKNOWN_TASK, WRONG_STATE, InvalidField, Refused
from coupons.ledger import batches, campaigns, db, idempotency, notifications
from coupons.ledger import claims as ledger
from coupons.ledger import tenants as tenant_ledger
from coupons.ledger.batches import Batch as Batch
from coupons.ledger.campaigns import CAMPAIGN_STATUSES as CAMPAIGN_STATUSES
from coupons.ledger.campaigns import Campaign as Campaign
from coupons.ledger.campaigns import CampaignSpec as CampaignSpec
from coupons.ledger.campaigns import Task as Task
from coupons.ledger.claims import Claim as Claim
from coupons.ledger.idempotency import KeptRequest as KeptRequest
from coupons.ledger.tenants import DEFAULT_TENANT as DEFAULT_TENANT
from coupons.ledger.tenants import ApiKey as ApiKey
from coupons.ledger.tenants import Tenant as Tenant
from coupons.lifecycle import FINAL_STATES, STATES
from coupons.model import (
    CancelRequest,
    CouponStatus,
    EndCampaignInput,
    ReconcileInput,
    ReconcileReport,
    RedemptionReport,
    SyncInput,
    SyncReport,
    TaskCompletion,
)
from coupons.platforms.base import BatchAction, Platform
from coupons.platforms.configured import make_platform
from coupons.temporal import connect
from coupons.tenants import SCOPES as SCOPES
from coupons.tenants import IssuedKey as IssuedKey
from coupons.validation import validate_id
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger(__name__)

# How long a synchronous update waits for the coupon's worker to answer.
UPDATE_WAIT = timedelta(seconds=10)
# How long reading a coupon waits for its workflow's `status` query before answering from
# the ledger alone.
QUERY_WAIT = timedelta(seconds=5)

R = TypeVar("R")


class Unavailable(Exception):
    """A part the operation needs did not answer (Temporal, a worker; for the command line
    also PostgreSQL or the platform); trying again later may succeed."""


class Backends:
    """What every operation works with, one per process (the API) or per command (the
    command line): the settings, the ledger's pool, Temporal's client and the platform.

    Temporal's client and the platform are the ones given, or reached on first use: the
    command line reaches them only for the commands that need them (pausing a runaway
    batch must not wait for Temporal)."""

    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool,
        client: Client | None = None,
        platform: Platform | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self._client = client
        self._platform = platform

    async def client(self) -> Client:
        if self._client is None:
            try:
                self._client = await connect(self.settings.with_stack_secrets())
            except RuntimeError as err:
                raise Unavailable(
                    f"cannot reach Temporal at {self.settings.temporal_address} ({err}); "
                    "is `make run` up, with the same environment as this shell?"
                ) from None
        return self._client

    @property
    def platform(self) -> Platform:
        if self._platform is None:
            self._platform = make_platform(self.settings.with_stack_secrets())
        return self._platform

    async def aclose(self) -> None:
        """Close the platform's client (the pool and Temporal's client are the opener's)."""
        if self._platform is not None:
            await self._platform.aclose()


async def migrate(settings: Settings) -> None:
    """Bring the ledger's schema up to date (the API does at start)."""
    await db.migrate_url(settings.database_url)


@contextlib.asynccontextmanager
async def opened(
    settings: Settings,
    *,
    pool_size: int,
    timeout_s: float = 30.0,
    client: Client | None = None,
    platform: Platform | None = None,
) -> AsyncIterator[Backends]:
    """The backends over a new pool for the life of the block; the platform's client is
    closed at its end (`timeout_s` bounds the wait for a connection)."""
    made: Backends | None = None
    try:
        async with db.pool(settings.database_url, max_size=pool_size, timeout_s=timeout_s) as pool:
            made = Backends(settings, pool, client, platform)
            yield made
    finally:
        if made is not None:
            await made.aclose()
        elif platform is not None:
            await platform.aclose()


async def _run_workflow(
    b: Backends, workflow: str, arg: object, workflow_id: str, result: type[R], timeout_s: float
) -> R:
    """Start a workflow and wait for its result, `Unavailable` after `timeout_s`."""
    handle: WorkflowHandle[Any, R] = await (await b.client()).start_workflow(
        workflow, arg, id=workflow_id, task_queue=b.settings.task_queue, result_type=result
    )
    try:
        async with asyncio.timeout(timeout_s):
            return await handle.result()
    except TimeoutError:
        raise Unavailable(
            f"workflow {workflow_id} did not finish within {timeout_s:g} s (is the worker "
            f"polling task queue {b.settings.task_queue!r}?); it stays queued and runs then"
        ) from None


# ------------------------------------------------------------------ claims and reads


async def claim(
    b: Backends, campaign_id: str, user_id: str, *, tenant_id: str | None = None
) -> ClaimResult:
    """Claim a coupon of the campaign for the user; a repeated claim at the user's limit
    returns the coupon they hold (`created` False)."""
    client = await b.client()
    validate_id("user", user_id)
    if tenant_id is not None:
        # Campaigns never change tenant, so this check holds for the claim that follows.
        await catalog.campaigns.get_campaign(b.pool, campaign_id, tenant_id)
    try:
        return await ClaimService(b.pool, client, b.settings).claim(campaign_id, user_id)
    except RPCError as err:
        # The claim is in the ledger; the worker starts its workflow, a repeat returns it.
        raise Unavailable(
            f"the claim is recorded but its workflow could not be started yet (Temporal "
            f"answered {err.status.name}); repeat the claim to get it"
        ) from None


async def repair(b: Backends) -> int:
    """Start the workflows of claims that lack one; how many were started."""
    return await ClaimService(b.pool, await b.client(), b.settings).repair()


async def find_coupon(
    b: Backends, coupon_id: str, *, tenant_id: str | None = None, user_id: str | None = None
) -> Claim:
    """The coupon's claim; refused as unknown when it is not the tenant's, or not held by
    `user_id` (when given)."""
    found = await ledger.get_claim(b.pool, coupon_id, tenant_id)
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

    def fields(self) -> dict[str, Any]:
        """The coupon as both entry points show it."""
        claim, workflow = self.claim, self.workflow
        return {
            "coupon_id": claim.coupon_id,
            "campaign_id": claim.campaign_id,
            "user_id": claim.user_id,
            "state": claim.state,
            "workflow_id": claim.workflow_id,
            "workflow_state": workflow.state if workflow else None,
            "waiting_for": workflow.waiting_for if workflow else None,
            "tasks": {
                "required": claim.required_tasks,
                "done": workflow.tasks_done if workflow else None,
                "deadline": claim.task_deadline,
            },
            "claimed_at": claim.claimed_at,
            "receipt": self.receipt,
            "events": self.events,
        }


async def show_coupon(
    b: Backends,
    coupon_id: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
    query_wait: timedelta = QUERY_WAIT,
) -> CouponView:
    """The coupon's claim, receipt and events, and its workflow's status (tasks done, what
    it waits for) unless the workflow cannot answer now: then that part is None."""
    client = await b.client()
    view = await ledger.coupon_view(b.pool, coupon_id, tenant_id)
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
    b: Backends,
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
        b.pool, tenant_id, user_id, campaign_id=campaign_id, state=state, limit=limit
    )


async def campaign_coupons(
    b: Backends,
    campaign_id: str,
    *,
    user_id: str | None = None,
    state: str | None = None,
    limit: int = 100,
) -> list[Claim]:
    """A campaign's coupons (of one user, in one state, when given), from the ledger."""
    return await ledger.list_claims(b.pool, campaign_id, user_id=user_id, state=state, limit=limit)


async def count_by_state(b: Backends, campaign_id: str) -> dict[str, int]:
    """The campaign's coupons counted by state (states with none left out)."""
    return await ledger.count_by_state(b.pool, campaign_id)


# ------------------------------------------------------------------ task completion, cancel


def _check_task(found: Claim, task: str) -> None:
    validate_id("task", task)
    if task not in found.required_tasks:
        known = ", ".join(found.required_tasks) or "none"
        raise Refused(UNKNOWN_TASK, f"unknown task {task!r}; this coupon's tasks are: {known}")


async def complete_task(
    b: Backends,
    coupon_id: str,
    task: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
    wait: timedelta = UPDATE_WAIT,
) -> CouponStatus:
    """Report the task done through the workflow's update: the coupon's new status, or the
    workflow's refusal (`unknown_task`, `wrong_state`) with nothing written."""
    client = await b.client()
    found = await find_coupon(b, coupon_id, tenant_id=tenant_id, user_id=user_id)
    _check_task(found, task)
    async with _coupon_workflow(b.pool, client, found) as handle:
        return await handle.execute_update(
            UserCouponWorkflow.complete_task, TaskCompletion(task), rpc_timeout=wait
        )


async def report_task(
    b: Backends,
    coupon_id: str,
    task: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
) -> None:
    """Report the task done through the workflow's signal (fire and forget): refused here
    only for what the ledger already tells (unknown coupon or task, a finished coupon)."""
    client = await b.client()
    found = await find_coupon(b, coupon_id, tenant_id=tenant_id, user_id=user_id)
    _check_task(found, task)
    if found.state in FINAL_STATES:
        raise Refused(WRONG_STATE, f"coupon {coupon_id!r} is {found.state}: it is finished")
    async with _coupon_workflow(b.pool, client, found) as handle:
        await handle.signal(UserCouponWorkflow.task_done, TaskCompletion(task))


async def cancel(
    b: Backends,
    coupon_id: str,
    reason: str,
    *,
    tenant_id: str | None = None,
    user_id: str | None = None,
    wait: timedelta | None = UPDATE_WAIT,
) -> CouponStatus | None:
    """Cancel a coupon not yet sent, through the update (its new status) or, with `wait`
    None, through the signal (None)."""
    client = await b.client()
    found = await find_coupon(b, coupon_id, tenant_id=tenant_id, user_id=user_id)
    async with _coupon_workflow(b.pool, client, found) as handle:
        if wait is None:
            await handle.signal(UserCouponWorkflow.cancel, CancelRequest(reason))
            return None
        return await handle.execute_update(
            UserCouponWorkflow.cancel_coupon, CancelRequest(reason), rpc_timeout=wait
        )


@contextlib.asynccontextmanager
async def _coupon_workflow(
    pool: AsyncConnectionPool, client: Client, found: Claim
) -> AsyncIterator[WorkflowHandle[UserCouponWorkflow, Any]]:
    """The coupon's workflow; what Temporal answers about it becomes refusals a caller can
    act on, and a workflow or worker that cannot answer `Unavailable`."""
    try:
        yield client.get_workflow_handle_for(UserCouponWorkflow.run, found.workflow_id)
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


# ------------------------------------------------------------------ wedged coupons


async def wedged_coupons(b: Backends, *, limit: int = 1000) -> list[wedged.Wedged]:
    """Coupons whose workflow cannot make progress, with the cause (`app.wedged`)."""
    return await wedged.find_wedged(b.pool, await b.client(), b.settings, limit=limit)


async def recover(b: Backends, coupon_id: str) -> wedged.Recovery:
    """Recover one coupon if it is wedged; one that is not is left alone."""
    return await wedged.recover(b.pool, await b.client(), b.settings, coupon_id)


async def recover_all(b: Backends) -> list[wedged.Recovery]:
    """Recover every wedged coupon; one that fails is reported, not raised."""
    return await wedged.recover_all(b.pool, await b.client(), b.settings)


# ------------------------------------------------------------------ batches

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
    found = await _run_workflow(
        b, CATALOG_SYNC_WORKFLOW, SyncInput(batch_ids), workflow_id, SyncReport, timeout_s
    )
    return workflow_id, found


async def reconcile(
    b: Backends, batch_id: str | None, *, repair: bool, timeout_s: float
) -> tuple[str, ReconcileReport]:
    """Compare the platform's flow files of the batch (default: every batch) with the
    ledger, through the reconciliation workflow; its id and report."""
    if batch_id is not None:
        # Refused here, at once: the workflow would retry an unknown batch before giving up.
        await catalog.batches.get_batch(b.pool, batch_id)
    workflow_id = f"reconcile:manual:{uuid.uuid4()}"
    found = await _run_workflow(
        b,
        RECONCILE_WORKFLOW,
        ReconcileInput(batch_id, repair=repair),
        workflow_id,
        ReconcileReport,
        timeout_s,
    )
    return workflow_id, found


# ------------------------------------------------------------------ campaigns


def campaign_fields(campaign: Campaign) -> dict[str, Any]:
    """The campaign as the entry points show it: its fields, what remains of its quota, its
    tasks as key and name, its relative deadline in seconds."""
    return {
        "id": campaign.id,
        "tenant_id": campaign.tenant_id,
        "name": campaign.name,
        "batch_id": campaign.batch_id,
        "status": campaign.status,
        "quota": campaign.quota,
        "claimed": campaign.claimed,
        "remaining": campaign.quota - campaign.claimed,
        "per_user_limit": campaign.per_user_limit,
        "tasks": [{"key": t.key, "name": t.name} for t in campaign.tasks],
        "task_deadline_s": (
            campaign.task_deadline.total_seconds() if campaign.task_deadline else None
        ),
        "deadline_at": campaign.deadline_at,
        "starts_at": campaign.starts_at,
        "ends_at": campaign.ends_at,
        "created_at": campaign.created_at,
        "updated_at": campaign.updated_at,
        "ended_at": campaign.ended_at,
    }


async def create_campaign(b: Backends, spec: CampaignSpec) -> tuple[Campaign, bool]:
    """Define a campaign; the same definition again is a no-op (`created` False)."""
    return await catalog.campaigns.create_campaign(b.pool, spec)


async def update_campaign(b: Backends, campaign_id: str, **changes: Any) -> Campaign:
    """Change some fields (`tenant_id` scopes); claims already made keep theirs."""
    return await catalog.campaigns.update_campaign(b.pool, campaign_id, **changes)


async def get_campaign(b: Backends, campaign_id: str, tenant_id: str | None = None) -> Campaign:
    """The campaign; refused `unknown_campaign`."""
    return await catalog.campaigns.get_campaign(b.pool, campaign_id, tenant_id)


async def list_campaigns(
    b: Backends,
    *,
    batch_id: str | None = None,
    status: str | None = None,
    tenant_id: str | None = None,
) -> list[Campaign]:
    """Campaigns (of a batch, in a status, of a tenant, when given)."""
    return await campaigns.list_campaigns(
        b.pool, batch_id=batch_id, status=status, tenant_id=tenant_id
    )


async def change_campaign_status(
    b: Backends, campaign_id: str, action: str, tenant_id: str | None = None
) -> Campaign:
    """Pause, resume or end claims of the campaign."""
    return await catalog.campaigns.change_campaign_status(b.pool, campaign_id, action, tenant_id)


async def end_campaign(
    b: Backends,
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
    client = await b.client() if expire_pending else None
    campaign = await catalog.campaigns.change_campaign_status(b.pool, campaign_id, "end", tenant_id)
    if client is None:
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
            task_queue=b.settings.task_queue,
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


async def funnel_report(
    b: Backends, campaign_id: str, tenant_id: str | None = None
) -> report.FunnelReport:
    """The campaign's funnel from the ledger (`coupons.report`)."""
    return await report.funnel_report(b.pool, campaign_id, tenant_id)


# ------------------------------------------------------------------ tenants and keys


async def known_tenant(b: Backends, tenant_id: str) -> str:
    """The tenant's id; refused `unknown_tenant`."""
    if await tenant_ledger.get_tenant(b.pool, tenant_id) is None:
        raise Refused("unknown_tenant", f"no tenant {tenant_id!r}")
    return tenant_id


async def create_tenant(b: Backends, name: str) -> tuple[Tenant, IssuedKey]:
    """A new tenant and its first key (scope admin); the key's secret is in the answer
    only."""
    return await tenants.create_tenant(b.pool, name)


async def list_tenants(b: Backends) -> list[Tenant]:
    return await tenant_ledger.list_tenants(b.pool)


async def create_key(b: Backends, tenant_id: str, scope: str) -> IssuedKey:
    return await tenants.create_key(b.pool, tenant_id, scope)


async def list_keys(b: Backends, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys (never their secrets); refused `unknown_tenant`."""
    return await tenant_ledger.list_keys(b.pool, await known_tenant(b, tenant_id))


async def revoke_key(b: Backends, key_id: str) -> ApiKey:
    return await tenants.revoke_key(b.pool, key_id)


async def authenticate(b: Backends, presented: str) -> ApiKey | None:
    """The key an API request presents, unless it is unknown or revoked."""
    return await tenants.authenticate(b.pool, presented)


# ------------------------------------------------------------------ the API's answers kept


async def take_answer(
    b: Backends, tenant_id: str, key: str, fingerprint: str, stale_after: timedelta
) -> KeptRequest | None:
    """Take an `Idempotency-Key` for a new request (None), or what its first request left."""
    return await idempotency.take(b.pool, tenant_id, key, fingerprint, stale_after)


async def keep_answer(
    b: Backends, tenant_id: str, key: str, status: int, response: dict[str, Any]
) -> None:
    await idempotency.keep(b.pool, tenant_id, key, status, response)


async def release_answer(b: Backends, tenant_id: str, key: str) -> None:
    """Forget a key whose request failed: a repeat runs it again."""
    await idempotency.release(b.pool, tenant_id, key)


async def prune_answers(b: Backends, older_than: timedelta) -> int:
    return await idempotency.prune(b.pool, older_than)


# ------------------------------------------------------------------ redemption callbacks


async def apply_coupon_used(
    b: Backends, notification_id: str, platform_coupon_id: str, used_at: datetime
) -> str:
    """Apply the platform's notice that one of its coupons was used: signal the coupon's
    workflow, once per notification. Returns "applied", "duplicate" (applied before) or
    "finished" (the coupon is final already: nothing to apply).

    Refused (`unknown_platform_coupon`) while no receipt names the platform coupon: the
    notice may have overtaken our own confirmation of the send, so the platform should
    deliver it again later.
    """
    holder = await notifications.coupon_of(b.pool, platform_coupon_id)
    if holder is None:
        raise Refused(
            "unknown_platform_coupon",
            "no receipt names this platform coupon (yet); deliver the notification again later",
        )
    outcome = "applied"
    client = await b.client()

    async def signal() -> None:
        nonlocal outcome
        handle = client.get_workflow_handle(holder.workflow_id)
        try:
            await handle.signal(REPORT_REDEMPTION, RedemptionReport(used_at, "callback"))
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise Unavailable(f"Temporal answered {err.status.name}: {err.message}") from None
            outcome = "finished"  # the workflow closed: the coupon is final

    if not await notifications.apply_once(b.pool, notification_id, platform_coupon_id, signal):
        return "duplicate"
    return outcome
