"""The command line an app or operator uses (`python starter.py ...`).

Exit codes: 0 success, 2 bad input (the reason on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from coupons.claims import ClaimService
from coupons.validation import validate_id
from coupons.config import ConfigError, Settings
from coupons.errors import BAD_INPUT, Refused
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.ledger.campaigns import get_campaign
from coupons.lifecycle import STATES
from coupons.model import CancelRequest, CouponStatus, TaskCompletion
from coupons.temporal import connect
from workflows.user_coupon import UserCouponWorkflow

# How long an update waits for a worker to answer before the command gives up.
UPDATE_WAIT_S = 20.0


class Unavailable(Exception):
    """A part the command needs (PostgreSQL, Temporal) cannot be reached."""


class Context:
    """What a command needs; Temporal is connected only by the commands that use it."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool) -> None:
        self.settings = settings
        self.pool = pool
        self._client: Client | None = None

    async def client(self) -> Client:
        if self._client is None:
            try:
                self._client = await connect(self.settings)
            except RuntimeError as err:
                raise Unavailable(
                    f"cannot reach Temporal at {self.settings.temporal_address} ({err}); "
                    "is `make run` up, with the same environment as this shell?"
                ) from None
        return self._client


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="starter.py", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("claim", help="claim a coupon of a campaign for a user")
    c.add_argument("--campaign", required=True)
    c.add_argument("--user", required=True)
    t = sub.add_parser("complete-task", help="report that the coupon's user completed a task")
    t.add_argument("--coupon", required=True)
    t.add_argument("--task", required=True)
    t.add_argument("--wait", action="store_true", help="use the update: answer with the new state")
    t.add_argument("--timeout", type=float, default=UPDATE_WAIT_S, help="seconds --wait waits")
    s = sub.add_parser("show", help="print a coupon's state, tasks, receipt and events")
    s.add_argument("--coupon", required=True)
    x = sub.add_parser("cancel", help="cancel a coupon that is not yet sent to the platform")
    x.add_argument("--coupon", required=True)
    x.add_argument("--reason", default="cancelled by operator")
    x.add_argument("--no-wait", action="store_true", help="send the signal and do not wait")
    x.add_argument("--timeout", type=float, default=UPDATE_WAIT_S, help="seconds to wait")
    ls = sub.add_parser("list", help="list a campaign's coupons (from the ledger)")
    ls.add_argument("--campaign", required=True)
    ls.add_argument("--user")
    ls.add_argument("--state", choices=STATES)
    ls.add_argument("--limit", type=int, default=100)
    st = sub.add_parser("stats", help="count a campaign's coupons by state (from the ledger)")
    st.add_argument("--campaign", required=True)
    sub.add_parser("repair", help="start the workflows of claims that lack one")
    return p


def _wait(args: argparse.Namespace) -> timedelta:
    if not 0 < args.timeout <= 3600:
        raise Refused("invalid_request", f"--timeout {args.timeout:g} must be between 0 and 3600")
    return timedelta(seconds=args.timeout)


