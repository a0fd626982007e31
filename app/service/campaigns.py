"""Operations on campaigns: define, change, read, pause, resume or end
(`coupons.catalog.campaigns`), and the expiry of an ended campaign's received coupons."""

from __future__ import annotations

from typing import Any

from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from app.service.backends import Backends, Unavailable
from coupons import catalog
from coupons.contract import END_CAMPAIGN_WORKFLOW
from coupons.errors import InvalidField
from coupons.ledger import campaigns
from coupons.ledger.campaigns import Campaign, CampaignFilter, CampaignSpec
from coupons.model import EndCampaignInput


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


async def list_campaigns(b: Backends, where: CampaignFilter) -> list[Campaign]:
    """The campaigns `where` asks for (of a batch, in a status, of a tenant)."""
    return await campaigns.list_campaigns(b.pool, where)


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
