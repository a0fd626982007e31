"""Batches: `batch create|list|show|start|pause|resume|stop|sync`, the coupon batches at
the platform as the ledger holds them."""

from __future__ import annotations

import argparse

from rich.text import Text

from app import service
from app.cli.args import (
    Commands,
    Nouns,
    ident,
    json_flag,
    rule,
    tenant_flag,
    time_arg,
    timeout_flag,
)
from app.cli.render import (
    Answer,
    batch_detail,
    batch_json,
    batch_table,
    batches_failed,
    campaign_table,
    sync_view,
)
from app.service import Backends
from coupons import validation as rules
from coupons.platforms.base import BatchAction

# How long `batch sync` waits for its workflow's answer.
SYNC_WAIT_S = 60.0


def add_parsers(nouns: Nouns) -> None:
    p = nouns.add_parser("batch", help="coupon batches at the platform")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a batch at the platform (idempotent) and start it")
    c.add_argument("--id", required=True, type=ident("batch"), help="our batch id")
    c.add_argument(
        "--quantity",
        type=rule(rules.QUANTITY),
        required=True,
        help=f"coupons the batch holds ({rules.QUANTITY.range})",
    )
    # Money in cents, as both platforms count it; the unit is in the flag's name (the name
    # without it still works).
    for dest, money, help in (
        ("value", rules.FACE_VALUE_CENTS, "face value in cents (default 500 = 5.00)"),
        ("min_spend", rules.MIN_SPEND_CENTS, "minimum spend in cents (default 0: none)"),
    ):
        flag = "--" + dest.replace("_", "-")
        c.add_argument(f"{flag}-cents", flag, dest=dest, type=rule(money), help=help)
    c.add_argument(
        "--valid-days",
        type=rule(rules.VALID_DAYS),
        help="days a sent coupon is valid (default: the window given, else 30)",
    )
    c.add_argument(
        "--per-user-limit",
        type=rule(rules.PER_USER_LIMIT),
        help="coupons per user at the platform",
    )
    c.add_argument("--name", type=rule(rules.NAME))
    c.add_argument(
        "--starts-at",
        type=time_arg("--starts-at"),
        help="ISO time with a timezone, e.g. 2026-06-01T00:00+08:00",
    )
    c.add_argument("--ends-at", type=time_arg("--ends-at"), help="ISO time with a timezone")
    c.add_argument("--no-start", action="store_true", help="create it, do not start it")
    tenant_flag(c, "batch")
    json_flag(c)
    json_flag(sub.add_parser("list", help="every batch as last synced"))
    s = sub.add_parser("show", help="one batch as last synced, with its campaigns")
    s.add_argument("batch", type=ident("batch"))
    json_flag(s)
    for action in BatchAction:
        a = sub.add_parser(action.value, help=f"{action.value} the batch at the platform")
        a.add_argument("batch", type=ident("batch"))
        json_flag(a)
    y = sub.add_parser("sync", help="read batches at the platform now (the catalog sync)")
    y.add_argument(
        "--batch",
        action="append",
        type=ident("batch"),
        help="a batch to sync (repeatable; default: all in use)",
    )
    timeout_flag(y, SYNC_WAIT_S, "seconds to wait for the sync")
    json_flag(y)


async def cmd_batch_create(b: Backends, args: argparse.Namespace) -> Answer:
    # Checked first: the batch would be created at the platform before the ledger refused it.
    tenant_id = await service.known_tenant(b, args.tenant)
    given = {
        "face_value_cents": args.value,
        "min_spend_cents": args.min_spend,
        "valid_days": args.valid_days,
        "per_user_limit": args.per_user_limit,
    }
    batch = await service.create_batch(
        b,
        args.id,
        quantity=args.quantity,
        name=args.name,
        starts_at=args.starts_at,
        ends_at=args.ends_at,
        start=not args.no_start,
        tenant_id=tenant_id,
        **{field: value for field, value in given.items() if value is not None},
    )
    return Answer(batch_json(batch), lambda: batch_detail(batch))


async def cmd_batch_list(b: Backends, args: argparse.Namespace) -> Answer:
    batches = await service.list_batches(b)
    return Answer(
        {"batches": [batch_json(x) for x in batches]},
        lambda: [batch_table(batches)] if batches else [Text("no batches")],
    )


async def cmd_batch_show(b: Backends, args: argparse.Namespace) -> Answer:
    batch = await service.get_batch(b, args.batch)
    campaigns = await service.list_campaigns(b, service.CampaignFilter(batch_id=batch.id))
    data = batch_json(batch)
    data["campaigns"] = [
        {"id": c.id, "status": c.status, "quota": c.quota, "claimed": c.claimed} for c in campaigns
    ]
    return Answer(
        data,
        lambda: [
            *batch_detail(batch),
            Text(""),
            campaign_table(campaigns) if campaigns else Text("no campaigns use it"),
        ],
    )


async def cmd_batch_change(b: Backends, args: argparse.Namespace) -> Answer:
    batch = await service.change_batch(b, args.batch, BatchAction(args.action))
    return Answer(batch_json(batch), lambda: batch_detail(batch))


async def cmd_batch_sync(b: Backends, args: argparse.Namespace) -> Answer:
    batch_ids = list(dict.fromkeys(args.batch)) if args.batch else None
    workflow_id, report = await service.sync_catalog(b, batch_ids, float(args.timeout))
    data = {
        "workflow_id": workflow_id,
        "batches": report.batches,
        "drifted": len(report.drifted),
        "failed": report.failed,
    }
    return Answer(data, lambda: sync_view(report), batches_failed(report.failed, "synced"))


COMMANDS: Commands = {
    "batch create": cmd_batch_create,
    "batch list": cmd_batch_list,
    "batch show": cmd_batch_show,
    **{f"batch {action.value}": cmd_batch_change for action in BatchAction},
    "batch sync": cmd_batch_sync,
}
