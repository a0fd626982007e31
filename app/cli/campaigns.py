"""Campaigns: `campaign create|update|list|show|pause|resume|end`, the campaigns that hand
out a batch."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from temporalio.client import WorkflowHandle, WorkflowQueryFailedError
from temporalio.service import RPCError

from app import service
from app.cli.args import (
    Commands,
    Nouns,
    duration_arg,
    ident,
    json_flag,
    rule,
    task_arg,
    tenant_flag,
    time_arg,
    timeout_flag,
)
from app.cli.render import (
    Answer,
    campaign_detail,
    campaign_json,
    campaign_table,
    expiry_view,
    states_table,
)
from app.service import CAMPAIGN_STATUSES, Backends, CampaignSpec, Unavailable
from coupons import validation as rules
from coupons.errors import InvalidField, Refused
from coupons.model import EndProgress
from workflows.end_campaign import EndCampaignWorkflow

# How long `campaign end` waits for a worker to answer the progress query.
PROGRESS_SILENCE_S = 30.0
PROGRESS_POLL_S = 0.3


def add_parsers(nouns: Nouns) -> None:
    p = nouns.add_parser("campaign", help="campaigns that hand out a batch")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="define a campaign (the same definition again is a no-op)")
    c.add_argument("--id", required=True, type=ident("campaign"))
    c.add_argument("--batch", required=True, type=ident("batch"))
    c.add_argument("--quota", type=rule(rules.QUOTA), required=True, help=f"({rules.QUOTA.range})")
    _campaign_fields(c)
    tenant_flag(c, "campaign (and its batch)")
    json_flag(c)
    u = sub.add_parser("update", help="change some fields; claims already made keep theirs")
    u.add_argument("campaign", type=ident("campaign"))
    u.add_argument("--batch", type=ident("batch"))
    u.add_argument("--quota", type=rule(rules.QUOTA), help=f"({rules.QUOTA.range})")
    _campaign_fields(u)
    u.add_argument("--no-tasks", action="store_true", help="no tasks: usable at claim")
    u.add_argument("--no-deadline", action="store_true", help="no task deadline")
    json_flag(u)
    ls = sub.add_parser("list", help="campaigns, with their claims against the quota")
    ls.add_argument("--batch", type=ident("batch"))
    ls.add_argument("--status", choices=CAMPAIGN_STATUSES)
    json_flag(ls)
    s = sub.add_parser("show", help="a campaign's definition, status and coupons by state")
    s.add_argument("campaign", type=ident("campaign"))
    json_flag(s)
    for action in ("pause", "resume"):
        a = sub.add_parser(action, help=f"{action} claims of the campaign")
        a.add_argument("campaign", type=ident("campaign"))
        json_flag(a)
    e = sub.add_parser("end", help="end the campaign for good; optionally expire its pending")
    e.add_argument("campaign", type=ident("campaign"))
    e.add_argument("--expire-pending", action="store_true", help="expire its received coupons too")
    e.add_argument(
        "--reason",
        type=rule(rules.REASON),
        help="the expired coupons' cause (default: campaign ended)",
    )
    e.add_argument("--no-wait", action="store_true", help="start the expiry and return")
    timeout_flag(e, PROGRESS_SILENCE_S, "seconds without an answer from a worker")
    json_flag(e)


def _campaign_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--per-user-limit", type=rule(rules.PER_USER_LIMIT), help=rules.PER_USER_LIMIT.range
    )
    p.add_argument(
        "--task",
        action="append",
        type=task_arg,
        metavar="KEY[=Display name]",
        help="a required task (repeatable; all must be done; on update, replaces the list)",
    )
    p.add_argument(
        "--deadline",
        type=duration_arg("--deadline"),
        help=f"task deadline after the claim: {rules.DURATION_FORMS}",
    )
    p.add_argument(
        "--deadline-at",
        type=time_arg("--deadline-at"),
        help="fixed task deadline (ISO time with a timezone)",
    )
    p.add_argument(
        "--starts-at", type=time_arg("--starts-at"), help="claims open (ISO time with a timezone)"
    )
    p.add_argument(
        "--ends-at", type=time_arg("--ends-at"), help="claims close (ISO time with a timezone)"
    )
    p.add_argument("--name", type=rule(rules.NAME))


def _campaign_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The CampaignSpec fields the flags give, parsed; absent flags are left out."""
    changes: dict[str, Any] = {
        "batch_id": args.batch,
        "quota": args.quota,
        "per_user_limit": args.per_user_limit,
        "name": args.name,
        "tasks": args.task,
        "task_deadline": args.deadline,
        "deadline_at": args.deadline_at,
        "starts_at": args.starts_at,
        "ends_at": args.ends_at,
    }
    return {field: value for field, value in changes.items() if value is not None}


async def cmd_campaign_create(b: Backends, args: argparse.Namespace) -> Answer:
    tenant_id = await service.known_tenant(b, args.tenant)
    fields = _campaign_changes(args)
    spec = CampaignSpec(id=args.id, tenant_id=tenant_id, **fields)
    campaign, created = await service.create_campaign(b, spec)
    data = {**campaign_json(campaign), "created": created}
    return Answer(data, lambda: campaign_detail(campaign))


