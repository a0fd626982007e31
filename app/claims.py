"""Claiming: answered by the ledger alone; the coupon's workflow started after the answer.

Only PostgreSQL can hold the quota atomically, and it answers in milliseconds where a
workflow start waits for the Temporal server's pace: so a claim is answered as soon as the
ledger has committed it, and the claims not yet `workflow_started` are an outbox the
workers drain (`start_pending`, `app.workers.start_claims_forever`). A task report or a
cancel arriving before the worker got to the claim starts the workflow itself
(`start_workflow`, the same id: one workflow, whoever starts it first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from coupons import metrics
from coupons.config import Settings
from coupons.errors import Refused
from coupons.ledger import claims as ledger
from coupons.ledger.claims import Claim, ClaimRefused
from coupons.model import (
    CAMPAIGN_ID,
    COUPON_STATE,
    PLATFORM_COUPON_ID,
    USER_ID,
    CouponInput,
    CouponStatus,
    Receipt,
)
from coupons.validation import validate_id
from workflows.user_coupon import UserCouponWorkflow

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

# Workflow starts in flight at once from one starter: the Temporal server's pace, not the
# ledger's, bounds them.
STARTS_AT_ONCE = 50

__all__ = ["ClaimRefused", "ClaimResult", "ClaimService", "StartSignal", "claim", "from_claim"]

D = TypeVar("D", bound="DataclassInstance")


def from_claim(cls: type[D], claim: Claim, **given: Any) -> D:
    """A `cls` holding `given` and, in each of its other fields that `Claim` has too, the
    claim's value: what is told of a claim (the answer to a claim, its workflow's input, a
    wedged coupon) names the claim's fields as the ledger does."""
    shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(Claim)}
    return cls(**{name: getattr(claim, name) for name in shared - given.keys()}, **given)


@dataclass
class ClaimResult:
    coupon_id: str
    workflow_id: str
    campaign_id: str
    user_id: str
    state: str
    created: bool
    claimed_at: datetime
    task_deadline: datetime | None


@dataclass(frozen=True)
class StartSignal:
    """A signal sent with a workflow's start (signal-with-start): its name and argument."""

    name: str
    arg: Any


