"""Batches and campaigns, for operators (scope `admin`). Ids are made by the server
(`bat_<hex>`, `cmp_<hex>`): they are global, so a client never picks one and cannot probe
for another tenant's."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

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
    TaskOut,
)
from app.api.problems import error_responses
from app.api.routing import (
    ApiRoute,
    Backends,
    backends,
    bearer,
    derived_id,
    principal,
    requires,
)
from coupons import catalog
from coupons import validation as rules
from coupons.errors import Refused
from coupons.ledger import campaigns as catalog_ledger
from coupons.ledger import claims as claims_ledger
from coupons.ledger.campaigns import Batch, Campaign, CampaignSpec, Task
from coupons.platforms.base import BatchAction
from coupons.tenants import ApiKey

router = APIRouter(
    prefix="/v1", tags=["operators"], route_class=ApiRoute, dependencies=[Security(bearer)]
)

BatchIdPath = Annotated[str, Path(pattern=rules.ID_PATTERN)]
CampaignIdPath = Annotated[str, Path(pattern=rules.ID_PATTERN)]
Admin = Annotated[ApiKey, Depends(principal)]
Parts = Annotated[Backends, Depends(backends)]
ADMIN = requires("admin")


def _batch(batch: Batch) -> BatchOut:
    return BatchOut.model_validate(batch, from_attributes=True)


def _campaign(campaign: Campaign) -> dict[str, Any]:
    return {
        "id": campaign.id,
        "name": campaign.name,
        "batch_id": campaign.batch_id,
        "status": campaign.status,
        "quota": campaign.quota,
        "claimed": campaign.claimed,
        "remaining": campaign.quota - campaign.claimed,
        "per_user_limit": campaign.per_user_limit,
        "tasks": [TaskOut(key=t.key, name=t.name) for t in campaign.tasks],
        "task_deadline_s": (
            int(campaign.task_deadline.total_seconds()) if campaign.task_deadline else None
        ),
        "deadline_at": campaign.deadline_at,
        "starts_at": campaign.starts_at,
        "ends_at": campaign.ends_at,
        "created_at": campaign.created_at,
        "updated_at": campaign.updated_at,
        "ended_at": campaign.ended_at,
    }


# ------------------------------------------------------------------ batches


@router.post(
    "/batches",
    status_code=201,
    summary="Create a batch at the platform (and start it, unless start is false)",
    responses=error_responses(409),
    openapi_extra=ADMIN,
)
async def create_batch(body: BatchIn, request: Request, key: Admin, parts: Parts) -> BatchOut:
    batch = await catalog.create_batch(
        parts.pool,
        parts.platform,
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
    found = await catalog_ledger.list_batches(parts.pool, tenant_id=key.tenant_id)
    return Batches(batches=[_batch(b) for b in found])


@router.get(
    "/batches/{batch_id}",
    summary="One batch as last synced, with the campaigns that hand it out",
    responses=error_responses(404),
    openapi_extra=ADMIN,
)
async def get_batch(batch_id: BatchIdPath, key: Admin, parts: Parts) -> BatchDetail:
    batch = await catalog.get_batch(parts.pool, batch_id, key.tenant_id)
    campaigns = await catalog_ledger.list_campaigns(
        parts.pool, batch_id=batch.id, tenant_id=key.tenant_id
    )
    return BatchDetail(
        **_batch(batch).model_dump(),
        campaigns=[
            BatchCampaign(id=c.id, status=c.status, quota=c.quota, claimed=c.claimed)  # type: ignore[arg-type]
            for c in campaigns
        ],
    )


def _batch_action(action: BatchAction) -> None:
    async def change(batch_id: BatchIdPath, key: Admin, parts: Parts) -> BatchOut:
        batch = await service.change_batch(
            parts.pool,
            parts.client,
            parts.settings,
            parts.platform,
            batch_id,
            action,
            key.tenant_id,
        )
        return _batch(batch)

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
    campaign, created = await catalog.create_campaign(parts.pool, spec)
    if not created:
        response.status_code = 200
    return CampaignCreated(**_campaign(campaign), created=created)


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
    found = await catalog_ledger.list_campaigns(
        parts.pool, batch_id=batch_id, status=status, tenant_id=key.tenant_id
    )
    return Campaigns(campaigns=[CampaignOut(**_campaign(c)) for c in found])


@router.get(
    "/campaigns/{campaign_id}",
    summary="One campaign, with its coupons counted by state",
    responses=error_responses(404),
    openapi_extra=ADMIN,
)
async def get_campaign(campaign_id: CampaignIdPath, key: Admin, parts: Parts) -> CampaignDetail:
    campaign = await catalog.get_campaign(parts.pool, campaign_id, key.tenant_id)
    states = await claims_ledger.count_by_state(parts.pool, campaign.id)
    return CampaignDetail(**_campaign(campaign), states=states)


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
    campaign = await catalog.update_campaign(
        parts.pool, campaign_id, tenant_id=key.tenant_id, **changes
    )
    return CampaignOut(**_campaign(campaign))


def _campaign_action(action: str) -> None:
    async def change(campaign_id: CampaignIdPath, key: Admin, parts: Parts) -> CampaignOut:
        campaign = await catalog.change_campaign_status(
            parts.pool, campaign_id, action, key.tenant_id
        )
        return CampaignOut(**_campaign(campaign))

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
        parts.pool,
        parts.client,
        parts.settings,
        campaign_id,
        tenant_id=key.tenant_id,
        expire_pending=given.expire_pending,
        reason=given.reason,
    )
    expiry = Expiry(workflow_id=workflow_id) if workflow_id else None
    return CampaignEnded(**_campaign(campaign), expiry=expiry)
