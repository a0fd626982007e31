"""Batches and campaigns, for operators (scope `admin`). Ids are made by the server
(`bat_<hex>`, `cmp_<hex>`): they are global, so a client never picks one and cannot probe
for another tenant's."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response, Security

from app import service
from app.api.models import (
    BatchCampaign,
    BatchDetail,
    Batches,
    BatchIn,
    BatchOut,
    CampaignCreated,
    CampaignDetail,
    CampaignEnded,
    CampaignEndIn,
    CampaignIn,
    CampaignOut,
    CampaignPatch,
    Campaigns,
    CampaignStatus,
    Expiry,
    TaskIn,
)
from app.api.problems import error_responses
from app.api.routing import ApiRoute, backends, bearer, derived_id, principal, requires
from app.service import ApiKey, Backends, Batch, Campaign, CampaignSpec, Task
from coupons import validation as rules
from coupons.errors import Refused
from coupons.platforms.base import BatchAction

router = APIRouter(
    prefix="/v1", tags=["operators"], route_class=ApiRoute, dependencies=[Security(bearer)]
)

BatchIdPath = Annotated[str, Path(pattern=rules.ID_PATTERN)]
CampaignIdPath = Annotated[str, Path(pattern=rules.ID_PATTERN)]
Admin = Annotated[ApiKey, Depends(principal)]
Parts = Annotated[Backends, Depends(backends)]
ADMIN = requires("admin")
Out = TypeVar("Out", bound=CampaignOut)


def _batch(batch: Batch) -> BatchOut:
    return BatchOut.model_validate(batch, from_attributes=True)


def _campaign(campaign: Campaign, model: type[Out] = CampaignOut, **more: Any) -> Out:  # type: ignore[assignment]
    """The campaign as `model` (CampaignOut, or one with `more` fields), from the fields
    the command line shows too."""
    return model.model_validate({**service.campaign_fields(campaign), **more})


# ------------------------------------------------------------------ batches


@router.post(
    "/batches",
    status_code=201,
    summary="Create a batch at the platform (and start it, unless start is false)",
    responses=error_responses(409),
    openapi_extra=ADMIN,
)
async def create_batch(body: BatchIn, request: Request, key: Admin, parts: Parts) -> BatchOut:
    batch = await service.create_batch(
        parts,
        derived_id("bat", request, key),
        quantity=body.quantity,
        face_value_cents=body.face_value_cents,
        min_spend_cents=body.min_spend_cents,
        # Not given: as long as the window given (what WeChat Pay can keep), else 30.
        valid_days=body.valid_days if "valid_days" in body.model_fields_set else None,
        per_user_limit=body.per_user_limit,
        name=body.name,
        starts_at=body.starts_at,
        ends_at=body.ends_at,
        start=body.start,
        tenant_id=key.tenant_id,
    )
    return _batch(batch)


@router.get(
    "/batches",
    summary="The tenant's batches, as last synced",
    openapi_extra=ADMIN,
    responses=error_responses(),
)
async def list_batches(key: Admin, parts: Parts) -> Batches:
    found = await service.list_batches(parts, tenant_id=key.tenant_id)
    return Batches(batches=[_batch(b) for b in found])


@router.get(
    "/batches/{batch_id}",
    summary="One batch as last synced, with the campaigns that hand it out",
    responses=error_responses(404),
    openapi_extra=ADMIN,
)
async def get_batch(batch_id: BatchIdPath, key: Admin, parts: Parts) -> BatchDetail:
    batch = await service.get_batch(parts, batch_id, key.tenant_id)
    campaigns = await service.list_campaigns(parts, batch_id=batch.id, tenant_id=key.tenant_id)
    return BatchDetail(
        **dataclasses.asdict(batch),
        campaigns=[BatchCampaign.model_validate(c, from_attributes=True) for c in campaigns],
    )


def _batch_action(action: BatchAction) -> None:
    async def change(batch_id: BatchIdPath, key: Admin, parts: Parts) -> BatchOut:
        return _batch(await service.change_batch(parts, batch_id, action, key.tenant_id))

    change.__name__ = f"{action.value}_batch"
    router.add_api_route(
        f"/batches/{{batch_id}}/{action.value}",
        change,
        methods=["POST"],
        summary=f"{action.value.capitalize()} the batch at the platform",
        description="Repeating an action already done is a no-op; one the batch's status "
        "does not allow is `wrong_state`.",
        responses=error_responses(404, 409),
        openapi_extra=ADMIN,
    )


for _action in BatchAction:
    _batch_action(_action)


# ------------------------------------------------------------------ campaigns


def _tasks(tasks: list[TaskIn]) -> list[Task]:
    return [Task(t.key, t.name or t.key) for t in tasks]


def _deadline(seconds: int | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)


@router.post(
    "/campaigns",
    status_code=201,
    summary="Define a campaign that hands out one of the tenant's batches",
    description="Checked against its batch before anything is written; the error names "
    "the field. With an Idempotency-Key, a repeat returns the first answer.",
    responses={
        200: {"model": CampaignCreated, "description": "the same definition existed"},
        **error_responses(409),
    },
    openapi_extra=ADMIN,
)
async def create_campaign(
    body: CampaignIn, request: Request, response: Response, key: Admin, parts: Parts
) -> CampaignCreated:
    spec = CampaignSpec(
        id=derived_id("cmp", request, key),
        batch_id=body.batch_id,
        quota=body.quota,
        per_user_limit=body.per_user_limit,
        tasks=_tasks(body.tasks),
        name=body.name,
        starts_at=body.starts_at,
        ends_at=body.ends_at,
        task_deadline=_deadline(body.task_deadline_s),
        deadline_at=body.deadline_at,
        tenant_id=key.tenant_id,
    )
    campaign, created = await service.create_campaign(parts, spec)
    if not created:
        response.status_code = 200
    return _campaign(campaign, CampaignCreated, created=created)


@router.get(
    "/campaigns",
    summary="The tenant's campaigns",
    responses=error_responses(422),
    openapi_extra=ADMIN,
)
async def list_campaigns(
    key: Admin,
    parts: Parts,
    batch_id: Annotated[str | None, Query(pattern=rules.ID_PATTERN)] = None,
    status: CampaignStatus | None = None,
) -> Campaigns:
    found = await service.list_campaigns(
        parts, batch_id=batch_id, status=status, tenant_id=key.tenant_id
    )
    return Campaigns(campaigns=[_campaign(c) for c in found])


@router.get(
    "/campaigns/{campaign_id}",
    summary="One campaign, with its coupons counted by state",
    responses=error_responses(404),
    openapi_extra=ADMIN,
)
async def get_campaign(campaign_id: CampaignIdPath, key: Admin, parts: Parts) -> CampaignDetail:
    campaign = await service.get_campaign(parts, campaign_id, key.tenant_id)
    states = await service.count_by_state(parts, campaign.id)
    return _campaign(campaign, CampaignDetail, states=states)


@router.patch(
    "/campaigns/{campaign_id}",
    summary="Change some fields of a campaign; claims already made keep theirs",
    responses=error_responses(404, 409),
    openapi_extra=ADMIN,
)
async def update_campaign(
    campaign_id: CampaignIdPath, body: CampaignPatch, key: Admin, parts: Parts
) -> CampaignOut:
    given = body.model_dump(exclude_unset=True)
    if not given:
        raise Refused("invalid_request", "nothing to change: give at least one field")
    for field in ("batch_id", "quota", "per_user_limit", "tasks"):
        if field in given and given[field] is None:
            raise Refused("invalid_request", f"{field}: cannot be null")
    changes: dict[str, Any] = {k: v for k, v in given.items() if k != "task_deadline_s"}
    if "tasks" in given:
        changes["tasks"] = _tasks(body.tasks)
    if "task_deadline_s" in given:
        changes["task_deadline"] = _deadline(body.task_deadline_s)
    # Another tenant's campaign is as unknown as none.
    campaign = await service.update_campaign(parts, campaign_id, tenant_id=key.tenant_id, **changes)
    return _campaign(campaign)


def _campaign_action(action: str) -> None:
    async def change(campaign_id: CampaignIdPath, key: Admin, parts: Parts) -> CampaignOut:
        campaign = await service.change_campaign_status(parts, campaign_id, action, key.tenant_id)
        return _campaign(campaign)

    change.__name__ = f"{action}_campaign"
    router.add_api_route(
        f"/campaigns/{{campaign_id}}/{action}",
        change,
        methods=["POST"],
        summary=f"{action.capitalize()} claims of the campaign",
        description="Repeating it is a no-op; on an ended campaign it is `wrong_state`.",
        responses=error_responses(404, 409),
        openapi_extra=ADMIN,
    )


for _status_action in ("pause", "resume"):
    _campaign_action(_status_action)


@router.post(
    "/campaigns/{campaign_id}/end",
    summary="End the campaign for good; optionally expire its received coupons",
    description="With `expire_pending`, the workflow `end-campaign:<id>` expires its "
    "`received` coupons through their workflows, page by page; the answer names it.",
    responses=error_responses(404, 409),
    openapi_extra=ADMIN,
)
async def end_campaign(
    campaign_id: CampaignIdPath,
    key: Admin,
    parts: Parts,
    body: Annotated[CampaignEndIn | None, Body()] = None,
) -> CampaignEnded:
    given = body or CampaignEndIn()
    campaign, workflow_id = await service.end_campaign(
        parts,
        campaign_id,
        tenant_id=key.tenant_id,
        expire_pending=given.expire_pending,
        reason=given.reason,
    )
    expiry = Expiry(workflow_id=workflow_id) if workflow_id else None
    return _campaign(campaign, CampaignEnded, expiry=expiry)
