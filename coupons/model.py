"""Dataclasses shared by the workflow, the activities and the command line.

One argument per workflow, signal, update and activity, so fields can be added later
without breaking stored histories. Only stdlib and temporalio's pure `common` module
here: the workflow sandbox imports this file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from temporalio.common import SearchAttributeKey

COUPON_STATE = SearchAttributeKey.for_keyword("CouponState")
CAMPAIGN_ID = SearchAttributeKey.for_keyword("CampaignId")
USER_ID = SearchAttributeKey.for_keyword("UserId")
# Set once the platform confirmed the send: find a coupon by what a shop or support sees.
PLATFORM_COUPON_ID = SearchAttributeKey.for_keyword("PlatformCouponId")
SEARCH_ATTRIBUTES = (COUPON_STATE, CAMPAIGN_ID, USER_ID, PLATFORM_COUPON_ID)


def coupon_workflow_id(coupon_id: str) -> str:
    """Stable, so a repeated claim or a repair finds the same workflow."""
    return f"coupon:{coupon_id}"


@dataclass
class Transition:
    from_state: str | None
    to_state: str
    cause: str
    at: datetime


@dataclass
class CouponInput:
    coupon_id: str
    campaign_id: str
    user_id: str
    batch_id: str
    required_tasks: list[str]
    claimed_at: datetime
    task_deadline: datetime | None
    # Set only when a recovery (app/wedged.py) starts a fresh run from the ledger, whose
    # state it resumes: `received` (with the task reports the stuck run had been given),
    # `usable` (its tasks done: the send is next, with the coupon's one idempotency key) or
    # `issued` (with the ledger's receipt: waiting for redemption or lapse). The defaults
    # are how every other run starts, so stored histories replay unchanged.
    resume_state: str | None = None
    tasks_done: list[str] = field(default_factory=list)
    receipt: Receipt | None = None
    # Set only on a run that an earlier run of the same coupon continued as new into (its
    # history had grown long while it waited for budget): what that run knew beyond the
    # ledger's state, which `resume_state` and `tasks_done` carry.
    carried: CarriedRun | None = None


@dataclass
class CarriedRun:
    """What one run of a coupon's workflow hands the next when it continues as new."""

    transitions: list[Transition]
    ignored_signals: list[str]
    # A report of the coupon's use that overtook its send, to be taken once it is issued.
    redemption: RedemptionReport | None
    # Where the budget recheck's backoff stood: the next run goes on from there.
    budget_recheck_s: float
    # How many runs came before this one (1 for the first continued run).
    runs_before: int = 1


@dataclass
class TaskCompletion:
    task: str


@dataclass
class CancelRequest:
    reason: str = "cancelled"


@dataclass
class ExpireRequest:
    reason: str = "expired by operator"


@dataclass
class BudgetNotice:
    """The catalog sync saw budget at the platform again for this (platform) batch."""

    batch_id: str


@dataclass
class RedemptionReport:
    used_at: datetime
    source: str = "callback"


@dataclass
class Receipt:
    platform_coupon_id: str
    idempotency_key: str
    sent_at: datetime
    valid_until: datetime
    confirmed_at: datetime
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class IssueInput:
    coupon_id: str
    batch_id: str
    user_id: str
    # The transition into `usable` still to be written to the ledger (None when the
    # claim already recorded it), written by the issue activity to save a round trip.
    became_usable: Transition | None
    # Answer "the batch cannot send now" (budget, paused) at once instead of retrying, so
    # the workflow can wait for budget. False for workflows started before that existed.
    wait_for_budget: bool = False


@dataclass
class RecordTransitionInput:
    coupon_id: str
    transition: Transition


@dataclass
class LookupInput:
    user_id: str
    platform_coupon_id: str


@dataclass
class PlatformView:
    """What the platform's lookup says of an issued coupon."""

    status: str  # "sent", "used", "expired" or "missing"
    used_at: datetime | None = None


@dataclass
class CouponStatus:
    """The full state of one coupon as the workflow holds it (the `status` query)."""

    coupon_id: str
    campaign_id: str
    user_id: str
    state: str
    tasks_required: list[str]
    tasks_done: list[str]
    task_deadline: datetime | None
    claimed_at: datetime
    waiting_for: str
    receipt: Receipt | None = None
    transitions: list[Transition] = field(default_factory=list)
    ignored_signals: list[str] = field(default_factory=list)


# ----- the catalog: sync, reconciliation, ending a campaign ---------------------------


@dataclass
class SyncInput:
    batch_ids: list[str] | None = None  # None: every batch still in use


@dataclass
class BatchSync:
    """One batch after a sync: the platform's figures beside what we owe from it."""

    batch_id: str
    platform_batch_id: str
    status: str
    quantity: int
    remaining: int
    owed: int
    backlog: int
    drift: list[str]
    synced_at: datetime
    woken: int = 0  # coupons waiting for budget that this sync told to try again


