"""Reconciliation (对账): the platform's own record of a batch against our ledger.

Pure: takes the platform's flow files and the ledger's coupons, names every difference
and the one repair that is safe to make without a person (a use we missed becomes a
redemption, through the coupon's workflow). Everything else is left for an operator.
"""

from __future__ import annotations

from coupons.ledger.claims import LedgerCoupon
from coupons.model import Mismatch, idempotency_key
from coupons.platforms.base import FlowRecord

# A send in flight: the platform may have it before our receipt is written.
_IN_FLIGHT = "usable"
REDEEM = "redeem"


def compare(
    ledger: list[LedgerCoupon], sent: list[FlowRecord] | None, used: list[FlowRecord]
) -> list[Mismatch]:
    """`sent` None: the platform publishes no sent flow, so sends we have no receipt of and
    receipts the platform lacks cannot be seen; uses are still compared."""
    by_platform_id = {c.platform_coupon_id: c for c in ledger if c.platform_coupon_id}
    by_key = {idempotency_key(c.coupon_id): c for c in ledger}
    sent_ids = None if sent is None else {record.coupon_id for record in sent}
    used_at = {record.coupon_id: record for record in used}
    found: list[Mismatch] = []

    for record in sent or []:
        ours = by_platform_id.get(record.coupon_id)
        if ours is not None:
            continue
        claim = by_key.get(record.idempotency_key or "")
        if claim is not None and claim.state == _IN_FLIGHT:
            continue  # its receipt is being written
        if claim is not None:
            detail = (
                f"the platform sent coupon {record.coupon_id} for our {claim.state} claim "
                f"{claim.coupon_id}, which has no receipt of it"
            )
        else:
            detail = (
                f"the platform sent coupon {record.coupon_id} to user {record.user_id} "
                "with no claim of ours behind it"
            )
        found.append(
            Mismatch(
                "platform_only",
                detail,
                coupon_id=claim.coupon_id if claim else None,
                platform_coupon_id=record.coupon_id,
            )
        )

    for coupon in ledger:
        platform_id = coupon.platform_coupon_id
        if platform_id is None:
            continue
        if sent_ids is not None and platform_id not in sent_ids:
            found.append(
                Mismatch(
                    "ledger_only",
                    f"our {coupon.state} coupon {coupon.coupon_id} has receipt {platform_id}, "
                    "which the platform's sent flow lacks",
                    coupon_id=coupon.coupon_id,
                    platform_coupon_id=platform_id,
                )
            )
            continue
        was_used = platform_id in used_at
        if was_used and coupon.state == "issued":
            found.append(
                Mismatch(
                    "state",
                    f"used at the platform, {coupon.state} here",
                    coupon_id=coupon.coupon_id,
                    platform_coupon_id=platform_id,
                    repair=REDEEM,
                )
            )
        elif was_used and coupon.state != "redeemed":
            found.append(
                Mismatch(
                    "state",
                    f"used at the platform, but {coupon.state} here (final: not repaired)",
                    coupon_id=coupon.coupon_id,
                    platform_coupon_id=platform_id,
                )
            )
        elif not was_used and coupon.state == "redeemed":
            found.append(
                Mismatch(
                    "state",
                    "redeemed here, but the platform's used flow lacks it",
                    coupon_id=coupon.coupon_id,
                    platform_coupon_id=platform_id,
                )
            )
    return found
