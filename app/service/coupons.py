"""Operations on coupons: claiming, reading (one coupon, a user's, a campaign's), reporting
a task done and cancelling through the coupon's workflow, and the wedged coupons found and
recovered (`app.wedged`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from app import claims, wedged
from app.claims import ClaimResult, ClaimService, StartSignal
from app.service.backends import Backends, Unavailable
from coupons import contract as act
from coupons.errors import UNKNOWN_TASK, WRONG_STATE, InvalidField, Refused
from coupons.ledger import claims as ledger
from coupons.ledger.claims import Claim, ClaimFilter
from coupons.lifecycle import FINAL_STATES, STATES
from coupons.model import CancelRequest, CouponStatus, TaskCompletion
from coupons.validation import LIST_LIMIT, validate_id
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger(__name__)

# How long a synchronous update waits for the coupon's worker to answer.
UPDATE_WAIT = timedelta(seconds=10)
# How long reading a coupon waits for its workflow's `status` query before answering from
# the ledger alone.
QUERY_WAIT = timedelta(seconds=5)


# ------------------------------------------------------------------ claims and reads


async def claim(
    b: Backends, campaign_id: str, user_id: str, *, tenant_id: str | None = None
) -> ClaimResult:
    """Claim a coupon of the campaign for the user, answered by the ledger alone (the
    workers start its workflow); a repeated claim at the user's limit returns the coupon
    they hold (`created` False)."""
    return await claims.claim(b.pool, campaign_id, user_id, tenant_id)


async def repair(b: Backends) -> int:
    """Start the workflows of claims that lack one; how many were started."""
    return await ClaimService(b.pool, await b.client(), b.settings).repair()


@dataclass(frozen=True)
class CouponRef:
    """A coupon as a caller names it: its id, and whose it must be for the caller to see it
    at all (the API key's tenant; the holder, for a user's own action). None: anyone's."""

    coupon_id: str
    tenant_id: str | None = None
    user_id: str | None = None

    def sees(self, claim: Claim | None) -> Claim:
        """`claim` (the ledger's answer for this id and tenant) if the caller may see it;
        refused as unknown otherwise: another's coupon is as unknown as none."""
        if claim is None or (self.user_id is not None and claim.user_id != self.user_id):
            raise Refused("unknown_coupon", f"no coupon {self.coupon_id!r}")
        return claim


async def find_coupon(b: Backends, ref: CouponRef) -> Claim:
    """The coupon's claim, if the caller may see it."""
    return ref.sees(await ledger.get_claim(b.pool, ref.coupon_id, ref.tenant_id))


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
    b: Backends, ref: CouponRef, query_wait: timedelta = QUERY_WAIT
) -> CouponView:
    """The coupon's claim, receipt and events, and its workflow's status (tasks done, what
    it waits for) unless the workflow cannot answer now: then that part is None."""
    client = await b.client()
    view = await ledger.coupon_view(b.pool, ref.coupon_id, ref.tenant_id) or {}
    found = ref.sees(view.get("claim"))
    # Typed here: without a target type mypy infers the handle's parameters as Never.
    handle: WorkflowHandle[UserCouponWorkflow, CouponStatus] = client.get_workflow_handle_for(
        UserCouponWorkflow.run, found.workflow_id
    )
    workflow: CouponStatus | None = None
    try:
        workflow = await handle.query(UserCouponWorkflow.status, rpc_timeout=query_wait)
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            log.warning("status query of %s failed: %s", found.workflow_id, err)
    except WorkflowQueryFailedError as err:
        log.warning("status query of %s failed: %s", found.workflow_id, err)
    return CouponView(found, view["receipt"], view["events"], workflow)