class ClaimService:
    def __init__(self, pool: AsyncConnectionPool, client: Client, settings: Settings) -> None:
        self._pool = pool
        self._client = client
        self._settings = settings

    async def claim(self, campaign_id: str, user_id: str) -> ClaimResult:
        return await claim(self._pool, campaign_id, user_id)

    async def claim_started(self, campaign_id: str, user_id: str) -> ClaimResult:
        """Claim a coupon and start its workflow before answering, through this service's
        own client: for a caller that wants the workflow at once (the command line's
        `claim`). The new claim is born leased to this caller, so no starter races it."""
        claimed, created = await _claim(self._pool, campaign_id, user_id, None, self._start_lease())
        if not claimed.workflow_started:
            # A new claim is born held; a repeated claim's is held here.
            await (self._start_held(claimed) if created else self.start_workflow(claimed))
        return from_claim(ClaimResult, claimed, created=created)

    async def start_workflow(self, claim: Claim, signal: StartSignal | None = None) -> None:
        """Start the claim's workflow unless it exists, and record it started. With
        `signal`, the workflow gets it either way, in the same call: a new one finds it in
        its first task (one workflow task, not two). A closed one neither starts again nor
        gets the signal: WorkflowAlreadyStartedError, then.

        The claim is held from the outbox's starters while this start is under way: a
        second start of the same workflow would be answered with the first, but costs the
        Temporal server nearly a start of its own. Should this start fail, the claim goes
        back to the starters at once; should this process die first, when the hold ends."""
        await ledger.hold_start(self._pool, claim.coupon_id, self._start_lease())
        await self._start_held(claim, signal)

    async def _start_held(self, claim: Claim, signal: StartSignal | None = None) -> None:
        """Start the workflow of a claim this caller holds, and record it started; a failed
        start hands the claim back."""
        try:
            await self._start_new(claim, signal)
        except BaseException:
            await self._hand_back(claim)
            raise
        await ledger.mark_started(self._pool, [claim.coupon_id])

    async def _hand_back(self, claim: Claim) -> None:
        # Best effort, so the start's own error is the one raised: the hold ends anyway.
        try:
            await ledger.release_start(self._pool, claim.coupon_id)
        except Exception as err:
            log.warning("could not hand claim %s back to the starters: %s", claim.coupon_id, err)

    async def start_pending(self, limit: int = STARTS_AT_ONCE) -> int:
        """Start the workflows of up to `limit` claims not started yet (oldest first, none
        another starter holds); how many were started."""
        taken = await ledger.take_unstarted(self._pool, limit, self._start_lease())
        started = await asyncio.gather(*(self._start_new(c) for c in taken), return_exceptions=True)
        done = [c.coupon_id for c, outcome in zip(taken, started, strict=True) if outcome is None]
        for c, outcome in zip(taken, started, strict=True):
            if isinstance(outcome, BaseException):
                # One claim Temporal will not start must not hold up the others; its lease
                # ends and it is taken again.
                log.warning("could not start the workflow of claim %s: %s", c.coupon_id, outcome)
        if done:
            await ledger.mark_started(self._pool, done)
        return len(done)

    def _start_lease(self) -> timedelta:
        """How long a claim taken to be started is its taker's alone."""
        return timedelta(seconds=self._settings.claim_repair_after_s)

    async def _start_new(self, claim: Claim, signal: StartSignal | None = None) -> None:
        try:
            await self._start(
                claim,
                coupon_input(claim),
                # One workflow per coupon, ever: a running one is reused, a closed one
                # is never started again.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                signal=signal,
            )
        except WorkflowAlreadyStartedError:
            log.info("workflow %s already exists (closed)", claim.workflow_id)
            if signal is not None:
                raise

    async def restart_workflow(
        self, claim: Claim, tasks_done: list[str], receipt: Receipt | None
    ) -> str:
        """A fresh run of the coupon's workflow resuming the ledger's state (`claim.state`,
        with `receipt` when issued); returns its run id.

        Only a recovery (app/wedged.py) calls this, after the stuck run was terminated
        or found gone: the reuse policy lets a new run follow one that ended without
        completing (terminated, failed, timed out), never a completed one, and never runs
        beside a running one (WorkflowAlreadyStartedError: someone else recovered it).
        """
        handle = await self._start(
            claim,
            coupon_input(claim, tasks_done=tasks_done, receipt=receipt, resume=True),
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            summary=f" (recovered from the ledger: {claim.state})",
        )
        await ledger.mark_started(self._pool, [claim.coupon_id])
        assert handle.result_run_id is not None  # a start always names its run
        return handle.result_run_id

    async def _start(
        self,
        claim: Claim,
        input: CouponInput,
        *,
        id_conflict_policy: WorkflowIDConflictPolicy,
        id_reuse_policy: WorkflowIDReusePolicy,
        summary: str = "",
        signal: StartSignal | None = None,
    ) -> WorkflowHandle[UserCouponWorkflow, CouponStatus]:
        attributes = [
            SearchAttributePair(COUPON_STATE, claim.state),
            SearchAttributePair(CAMPAIGN_ID, claim.campaign_id),
            SearchAttributePair(USER_ID, claim.user_id),
        ]
        if input.receipt is not None:
            attributes.append(
                SearchAttributePair(PLATFORM_COUPON_ID, input.receipt.platform_coupon_id)
            )
        return await self._client.start_workflow(
            UserCouponWorkflow.run,
            input,
            id=claim.workflow_id,
            task_queue=self._settings.task_queue,
            id_conflict_policy=id_conflict_policy,
            id_reuse_policy=id_reuse_policy,
            search_attributes=TypedSearchAttributes(attributes),
            static_summary=f"coupon {claim.coupon_id}: campaign {claim.campaign_id}, "
            f"user {claim.user_id}{summary}",
            start_signal=signal.name if signal else None,
            start_signal_args=[signal.arg] if signal else [],
        )

    async def repair(self) -> int:
        """Start every claim's workflow not started yet; how many were started."""
        started = total = await self.start_pending()
        while started == STARTS_AT_ONCE:
            started = await self.start_pending()
            total += started
        return total


async def claim(
    pool: AsyncConnectionPool, campaign_id: str, user_id: str, tenant_id: str | None = None
) -> ClaimResult:
    """Claim a coupon, answered once the ledger has it; a repeated claim at the user's limit
    returns the existing one. With `tenant_id`, only of that tenant's campaigns."""
    claimed, created = await _claim(pool, campaign_id, user_id, tenant_id, None)
    return from_claim(ClaimResult, claimed, created=created)


async def _claim(
    pool: AsyncConnectionPool,
    campaign_id: str,
    user_id: str,
    tenant_id: str | None,
    lease: timedelta | None,
) -> tuple[Claim, bool]:
    try:
        validate_id("campaign", campaign_id)
        validate_id("user", user_id)
        claimed, created = await ledger.claim(pool, campaign_id, user_id, tenant_id, lease)
    except Refused as refused:
        metrics.CLAIMS.labels(outcome=refused.code).inc()
        raise
    except Exception:
        metrics.CLAIMS.labels(outcome="error").inc()
        raise
    metrics.CLAIMS.labels(outcome="created" if created else "existing").inc()
    return claimed, created


def coupon_input(
    claim: Claim,
    *,
    tasks_done: list[str] | None = None,
    receipt: Receipt | None = None,
    resume: bool = False,
) -> CouponInput:
    """The workflow's input for `claim`: as claimed, or (`resume`) from the ledger's state."""
    return from_claim(
        CouponInput,
        claim,
        required_tasks=list(claim.required_tasks),
        resume_state=claim.state if resume else None,
        tasks_done=list(tasks_done or []),
        receipt=receipt,
    )
