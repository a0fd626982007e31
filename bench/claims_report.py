"""The claim figures in the run's outputs (bench/claiming.py): their targets, their rows
and sections of the markdown, and their panels of the chart."""

from __future__ import annotations

import math
from typing import Any

from bench.figures import get, num, p50_p99

IN_PROCESS, API = "in process", "HTTP API"
# (results key, name in the targets, path) of each burst.
STORMS = (
    ("claim_storm", "claim storm", IN_PROCESS),
    ("claim_storm_api", "claim storm through the HTTP API", API),
    ("claim_storm_large", "large claim storm", IN_PROCESS),
    ("claim_storm_large_api", "large claim storm through the HTTP API", API),
)
# Each path's first burst run once before them, for no target (bench/claiming.py).
WARM_UPS = (("claim_warm_up", f"{IN_PROCESS}, warm-up"), ("claim_warm_up_api", f"{API}, warm-up"))
STEADY = (("steady_claims", IN_PROCESS), ("steady_claims_api", API))
SWEEP = (("in_process", IN_PROCESS), ("api", API))
COLORS = {IN_PROCESS: "#1f77b4", API: "#ff7f0e"}
# The targets, by path: bursts' claims/s, steady claims' p99.
CLAIMS_PER_S = {IN_PROCESS: 2000, API: 1000}
STEADY_P99_MS = {IN_PROCESS: 50, API: 100}
WORKFLOWS_WITHIN_S = 30.0


