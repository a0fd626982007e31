"""The command line an app or operator uses (`python starter.py ...`).

Coupons: `claim`, `complete-task`, `show`, `cancel`, `list`, `stats`, `repair` print JSON.
Catalog: `batch create|list|show|start|pause|resume|stop|sync`,
`campaign create|update|list|show|pause|resume|end`, `reconcile` and `report` (a
campaign's funnel, with a PNG chart) print a table, or JSON with `--json`.
`batch create` and `campaign create` take `--tenant ID` (default `default`): the tenant
that owns what they create; the other catalog commands see every tenant's (`report
--tenant ID` only that tenant's).
Tenants (the apps that call the HTTP API) and their keys: `tenant create|list`,
`key create|list|revoke` print JSON; a new key's secret (`api_key`) is printed once, by
the command that creates it, and is never stored or shown again.

Exit codes: 0 success; 2 refused, by the service or for bad input (`error: <code>:
<message>` on stderr, with a stable code such as `sold_out`, `campaign_closed`,
`unknown_task`, `invalid_request`); 1 a part that cannot be reached (PostgreSQL,
Temporal, the platform, no worker answering in time) or an unexpected error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from rich import box
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.service import RPCError

from app import doctor, service, wedged
from app.claims import ClaimService
from app.running import settings_from_env, stack_for
from app.service import Unavailable
from coupons import catalog, codec, report, tenants
from coupons import validation as rules
from coupons.config import ConfigError, Settings
from coupons.contract import CATALOG_SYNC_WORKFLOW, RECONCILE_WORKFLOW
from coupons.errors import InvalidField, Refused
from coupons.ledger import campaigns as catalog_ledger
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.ledger import tenants as tenant_ledger
from coupons.ledger.campaigns import CAMPAIGN_STATUSES, Batch, Campaign, CampaignSpec, Task
from coupons.ledger.tenants import DEFAULT_TENANT, ApiKey
from coupons.lifecycle import STATES
from coupons.model import (
    BatchReconciliation,
    BatchSync,
    EndProgress,
    ReconcileInput,
    ReconcileReport,
    SyncInput,
    SyncReport,
)
from coupons.platforms.base import BatchAction, Platform, PlatformError
from coupons.platforms.configured import make_platform
from coupons.temporal import connect
from workflows.end_campaign import EndCampaignWorkflow

# How long an update waits for a worker to answer before the command gives up.
UPDATE_WAIT_S = 20.0
# How long `batch sync` and `reconcile` wait for their workflow's answer.
SYNC_WAIT_S = 60.0
RECONCILE_WAIT_S = 300.0
# How long `campaign end` waits for a worker to answer the progress query.
PROGRESS_SILENCE_S = 30.0
PROGRESS_POLL_S = 0.3

R = TypeVar("R")


@dataclass
class Answer:
    """What a catalog command answers: `data` for `--json`, `view` for a person.

    `error` marks a partial failure: the answer is printed, then the error, exit 1.
    """

    data: dict[str, Any]
    view: Callable[[], list[RenderableType]]
    error: str | None = None


class Context:
    """What a command needs; Temporal and the platform are reached only by the commands
    that use them."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool) -> None:
        self.settings = settings
        self.pool = pool
        self._client: Client | None = None
        self._platform: Platform | None = None

    async def client(self) -> Client:
        if self._client is None:
            try:
                self._client = await connect(self.settings.with_stack_secrets())
            except RuntimeError as err:
                raise Unavailable(
                    f"cannot reach Temporal at {self.settings.temporal_address} ({err}); "
                    "is `make run` up, with the same environment as this shell?"
                ) from None
        return self._client

    def platform(self) -> Platform:
        if self._platform is None:
            self._platform = make_platform(self.settings.with_stack_secrets())
        return self._platform

    async def aclose(self) -> None:
        if self._platform is not None:
            await self._platform.aclose()


# ------------------------------------------------------------------ arguments


