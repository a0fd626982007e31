"""Coupons as apps use them (scope `app` or `admin`): claim, list, read, complete a task
(synchronously, or in bulk through the signal), cancel."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Query, Response

from app import service
from app.api.models import (
    CancelIn,
    ClaimIn,
    ClaimOut,
    CompleteTaskIn,
    CouponOut,
    CouponState,
    CouponSummary,
    State,
    TaskEventIn,
    TaskEventResult,
    TaskEventsIn,
    TaskEventsOut,
    UserCoupons,
)
from app.api.problems import REFUSALS, error_responses
from app.api.routing import CouponIdPath, IdPath, Key, Parts, scoped_router
from coupons import validation as rules
from coupons.errors import Refused
from coupons.model import CouponStatus

router = scoped_router("app", "coupons")
# Signals sent at once by one task-events request.
SIGNAL_CONCURRENCY = 20


@router.post(
    "/campaigns/{campaign_id}/claims",
    status_code=201,
    summary="Claim a coupon of the campaign for a user",
    description="201 with a new coupon; 200 with the one the user holds already (at the "
    "campaign's per-user limit a repeated claim returns it, whatever the campaign's state).",
    responses={
        200: {"model": ClaimOut, "description": "the coupon the user already holds"},
        **error_responses(404, 409, 422),
    },
)
async def claim(
    campaign_id: IdPath, body: ClaimIn, response: Response, key: Key, parts: Parts
) -> ClaimOut:
    result = await service.claim(parts, campaign_id, body.user_id, tenant_id=key.tenant_id)
    if not result.created:
        response.status_code = 200
    return ClaimOut.model_validate(result, from_attributes=True)


@router.get(
    "/users/{user_id}/coupons",
    summary="A user's coupons, newest first",
    responses=error_responses(422),
)
async def user_coupons(
    user_id: IdPath,
    key: Key,
    parts: Parts,
    campaign_id: Annotated[str | None, Query(pattern=rules.ID_PATTERN)] = None,
    state: State | None = None,
    limit: Annotated[int, Query(ge=rules.LIST_LIMIT.low, le=rules.LIST_LIMIT.high)] = 100,
) -> UserCoupons:
    where = service.ClaimFilter(
        tenant_id=key.tenant_id,
        campaign_id=campaign_id,
        user_id=user_id,
        state=state,
        newest_first=True,
        limit=limit,
    )
    found = await service.list_coupons(parts, where)
    return UserCoupons(
        user_id=user_id,
        coupons=[CouponSummary.model_validate(c, from_attributes=True) for c in found],
    )


@router.get(
    "/coupons/{coupon_id}",
    summary="One coupon: state, tasks, receipt, events and what it waits for",
    responses=error_responses(404, 422),
)
async def get_coupon(coupon_id: CouponIdPath, key: Key, parts: Parts) -> CouponOut:
    view = await service.show_coupon(parts, service.CouponRef(coupon_id, key.tenant_id))
    return CouponOut.model_validate(view.fields())


def _state(status: CouponStatus) -> CouponState:
    return CouponState.model_validate(status, from_attributes=True)


@router.post(
    "/coupons/{coupon_id}/tasks/{task}/complete",
    summary="Report a task done, synchronously: the coupon's new state, or why not",
    description="Through the coupon workflow's update: `unknown_task` or `wrong_state` "
    "when its validator refuses (nothing is recorded). The user must hold the coupon; "
    "for anyone else it is `not_found`.",
    responses=error_responses(404, 409, 422, 503),
)
async def complete_task(
    coupon_id: CouponIdPath, task: IdPath, body: CompleteTaskIn, key: Key, parts: Parts
) -> CouponState:
    ref = service.CouponRef(coupon_id, key.tenant_id, body.user_id)
    status = await service.complete_task(parts, ref, task)
    return _state(status)


@router.post(
    "/task-events",
    status_code=202,
    summary="Report task completions in bulk, fire and forget",
    description="Each event is checked against the ledger (the coupon, its holder, its "
    "tasks) and sent to the coupon's workflow as the `task_done` signal; the answer says, "
    f"per event, whether it was accepted. At most {rules.TASK_EVENTS.high} events.",
    responses=error_responses(422),
)
async def task_events(body: TaskEventsIn, key: Key, parts: Parts) -> TaskEventsOut:
    gate = asyncio.Semaphore(SIGNAL_CONCURRENCY)

    async def one(event: TaskEventIn) -> TaskEventResult:
        async with gate:
            try:
                ref = service.CouponRef(event.coupon_id, key.tenant_id, event.user_id)
                await service.report_task(parts, ref, event.task)
            except Refused as refused:
                code = REFUSALS.get(refused.code, (422, refused.code))[1]
                return _event(event, code, refused.message)
            except service.Unavailable as err:
                return _event(event, "unavailable", str(err))
        return _event(event, None, None)

    results = await asyncio.gather(*(one(e) for e in body.events))
    accepted = sum(r.accepted for r in results)
    return TaskEventsOut(accepted=accepted, refused=len(results) - accepted, results=results)


def _event(event: TaskEventIn, code: str | None, detail: str | None) -> TaskEventResult:
    return TaskEventResult(
        coupon_id=event.coupon_id,
        task=event.task,
        accepted=code is None,
        code=code,
        detail=detail,
    )


@router.post(
    "/coupons/{coupon_id}/cancel",
    summary="Cancel a coupon that is not yet sent to the platform",
    responses=error_responses(404, 409, 422, 503),
)
async def cancel(coupon_id: CouponIdPath, body: CancelIn, key: Key, parts: Parts) -> CouponState:
    ref = service.CouponRef(coupon_id, key.tenant_id, body.user_id)
    status = await service.cancel(parts, ref, body.reason)
    assert status is not None  # the update answers; only the signal would not
    return _state(status)