@dataclass
class SyncReport:
    batches: list[BatchSync]
    failed: list[str] = field(default_factory=list)  # "batch: why"

    @property
    def drifted(self) -> list[BatchSync]:
        return [b for b in self.batches if b.drift]


@dataclass
class ReconcileInput:
    batch_id: str | None = None  # None: every batch
    repair: bool = True


@dataclass
class Mismatch:
    kind: str  # platform_only, ledger_only, state
    detail: str
    coupon_id: str | None = None
    platform_coupon_id: str | None = None
    repair: str | None = None  # what reconciliation did about it, None: left for an operator


@dataclass
class BatchReconciliation:
    batch_id: str
    platform_sent: int | None  # None: the platform publishes no sent flow (WeChat Pay, Alipay)
    platform_used: int
    ledger_coupons: int
    mismatches: list[Mismatch]
    repairs_requested: list[str]  # coupon ids told to become `redeemed`
    repaired: int = 0  # of those, the ones the ledger shows repaired
    # Where the uses came from: the platform's used "flow" file, or "lookups" of each coupon
    # we hold a receipt of, for a platform with no used flow (Alipay).
    used_from: str = "flow"


@dataclass
class RepairCheck:
    coupon_ids: list[str]
    state: str
    timeout_s: float = 60.0


@dataclass
class ReconcileReport:
    batches: list[BatchReconciliation]
    # Batches that could not be reconciled ("batch: why"), the others reconciled all the same.
    failed: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return sum(len(b.mismatches) for b in self.batches)

    @property
    def repaired(self) -> int:
        return sum(b.repaired for b in self.batches)


@dataclass
class EndCampaignInput:
    campaign_id: str
    reason: str = "campaign ended"


@dataclass
class ExpirePage:
    campaign_id: str
    after: str
    reason: str
    limit: int = 200


@dataclass
class ExpirePageResult:
    expired: list[str]  # coupon ids whose workflow accepted the expiry
    skipped: int  # no longer received when asked (task done, cancelled, finished)
    last: str  # the last coupon id looked at: the next page starts after it
    done: bool


@dataclass
class EndProgress:
    campaign_id: str
    total: int  # received when the expiry began
    expired: int = 0
    skipped: int = 0
    done: bool = False


# Ending a campaign, a page at a time: what a page takes, gives back and heartbeats.

# How long a coupon's workflow has to take an expiry before the page reports it stuck: a
# workflow with a worker takes it in milliseconds.
UPDATE_TIMEOUT_S = 10.0


@dataclass
class StuckCoupon:
    """A coupon a campaign end left `received`, and why (`contract.STUCK_*`)."""

    coupon_id: str
    reason: str
    detail: str = ""


@dataclass
class ExpireCoupons:
    """One page of a campaign end: its received coupons after `after`, at most `limit`."""

    campaign_id: str
    after: str
    reason: str
    # Each coupon's update id is `<update_key>:<coupon id>`: the same on every retry and
    # every pass, so a retry joins an update still in flight or reads its outcome (which
    # Temporal keeps, even once the coupon's workflow has closed) and never counts twice.
    update_key: str
    limit: int = 200
    update_timeout_s: float = UPDATE_TIMEOUT_S
    ledger_wait_s: float = 60.0


@dataclass
class ExpiredCoupons:
    """What one page did: counts, and the coupons it left with their reason (at most a page)."""

    expired: int  # taken by the workflow and `expired` in the ledger
    skipped: int  # no longer received when asked (task done, cancelled, finished)
    stuck: list[StuckCoupon]
    last: str  # the last coupon id read: the next page starts after it
    done: bool  # the page was the pass's last


@dataclass
class PageCoupon:
    coupon_id: str
    workflow_id: str
    workflow_started: bool


@dataclass
class PageTally:
    """The page as its activity heartbeats it: the coupons as first read (a retry works on
    these, not on a new read that no longer shows those already expired) and what became of
    each one done so far."""

    coupons: list[PageCoupon]
    last: str
    done: bool
    accepted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stuck: list[StuckCoupon] = field(default_factory=list)

    def untouched(self) -> list[PageCoupon]:
        handled = {*self.accepted, *self.skipped, *(s.coupon_id for s in self.stuck)}
        return [c for c in self.coupons if c.coupon_id not in handled]

    def note(self, coupon: PageCoupon, outcome: bool | StuckCoupon) -> None:
        if isinstance(outcome, StuckCoupon):
            self.stuck.append(outcome)
        else:
            (self.accepted if outcome else self.skipped).append(coupon.coupon_id)


def idempotency_key(coupon_id: str) -> str:
    """The platform-side request key of a coupon's send: 32 hex chars, as WeChat allows.

    Derived, never random, so every retry and every resend after an ambiguous answer
    carries the same key.
    """
    return hashlib.sha256(coupon_id.encode()).hexdigest()[:32]
