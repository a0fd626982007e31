"""Request and response bodies. Requests refuse unknown fields and wrong types (422)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from annotated_types import GroupedMetadata
from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass

from app.service import Batch
from coupons import validation as rules


def _whole(value: Any) -> Any:
    """A number with no fraction, such as 5.0, is the integer JSON Schema takes it for; a
    string stays a string (refused, strict), and so does a boolean."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _plausible(moment: datetime) -> datetime:
    if not rules.EARLIEST <= moment < rules.LATEST:
        raise ValueError("must be between the years 2000 and 2099")
    return moment


@dataclasses.dataclass(frozen=True)
class Rule(GroupedMetadata):
    """A rule of coupons.validation, which the command line and the catalog check too (one
    table of what the service takes), as the constraints of a field of its type."""

    rule: rules.Whole | rules.Text

    def __iter__(self) -> Iterator[object]:
        low, high = self.rule.low, self.rule.high
        if isinstance(self.rule, rules.Text):
            yield Field(min_length=low, max_length=high, pattern=rules.PRINTABLE_PATTERN)
            return
        # Integers as JSON Schema has them: 5 and 5.0, never "5" or true. (The bounds sit
        # with the integer, inside the validator, so the OpenAPI shows them as minimum and
        # maximum.)
        yield Field(strict=True, ge=low, le=high)
        yield BeforeValidator(_whole)