class _Parser(argparse.ArgumentParser):
    """Bad input on the command line is answered like every refusal: one line, with the
    code `invalid_request` and the flag named, exit 2 (subcommands' parsers are this class)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):
            message = message.removeprefix("argument ")
        self.exit(2, f"error: invalid_request: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        return importlib.metadata.version("coupon-lifecycle")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "(not installed)"


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="starter.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    codec.add_commands(sub.add_parser("codec", help="payload encryption keys: init, rotate, show"))
    c = sub.add_parser("claim", help="claim a coupon of a campaign for a user")
    c.add_argument("--campaign", required=True, type=_id("campaign"))
    c.add_argument("--user", required=True, type=_id("user"))
    t = sub.add_parser("complete-task", help="report that the coupon's user completed a task")
    t.add_argument("--coupon", required=True, type=_coupon_id)
    t.add_argument("--task", required=True, type=_id("task"))
    t.add_argument("--wait", action="store_true", help="use the update: answer with the new state")
    _timeout_flag(t, UPDATE_WAIT_S, "seconds --wait waits")
    s = sub.add_parser("show", help="print a coupon's state, tasks, receipt and events")
    s.add_argument("--coupon", required=True, type=_coupon_id)
    x = sub.add_parser("cancel", help="cancel a coupon that is not yet sent to the platform")
    x.add_argument("--coupon", required=True, type=_coupon_id)
    x.add_argument("--reason", default="cancelled by operator", type=_rule(rules.REASON))
    x.add_argument("--no-wait", action="store_true", help="send the signal and do not wait")
    _timeout_flag(x, UPDATE_WAIT_S, "seconds to wait")
    ls = sub.add_parser("list", help="list a campaign's coupons (from the ledger)")
    ls.add_argument("--campaign", required=True, type=_id("campaign"))
    ls.add_argument("--user", type=_id("user"))
    ls.add_argument("--state", choices=STATES)
    ls.add_argument("--limit", type=_rule(rules.LIST_LIMIT), default=100, help="at most this many")
    st = sub.add_parser("stats", help="count a campaign's coupons by state (from the ledger)")
    st.add_argument("--campaign", required=True, type=_id("campaign"))
    sub.add_parser("repair", help="start the workflows of claims that lack one")
    _coupon_parser(sub.add_parser("coupon", help="coupons whose workflow cannot progress"))
    _json_flag(
        sub.add_parser(
            "doctor",
            help="which stack this shell speaks to, and each part's health (exit 0: all well)",
        )
    )
    _batch_parser(sub.add_parser("batch", help="coupon batches at the platform"))
    _campaign_parser(sub.add_parser("campaign", help="campaigns that hand out a batch"))
    _tenant_parser(sub.add_parser("tenant", help="tenants: the apps that call the HTTP API"))
    _key_parser(sub.add_parser("key", help="a tenant's API keys"))
    r = sub.add_parser("reconcile", help="compare the platform's flow files with the ledger")
    r.add_argument("--batch", type=_id("batch"), help="one batch (default: every batch)")
    r.add_argument("--no-repair", action="store_true", help="report only, repair nothing")
    _timeout_flag(r, RECONCILE_WAIT_S, "seconds to wait for the reconciliation")
    _json_flag(r)
    f = sub.add_parser("report", help="a campaign's funnel from the ledger, with a PNG chart")
    f.add_argument("--campaign", required=True, type=_id("campaign"))
    f.add_argument(
        "--out", help="the chart's path, a .png (default: DATA_DIR/reports/<campaign>-<date>.png)"
    )
    f.add_argument(
        "--tenant", type=_id("tenant"), help="only this tenant's campaign (default: any tenant's)"
    )
    _json_flag(f)
    return p


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _timeout_flag(p: argparse.ArgumentParser, default: float, help: str) -> None:
    p.add_argument(
        "--timeout",
        type=_rule(rules.TIMEOUT),
        default=default,
        help=f"{help} (default {default:g}; {rules.TIMEOUT.range})",
    )


def _tenant_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--tenant",
        default=DEFAULT_TENANT,
        type=_id("tenant"),
        help=f"the tenant that owns the {what} (default: %(default)s)",
    )


def _coupon_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    w = sub.add_parser("wedged", help="coupons whose workflow cannot make progress, with the cause")
    w.add_argument(
        "--limit", type=_rule(rules.LIST_LIMIT), default=1000, help="at most this many per cause"
    )
    _json_flag(w)
    r = sub.add_parser(
        "recover", help="recover a wedged coupon from the ledger's state (never sends twice)"
    )
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("coupon", nargs="?", type=_coupon_id, help="the coupon to recover")
    which.add_argument("--all", action="store_true", help="every coupon `coupon wedged` lists")
    _json_flag(r)


def _batch_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a batch at the platform (idempotent) and start it")
    c.add_argument("--id", required=True, type=_id("batch"), help="our batch id")
    c.add_argument(
        "--quantity",
        type=_rule(rules.QUANTITY),
        required=True,
        help=f"coupons the batch holds ({rules.QUANTITY.range})",
    )
    # Money in cents, as both platforms count it; the unit is in the flag's name.
    c.add_argument(
        "--value-cents",
        "--value",
        dest="value",
        type=_rule(rules.FACE_VALUE_CENTS),
        help="face value in cents (default 500 = 5.00)",
    )
    c.add_argument(
        "--min-spend-cents",
        "--min-spend",
        dest="min_spend",
        type=_rule(rules.MIN_SPEND_CENTS),
        help="minimum spend in cents (default 0: none)",
    )
    c.add_argument(
        "--valid-days",
        type=_rule(rules.VALID_DAYS),
        help="days a sent coupon is valid (default: the window given, else 30)",
    )
    c.add_argument(
        "--per-user-limit",
        type=_rule(rules.PER_USER_LIMIT),
        help="coupons per user at the platform",
    )
    c.add_argument("--name", type=_rule(rules.NAME))
    c.add_argument(
        "--starts-at",
        type=_time_arg("--starts-at"),
        help="ISO time with a timezone, e.g. 2026-06-01T00:00+08:00",
    )
    c.add_argument("--ends-at", type=_time_arg("--ends-at"), help="ISO time with a timezone")
    c.add_argument("--no-start", action="store_true", help="create it, do not start it")
    _tenant_flag(c, "batch")
    _json_flag(c)
    _json_flag(sub.add_parser("list", help="every batch as last synced"))
    s = sub.add_parser("show", help="one batch as last synced, with its campaigns")
    s.add_argument("batch", type=_id("batch"))
    _json_flag(s)
    for action in BatchAction:
        a = sub.add_parser(action.value, help=f"{action.value} the batch at the platform")
        a.add_argument("batch", type=_id("batch"))
        _json_flag(a)
    y = sub.add_parser("sync", help="read batches at the platform now (the catalog sync)")
    y.add_argument(
        "--batch",
        action="append",
        type=_id("batch"),
        help="a batch to sync (repeatable; default: all in use)",
    )
    _timeout_flag(y, SYNC_WAIT_S, "seconds to wait for the sync")
    _json_flag(y)


def _campaign_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="define a campaign (the same definition again is a no-op)")
    c.add_argument("--id", required=True, type=_id("campaign"))
    c.add_argument("--batch", required=True, type=_id("batch"))
    c.add_argument("--quota", type=_rule(rules.QUOTA), required=True, help=f"({rules.QUOTA.range})")
    _campaign_fields(c)
    _tenant_flag(c, "campaign (and its batch)")
    _json_flag(c)
    u = sub.add_parser("update", help="change some fields; claims already made keep theirs")
    u.add_argument("campaign", type=_id("campaign"))
    u.add_argument("--batch", type=_id("batch"))
    u.add_argument("--quota", type=_rule(rules.QUOTA), help=f"({rules.QUOTA.range})")
    _campaign_fields(u)
    u.add_argument("--no-tasks", action="store_true", help="no tasks: usable at claim")
    u.add_argument("--no-deadline", action="store_true", help="no task deadline")
    _json_flag(u)
    ls = sub.add_parser("list", help="campaigns, with their claims against the quota")
    ls.add_argument("--batch", type=_id("batch"))
    ls.add_argument("--status", choices=CAMPAIGN_STATUSES)
    _json_flag(ls)
    s = sub.add_parser("show", help="a campaign's definition, status and coupons by state")
    s.add_argument("campaign", type=_id("campaign"))
    _json_flag(s)
    for action in ("pause", "resume"):
        a = sub.add_parser(action, help=f"{action} claims of the campaign")
        a.add_argument("campaign", type=_id("campaign"))
        _json_flag(a)
    e = sub.add_parser("end", help="end the campaign for good; optionally expire its pending")
    e.add_argument("campaign", type=_id("campaign"))
    e.add_argument("--expire-pending", action="store_true", help="expire its received coupons too")
    e.add_argument(
        "--reason",
        type=_rule(rules.REASON),
        help="the expired coupons' cause (default: campaign ended)",
    )
    e.add_argument("--no-wait", action="store_true", help="start the expiry and return")
    _timeout_flag(e, PROGRESS_SILENCE_S, "seconds without an answer from a worker")
    _json_flag(e)


def _tenant_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="a new tenant and its first key (scope admin), shown once")
    c.add_argument("--name", required=True, type=_rule(rules.NAME), help="unique")
    sub.add_parser("list", help="every tenant")


def _key_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="a new API key of a tenant; its secret is shown once")
    c.add_argument("--tenant", required=True, type=_id("tenant"))
    c.add_argument("--scope", required=True, choices=tenants.SCOPES)
    ls = sub.add_parser("list", help="a tenant's keys: ids, scopes, times (never secrets)")
    ls.add_argument("--tenant", required=True, type=_id("tenant"))
    r = sub.add_parser("revoke", help="revoke a key for good (again is a no-op)")
    r.add_argument("key", type=_id("key"))


def _campaign_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--per-user-limit", type=_rule(rules.PER_USER_LIMIT), help=rules.PER_USER_LIMIT.range
    )
    p.add_argument(
        "--task",
        action="append",
        type=_task_arg,
        metavar="KEY[=Display name]",
        help="a required task (repeatable; all must be done; on update, replaces the list)",
    )
    p.add_argument(
        "--deadline",
        type=_duration_arg("--deadline"),
        help=f"task deadline after the claim: {rules.DURATION_FORMS}",
    )
    p.add_argument(
        "--deadline-at",
        type=_time_arg("--deadline-at"),
        help="fixed task deadline (ISO time with a timezone)",
    )
    p.add_argument(
        "--starts-at", type=_time_arg("--starts-at"), help="claims open (ISO time with a timezone)"
    )
    p.add_argument(
        "--ends-at", type=_time_arg("--ends-at"), help="claims close (ISO time with a timezone)"
    )
    p.add_argument("--name", type=_rule(rules.NAME))


T = TypeVar("T")


@dataclass(frozen=True)
class _Arg(Generic[T]):
    """An argparse `type=` checking one rule of coupons.validation: a refusal becomes
    argparse's own error (exit 2 naming the flag) before anything connects, writes or calls
    the platform. `rule` is the rule's name, as the README's bad-input table gives it."""

    rule: str
    parse: Callable[[str], T]

    def __call__(self, text: str) -> T:
        try:
            return self.parse(text)
        except InvalidField as err:
            raise argparse.ArgumentTypeError(err.detail) from None


def _rule(rule: rules.Whole | rules.Text | rules.Seconds) -> _Arg[Any]:
    if isinstance(rule, rules.Text):
        return _Arg(rule.name, lambda text: rule.check("", text))
    return _Arg(rule.name, lambda text: rule.parse("", text))


def _id(kind: str) -> _Arg[str]:
    return _Arg(rules.ID, lambda text: rules.validate_id(kind, text))


_coupon_id = _Arg(rules.COUPON_ID, rules.validate_coupon_id)


def _task(text: str) -> Task:
    """`KEY[=Display name]`: the key an id, the name (the key when absent) printable text."""
    key, given, name = text.partition("=")
    return Task(
        rules.validate_id("task", key), rules.NAME.check("task name", name) if given else key
    )


_task_arg = _Arg(rules.TASK, _task)


def _time_arg(flag: str) -> _Arg[datetime]:
    return _Arg(rules.TIME, lambda text: rules.parse_time(flag, text))


def _duration_arg(flag: str) -> _Arg[timedelta]:
    return _Arg(rules.DURATION, lambda text: rules.parse_duration(flag, text))


def _wait(args: argparse.Namespace) -> timedelta:
    return timedelta(seconds=args.timeout)


# ------------------------------------------------------------------ coupons


async def cmd_claim(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    result = await service.claim(
        ctx.pool, await ctx.client(), ctx.settings, args.campaign, args.user
    )
    return dataclasses.asdict(result)


async def cmd_complete_task(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    client = await ctx.client()
    if args.wait:
        status = await service.complete_task(
            ctx.pool, client, args.coupon, args.task, wait=_wait(args)
        )
        return {"coupon_id": args.coupon, "state": status.state, "tasks_done": status.tasks_done}
    await service.report_task(ctx.pool, client, args.coupon, args.task)
    return {"coupon_id": args.coupon, "signalled": "task_done", "task": args.task}


async def cmd_cancel(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    wait = None if args.no_wait else _wait(args)
    status = await service.cancel(ctx.pool, await ctx.client(), args.coupon, args.reason, wait=wait)
    if status is None:
        return {"coupon_id": args.coupon, "signalled": "cancel"}
    return {"coupon_id": args.coupon, "state": status.state}


async def cmd_show(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    view = await service.show_coupon(ctx.pool, await ctx.client(), args.coupon)
    claim, workflow = view.claim, view.workflow
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
        "receipt": view.receipt,
        "events": view.events,
    }


async def cmd_list(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
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
    campaign = await catalog.get_campaign(ctx.pool, args.campaign)
    return {
        "campaign_id": campaign.id,
        "quota": campaign.quota,
        "claimed": campaign.claimed,
        "remaining": campaign.quota - campaign.claimed,
        "states": await ledger.count_by_state(ctx.pool, campaign.id),
    }


async def cmd_repair(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    return {"repaired": await ClaimService(ctx.pool, await ctx.client(), ctx.settings).repair()}


async def cmd_coupon_wedged(ctx: Context, args: argparse.Namespace) -> Answer:
    found = await wedged.find_wedged(ctx.pool, await ctx.client(), ctx.settings, limit=args.limit)
    counts = wedged.count_by_cause(found)
    return Answer(
        {"wedged": found, "by_cause": counts},
        lambda: _wedged_view(found, counts),
    )


async def cmd_coupon_recover(ctx: Context, args: argparse.Namespace) -> Answer:
    client = await ctx.client()
    if args.all:
        done = await wedged.recover_all(ctx.pool, client, ctx.settings)
    else:
        done = [await wedged.recover(ctx.pool, client, ctx.settings, args.coupon)]
    failed = [r.coupon_id for r in done if r.action == "error"]
    return Answer(
        {"recovered": done},
        lambda: _recovery_view(done),
        error=f"{len(failed)} not recovered: {', '.join(failed)}" if failed else None,
    )


# ------------------------------------------------------------------ batches


async def cmd_batch_create(ctx: Context, args: argparse.Namespace) -> Answer:
    # Checked first: the batch would be created at the platform before the ledger refused it.
    tenant_id = await _known_tenant(ctx, args.tenant)
    given = {
        "face_value_cents": args.value,
        "min_spend_cents": args.min_spend,
        "valid_days": args.valid_days,
        "per_user_limit": args.per_user_limit,
    }
    batch = await catalog.create_batch(
        ctx.pool,
        ctx.platform(),
        args.id,
        quantity=args.quantity,
        name=args.name,
        starts_at=args.starts_at,
        ends_at=args.ends_at,
        start=not args.no_start,
        tenant_id=tenant_id,
        **{field: value for field, value in given.items() if value is not None},
    )
    return Answer(_batch_json(batch), lambda: _batch_detail(batch))


async def cmd_batch_list(ctx: Context, args: argparse.Namespace) -> Answer:
    batches = await catalog_ledger.list_batches(ctx.pool)
    return Answer(
        {"batches": [_batch_json(b) for b in batches]},
        lambda: [_batch_table(batches)] if batches else [Text("no batches")],
    )


async def cmd_batch_show(ctx: Context, args: argparse.Namespace) -> Answer:
    batch = await catalog.get_batch(ctx.pool, args.batch)
    campaigns = await catalog_ledger.list_campaigns(ctx.pool, batch_id=batch.id)
    data = _batch_json(batch)
    data["campaigns"] = [
        {"id": c.id, "status": c.status, "quota": c.quota, "claimed": c.claimed} for c in campaigns
    ]
    return Answer(
        data,
        lambda: [
            *_batch_detail(batch),
            Text(""),
            _campaign_table(campaigns) if campaigns else Text("no campaigns use it"),
        ],
    )


async def cmd_batch_change(ctx: Context, args: argparse.Namespace) -> Answer:
    action = BatchAction(args.action)
    # Pausing or stopping a runaway batch must not wait for Temporal: only an action after
    # which the batch sends again needs it (to wake the coupons waiting for it).
    client = await ctx.client() if action in service.SENDS_AGAIN else None
    batch = await service.change_batch(
        ctx.pool, client, ctx.settings, ctx.platform(), args.batch, action
    )
    return Answer(_batch_json(batch), lambda: _batch_detail(batch))


async def cmd_batch_sync(ctx: Context, args: argparse.Namespace) -> Answer:
    timeout_s = float(args.timeout)
    batch_ids = None
    if args.batch:
        # Refused here, at once: the workflow would retry an unknown batch before giving up.
        batch_ids = list(dict.fromkeys(args.batch))
        for batch_id in batch_ids:
            await catalog.get_batch(ctx.pool, batch_id)
    workflow_id = f"catalog-sync:manual:{uuid.uuid4()}"
    report = await _run_workflow(
        ctx, CATALOG_SYNC_WORKFLOW, SyncInput(batch_ids), workflow_id, SyncReport, timeout_s
    )
    data = {
        "workflow_id": workflow_id,
        "batches": report.batches,
        "drifted": len(report.drifted),
        "failed": report.failed,
    }
    error = None
    if report.failed:
        error = f"{len(report.failed)} batches could not be synced: " + "; ".join(report.failed)
    return Answer(data, lambda: _sync_view(report), error)


# ------------------------------------------------------------------ campaigns


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


async def cmd_campaign_create(ctx: Context, args: argparse.Namespace) -> Answer:
    tenant_id = await _known_tenant(ctx, args.tenant)
    fields = _campaign_changes(args)
    spec = CampaignSpec(id=args.id, tenant_id=tenant_id, **fields)
    campaign, created = await catalog.create_campaign(ctx.pool, spec)
    data = {**_campaign_json(campaign), "created": created}
    return Answer(data, lambda: _campaign_detail(campaign))


async def cmd_campaign_update(ctx: Context, args: argparse.Namespace) -> Answer:
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
    campaign = await catalog.update_campaign(ctx.pool, args.campaign, **changes)
    return Answer(_campaign_json(campaign), lambda: _campaign_detail(campaign))


async def cmd_campaign_list(ctx: Context, args: argparse.Namespace) -> Answer:
    campaigns = await catalog_ledger.list_campaigns(
        ctx.pool, batch_id=args.batch, status=args.status
    )
    return Answer(
        {"campaigns": [_campaign_json(c) for c in campaigns]},
        lambda: [_campaign_table(campaigns)] if campaigns else [Text("no campaigns")],
    )


async def cmd_campaign_show(ctx: Context, args: argparse.Namespace) -> Answer:
    campaign = await catalog.get_campaign(ctx.pool, args.campaign)
    states = await ledger.count_by_state(ctx.pool, campaign.id)
    data = {**_campaign_json(campaign), "states": states}
    return Answer(data, lambda: [*_campaign_detail(campaign), Text(""), _states_table(states)])


async def cmd_campaign_status(ctx: Context, args: argparse.Namespace) -> Answer:
    campaign = await catalog.change_campaign_status(ctx.pool, args.campaign, args.action)
    return Answer(_campaign_json(campaign), lambda: _campaign_detail(campaign))


async def cmd_campaign_end(ctx: Context, args: argparse.Namespace) -> Answer:
    if not args.expire_pending:
        for flag, given in (("--reason", args.reason is not None), ("--no-wait", args.no_wait)):
            if given:
                raise InvalidField(flag, "applies only with --expire-pending")
    silence_s = float(args.timeout)
    if not args.expire_pending:
        # Only the catalog changes (as for pause and resume): Temporal need not be up.
        campaign = await catalog.change_campaign_status(ctx.pool, args.campaign, "end")
        data = {**_campaign_json(campaign), "expiry": None}
        return Answer(data, lambda: _campaign_detail(campaign))
    client = await ctx.client()
    campaign, workflow_id = await service.end_campaign(
        ctx.pool, client, ctx.settings, args.campaign, expire_pending=True, reason=args.reason
    )
    assert workflow_id is not None  # expire_pending: the expiry was started
    expiry: dict[str, Any] = {"workflow_id": workflow_id, "done": False}
    if not args.no_wait:
        handle = client.get_workflow_handle_for(EndCampaignWorkflow.run, workflow_id)
        progress = await _follow_expiry(handle, campaign.id, silence_s)
        expiry = {"workflow_id": workflow_id, **dataclasses.asdict(progress)}
    data = {**_campaign_json(campaign), "expiry": expiry}
    return Answer(data, lambda: [*_campaign_detail(campaign), Text(""), _expiry_view(expiry)])


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


# ------------------------------------------------------------------ tenants and keys


async def _known_tenant(ctx: Context, tenant_id: str) -> str:
    if await tenant_ledger.get_tenant(ctx.pool, tenant_id) is None:
        raise Refused("unknown_tenant", f"no tenant {tenant_id!r}")
    return tenant_id


async def cmd_tenant_create(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    tenant, key = await tenants.create_tenant(ctx.pool, args.name)
    return {
        "tenant_id": tenant.id,
        "name": tenant.name,
        "created_at": tenant.created_at,
        "key_id": key.key_id,
        "scope": key.scope,
        # The only time the secret is shown: only its digest is stored.
        "api_key": key.api_key,
    }


async def cmd_tenant_list(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    found = await tenant_ledger.list_tenants(ctx.pool)
    return {"tenants": [{"id": t.id, "name": t.name, "created_at": t.created_at} for t in found]}


async def cmd_key_create(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    key = await tenants.create_key(ctx.pool, args.tenant, args.scope)
    return {
        "tenant_id": key.tenant_id,
        "key_id": key.key_id,
        "scope": key.scope,
        "api_key": key.api_key,
    }


def _key_json(key: ApiKey) -> dict[str, Any]:
    """A key as lists show it: never its secret, nor the secret's digest."""
    return {
        "key_id": key.id,
        "tenant_id": key.tenant_id,
        "scope": key.scope,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }


async def cmd_key_list(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    tenant_id = await _known_tenant(ctx, args.tenant)
    found = await tenant_ledger.list_keys(ctx.pool, tenant_id)
    return {"tenant_id": tenant_id, "keys": [_key_json(k) for k in found]}


async def cmd_key_revoke(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    return _key_json(await tenants.revoke_key(ctx.pool, args.key))


# ------------------------------------------------------------------ reconciliation


async def cmd_reconcile(ctx: Context, args: argparse.Namespace) -> Answer:
    timeout_s = float(args.timeout)
    if args.batch is not None:
        # Refused here, at once: the workflow would retry an unknown batch before giving up.
        await catalog.get_batch(ctx.pool, args.batch)
    workflow_id = f"reconcile:manual:{uuid.uuid4()}"
    report = await _run_workflow(
        ctx,
        RECONCILE_WORKFLOW,
        ReconcileInput(args.batch, repair=not args.no_repair),
        workflow_id,
        ReconcileReport,
        timeout_s,
    )
    data = {
        "workflow_id": workflow_id,
        "mismatches": report.mismatches,
        "repaired": report.repaired,
        "batches": report.batches,
    }
    return Answer(data, lambda: _reconcile_view(report))


async def _run_workflow(
    ctx: Context, workflow: str, arg: object, workflow_id: str, result: type[R], timeout_s: float
) -> R:
    handle: WorkflowHandle[Any, R] = await (await ctx.client()).start_workflow(
        workflow, arg, id=workflow_id, task_queue=ctx.settings.task_queue, result_type=result
    )
    try:
        async with asyncio.timeout(timeout_s):
            return await handle.result()
    except TimeoutError:
        raise Unavailable(
            f"workflow {workflow_id} did not finish within {timeout_s:g} s (is the worker "
            f"polling task queue {ctx.settings.task_queue!r}?); it stays queued and runs then"
        ) from None


# ------------------------------------------------------------------ funnel report


async def cmd_report(ctx: Context, args: argparse.Namespace) -> Answer:
    tenant_id = None if args.tenant is None else await _known_tenant(ctx, args.tenant)
    if args.out is not None and not args.out.lower().endswith(".png"):
        raise InvalidField("--out", f"{args.out!r} must end in .png: the chart is a PNG")
    funnel = await report.funnel_report(ctx.pool, args.campaign, tenant_id)
    path = Path(args.out) if args.out else report.default_chart_path(ctx.settings.data_dir, funnel)
    try:
        chart = (await asyncio.to_thread(report.draw, funnel, path)).resolve()
    except OSError as err:
        raise InvalidField("--out", f"cannot write the chart to {str(path)!r}: {err}") from None
    return Answer(_report_json(funnel, chart), lambda: _report_view(funnel, chart))


def _report_json(funnel: report.FunnelReport, chart: Path) -> dict[str, Any]:
    times = funnel.task_times
    return {
        "campaign_id": funnel.campaign_id,
        "tenant_id": funnel.tenant_id,
        "at": funnel.at,
        "funnel": {s.name: s.coupons for s in funnel.stages},
        "exits": {e.name: e.coupons for e in funnel.exits},
        "conversion": funnel.conversion(),
        "states": {state: funnel.states[state] for state in STATES if state in funnel.states},
        "claim_to_task": {
            "coupons": times.coupons,
            "p50_s": times.p50_s,
            "p90_s": times.p90_s,
            "p99_s": times.p99_s,
            "max_s": times.max_s,
            "histogram": [
                {"bin": b.label, "from_s": b.from_s, "to_s": b.to_s, "coupons": b.coupons}
                for b in times.bins
            ],
        },
        "claims_per_day": [
            {"day": d.day.isoformat(), "claims": d.claims} for d in funnel.claims_per_day
        ],
        "chart": str(chart),
    }


def _report_view(funnel: report.FunnelReport, chart: Path) -> list[RenderableType]:
    title = Text(
        f"campaign {funnel.campaign_id} (tenant {funnel.tenant_id}), from the ledger at "
        f"{_time(funnel.at)}"
    )
    if not funnel.claimed:
        return [title, Text("no claims yet"), Text(f"chart: {chart}")]
    stages = _table("stage", "coupons", "of the stage before", "of claimed")
    for s in funnel.stages:
        stages.add_row(
            s.name, str(s.coupons), report.percent(s.from_previous), report.percent(s.from_claimed)
        )
    exits = _table("exit", "coupons", "of claimed")
    for e in funnel.exits:
        exits.add_row(e.name, str(e.coupons), report.percent(e.of_claimed))
    times = funnel.task_times
    histogram = _table("claim to task", "coupons")
    for b in times.bins:
        histogram.add_row(b.label, str(b.coupons))
    days = _table("day (UTC)", "claims")
    for d in funnel.claims_per_day:
        days.add_row(d.day.isoformat(), str(d.claims))
    now = ", ".join(f"{funnel.states[s]} {s}" for s in STATES if funnel.states.get(s)) or "-"
    return [
        title,
        Text(""),
        stages,
        Text(f"claimed → redeemed: {report.percent(funnel.overall)}"),
        Text(""),
        exits,
        Text(f"now: {now}"),
        Text(""),
        Text(
            f"claim to task (claimed → usable), {times.coupons} coupons: "
            f"p50 {report.format_seconds(times.p50_s)}, p90 {report.format_seconds(times.p90_s)}, "
            f"p99 {report.format_seconds(times.p99_s)}, max {report.format_seconds(times.max_s)}"
        ),
        histogram,
        Text(""),
        days,
        Text(""),
        Text(f"chart: {chart}"),
    ]


# ------------------------------------------------------------------ output

CommandResult = dict[str, Any] | Answer

COMMANDS: dict[str, Callable[[Context, argparse.Namespace], Awaitable[CommandResult]]] = {
    "claim": cmd_claim,
    "complete-task": cmd_complete_task,
    "show": cmd_show,
    "cancel": cmd_cancel,
    "list": cmd_list,
    "stats": cmd_stats,
    "repair": cmd_repair,
    "coupon wedged": cmd_coupon_wedged,
    "coupon recover": cmd_coupon_recover,
    "batch create": cmd_batch_create,
    "batch list": cmd_batch_list,
    "batch show": cmd_batch_show,
    **{f"batch {action.value}": cmd_batch_change for action in BatchAction},
    "batch sync": cmd_batch_sync,
    "campaign create": cmd_campaign_create,
    "campaign update": cmd_campaign_update,
    "campaign list": cmd_campaign_list,
    "campaign show": cmd_campaign_show,
    "campaign pause": cmd_campaign_status,
    "campaign resume": cmd_campaign_status,
    "campaign end": cmd_campaign_end,
    "reconcile": cmd_reconcile,
    "report": cmd_report,
    "tenant create": cmd_tenant_create,
    "tenant list": cmd_tenant_list,
    "key create": cmd_key_create,
    "key list": cmd_key_list,
    "key revoke": cmd_key_revoke,
}


def _command(args: argparse.Namespace) -> str:
    action = getattr(args, "action", None)
    return f"{args.command} {action}" if action else str(args.command)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _batch_json(batch: Batch) -> dict[str, Any]:
    return dataclasses.asdict(batch)


def _campaign_json(campaign: Campaign) -> dict[str, Any]:
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


def _plain() -> bool:
    return not sys.stdout.isatty()


def _table(*columns: str, header: bool = True) -> Table:
    """A table: boxed for a terminal, plain columns (no box, no colour) for a pipe."""
    plain = _plain()
    table = Table(
        box=None if plain else box.SIMPLE_HEAD,
        show_header=header,
        header_style="" if plain else "bold",
        pad_edge=False,
    )
    for name in columns:
        table.add_column(name, overflow="fold")
    return table


def _time(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def _duration(value: timedelta) -> str:
    """The inverse of `parse_duration`: 1d12h, 30m, 90s -> 1m30s."""
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _details(rows: list[tuple[str, str]]) -> Table:
    table = _table("field", "value", header=False)
    for name, value in rows:
        table.add_row(name, value)
    return table


def _batch_table(batches: list[Batch]) -> Table:
    table = _table(
        "id",
        "platform id",
        "status",
        "quantity",
        "remaining",
        "owed",
        "backlog",
        "synced at",
        "drift",
    )
    for b in batches:
        table.add_row(
            b.id,
            b.platform_batch_id,
            b.status,
            str(b.quantity),
            str(b.remaining),
            str(b.owed),
            str(b.backlog),
            _time(b.synced_at),
            "; ".join(b.drift) or "-",
        )
    return table


def _money(cents: int | None) -> str:
    return "-" if cents is None else f"{cents / 100:.2f}"


def _batch_detail(b: Batch) -> list[RenderableType]:
    rows = [
        ("batch", b.id),
        ("tenant", b.tenant_id),
        ("platform id", b.platform_batch_id),
        ("name", b.name),
        ("status", b.status),
        ("quantity", str(b.quantity)),
        ("remaining", str(b.remaining)),
        ("face value", _money(b.face_value_cents)),
        ("minimum spend", _money(b.min_spend_cents)),
        ("valid days", str(b.valid_days)),
        ("per-user limit", "-" if b.per_user_limit is None else str(b.per_user_limit)),
        ("window", f"{_time(b.starts_at)} to {_time(b.ends_at)}"),
        ("owed", str(b.owed)),
        ("backlog", str(b.backlog)),
        ("synced at", _time(b.synced_at)),
    ]
    rows += [("drift", line) for line in b.drift]
    return [_details(rows)]


def _sync_view(report: SyncReport) -> list[RenderableType]:
    table = _table(
        "batch",
        "platform id",
        "status",
        "quantity",
        "remaining",
        "owed",
        "backlog",
        "woken",
        "drift",
    )
    synced: list[BatchSync] = report.batches
    for b in synced:
        table.add_row(
            b.batch_id,
            b.platform_batch_id,
            b.status,
            str(b.quantity),
            str(b.remaining),
            str(b.owed),
            str(b.backlog),
            str(b.woken),
            "; ".join(b.drift) or "-",
        )
    lines: list[RenderableType] = [
        Text(f"{len(synced)} batches synced, {len(report.drifted)} drifted")
    ]
    if synced:
        lines.insert(0, table)
    lines += [Text(f"failed: {why}") for why in report.failed]
    return lines


def _window(c: Campaign) -> str:
    if c.starts_at is None and c.ends_at is None:
        return "always"
    return f"{_time(c.starts_at)} to {_time(c.ends_at)}"


def _deadline(c: Campaign) -> str:
    parts = []
    if c.task_deadline is not None:
        parts.append(f"{_duration(c.task_deadline)} after the claim")
    if c.deadline_at is not None:
        parts.append(f"at {_time(c.deadline_at)}")
    return ", at the latest ".join(parts) or "none"


def _campaign_table(campaigns: list[Campaign]) -> Table:
    table = _table(
        "campaign", "batch", "status", "claimed", "quota", "per user", "tasks", "window", "deadline"
    )
    for c in campaigns:
        table.add_row(
            c.id,
            c.batch_id,
            c.status,
            str(c.claimed),
            str(c.quota),
            str(c.per_user_limit),
            ", ".join(c.required_tasks) or "-",
            _window(c),
            _deadline(c),
        )
    return table


def _campaign_detail(c: Campaign) -> list[RenderableType]:
    tasks = ", ".join(f"{t.key} ({t.name})" if t.name != t.key else t.key for t in c.tasks)
    return [
        _details(
            [
                ("campaign", c.id),
                ("tenant", c.tenant_id),
                ("name", c.name or "-"),
                ("batch", c.batch_id),
                ("status", c.status),
                ("claimed", f"{c.claimed} of {c.quota}"),
                ("per-user limit", str(c.per_user_limit)),
                ("tasks", tasks or "none: usable at claim"),
                ("claim window", _window(c)),
                ("task deadline", _deadline(c)),
                ("updated at", _time(c.updated_at)),
                ("ended at", _time(c.ended_at)),
            ]
        )
    ]


def _states_table(states: dict[str, int]) -> RenderableType:
    if not states:
        return Text("no coupons claimed yet")
    table = _table("state", "coupons")
    for state in STATES:
        if state in states:
            table.add_row(state, str(states[state]))
    return table


def _expiry_view(expiry: dict[str, Any]) -> RenderableType:
    if not expiry.get("done"):
        return Text(f"expiring its received coupons in workflow {expiry['workflow_id']}")
    return Text(
        f"{expiry['expired']} received coupons expired, {expiry['skipped']} skipped "
        f"(of {expiry['total']}) by workflow {expiry['workflow_id']}"
    )


def _reconcile_view(report: ReconcileReport) -> list[RenderableType]:
    lines: list[RenderableType] = []
    found: list[BatchReconciliation] = report.batches
    for b in found:
        lines.append(
            Text(
                f"batch {b.batch_id}: the platform "
                + (
                    "publishes no sent flow"
                    if b.platform_sent is None
                    else f"sent {b.platform_sent}"
                )
                + f" and saw {b.platform_used} used"
                + (" (asked coupon by coupon)" if b.used_from == "lookups" else "")
                + f"; the ledger has {b.ledger_coupons} coupons; "
                f"{len(b.mismatches)} mismatches, {b.repaired} repaired"
            )
        )
        if b.mismatches:
            table = _table("kind", "coupon", "platform coupon", "detail", "repair")
            for m in b.mismatches:
                table.add_row(
                    m.kind,
                    m.coupon_id or "-",
                    m.platform_coupon_id or "-",
                    m.detail,
                    m.repair or "for an operator",
                )
            lines.append(table)
    lines.append(
        Text(f"{report.mismatches} mismatches, {report.repaired} repaired in {len(found)} batches")
    )
    return lines


def _wedged_view(found: list[wedged.Wedged], counts: dict[str, int]) -> list[RenderableType]:
    if not found:
        return [Text("no wedged coupons")]
    table = _table("coupon", "cause", "ledger state", "since", "attempts", "detail")
    for w in found:
        table.add_row(
            w.coupon_id,
            w.cause,
            w.ledger_state,
            _time(w.since),
            "" if w.attempts is None else str(w.attempts),
            w.detail,
        )
    causes = ", ".join(f"{cause} {n}" for cause, n in counts.items() if n)
    return [
        table,
        Text(f"{len(found)} wedged: {causes}; `starter.py coupon recover --all` recovers them"),
    ]


def _recovery_view(done: list[wedged.Recovery]) -> list[RenderableType]:
    if not done:
        return [Text("no wedged coupons: nothing to recover")]
    lines: list[RenderableType] = []
    for r in done:
        runs = ""
        if r.stopped_run_id or r.new_run_id:
            runs = f"; stopped run {r.stopped_run_id or '-'}, new run {r.new_run_id or '-'}"
        cause = f" ({r.cause})" if r.cause else ""
        lines.append(Text(f"coupon {r.coupon_id}: {r.action}{cause}: {r.detail}{runs}"))
    return lines


def _doctor_answer(found: doctor.Diagnosis) -> Answer:
    def view() -> list[RenderableType]:
        table = _table("part", "", "detail")
        for finding in found.findings:
            status = {True: "ok", False: "PROBLEM", None: "?"}[finding.ok]
            table.add_row(finding.part, status, finding.detail)
        return [Text(f"stack: {found.stack}"), table]

    problems = sorted({f.part for f in found.problems})
    return Answer(
        {
            "stack": found.stack,
            "settings": found.settings,
            "findings": found.findings,
            "ok": found.ok,
        },
        view,
        error=f"{len(problems)} part(s) not well: {', '.join(problems)}" if problems else None,
    )


def _print(args: argparse.Namespace, result: CommandResult) -> None:
    if isinstance(result, Answer) and not args.json:
        plain = _plain()
        console = Console(
            force_terminal=not plain,
            no_color=plain,
            highlight=False,
            markup=False,
            emoji=False,
            # A pipe gets whole lines, not lines cut to an imagined 80-column terminal.
            width=200 if plain else None,
        )
        if not plain:
            for renderable in result.view():
                console.print(renderable)
            return
        with console.capture() as captured:
            for renderable in result.view():
                console.print(renderable)
        # Plain lines for a pipe: no padding after the last column.
        sys.stdout.writelines(f"{line.rstrip()}\n" for line in captured.get().splitlines())
        return
    data = result.data if isinstance(result, Answer) else result
    print(json.dumps(data, default=_json_default, indent=2))


# ------------------------------------------------------------------ running


async def run(args: argparse.Namespace, settings: Settings) -> CommandResult:
    # A short wait: a person at a prompt wants "PostgreSQL is down" now, not in 30 s.
    async with db.pool(settings.database_url, max_size=2, timeout_s=5) as pool:
        ctx = Context(settings, pool)
        try:
            return await COMMANDS[_command(args)](ctx, args)
        except (PoolTimeout, psycopg.OperationalError) as err:
            raise Unavailable(f"cannot reach PostgreSQL ({err})") from None
        except PlatformError as err:
            raise Unavailable(
                f"the platform at {settings.platform_url} failed: {err} (is it up, and is "
                "PLATFORM_API_KEY the platform's key?)"
            ) from None
        finally:
            await ctx.aclose()


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command; `environ` (default: the process's) configures it, as for `make run`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # psycopg_pool logs every failed connection attempt; the one-line error says it all.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exited:  # --help, --version, or bad input (already said on stderr)
        return exited.code if isinstance(exited.code, int) else 2
    if args.command == "doctor":
        # Apart from `run`: it must answer when PostgreSQL is the part that is down.
        try:
            settings = settings_from_env(environ)
            found = asyncio.run(doctor.diagnose(settings, stack_for(settings, environ)))
        except ConfigError as err:
            return _fail(2, str(err))
        return _answered(args, _doctor_answer(found))
    if args.command == "codec":
        try:
            print(codec.run_command(args, settings_from_env(environ)))
        except ConfigError as err:
            return _fail(2, str(err))
        return 0
    try:
        result = asyncio.run(run(args, settings_from_env(environ)))
    except ConfigError as err:
        return _fail(2, str(err))
    except Refused as err:
        return _fail(2, str(err))
    except WorkflowUpdateFailedError as err:
        # A refusal with a code is `Refused` already (app.service); this is a bug.
        return _fail(1, f"the update failed: {err.cause or err}")
    except WorkflowFailureError as err:
        return _fail(1, f"the workflow failed: {err.cause or err}")
    except Unavailable as err:
        return _fail(1, str(err))
    except RPCError as err:
        return _fail(1, f"Temporal answered {err.status.name}: {err}")
    except Exception as err:  # a bug: one line first, then what a developer needs
        _fail(1, f"unexpected {type(err).__name__}: {err}")
        traceback.print_exc()
        return 1
    return _answered(args, result)


def _answered(args: argparse.Namespace, result: CommandResult) -> int:
    try:
        _print(args, result)
    except BrokenPipeError:
        return 0  # the reader (`| head`) has seen enough
    if isinstance(result, Answer) and result.error:
        return _fail(1, result.error)
    return 0


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