async def cmd_claim(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    claims = ClaimService(ctx.pool, await ctx.client(), ctx.settings)
    result = await claims.claim(args.campaign, args.user)
    return dataclasses.asdict(result)


async def _claim_of(ctx: Context, coupon_id: str) -> ledger.Claim:
    claim = await ledger.get_claim(ctx.pool, coupon_id)
    if claim is None:
        raise Refused("unknown_coupon", f"no coupon {coupon_id!r}")
    return claim


@contextlib.asynccontextmanager
async def _open_coupon(claim: ledger.Claim) -> AsyncIterator[None]:
    """Turn "workflow already completed" into the answer a user can act on."""
    try:
        yield
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        if not claim.workflow_started:
            raise Unavailable(
                f"coupon {claim.coupon_id!r} has no workflow yet; the worker starts it within "
                "CLAIM_REPAIR_AFTER_S (or run `starter.py repair`), then try again"
            ) from err
        raise Refused(
            "coupon_finished", f"coupon {claim.coupon_id!r} is {claim.state}: it is finished"
        ) from err
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise Unavailable(
            "no worker answered in time (is the worker running?); the request stays queued "
            "and may still apply"
        ) from None


async def cmd_complete_task(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    claim = await _claim_of(ctx, args.coupon)
    async with _open_coupon(claim):
        return await _complete_task(ctx, claim, args)


async def _complete_task(
    ctx: Context, claim: ledger.Claim, args: argparse.Namespace
) -> dict[str, Any]:
    handle = (await ctx.client()).get_workflow_handle_for(UserCouponWorkflow.run, claim.workflow_id)
    completion = TaskCompletion(args.task)
    if args.wait:
        status = await handle.execute_update(
            UserCouponWorkflow.complete_task, completion, rpc_timeout=_wait(args)
        )
        return {
            "coupon_id": claim.coupon_id,
            "state": status.state,
            "tasks_done": status.tasks_done,
        }
    if args.task not in claim.required_tasks:
        known = ", ".join(claim.required_tasks) or "none"
        raise Refused(
            "unknown_task", f"unknown task {args.task!r}; this coupon's tasks are: {known}"
        )
    await handle.signal(UserCouponWorkflow.task_done, completion)
    return {"coupon_id": claim.coupon_id, "signalled": "task_done", "task": args.task}


async def cmd_cancel(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    claim = await _claim_of(ctx, args.coupon)
    async with _open_coupon(claim):
        return await _cancel(ctx, claim, args)


async def _cancel(ctx: Context, claim: ledger.Claim, args: argparse.Namespace) -> dict[str, Any]:
    handle = (await ctx.client()).get_workflow_handle_for(UserCouponWorkflow.run, claim.workflow_id)
    if args.no_wait:
        await handle.signal(UserCouponWorkflow.cancel, CancelRequest(args.reason))
        return {"coupon_id": claim.coupon_id, "signalled": "cancel"}
    status = await handle.execute_update(
        UserCouponWorkflow.cancel_coupon, CancelRequest(args.reason), rpc_timeout=_wait(args)
    )
    return {"coupon_id": claim.coupon_id, "state": status.state}


async def cmd_show(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    view = await ledger.coupon_view(ctx.pool, args.coupon)
    if view is None:
        raise Refused("unknown_coupon", f"no coupon {args.coupon!r}")
    claim: ledger.Claim = view["claim"]
    handle = (await ctx.client()).get_workflow_handle_for(UserCouponWorkflow.run, claim.workflow_id)
    workflow: CouponStatus | None = None
    try:
        workflow = await handle.query(UserCouponWorkflow.status)
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
    return {
        "coupon_id": claim.coupon_id,
        "campaign_id": claim.campaign_id,
        "user_id": claim.user_id,
        "state": claim.state,
        "workflow_id": claim.workflow_id,
        "workflow_state": workflow.state if workflow else None,
        "waiting_for": workflow.waiting_for if workflow else None,
        "tasks": {
            "required": claim.required_tasks,
            "done": workflow.tasks_done if workflow else None,
            "deadline": claim.task_deadline,
        },
        "claimed_at": claim.claimed_at,
        "receipt": view["receipt"],
        "events": view["events"],
    }


async def cmd_list(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    validate_id("campaign", args.campaign)
    if args.user is not None:
        validate_id("user", args.user)
    if not 1 <= args.limit <= 10_000:
        raise Refused("invalid_request", f"--limit {args.limit} must be between 1 and 10000")
    found = await ledger.list_claims(
        ctx.pool, args.campaign, user_id=args.user, state=args.state, limit=args.limit
    )
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


async def cmd_stats(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    validate_id("campaign", args.campaign)
    campaign = await get_campaign(ctx.pool, args.campaign)
    if campaign is None:
        raise Refused("unknown_campaign", f"no campaign {args.campaign!r}")
    return {
        "campaign_id": campaign.id,
        "quota": campaign.quota,
        "claimed": campaign.claimed,
        "remaining": campaign.quota - campaign.claimed,
        "states": await ledger.count_by_state(ctx.pool, campaign.id),
    }


async def cmd_repair(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    return {"repaired": await ClaimService(ctx.pool, await ctx.client(), ctx.settings).repair()}


COMMANDS: dict[str, Callable[[Context, argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "claim": cmd_claim,
    "complete-task": cmd_complete_task,
    "show": cmd_show,
    "cancel": cmd_cancel,
    "list": cmd_list,
    "stats": cmd_stats,
    "repair": cmd_repair,
}


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


async def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    # A short wait: a person at a prompt wants "PostgreSQL is down" now, not in 30 s.
    async with db.pool(settings.database_url, max_size=2, timeout_s=5) as pool:
        try:
            return await COMMANDS[args.command](Context(settings, pool), args)
        except (PoolTimeout, psycopg.OperationalError) as err:
            raise Unavailable(f"cannot reach PostgreSQL ({err})") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # psycopg_pool logs every failed connection attempt; the one-line error says it all.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    args = parser().parse_args(argv)
    try:
        result = asyncio.run(run(args, Settings.from_env()))
    except ConfigError as err:
        return _fail(2, str(err))
    except Refused as err:
        return _fail(2 if err.code in BAD_INPUT else 1, str(err))
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type:
            return _fail(2 if cause.type in BAD_INPUT else 1, f"{cause.type}: {cause.message}")
        return _fail(1, str(err))
    except Unavailable as err:
        return _fail(1, str(err))
    except RPCError as err:
        return _fail(1, f"Temporal answered {err.status.name}: {err}")
    try:
        print(json.dumps(result, default=_json_default, indent=2))
    except BrokenPipeError:
        pass  # the reader (`| head`) has seen enough
    return 0


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