async def list_coupons(b: Backends, where: ClaimFilter) -> list[Claim]:
    """The coupons `where` asks for (a tenant's, a campaign's, a user's, in a state...)."""
    for kind, given in (("user", where.user_id), ("campaign", where.campaign_id)):
        if given is not None:
            validate_id(kind, given)
    if where.state is not None and where.state not in STATES:
        raise InvalidField("state", f"{where.state!r} is not one of {', '.join(STATES)}")
    LIST_LIMIT.check("limit", where.limit)
    return await ledger.find_claims(b.pool, where)


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
    b: Backends, ref: CouponRef, task: str, wait: timedelta = UPDATE_WAIT
) -> CouponStatus:
    """Report the task done through the workflow's update: the coupon's new status, or the
    workflow's refusal (`unknown_task`, `wrong_state`) with nothing written."""
    client = await b.client()
    found = await find_coupon(b, ref)
    _check_task(found, task)
    async with _coupon_workflow(b, client, found) as handle:
        return await handle.execute_update(
            UserCouponWorkflow.complete_task, TaskCompletion(task), rpc_timeout=wait
        )


async def report_task(b: Backends, ref: CouponRef, task: str) -> None:
    """Report the task done through the workflow's signal (fire and forget): refused here
    only for what the ledger already tells (unknown coupon or task, a finished coupon)."""
    client = await b.client()
    found = await find_coupon(b, ref)
    _check_task(found, task)
    if found.state in FINAL_STATES:
        raise Refused(WRONG_STATE, f"coupon {found.coupon_id!r} is {found.state}: it is finished")
    await _signal(b, client, found, StartSignal(act.TASK_DONE, TaskCompletion(task)))


async def cancel(
    b: Backends, ref: CouponRef, reason: str, wait: timedelta | None = UPDATE_WAIT
) -> CouponStatus | None:
    """Cancel a coupon not yet sent, through the update (its new status) or, with `wait`
    None, through the signal (None)."""
    client = await b.client()
    found = await find_coupon(b, ref)
    if wait is None:
        await _signal(b, client, found, StartSignal(act.CANCEL, CancelRequest(reason)))
        return None
    async with _coupon_workflow(b, client, found) as handle:
        return await handle.execute_update(
            UserCouponWorkflow.cancel_coupon, CancelRequest(reason), rpc_timeout=wait
        )


async def _signal(b: Backends, client: Client, found: Claim, signal: StartSignal) -> None:
    """Signal the coupon's workflow; one the workers have not started yet is started here
    with the signal, in one call (a report the instant after the claim's answer is
    neither lost nor refused, and costs the new workflow no second task)."""
    async with _temporal_refusals(b, found):
        if found.workflow_started:
            await client.get_workflow_handle(found.workflow_id).signal(signal.name, signal.arg)
        else:
            await ClaimService(b.pool, client, b.settings).start_workflow(found, signal)


@contextlib.asynccontextmanager
async def _coupon_workflow(
    b: Backends, client: Client, found: Claim
) -> AsyncIterator[WorkflowHandle[UserCouponWorkflow, Any]]:
    """The coupon's workflow, started here if the workers have not started it yet (an
    update the instant after the claim's answer is neither lost nor refused)."""
    async with _temporal_refusals(b, found):
        if not found.workflow_started:
            await ClaimService(b.pool, client, b.settings).start_workflow(found)
        yield client.get_workflow_handle_for(UserCouponWorkflow.run, found.workflow_id)


@contextlib.asynccontextmanager
async def _temporal_refusals(b: Backends, found: Claim) -> AsyncIterator[None]:
    """What Temporal answers about the coupon's workflow, as refusals a caller can act on;
    a workflow or worker that cannot answer is `Unavailable`."""
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
    except (RPCError, WorkflowAlreadyStartedError) as err:
        if isinstance(err, RPCError) and err.status != RPCStatusCode.NOT_FOUND:
            raise Unavailable(f"Temporal answered {err.status.name}: {err.message}") from None
        # The workflow is closed (not found open, or not started again with the signal):
        # the coupon reached a final state, which the ledger recorded before it closed.
        now = await ledger.get_claim(b.pool, found.coupon_id)
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
