"""Claiming: the atomic ledger claim, then the coupon's workflow; and the repair of the gap.

The ledger claim comes first because only PostgreSQL can hold the quota atomically.
A crash between the two steps leaves a claim row without a workflow; `repair` (run by
the worker on a timer, and by any repeated claim) starts it with the same id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from coupons import metrics
from coupons.config import Settings
from coupons.errors import Refused
from coupons.ledger import claims as ledger
from coupons.ledger.claims import Claim, ClaimRefused
from coupons.model import CAMPAIGN_ID, COUPON_STATE, USER_ID, CouponInput
from coupons.validation import validate_id
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger(__name__)

__all__ = ["ClaimRefused", "ClaimResult", "ClaimService"]


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


class ClaimService:
    def __init__(self, pool: AsyncConnectionPool, client: Client, settings: Settings) -> None:
        self._pool = pool
        self._client = client
        self._settings = settings

    async def claim(self, campaign_id: str, user_id: str) -> ClaimResult:
        """Claim a coupon; a repeated claim at the user's limit returns the existing one."""
        try:
            validate_id("campaign", campaign_id)
            validate_id("user", user_id)
            claim, created = await ledger.claim(self._pool, campaign_id, user_id)
            if not claim.workflow_started:
                await self.start_workflow(claim)
        except Refused as refused:
            metrics.CLAIMS.labels(outcome=refused.code).inc()
            raise
        except Exception:
            metrics.CLAIMS.labels(outcome="error").inc()
            raise
        metrics.CLAIMS.labels(outcome="created" if created else "existing").inc()
        return ClaimResult(
            coupon_id=claim.coupon_id,
            workflow_id=claim.workflow_id,
            campaign_id=claim.campaign_id,
            user_id=claim.user_id,
            state=claim.state,
            created=created,
            claimed_at=claim.claimed_at,
            task_deadline=claim.task_deadline,
        )

    async def start_workflow(self, claim: Claim) -> None:
        try:
            await self._client.start_workflow(
                UserCouponWorkflow.run,
                CouponInput(
                    coupon_id=claim.coupon_id,
                    campaign_id=claim.campaign_id,
                    user_id=claim.user_id,
                    batch_id=claim.batch_id,
                    required_tasks=list(claim.required_tasks),
                    claimed_at=claim.claimed_at,
                    task_deadline=claim.task_deadline,
                ),
                id=claim.workflow_id,
                task_queue=self._settings.task_queue,
                # One workflow per coupon, ever: a running one is reused, a closed one
                # is never started again.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(COUPON_STATE, claim.state),
                        SearchAttributePair(CAMPAIGN_ID, claim.campaign_id),
                        SearchAttributePair(USER_ID, claim.user_id),
                    ]
                ),
                static_summary=f"coupon {claim.coupon_id}: campaign {claim.campaign_id}, "
                f"user {claim.user_id}",
            )
        except WorkflowAlreadyStartedError:
            log.info("workflow %s already exists (closed)", claim.workflow_id)
        await ledger.mark_started(self._pool, claim.coupon_id)

    async def repair(self) -> int:
        """Start the workflows of claims whose start was never confirmed; returns how many."""
        stale = await ledger.unstarted(
            self._pool, timedelta(seconds=self._settings.claim_repair_after_s)
        )
        repaired = 0
        for claim in stale:
            log.warning("repairing claim %s: starting its missing workflow", claim.coupon_id)
            try:
                await self.start_workflow(claim)
            except RPCError:
                # One claim Temporal will not start must not hold up the others.
                log.exception("could not start the workflow of claim %s", claim.coupon_id)
                continue
            repaired += 1
        return repaired
