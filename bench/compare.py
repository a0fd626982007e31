"""Each headline figure beside the previous committed run of the same size and platform:
the newest bench/results/<prefix><date>.json as committed at HEAD (the files on disk when
git cannot tell, as in an unpacked archive)."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

from bench.figures import get, num

GIT_TIMEOUT_S = 10
# A change smaller than this (percent) is not called better or worse: runs on a shared
# 2-core machine differ by that much on their own.
NOISE_PCT = 5.0

# (figure, dotted path in the results, whether higher is better)
COMPARED: tuple[tuple[str, str, bool], ...] = (
    ("floor throughput, workflows/s", "floor.throughput_per_s", True),
    ("floor signal-to-done p50, light rate, ms", "floor.light_rate.signal_to_done_ms.p50", False),
    ("lifecycle throughput, lifecycles/s", "lifecycle.throughput_per_s", True),
    ("lifecycle ratio to floor", "lifecycle.ratio_to_floor", True),
    ("lifecycle ratio to floor, alternating parts (median)", "paired.ratio_median", True),
    ("unlock-to-issued p50, light rate, ms", "lifecycle.light_rate.unlock_to_issued_ms.p50", False),
    ("unlock-to-issued p99, saturation, ms", "lifecycle.unlock_to_issued_ms.p99", False),
    ("worker CPU per 1,000 lifecycles, s", "lifecycle.worker_cpu_s_per_1000", False),
    ("workflow task wait, saturation, mean ms", "lifecycle.workflow_task_wait_ms.mean", False),
    ("worker garbage collection per lifecycle, ms", "lifecycle.worker_gc.ms_per_lifecycle", False),
    ("history events per coupon", "lifecycle.history_events_per_coupon.mean", False),
    ("SQL statements per coupon", "lifecycle.sql_per_coupon.statements", False),
    ("worker RSS with every coupon open, MiB", "open_coupons.worker_rss_mib", False),
    ("claim p50 with every coupon open, ms", "open_coupons.claim_latency_ms_at_all.p50", False),
    ("peer (DBOS) throughput, lifecycles/s", "peer.throughput_per_s", True),
    ("catalog sync, batches/s", "catalog_sync.batches_per_s", True),
    ("reconciliation with repairs, coupons/s", "reconciliation.first.coupons_per_s", True),
    ("single-row commits/s (reference)", "commit_reference.single_row_commits_per_s", True),
    ("SELECT 1 round trips/s (reference)", "commit_reference.select1_per_s", True),
    ("workflow starts/s, the server alone (reference)", "start_reference.starts_per_s", True),
    ("claim storm in process, claims/s", "claim_storm.throughput_per_s", True),
    ("claim storm in process p99, ms", "claim_storm.claim_latency_ms.p99", False),
    ("claim storm HTTP API, claims/s", "claim_storm_api.throughput_per_s", True),
    ("claim storm HTTP API p99, ms", "claim_storm_api.claim_latency_ms.p99", False),
    ("large claim storm in process, claims/s", "claim_storm_large.throughput_per_s", True),
    ("large claim storm in process p99, ms", "claim_storm_large.claim_latency_ms.p99", False),
    ("large claim storm HTTP API, claims/s", "claim_storm_large_api.throughput_per_s", True),
    ("large claim storm HTTP API p99, ms", "claim_storm_large_api.claim_latency_ms.p99", False),
    ("steady claims in process p99, ms", "steady_claims.claim_latency_ms.p99", False),
    ("steady claims in process, achieved/s", "steady_claims.achieved_per_s", True),
    (
        "steady claims in process, workflows all started after, s",
        "steady_claims.workflows.all_started_after_s",
        False,
    ),
    ("steady claims HTTP API p99, ms", "steady_claims_api.claim_latency_ms.p99", False),
    ("steady claims HTTP API, achieved/s", "steady_claims_api.achieved_per_s", True),
    (
        "steady claims HTTP API, workflows all started after, s",
        "steady_claims_api.workflows.all_started_after_s",
        False,
    ),
)


def results_prefix(size: str, platform: str) -> str:
    """What a run's result files are named with before their date: the size unless full,
    the platform unless generic ("wechat-quick-")."""
    prefix = "" if size == "full" else f"{size}-"
    return prefix if platform == "generic" else f"{platform}-{prefix}"


def _git(results: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=results,
        capture_output=True,
        text=True,
        check=True,
        timeout=GIT_TIMEOUT_S,
    ).stdout


def previous_run(results: Path, prefix: str) -> tuple[str, dict[str, Any]] | None:
    """The newest committed `<prefix><date>.json` in `results`, by name and contents."""
    pattern = re.compile(rf"{re.escape(prefix)}\d{{4}}-\d{{2}}-\d{{2}}\.json")
    try:
        # Names relative to `results`; the contents as committed, whatever is on disk.
        names = _git(results, "ls-tree", "--name-only", "HEAD").splitlines()

        def read(name: str) -> str:
            return _git(results, "show", f"HEAD:./{name}")
    except (OSError, subprocess.SubprocessError):
        names = [path.name for path in results.glob("*.json")]

        def read(name: str) -> str:
            return (results / name).read_text()

    found = sorted(name for name in names if pattern.fullmatch(name))
    if not found:
        return None
    return found[-1], json.loads(read(found[-1]))


def _change(now: float, before: float, higher_is_better: bool) -> dict[str, Any]:
    if math.isnan(now) or math.isnan(before):
        return {"change": None, "change_pct": None, "better": None}
    delta = now - before
    return {
        "change": round(delta, 3),
        "change_pct": round(100 * delta / before, 1) if before else None,
        "better": None if delta == 0 else (delta > 0) == higher_is_better,
    }


def compare(data: dict[str, Any], previous: tuple[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Each COMPARED figure now and in the previous run, with the change."""
    if previous is None:
        return {"file": None, "figures": []}
    name, before = previous
    figures = []
    for label, path, higher in COMPARED:
        now, then = num(get(data, path)), num(get(before, path))
        figures.append(
            {
                "figure": label,
                "path": path,
                "now": None if math.isnan(now) else now,
                "previous": None if math.isnan(then) else then,
                **_change(now, then, higher),
            }
        )
    return {"file": name, "date": before.get("date"), "figures": figures}


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    size = abs(value)
    return f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}"


def markdown(data: dict[str, Any]) -> list[str]:
    """The comparison as a markdown section."""
    previous = data.get("previous") or {}
    if not previous.get("file"):
        return ["", "## Compared with the previous run", "", "No previous committed run."]
    lines = [
        "",
        f"## Compared with the previous run ({previous['file']}, committed)",
        "",
        "A figure missing from either run shows as -.",
        "",
        "| figure | this run | previous | change |",
        "|---|---|---|---|",
    ]
    for row in previous["figures"]:
        change = "-"
        if row["change"] is not None:
            sign = "+" if row["change"] > 0 else ""
            pct = row["change_pct"]
            change = f"{sign}{_fmt(row['change'])}"
            if pct is not None:
                change += f", {round(pct):+d}%"
                if abs(pct) >= NOISE_PCT and row["better"] is not None:
                    change += ", better" if row["better"] else ", worse"
        lines.append(
            f"| {row['figure']} | {_fmt(row['now'])} | {_fmt(row['previous'])} | {change} |"
        )
    return lines
