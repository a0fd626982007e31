"""The operations of the service: what the HTTP API (`app.api`) and the command line
(`app.cli`) both call, so each exists once.

The rule: the entry points (`app/api/`, `app/cli/`) import nothing from `coupons.ledger`,
`coupons.catalog`, `coupons.tenants` or `app.claims`; every read and write they make, of
the ledger, of Temporal or of the platform, is an operation here. An operation holds what
belongs to the application (tenant scoping, starting and answering workflows, turning
Temporal's answers into refusals) and leaves the rest to the domain below it:
`coupons.catalog` (batches and campaigns), `coupons.tenants` (tenants and keys),
`coupons.report` (the funnel), `app.claims` and `app.wedged`, and `coupons.ledger` (all
SQL). The records the entry points render (`Batch`, `Campaign`, `Claim`, `ApiKey`, ...)
are re-exported from here, with `ClaimFilter` (which claims a listing wants).

The operations live one module per noun, as `app/cli/` has them: `coupons` (claims, reads,
tasks, cancel, wedged coupons), `batches`, `campaigns`, `reports` (the funnel,
reconciliation), `tenants` (tenants and keys), `answers` (the API's answers kept) and
`callbacks` (the platform's redemption notices), over `backends` (`Backends`, `opened`).
This package re-exports every operation: an entry point imports `from app import service`
and calls `service.<operation>(...)`.

Every operation takes one `Backends` first: the settings, the ledger's pool, Temporal's
client and the platform. An operation that scopes by tenant takes an optional `tenant_id`:
when given, another tenant's campaign, batch or coupon is as unknown as one that does not
exist, with the same refusal and message. An operation on one coupon may also name the
`user_id` that must hold it (an app reporting for its user): a coupon held by someone else
is unknown too.

Refusals raise `coupons.errors.Refused` with a stable code (`unknown_coupon`,
`unknown_task`, `wrong_state`, `sold_out`, ...); a part that did not answer (Temporal, a
worker) raises `Unavailable`, after which trying again may succeed.
"""

from __future__ import annotations

from app.claims import ClaimResult
from app.service.answers import keep_answer, prune_answers, release_answer, take_answer
from app.service.backends import Backends, Unavailable, migrate, opened
from app.service.batches import (
    SENDS_AGAIN,
    change_batch,
    create_batch,
    get_batch,
    list_batches,
    sync_catalog,
)
from app.service.callbacks import apply_coupon_used
from app.service.campaigns import (
    campaign_fields,
    change_campaign_status,
    create_campaign,
    end_campaign,
    get_campaign,
    list_campaigns,
    update_campaign,
)
from app.service.coupons import (
    QUERY_WAIT,
    UPDATE_WAIT,
    CouponRef,
    CouponView,
    cancel,
    claim,
    complete_task,
    count_by_state,
    find_coupon,
    list_coupons,
    recover,
    recover_all,
    repair,
    report_task,
    show_coupon,
    wedged_coupons,
)
from app.service.reports import funnel_report, reconcile
from app.service.tenants import (
    authenticate,
    create_key,
    create_tenant,
    known_tenant,
    list_keys,
    list_tenants,
    revoke_key,
)
from coupons.ledger.batches import Batch
from coupons.ledger.campaigns import (
    CAMPAIGN_STATUSES,
    Campaign,
    CampaignFilter,
    CampaignSpec,
    Task,
)
from coupons.ledger.claims import Claim, ClaimFilter
from coupons.ledger.idempotency import KeptRequest
from coupons.ledger.tenants import DEFAULT_TENANT, ApiKey, Tenant
from coupons.tenants import SCOPES, IssuedKey

__all__ = [
    "CAMPAIGN_STATUSES",
    "DEFAULT_TENANT",
    "QUERY_WAIT",
    "SCOPES",
    "SENDS_AGAIN",
    "UPDATE_WAIT",
    "ApiKey",
    "Backends",
    "Batch",
    "Campaign",
    "CampaignFilter",
    "CampaignSpec",
    "Claim",
    "ClaimFilter",
    "ClaimResult",
    "CouponRef",
    "CouponView",
    "IssuedKey",
    "KeptRequest",
    "Task",
    "Tenant",
    "Unavailable",
    "apply_coupon_used",
    "authenticate",
    "campaign_fields",
    "cancel",
    "change_batch",
    "change_campaign_status",
    "claim",
    "complete_task",
    "count_by_state",
    "create_batch",
    "create_campaign",
    "create_key",
    "create_tenant",
    "end_campaign",
    "find_coupon",
    "funnel_report",
    "get_batch",
    "get_campaign",
    "keep_answer",
    "known_tenant",
    "list_batches",
    "list_campaigns",
    "list_coupons",
    "list_keys",
    "list_tenants",
    "migrate",
    "opened",
    "prune_answers",
    "reconcile",
    "recover",
    "recover_all",
    "release_answer",
    "repair",
    "report_task",
    "revoke_key",
    "show_coupon",
    "sync_catalog",
    "take_answer",
    "update_campaign",
    "wedged_coupons",
]
