"""The platform's redemption callbacks: its notice that a coupon was used, applied to the
coupon's workflow once per notification."""

from __future__ import annotations

from datetime import datetime

from temporalio.service import RPCError, RPCStatusCode

from app.service.backends import Backends, Unavailable
from coupons.contract import REPORT_REDEMPTION
from coupons.errors import Refused
from coupons.ledger import notifications
from coupons.model import RedemptionReport


async def apply_coupon_used(
    b: Backends, notification_id: str, platform_coupon_id: str, used_at: datetime
) -> str:
    """Apply the platform's notice that one of its coupons was used: signal the coupon's
    workflow, once per notification. Returns "applied", "duplicate" (applied before) or
    "finished" (the coupon is final already: nothing to apply).

    Refused (`unknown_platform_coupon`) while no receipt names the platform coupon: the
    notice may have overtaken our own confirmation of the send, so the platform should
    deliver it again later.
    """
    holder = await notifications.coupon_of(b.pool, platform_coupon_id)
    if holder is None:
        raise Refused(
            "unknown_platform_coupon",
            "no receipt names this platform coupon (yet); deliver the notification again later",
        )
    outcome = "applied"
    client = await b.client()

    async def signal() -> None:
        nonlocal outcome
        handle = client.get_workflow_handle(holder.workflow_id)
        try:
            await handle.signal(REPORT_REDEMPTION, RedemptionReport(used_at, "callback"))
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise Unavailable(f"Temporal answered {err.status.name}: {err.message}") from None
            outcome = "finished"  # the workflow closed: the coupon is final

    if not await notifications.apply_once(b.pool, notification_id, platform_coupon_id, signal):
        return "duplicate"
    return outcome
