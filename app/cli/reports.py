"""`reconcile` (the platform's flow files against the ledger) and `report` (a campaign's
funnel, with a PNG chart): a table, or JSON with `--json`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from app import service
from app.cli.args import Commands, Nouns, ident, json_flag, timeout_flag
from app.cli.render import Answer, batches_failed, reconcile_view, report_json, report_view
from app.service import Backends
from coupons import report
from coupons.errors import InvalidField

# How long `reconcile` waits for its workflow's answer.
RECONCILE_WAIT_S = 300.0


def add_parsers(nouns: Nouns) -> None:
    r = nouns.add_parser("reconcile", help="compare the platform's flow files with the ledger")
    r.add_argument("--batch", type=ident("batch"), help="one batch (default: every batch)")
    r.add_argument("--no-repair", action="store_true", help="report only, repair nothing")
    timeout_flag(r, RECONCILE_WAIT_S, "seconds to wait for the reconciliation")
    json_flag(r)
    f = nouns.add_parser("report", help="a campaign's funnel from the ledger, with a PNG chart")
    f.add_argument("--campaign", required=True, type=ident("campaign"))
    f.add_argument(
        "--out", help="the chart's path, a .png (default: DATA_DIR/reports/<campaign>-<date>.png)"
    )
    f.add_argument(
        "--tenant", type=ident("tenant"), help="only this tenant's campaign (default: any tenant's)"
    )
    json_flag(f)


async def cmd_reconcile(b: Backends, args: argparse.Namespace) -> Answer:
    workflow_id, found = await service.reconcile(
        b, args.batch, repair=not args.no_repair, timeout_s=float(args.timeout)
    )
    data = {
        "workflow_id": workflow_id,
        "mismatches": found.mismatches,
        "repaired": found.repaired,
        "batches": found.batches,
        "failed": found.failed,
    }
    error = batches_failed(found.failed, "reconciled")
    return Answer(data, lambda: reconcile_view(found), error)


async def cmd_report(b: Backends, args: argparse.Namespace) -> Answer:
    tenant_id = None if args.tenant is None else await service.known_tenant(b, args.tenant)
    if args.out is not None and not args.out.lower().endswith(".png"):
        raise InvalidField("--out", f"{args.out!r} must end in .png: the chart is a PNG")
    funnel = await service.funnel_report(b, args.campaign, tenant_id)
    path = Path(args.out) if args.out else report.default_chart_path(b.settings.data_dir, funnel)
    try:
        chart = (await asyncio.to_thread(report.draw, funnel, path)).resolve()
    except OSError as err:
        raise InvalidField("--out", f"cannot write the chart to {str(path)!r}: {err}") from None
    return Answer(report_json(funnel, chart), lambda: report_view(funnel, chart))


COMMANDS: Commands = {"reconcile": cmd_reconcile, "report": cmd_report}