async def cmd_campaign_update(b: Backends, args: argparse.Namespace) -> Answer:
    changes = _campaign_changes(args)
    if args.no_tasks:
        if "tasks" in changes:
            raise InvalidField("--no-tasks", "give either --task or --no-tasks, not both")
        changes["tasks"] = []
    if args.no_deadline:
        if "task_deadline" in changes or "deadline_at" in changes:
            raise InvalidField(
                "--no-deadline", "give either --deadline/--deadline-at or --no-deadline, not both"
            )
        changes["task_deadline"] = changes["deadline_at"] = None
    if not changes:
        raise Refused("invalid_request", "nothing to change: give at least one field's flag")
    campaign = await service.update_campaign(b, args.campaign, **changes)
    return Answer(campaign_json(campaign), lambda: campaign_detail(campaign))


async def cmd_campaign_list(b: Backends, args: argparse.Namespace) -> Answer:
    campaigns = await service.list_campaigns(b, service.CampaignFilter(args.batch, args.status))
    return Answer(
        {"campaigns": [campaign_json(c) for c in campaigns]},
        lambda: [campaign_table(campaigns)] if campaigns else [Text("no campaigns")],
    )


async def cmd_campaign_show(b: Backends, args: argparse.Namespace) -> Answer:
    campaign = await service.get_campaign(b, args.campaign)
    states = await service.count_by_state(b, campaign.id)
    data = {**campaign_json(campaign), "states": states}
    return Answer(data, lambda: [*campaign_detail(campaign), Text(""), states_table(states)])


async def cmd_campaign_status(b: Backends, args: argparse.Namespace) -> Answer:
    campaign = await service.change_campaign_status(b, args.campaign, args.action)
    return Answer(campaign_json(campaign), lambda: campaign_detail(campaign))


async def cmd_campaign_end(b: Backends, args: argparse.Namespace) -> Answer:
    if not args.expire_pending:
        for flag, given in (("--reason", args.reason is not None), ("--no-wait", args.no_wait)):
            if given:
                raise InvalidField(flag, "applies only with --expire-pending")
    silence_s = float(args.timeout)
    if not args.expire_pending:
        # Only the catalog changes (as for pause and resume): Temporal need not be up.
        campaign = await service.change_campaign_status(b, args.campaign, "end")
        data = {**campaign_json(campaign), "expiry": None}
        return Answer(data, lambda: campaign_detail(campaign))
    campaign, workflow_id = await service.end_campaign(
        b, args.campaign, expire_pending=True, reason=args.reason
    )
    assert workflow_id is not None  # expire_pending: the expiry was started
    expiry: dict[str, Any] = {"workflow_id": workflow_id, "done": False}
    if not args.no_wait:
        client = await b.client()
        handle: WorkflowHandle[EndCampaignWorkflow, EndProgress] = client.get_workflow_handle_for(
            EndCampaignWorkflow.run, workflow_id
        )
        progress = await _follow_expiry(handle, campaign.id, silence_s)
        expiry = {"workflow_id": workflow_id, **dataclasses.asdict(progress)}
    data = {**campaign_json(campaign), "expiry": expiry}
    return Answer(data, lambda: [*campaign_detail(campaign), Text(""), expiry_view(expiry)])


async def _follow_expiry(
    handle: WorkflowHandle[Any, EndProgress], campaign_id: str, silence_s: float
) -> EndProgress:
    """Wait for the expiry, drawing its `progress` query as a bar on stderr."""
    loop = asyncio.get_running_loop()
    result = asyncio.ensure_future(handle.result())
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    )
    last_answer, why = loop.time(), "no answer yet"
    try:
        with bar:
            task = bar.add_task(f"expiring received coupons of {campaign_id}", total=None)
            while not result.done():
                try:
                    progress = await handle.query(
                        EndCampaignWorkflow.progress,
                        rpc_timeout=timedelta(seconds=min(5.0, silence_s)),
                    )
                except (RPCError, WorkflowQueryFailedError) as err:
                    why = str(err)
                    if loop.time() - last_answer > silence_s:
                        raise Unavailable(
                            f"no worker answered for {silence_s:g} s ({why}); is the worker "
                            f"running? The expiry goes on in workflow {handle.id}"
                        ) from None
                else:
                    last_answer = loop.time()
                    done = progress.expired + progress.skipped
                    bar.update(task, total=progress.total or None, completed=done)
                await asyncio.wait({result}, timeout=PROGRESS_POLL_S)
            final = result.result()
            bar.update(task, total=final.total, completed=final.expired + final.skipped)
            return final
    finally:
        result.cancel()


COMMANDS: Commands = {
    "campaign create": cmd_campaign_create,
    "campaign update": cmd_campaign_update,
    "campaign list": cmd_campaign_list,
    "campaign show": cmd_campaign_show,
    "campaign pause": cmd_campaign_status,
    "campaign resume": cmd_campaign_status,
    "campaign end": cmd_campaign_end,
}