def _ran(data: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The part's results when it ran at this size (a part not run says why instead)."""
    part = get(data, key)
    return part if isinstance(part, dict) and "not_run" not in part else None


def _commits(data: dict[str, Any]) -> float:
    return num(get(data, "commit_reference.single_row_commits_per_s"))


def _failed(part: dict[str, Any]) -> int:
    return sum((part.get("failed") or {}).values())


# ----- targets --------------------------------------------------------------------------


def _storm_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for key, name, path in STORMS:
        storm = _ran(data, key)
        if storm is None:
            continue
        granted, quota, in_ledger = storm["granted"], storm["quota"], storm["claims_in_ledger"]
        rate, bound = num(storm["throughput_per_s"]), CLAIMS_PER_S[path]
        found += [
            {
                "target": f"{name}: granted == quota",
                "figure": f"{granted} granted of {storm['claims']} claims, quota {quota}, "
                f"{in_ledger} in the ledger",
                "met": granted == in_ledger == quota,
            },
            {
                "target": f"{name}: >= {bound:,} claims/s",
                "figure": f"{rate:.0f} claims/s = {storm.get('ratio_to_commit_rate')} x the "
                f"single-row commit rate ({_commits(data):.0f}/s)",
                "met": rate >= bound,
            },
        ]
    return found


def _starts_needed(data: dict[str, Any], steady: dict[str, Any]) -> str:
    """The start rate the workflow target asks of the server, beside the rate it reached
    alone in the same run (bench/start_reference.py)."""
    within = steady["duration_s"] + WORKFLOWS_WITHIN_S
    needed = steady["granted"] / within
    alone = num(get(data, "start_reference.starts_per_s"))
    if not needed or math.isnan(alone):
        return ""
    return (
        f"; {steady['granted']:,} starts within {within:g} s need {needed:.0f}/s, the "
        f"Temporal server alone started {alone:.0f}/s ({alone / needed:.2f} x that)"
    )


def _steady_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for key, path in STEADY:
        steady = _ran(data, key)
        if steady is None:
            continue
        rate, bound = steady["offered_rate_per_s"], STEADY_P99_MS[path]
        p99 = num(steady["claim_latency_ms"]["p99"])
        workflows = steady["workflows"]
        after = workflows["all_started_after_s"]
        found += [
            {
                "target": f"steady claims at {rate:g}/s, {path}: p99 <= {bound} ms, every "
                "claim granted",
                "figure": f"p99 {p99:.0f} ms; {steady['granted']} of {steady['offered']} "
                f"granted ({steady['skipped_late']} never sent, {_failed(steady)} failed)",
                "met": p99 <= bound and steady["granted"] == steady["offered"],
            },
            {
                "target": f"steady claims, {path}: every granted claim's workflow started "
                f"<= {WORKFLOWS_WITHIN_S:g} s after the load ended",
                "figure": (
                    f"all started {after} s after"
                    if after is not None
                    else f"{workflows['unstarted_left']} still without one after "
                    f"{workflows['waited_up_to_s']:g} s"
                )
                + _starts_needed(data, steady),
                "met": after is not None and after <= WORKFLOWS_WITHIN_S,
            },
        ]
    return found


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's targets, for the parts this size ran."""
    return _storm_targets(data) + _steady_targets(data)


# ----- markdown -------------------------------------------------------------------------


def _storm_row(data: dict[str, Any], key: str) -> str:
    storm = get(data, key) or {}
    if "not_run" in storm:
        return f"not run: {storm['not_run']}"
    rate = num(storm.get("throughput_per_s"))
    return (
        f"{storm.get('granted')} granted of quota {storm.get('quota')} from "
        f"{storm.get('claims')} claims, {p50_p99(data, f'{key}.claim_latency_ms')}, "
        f"{rate:.0f} claims/s ({storm.get('ratio_to_commit_rate')} x the commit rate)"
    )


def _steady_row(data: dict[str, Any], key: str) -> str:
    steady = get(data, key) or {}
    if not steady:
        return "n/a"
    after = get(data, f"{key}.workflows.all_started_after_s")
    started = (
        f"all workflows started {after} s after the load ended"
        if after is not None
        else f"{get(data, f'{key}.workflows.unstarted_left')} workflows not started "
        f"{get(data, f'{key}.workflows.waited_up_to_s')} s after the load ended"
    )
    return (
        f"{steady['answered']} of {steady['offered']} answered at "
        f"{num(steady['achieved_per_s']):.0f}/s, {p50_p99(data, f'{key}.claim_latency_ms')}, "
        f"max {num(get(data, f'{key}.claim_latency_ms.max')):.0f} ms; {started}"
    )


def _reference_row(data: dict[str, Any]) -> str:
    ref = get(data, "commit_reference") or {}
    if ref.get("error"):
        return f"not measured: {ref['error']}"
    by_clients = ", ".join(
        f"{run['per_s']:.0f}/s with {run['clients']} clients ({run['latency_mean_ms']:.1f} ms mean)"
        for run in ref.get("commits_by_clients", [])
    )
    return (
        f"{num(ref.get('single_row_commits_per_s')):.0f} commits/s ({by_clients}); SELECT 1: "
        f"{num(ref.get('select1_per_s')):.0f}/s by pgbench, "
        f"{num(ref.get('select1_per_s_from_this_process')):.0f}/s from the bench's process"
    )


def _start_reference_row(data: dict[str, Any]) -> str:
    ref = get(data, "start_reference") or {}
    if not ref:
        return "n/a"
    return (
        f"{num(ref.get('starts_per_s')):.0f} starts/s ({ref.get('starts')} starts, "
        f"{ref.get('in_flight')} in flight, no worker polling, each answered in "
        f"{p50_p99(data, 'start_reference.start_latency_ms')}; "
        f"{num(ref.get('server_cpu_ms_per_start')):.1f} ms of the server's CPU each, "
        f"{num(get(data, 'start_reference.cpu_by_process.temporal.cores')):.2f} cores)"
    )


def table_rows(data: dict[str, Any]) -> list[str]:
    """The claim rows of the summary table."""
    large = get(data, "size.large_storm_claims") or 10_000  # the issue's, when not run
    rate = get(data, "size.steady_rate_per_s")
    return [
        f"| single-row commit rate (reference, pgbench) | {_reference_row(data)} |",
        f"| claim storm, in process | {_storm_row(data, 'claim_storm')} |",
        f"| claim storm, HTTP API | {_storm_row(data, 'claim_storm_api')} |",
        f"| claim storm of {large:,}, in process | {_storm_row(data, 'claim_storm_large')} |",
        f"| claim storm of {large:,}, HTTP API | {_storm_row(data, 'claim_storm_large_api')} |",
        "| workflow start rate (reference, the Temporal server alone) | "
        f"{_start_reference_row(data)} |",
        f"| steady claims at {rate}/s, in process | {_steady_row(data, 'steady_claims')} |",
        f"| steady claims at {rate}/s, HTTP API | {_steady_row(data, 'steady_claims_api')} |",
    ]


def _storm_section(data: dict[str, Any]) -> list[str]:
    """The bursts that ran, by path, side by side."""
    ran = [(key, path) for key, path in WARM_UPS if _ran(data, key)]
    ran += [(key, path) for key, _, path in STORMS if _ran(data, key)]

    def row(label: str, pick: Any) -> str:
        return f"| {label} | " + " | ".join(str(pick(get(data, key))) for key, _ in ran) + " |"

    def latency(storm: dict[str, Any]) -> str:
        return " / ".join(f"{num(storm['claim_latency_ms'][q]):.0f}" for q in ("p50", "p99", "max"))

    def counted(found: dict[str, int] | None) -> str:
        return ", ".join(f"{code} {n}" for code, n in sorted((found or {}).items())) or "none"

    api_pool = get(data, "claim_storm_api.api_pool_connections")
    return [
        "",
        "## Claim storms, in process and through the HTTP API",
        "",
        "Every claim at once, each by its own user, against a campaign of its own per path "
        "and burst. In process: `ClaimService` on a warm pool of "
        f"{get(data, 'claim_storm.pool_connections')} connections (DB_POOL_SIZE). HTTP API: "
        "`POST /v1/campaigns/{id}/claims` with a tenant's app key from "
        f"{get(data, 'claim_storm_api.http_connections')} clients of one HTTP connection "
        f"each to the API's {get(data, 'machine.api_processes') or 1} process(es) on one port "
        f"(each with a pool of {api_pool} connections). Latency is the client's: queueing "
        "for a connection included, on both paths. The reference: "
        f"{num(get(data, 'commit_reference.single_row_commits_per_s')):.0f} single-row "
        "commits/s in the same run. Each path's first burst ran once before the others as a "
        "warm-up (the API processes' first requests, their pools' first statements), "
        "for no target.",
        "",
        "| | " + " | ".join(f"{get(data, f'{k}.claims')} claims, {p}" for k, p in ran) + " |",
        "|---" * (len(ran) + 1) + "|",
        row("granted of quota", lambda s: f"{s['granted']} of {s['quota']}"),
        row("claims in the ledger", lambda s: s["claims_in_ledger"]),
        row("refused", lambda s: counted(s["refused"])),
        row("failed", lambda s: counted(s.get("failed"))),
        row("claim latency p50 / p99 / max, ms", latency),
        row("throughput, claims/s", lambda s: f"{num(s['throughput_per_s']):.0f}"),
        row("ratio to the single-row commit rate", lambda s: s.get("ratio_to_commit_rate")),
        row("wall time, s", lambda s: s["wall_s"]),
        row("repeated by the client (503, no answer)", lambda s: counted(s.get("retried"))),
    ]


def _sweep_section(data: dict[str, Any]) -> list[str]:
    sweep = get(data, "claim_rate_sweep") or {}
    if not sweep:
        return []
    lines = [
        "",
        "## Claim latency against offered rate (open loop)",
        "",
        "Claims offered at a fixed rate, each sent at its planned time whether or not earlier "
        "ones answered, and timed from that planned time (queueing shows). At most "
        f"{get(data, 'steady_claims.max_in_flight')} in flight; a claim the generator could "
        f"not send within {get(data, 'size.late_limit_s')} s of its planned time is never "
        f'sent ("skipped"). Each rate for {get(data, "size.sweep_step_s")} s; the steady '
        f"run: {get(data, 'size.steady_rate_per_s')}/s for {get(data, 'size.steady_s')} s.",
        "",
        "| offered/s | "
        + " | ".join(f"{p}: achieved/s, p50 / p99 ms, skipped" for _, p in SWEEP)
        + " |",
        "|---|---|---|",
    ]
    by_path = [sweep.get(name) or [] for name, _ in SWEEP]
    for points in zip(*by_path, strict=False):
        cells = [
            f"{num(p['achieved_per_s']):.0f}, {num(p['claim_latency_ms']['p50']):.0f} / "
            f"{num(p['claim_latency_ms']['p99']):.0f}, {p['skipped_late']}"
            for p in points
        ]
        lines.append(f"| {points[0]['offered_rate_per_s']:g} | " + " | ".join(cells) + " |")
    return lines


def sections(data: dict[str, Any]) -> list[str]:
    return _storm_section(data) + _sweep_section(data)


# ----- chart ----------------------------------------------------------------------------


def plot_storms(axes: Any, data: dict[str, Any]) -> None:
    """Each burst's latency, p50 and p99, with its claims/s."""
    ran = [(key, path) for key, _, path in STORMS if _ran(data, key)]
    labels = [
        f"{get(data, f'{key}.claims')}, {path}\n"
        f"{num(get(data, f'{key}.throughput_per_s')):.0f} claims/s"
        for key, path in ran
    ]
    width = 0.4
    for offset, quantile in ((-width / 2, "p50"), (width / 2, "p99")):
        values = [num(get(data, f"{key}.claim_latency_ms.{quantile}")) for key, _ in ran]
        axes.bar(
            [i + offset for i in range(len(labels))],
            [0 if math.isnan(v) else v for v in values],
            width,
            label=quantile,
        )
    axes.set_xticks(list(range(len(labels))), labels, fontsize=8)
    axes.set_ylabel("claim latency, ms")
    axes.set_title("claim storms: all at once, quota a tenth of the claims")
    axes.legend()


def plot_claim_rates(axes: Any, data: dict[str, Any]) -> None:
    """Each burst's claims/s beside the single-row commit rate and the targets."""
    ran = [(key, path) for key, _, path in STORMS if _ran(data, key)]
    rates = [num(get(data, f"{key}.throughput_per_s")) for key, _ in ran]
    bars = axes.bar(
        [f"{get(data, f'{key}.claims')}\n{path}" for key, path in ran],
        [0 if math.isnan(v) else v for v in rates],
        color=[COLORS[path] for _, path in ran],
    )
    for bar, value in zip(bars, rates, strict=True):
        axes.annotate(
            f"{value:.0f}/s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    commits = _commits(data)
    if not math.isnan(commits):
        axes.axhline(
            commits, color="red", linestyle="--", label=f"single-row commits {commits:.0f}/s"
        )
    for path, bound in CLAIMS_PER_S.items():
        axes.axhline(bound, color=COLORS[path], linestyle=":", label=f"target {path} {bound}/s")
    axes.set_ylabel("claims/s")
    axes.set_title("claim storms: claims/s against PostgreSQL's limit")
    axes.legend(fontsize=8)


def plot_sweep(axes: Any, data: dict[str, Any]) -> None:
    """Claim latency (p50, p99) against offered rate, by path, with the p99 targets."""
    for name, path in SWEEP:
        color = COLORS[path]
        points = get(data, f"claim_rate_sweep.{name}") or []
        offered = [p["offered_rate_per_s"] for p in points]
        for quantile, style in (("p50", "-"), ("p99", "--")):
            axes.plot(
                offered,
                [num(p["claim_latency_ms"][quantile]) for p in points],
                style,
                marker="o",
                color=color,
                label=f"{path} {quantile}",
            )
        axes.axhline(STEADY_P99_MS[path], color=color, linestyle=":", linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("offered claims/s (open loop)")
    axes.set_ylabel("claim latency from planned send, ms (log)")
    axes.set_title("claim latency vs offered rate (dotted: p99 targets)")
    axes.legend(fontsize=8)
