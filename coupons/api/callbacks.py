"""The platform's redemption notifications (unauthenticated: the signature is the proof).

Acknowledged fast: the notice is checked, the coupon's workflow signalled, the notification
id recorded so a duplicate is acknowledged without a second signal; the workflow moves the
coupon `issued` → `redeemed` on its own time. Polling stays the fallback.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from coupons import service
from coupons.api.models import CallbackAnswer
from coupons.api.problems import TITLES, ApiProblem, Problem
from coupons.api.routing import Backends, backends
from coupons.platforms.base import CallbackRejected

log = logging.getLogger(__name__)

router = APIRouter(tags=["callbacks"])


@router.post(
    "/callbacks/generic/coupon-used",
    summary="The platform's COUPON.USED notification (signed; no API key)",
    description="Signed with the platform's callback secret in X-Platform-Timestamp, "
    "-Nonce and -Signature. 200 once applied (or for a duplicate); 401 for a notification "
    "that does not verify; 409 while no receipt names the coupon yet and 503 while the "
    "workflow service does not answer: the platform delivers it again.",
    responses={
        status: {"model": Problem, "description": TITLES[status]} for status in (401, 409, 413, 503)
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def coupon_used(
    request: Request, parts: Annotated[Backends, Depends(backends)]
) -> CallbackAnswer:
    body = await request.body()
    try:
        notice = parts.platform.verify_callback(request.headers, body)
    except CallbackRejected as rejected:
        # The reason names what failed, never the secret or the expected signature.
        peer = request.client.host if request.client else "unknown"
        log.warning("callback from %s rejected: %s", peer, rejected.reason)
        raise ApiProblem("unauthorized", "the notification does not verify") from None
    outcome = await service.apply_coupon_used(
        parts.pool,
        parts.client,
        notice.notification_id,
        notice.platform_coupon_id,
        notice.used_at,
    )
    log.info(
        "callback %s: platform coupon %s used at %s: %s",
        notice.notification_id,
        notice.platform_coupon_id,
        notice.used_at.isoformat(),
        outcome,
    )
    return CallbackAnswer(status=outcome)  # type: ignore[arg-type]  # one of the three
