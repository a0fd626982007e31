"""Coupons: `claim`, `complete-task`, `show`, `cancel`, `list`, `stats`, `repair` (JSON),
and `coupon wedged|recover` for coupons whose workflow cannot progress."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from app import service
from app.cli.args import (
    Commands,
    Nouns,
    coupon_id,
    ident,
    json_flag,
    rule,
    timeout_flag,
    wait,
)
from app.cli.render import Answer, recovery_view, wedged_view
from app.service import Backends
from app.wedged import count_by_cause
from coupons import validation as rules
from coupons.lifecycle import STATES

# How long an update waits for a worker to answer before the command gives up.
UPDATE_WAIT_S = 20.0


def add_parsers(nouns: Nouns) -> None:
    c = nouns.add_parser("claim", help="claim a coupon of a campaign for a user")
    c.add_argument("--campaign", required=True, type=ident("campaign"))
    c.add_argument("--user", required=True, type=ident("user"))
    t = nouns.add_parser("complete-task", help="report that the coupon's user completed a task")
    t.add_argument("--coupon", required=True, type=coupon_id)
    t.add_argument("--task", required=True, type=ident("task"))
    t.add_argument("--wait", action="store_true", help="use the update: answer with the new state")
    timeout_flag(t, UPDATE_WAIT_S, "seconds --wait waits")
    s = nouns.add_parser("show", help="print a coupon's state, tasks, receipt and events")
    s.add_argument("--coupon", required=True, type=coupon_id)
    x = nouns.add_parser("cancel", help="cancel a coupon that is not yet sent to the platform")
    x.add_argument("--coupon", required=True, type=coupon_id)
    x.add_argument("--reason", default="cancelled by operator", type=rule(rules.REASON))
    x.add_argument("--no-wait", action="store_true", help="send the signal and do not wait")
    timeout_flag(x, UPDATE_WAIT_S, "seconds to wait")
    ls = nouns.add_parser("list", help="list a campaign's coupons (from the ledger)")
    ls.add_argument("--campaign", required=True, type=ident("campaign"))
    ls.add_argument("--user", type=ident("user"))
    ls.add_argument("--state", choices=STATES)
    ls.add_argument("--limit", type=rule(rules.LIST_LIMIT), default=100, help="at most this many")
    st = nouns.add_parser("stats", help="count a campaign's coupons by state (from the ledger)")
    st.add_argument("--campaign", required=True, type=ident("campaign"))
    nouns.add_parser("repair", help="start the workflows of claims that lack one")
    _coupon_parser(nouns.add_parser("coupon", help="coupons whose workflow cannot progress"))


def _coupon_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    w = sub.add_parser("wedged", help="coupons whose workflow cannot make progress, with the cause")
    w.add_argument(
        "--limit", type=rule(rules.LIST_LIMIT), default=1000, help="at most this many per cause"
    )
    json_flag(w)
    r = sub.add_parser(
        "recover", help="recover a wedged coupon from the ledger's state (never sends twice)"
    )
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("coupon", nargs="?", type=coupon_id, help="the coupon to recover")
    which.add_argument("--all", action="store_true", help="every coupon `coupon wedged` lists")
    json_flag(r)


async def cmd_claim(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    result = await service.claim(b, args.campaign, args.user)
    return dataclasses.asdict(result)


async def cmd_complete_task(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    ref = service.CouponRef(args.coupon)
    if args.wait:
        status = await service.complete_task(b, ref, args.task, wait(args))
        return {"coupon_id": args.coupon, "state": status.state, "tasks_done": status.tasks_done}
    await service.report_task(b, ref, args.task)
    return {"coupon_id": args.coupon, "signalled": "task_done", "task": args.task}


async def cmd_cancel(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    ref = service.CouponRef(args.coupon)
    status = await service.cancel(b, ref, args.reason, None if args.no_wait else wait(args))
    if status is None:
        return {"coupon_id": args.coupon, "signalled": "cancel"}
    return {"coupon_id": args.coupon, "state": status.state}


async def cmd_show(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    return (await service.show_coupon(b, service.CouponRef(args.coupon))).fields()


async def cmd_list(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    where = service.ClaimFilter(
        campaign_id=args.campaign, user_id=args.user, state=args.state, limit=args.limit
    )
    found = await service.list_coupons(b, where)
    return {
        "campaign_id": args.campaign,
        "coupons": [
            {
                "coupon_id": c.coupon_id,
                "user_id": c.user_id,
                "state": c.state,
                "claimed_at": c.claimed_at,
            }
            for c in found
        ],
    }


async def cmd_stats(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    campaign = await service.get_campaign(b, args.campaign)
    return {
        "campaign_id": campaign.id,
        "quota": campaign.quota,
        "claimed": campaign.claimed,
        "remaining": campaign.quota - campaign.claimed,
        "states": await service.count_by_state(b, campaign.id),
    }


async def cmd_repair(b: Backends, args: argparse.Namespace) -> dict[str, Any]:
    return {"repaired": await service.repair(b)}


async def cmd_coupon_wedged(b: Backends, args: argparse.Namespace) -> Answer:
    found = await service.wedged_coupons(b, limit=args.limit)
    counts = count_by_cause(found)
    return Answer({"wedged": found, "by_cause": counts}, lambda: wedged_view(found, counts))


async def cmd_coupon_recover(b: Backends, args: argparse.Namespace) -> Answer:
    if args.all:
        done = await service.recover_all(b)
    else:
        done = [await service.recover(b, args.coupon)]
    failed = [r.coupon_id for r in done if r.action == "error"]
    return Answer(
        {"recovered": done},
        lambda: recovery_view(done),
        error=f"{len(failed)} not recovered: {', '.join(failed)}" if failed else None,
    )


COMMANDS: Commands = {
    "claim": cmd_claim,
    "complete-task": cmd_complete_task,
    "show": cmd_show,
    "cancel": cmd_cancel,
    "list": cmd_list,
    "stats": cmd_stats,
    "repair": cmd_repair,
    "coupon wedged": cmd_coupon_wedged,
    "coupon recover": cmd_coupon_recover,
}
