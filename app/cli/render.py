"""What the command line prints: a table or a view for a person, JSON with `--json` (or
for the commands that print only JSON). Rendering is kept apart from the commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from app import doctor, service, wedged
from app.service import Batch, Campaign
from coupons import report
from coupons.lifecycle import STATES
from coupons.model import BatchReconciliation, BatchSync, ReconcileReport, SyncReport


@dataclass
class Answer:
    """What a catalog command answers: `data` for `--json`, `view` for a person.

    `error` marks a partial failure: the answer is printed, then the error, exit 1.
    """

    data: dict[str, Any]
    view: Callable[[], list[RenderableType]]
    error: str | None = None


CommandResult = dict[str, Any] | Answer


def batches_failed(failed: list[str], undone: str) -> str | None:
    """The error of a run that went on past the batches it could not do (None: none)."""
    if not failed:
        return None
    return f"{len(failed)} batches could not be {undone}: " + "; ".join(failed)


def json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def batch_json(batch: Batch) -> dict[str, Any]:
    return dataclasses.asdict(batch)


def campaign_json(campaign: Campaign) -> dict[str, Any]:
    return service.campaign_fields(campaign)


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


# The columns a batch's row shows, listed or synced, between its id and what follows.
_BATCH_COLUMNS = ("platform id", "status", "quantity", "remaining", "owed", "backlog")


def _batch_cells(b: Batch | BatchSync) -> list[str]:
    return [b.platform_batch_id, b.status, *map(str, (b.quantity, b.remaining, b.owed, b.backlog))]


def batch_table(batches: list[Batch]) -> Table:
    table = _table("id", *_BATCH_COLUMNS, "synced at", "drift")
    for b in batches:
        table.add_row(b.id, *_batch_cells(b), _time(b.synced_at), "; ".join(b.drift) or "-")
    return table


def _money(cents: int | None) -> str:
    return "-" if cents is None else f"{cents / 100:.2f}"


def batch_detail(b: Batch) -> list[RenderableType]:
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


def sync_view(report: SyncReport) -> list[RenderableType]:
    table = _table("batch", *_BATCH_COLUMNS, "woken", "drift")
    synced: list[BatchSync] = report.batches
    for b in synced:
        table.add_row(b.batch_id, *_batch_cells(b), str(b.woken), "; ".join(b.drift) or "-")
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


def campaign_table(campaigns: list[Campaign]) -> Table:
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


def campaign_detail(c: Campaign) -> list[RenderableType]:
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


def states_table(states: dict[str, int]) -> RenderableType:
    if not states:
        return Text("no coupons claimed yet")
    table = _table("state", "coupons")
    for state in STATES:
        if state in states:
            table.add_row(state, str(states[state]))
    return table


def expiry_view(expiry: dict[str, Any]) -> RenderableType:
    if not expiry.get("done"):
        return Text(f"expiring its received coupons in workflow {expiry['workflow_id']}")
    text = (
        f"{expiry['expired']} received coupons expired, {expiry['skipped']} skipped "
        f"(of {expiry['total']}) by workflow {expiry['workflow_id']}"
    )
    if stuck := expiry.get("stuck"):
        # The coupons that could not take the expiry, by reason (the result names them).
        reasons = Counter(c["reason"] for c in expiry.get("stuck_coupons", []))
        named = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
        text += f"; {stuck} left received ({named or 'reasons in --json'})"
    return Text(text)


def reconcile_view(report: ReconcileReport) -> list[RenderableType]:
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
    lines += [Text(f"failed: {why}") for why in report.failed]
    lines.append(
        Text(f"{report.mismatches} mismatches, {report.repaired} repaired in {len(found)} batches")
    )
    return lines


def wedged_view(found: list[wedged.Wedged], counts: dict[str, int]) -> list[RenderableType]:
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


def recovery_view(done: list[wedged.Recovery]) -> list[RenderableType]:
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


def doctor_view(found: doctor.Diagnosis) -> list[RenderableType]:
    table = _table("part", "", "detail")
    for finding in found.findings:
        status = {True: "ok", False: "PROBLEM", None: "?"}[finding.ok]
        table.add_row(finding.part, status, finding.detail)
    return [Text(f"stack: {found.stack}"), table]


def report_json(funnel: report.FunnelReport, chart: Path) -> dict[str, Any]:
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


def report_view(funnel: report.FunnelReport, chart: Path) -> list[RenderableType]:
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


def print_result(args: argparse.Namespace, result: CommandResult) -> None:
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
    print(json.dumps(data, default=json_default, indent=2))