Id = Annotated[str, Field(pattern=rules.ID_PATTERN, examples=["alice"])]
CouponId = Annotated[str, Field(pattern=rules.COUPON_ID_PATTERN, examples=["spring:alice:1"])]
Moment = Annotated[AwareDatetime, AfterValidator(_plausible)]
Name = Annotated[str, Rule(rules.NAME)]
Reason = Annotated[str, Rule(rules.REASON)]
Quantity = Annotated[int, Rule(rules.QUANTITY)]
Quota = Annotated[int, Rule(rules.QUOTA)]
PerUser = Annotated[int, Rule(rules.PER_USER_LIMIT)]
MinSpend = Annotated[int, Rule(rules.MIN_SPEND_CENTS)]
FaceValue = Annotated[int, Rule(rules.FACE_VALUE_CENTS)]
Days = Annotated[int, Rule(rules.VALID_DAYS)]
DeadlineSeconds = Annotated[int, Rule(rules.TASK_DEADLINE_S)]
State = Literal[
    "received", "usable", "issued", "redeemed", "expired", "cancelled", "failed", "lapsed"
]
CampaignStatus = Literal["active", "paused", "ended"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ requests


class ClaimIn(Strict):
    user_id: Id


class CompleteTaskIn(Strict):
    user_id: Id = Field(description="the user who holds the coupon")


class TaskEventIn(Strict):
    coupon_id: CouponId
    user_id: Id
    task: Id


class TaskEventsIn(Strict):
    events: list[TaskEventIn] = Field(min_length=1, max_length=rules.TASK_EVENTS.high)


class CancelIn(Strict):
    user_id: Id | None = Field(default=None, description="when given, must hold the coupon")
    reason: Reason


class BatchIn(Strict):
    quantity: Quantity
    face_value_cents: FaceValue = 500
    min_spend_cents: MinSpend = 0
    valid_days: Days = 30
    per_user_limit: PerUser = 1
    name: Name | None = None
    starts_at: Moment | None = None
    ends_at: Moment | None = None
    start: Annotated[bool, Field(strict=True)] = True


class TaskIn(Strict):
    key: Id
    name: Name | None = Field(default=None, description="display name; the key when absent")


class CampaignIn(Strict):
    batch_id: Id
    quota: Quota
    per_user_limit: PerUser = 1
    tasks: list[TaskIn] = Field(default_factory=list, max_length=rules.TASKS.high)
    name: Name | None = None
    starts_at: Moment | None = None
    ends_at: Moment | None = None
    task_deadline_s: DeadlineSeconds | None = Field(
        default=None, description="the task deadline, in seconds after the claim"
    )
    deadline_at: Moment | None = Field(default=None, description="a fixed task deadline")


class CampaignPatch(Strict):
    """Only the fields given change (at least one); null clears the optional ones."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    batch_id: Id = None  # type: ignore[assignment]  # absent: unchanged; null is refused
    quota: Quota = None  # type: ignore[assignment]
    per_user_limit: PerUser = None  # type: ignore[assignment]
    tasks: Annotated[list[TaskIn], Field(max_length=rules.TASKS.high)] = None  # type: ignore[assignment]
    name: Name | None = None
    starts_at: Moment | None = None
    ends_at: Moment | None = None
    task_deadline_s: DeadlineSeconds | None = None
    deadline_at: Moment | None = None


class CampaignEndIn(Strict):
    # A reason names the cause of the expiry: it comes only with expire_pending true.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "dependentSchemas": {
                "reason": {
                    "properties": {"expire_pending": {"const": True}},
                    "required": ["expire_pending"],
                }
            }
        },
    )

    expire_pending: Annotated[bool, Field(strict=True)] = Field(
        default=False, description="also expire the campaign's received coupons"
    )
    reason: Reason | None = Field(default=None, description="the expired coupons' cause")


# ------------------------------------------------------------------ responses


class Health(BaseModel):
    status: Literal["ok"]


class ClaimOut(BaseModel):
    coupon_id: str
    workflow_id: str
    campaign_id: str
    user_id: str
    state: State
    created: bool = Field(description="false: the coupon the user already held")
    claimed_at: datetime
    task_deadline: datetime | None


class CouponSummary(BaseModel):
    coupon_id: str
    campaign_id: str
    state: State
    claimed_at: datetime
    task_deadline: datetime | None


class UserCoupons(BaseModel):
    user_id: str
    coupons: list[CouponSummary]


class Tasks(BaseModel):
    required: list[str]
    done: list[str] | None = Field(description="null when the workflow could not answer")
    deadline: datetime | None


class ReceiptOut(BaseModel):
    platform_coupon_id: str
    sent_at: datetime
    valid_until: datetime
    confirmed_at: datetime


class EventOut(BaseModel):
    from_state: State | None
    to_state: State
    cause: str
    at: datetime


class CouponOut(BaseModel):
    coupon_id: str
    campaign_id: str
    user_id: str
    state: State = Field(description="as the ledger records it")
    workflow_state: State | None = Field(description="as the workflow holds it; null: no answer")
    waiting_for: str | None
    tasks: Tasks
    claimed_at: datetime
    receipt: ReceiptOut | None
    events: list[EventOut]


class CouponState(BaseModel):
    """The coupon as its workflow answered the request (GET the coupon for the rest)."""

    coupon_id: str
    state: State
    tasks_required: list[str]
    tasks_done: list[str]


class TaskEventResult(BaseModel):
    coupon_id: str
    task: str
    accepted: bool
    code: str | None = Field(description="why it was refused (not_found, unknown_task, ...)")
    detail: str | None


class TaskEventsOut(BaseModel):
    accepted: int
    refused: int
    results: list[TaskEventResult]


# The ledger's batch as its tenant reads it: the tenant is the key's, so not shown. (No
# docstring: it would be the schema's description.)
@dataclass
class BatchOut(Batch):
    tenant_id: Annotated[str, Field(exclude=True)]


class BatchCampaign(BaseModel):
    id: str
    status: CampaignStatus
    quota: int
    claimed: int


@dataclass
class BatchDetail(BatchOut):
    campaigns: list[BatchCampaign]


class Batches(BaseModel):
    batches: list[BatchOut]


class TaskOut(BaseModel):
    key: str
    name: str


class CampaignOut(BaseModel):
    id: str
    name: str | None
    batch_id: str
    status: CampaignStatus
    quota: int
    claimed: int
    remaining: int
    per_user_limit: int
    tasks: list[TaskOut]
    task_deadline_s: int | None
    deadline_at: datetime | None
    starts_at: datetime | None
    ends_at: datetime | None
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None


class CampaignCreated(CampaignOut):
    created: bool = Field(description="false: the same definition existed already")


class CampaignDetail(CampaignOut):
    states: dict[str, int] = Field(description="its coupons, counted by state")


class Expiry(BaseModel):
    workflow_id: str = Field(description="the workflow expiring the received coupons")


class CampaignEnded(CampaignOut):
    expiry: Expiry | None


class Campaigns(BaseModel):
    campaigns: list[CampaignOut]


class CallbackAnswer(BaseModel):
    status: Literal["applied", "duplicate", "finished", "ignored"]
