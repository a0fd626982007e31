"""Batches and campaigns, for operators (scope `admin`). Ids are made by the server
(`bat_<hex>`, `cmp_<hex>`): they are global, so a client never picks one and cannot probe
for another tenant's."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Body, Query, Request, Response

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
)
from app.api.problems import error_responses
from app.api.routing import IdPath, Key, Parts, derived_id, scoped_router
from app.service import Batch, Campaign, CampaignSpec, Task
from coupons import validation as rules
from coupons.errors import Refused
from coupons.platforms.base import BatchAction

router = scoped_router("admin", "operators")
Out = TypeVar("Out", bound=CampaignOut)
Endpoint = Callable[..., Awaitable[Any]]


def _batch(batch: Batch) -> BatchOut:
    return BatchOut(**dataclasses.asdict(batch))


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
)
async def create_batch(body: BatchIn, request: Request, key: Key, parts: Parts) -> BatchOut:
    fields = body.model_dump()  # the catalog's create_batch takes them by the same names
    if "valid_days" not in body.model_fields_set:
        # As long as the window given (what WeChat Pay can keep), else 30.
        fields["valid_days"] = None
    batch_id = derived_id("bat", request, key)
    batch = await service.create_batch(parts, batch_id, tenant_id=key.tenant_id, **fields)
    return _batch(batch)


@router.get(
    "/batches",
    summary="The tenant's batches, as last synced",
    responses=error_responses(),
)
async def list_batches(key: Key, parts: Parts) -> Batches:
    found = await service.list_batches(parts, tenant_id=key.tenant_id)
    return Batches(batches=[_batch(b) for b in found])


@router.get(
    "/batches/{batch_id}",
    summary="One batch as last synced, with the campaigns that hand it out",
    responses=error_responses(404),
)
async def get_batch(batch_id: IdPath, key: Key, parts: Parts) -> BatchDetail:
    batch = await service.get_batch(parts, batch_id, key.tenant_id)
    campaigns = await service.list_campaigns(
        parts, service.CampaignFilter(batch_id=batch.id, tenant_id=key.tenant_id)
    )
    return BatchDetail(
        **dataclasses.asdict(batch),
        campaigns=[BatchCampaign.model_validate(c, from_attributes=True) for c in campaigns],
    )


def _add_action(path: str, name: str, change: Endpoint, *, summary: str, description: str) -> None:
    """POST `path`: an action on one batch or campaign, which `change` takes; `name` starts
    its OpenAPI operation id. The answer is 404 for an unknown one, 409 where its status
    does not allow the action."""
    router.add_api_route(
        path,
        change,
        methods=["POST"],
        name=name,
        summary=summary,
        description=description,
        responses=error_responses(404, 409),
    )


def _batch_action(action: BatchAction) -> None:
    async def change(batch_id: IdPath, key: Key, parts: Parts) -> BatchOut:
        return _batch(await service.change_batch(parts, batch_id, action, key.tenant_id))

    _add_action(
        f"/batches/{{batch_id}}/{action.value}",
        f"{action.value}_batch",
        change,
        summary=f"{action.value.capitalize()} the batch at the platform",
        description="Repeating an action already done is a no-op; one the batch's status "
        "does not allow is `wrong_state`.",
    )


for _action in BatchAction:
    _batch_action(_action)


# ------------------------------------------------------------------ campaigns


def _spec_fields(body: CampaignIn | CampaignPatch, given: dict[str, Any]) -> dict[str, Any]:
    """The fields `given` of `body` (all of them, or those a patch sets) as CampaignSpec
    names them: tasks as Task (the key names one that has no name), the relative deadline
    as a timedelta."""
    fields = {k: v for k, v in given.items() if k not in ("tasks", "task_deadline_s")}
    if "tasks" in given:
        fields["tasks"] = [Task(t.key, t.name or t.key) for t in body.tasks]
    if "task_deadline_s" in given:
        seconds = body.task_deadline_s
        fields["task_deadline"] = None if seconds is None else timedelta(seconds=seconds)
    return fields


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
)
async def create_campaign(
    body: CampaignIn, request: Request, response: Response, key: Key, parts: Parts
) -> CampaignCreated:
    fields = _spec_fields(body, body.model_dump())
    spec = CampaignSpec(id=derived_id("cmp", request, key), tenant_id=key.tenant_id, **fields)
    campaign, created = await service.create_campaign(parts, spec)
    if not created:
        response.status_code = 200
    return _campaign(campaign, CampaignCreated, created=created)


@router.get(
    "/campaigns",
    summary="The tenant's campaigns",
    responses=error_responses(422),
)
async def list_campaigns(
    key: Key,
    parts: Parts,
    batch_id: Annotated[str | None, Query(pattern=rules.ID_PATTERN)] = None,
    status: CampaignStatus | None = None,
) -> Campaigns:
    where = service.CampaignFilter(batch_id, status, key.tenant_id)
    found = await service.list_campaigns(parts, where)
    return Campaigns(campaigns=[_campaign(c) for c in found])


@router.get(
    "/campaigns/{campaign_id}",
    summary="One campaign, with its coupons counted by state",
    responses=error_responses(404),
)
async def get_campaign(campaign_id: IdPath, key: Key, parts: Parts) -> CampaignDetail:
    campaign = await service.get_campaign(parts, campaign_id, key.tenant_id)
    states = await service.count_by_state(parts, campaign.id)
    return _campaign(campaign, CampaignDetail, states=states)


@router.patch(
    "/campaigns/{campaign_id}",
    summary="Change some fields of a campaign; claims already made keep theirs",
    responses=error_responses(404, 409),
)
async def update_campaign(
    campaign_id: IdPath, body: CampaignPatch, key: Key, parts: Parts
) -> CampaignOut:
    given = body.model_dump(exclude_unset=True)
    if not given:
        raise Refused("invalid_request", "nothing to change: give at least one field")
    for field in ("batch_id", "quota", "per_user_limit", "tasks"):
        if field in given and given[field] is None:
            raise Refused("invalid_request", f"{field}: cannot be null")
    changes = _spec_fields(body, given)
    # Another tenant's campaign is as unknown as none.
    campaign = await service.update_campaign(parts, campaign_id, tenant_id=key.tenant_id, **changes)
    return _campaign(campaign)


def _campaign_action(action: str) -> None:
    async def change(campaign_id: IdPath, key: Key, parts: Parts) -> CampaignOut:
        campaign = await service.change_campaign_status(parts, campaign_id, action, key.tenant_id)
        return _campaign(campaign)

    _add_action(
        f"/campaigns/{{campaign_id}}/{action}",
        f"{action}_campaign",
        change,
        summary=f"{action.capitalize()} claims of the campaign",
        description="Repeating it is a no-op; on an ended campaign it is `wrong_state`.",
    )


for _status_action in ("pause", "resume"):
    _campaign_action(_status_action)


@router.post(
    "/campaigns/{campaign_id}/end",
    summary="End the campaign for good; optionally expire its received coupons",
    description="With `expire_pending`, the workflow `end-campaign:<id>` expires its "
    "`received` coupons through their workflows, page by page; the answer names it.",
    responses=error_responses(404, 409),
)
async def end_campaign(
    campaign_id: IdPath,
    key: Key,
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
