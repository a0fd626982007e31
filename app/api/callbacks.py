"""The platform's redemption notifications (unauthenticated: the signature is the proof).

Acknowledged fast: the notice is checked, the coupon's workflow signalled, the notification
id recorded so a duplicate is acknowledged without a second signal; the workflow moves the
coupon `issued` → `redeemed` on its own time. Polling stays the fallback.

The path names the platform (`/callbacks/{generic|wechat|alipay}/coupon-used`); only the
configured platform's path takes notifications, checked by its adapter. Any answer but a
success makes the platform deliver again; a success is what the platform expects (Alipay:
the text `success`).
"""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from app import service
from app.api.models import CallbackAnswer
from app.api.problems import TITLES, ApiProblem, Problem
from app.api.routing import Parts
from app.service import Backends
from coupons import metrics
from coupons.errors import Refused
from coupons.platforms.base import CallbackRejected, verified_notice

log = logging.getLogger(__name__)

router = APIRouter(tags=["callbacks"])


@router.post(
    "/callbacks/{platform}/coupon-used",
    summary="The platform's coupon-used notification (signed; no API key)",
    description="Verified by the configured platform's adapter: generic (HMAC in "
    "X-Platform-Timestamp, -Nonce and -Signature), wechat (COUPON.USE, Wechatpay-Signature "
    "with the key Wechatpay-Serial names: the WeChat Pay public key or a platform "
    "certificate, fetched when new; resource decrypted with the APIv3 key) or alipay "
    "(form-encoded, RSA2 `sign`). 200 once applied (or for a duplicate); 401 for a "
    "notification that does not verify; 404 for another platform's path; 409 while no "
    "receipt names the coupon yet and 503 while the workflow service does not answer: the "
    "platform delivers it again.",
    response_model=CallbackAnswer,
    responses={
        status: {"model": Problem, "description": TITLES[status]}
        for status in (401, 404, 409, 413, 503)
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def coupon_used(
    request: Request,
    platform: Literal["generic", "wechat", "alipay"],
    parts: Parts,
) -> CallbackAnswer | Response:
    if platform != parts.settings.platform:
        raise ApiProblem(
            "not_found",
            f"this service takes {parts.settings.platform} notifications, at "
            f"/callbacks/{parts.settings.platform}/coupon-used",
        )
    body = await request.body()
    try:
        notice = await verified_notice(parts.platform, request.headers, body)
    except CallbackRejected as rejected:
        # The reason names what failed, never the secret or the expected signature.
        peer = request.client.host if request.client else "unknown"
        log.warning("callback from %s rejected: %s", peer, rejected.reason)
        metrics.CALLBACK_VERIFICATION_FAILURES.inc()
        metrics.CALLBACKS.labels(outcome="rejected").inc()
        raise ApiProblem("unauthorized", "the notification does not verify") from None
    if notice is None:
        log.info("callback: a genuine notification of another event, acknowledged and ignored")
        metrics.CALLBACKS.labels(outcome="ignored").inc()
        return _taken(parts, "ignored")
    try:
        outcome = await service.apply_coupon_used(
            parts,
            notice.notification_id,
            notice.platform_coupon_id,
            notice.used_at,
        )
    except Refused as refused:
        metrics.CALLBACKS.labels(outcome=refused.code).inc()
        raise
    except service.Unavailable:
        metrics.CALLBACKS.labels(outcome="unavailable").inc()
        raise
    metrics.CALLBACKS.labels(outcome=outcome).inc()
    log.info(
        "callback %s: platform coupon %s used at %s: %s",
        notice.notification_id,
        notice.platform_coupon_id,
        notice.used_at.isoformat(),
        outcome,
    )
    return _taken(parts, outcome)


def _taken(parts: Backends, outcome: str) -> CallbackAnswer | Response:
    if parts.platform.callback_success is not None:
        # The platform's own words (documented as text/plain), not our JSON answer.
        return PlainTextResponse(parts.platform.callback_success)
    return CallbackAnswer(status=outcome)  # type: ignore[arg-type]  # one of the four
