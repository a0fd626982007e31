"""The run's outputs: JSON with every figure, a PNG plot and a short markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here, and none needed for a file
import matplotlib.pyplot as plt

from bench import claims_report, compare
from bench.figures import get, num, p50_p99

# Issue 16: the lifecycle at 0.8 of the floor, and unlock-to-issued at light rate no worse
# than the day it was filed: p50 65 ms, 0.63 of that run's floor (104 ms). That floor, and
# every figure before the dev server's task-queue reads were raised (app/embedded/temporal.py
# DEV_SERVER_DYNAMIC_CONFIG), waited up to 50 ms at each task handoff; both are printed.
LIFECYCLE_TO_FLOOR = 0.8
FILED_LIGHT_MS = 65.0
FILED_LIGHT_RATIO = 0.63


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' targets, each with its figure, its bound and whether it was met."""
    ratio = num(get(data, "lifecycle.ratio_to_floor"))
    paired = get(data, "paired") or {}
    if "ratio_median" not in paired:
        paired = {}  # not run, or failed (its error is in the JSON)
    light = num(get(data, "lifecycle.light_rate.unlock_to_issued_ms.p50"))
    floor_light = num(get(data, "floor.light_rate.signal_to_done_ms.p50"))
    rss = num(get(data, "open_coupons.worker_rss_mib"))
    count = get(data, "open_coupons.count")
    at_100 = num(get(data, "open_coupons.claim_latency_ms_at_100.p50"))
    at_all = num(get(data, "open_coupons.claim_latency_ms_at_all.p50"))
    sync = get(data, "catalog_sync") or {}
    recon = get(data, "reconciliation") or {}
    marked = recon.get("marked_used")
    first = recon.get("first") or {}
    second = recon.get("second") or {}
    return [
        {
            "target": "lifecycle throughput >= 0.8 x floor (issue 16)",
            "figure": "; ".join(filter(None, [f"ratio {ratio:.2f}", _paired(paired)])),
            # Met only if it holds both ways: the main runs, and the pairs of parts.
            "met": ratio >= LIFECYCLE_TO_FLOOR
            and (not paired or paired["ratio_median"] >= LIFECYCLE_TO_FLOOR),
        },
        {
            "target": f"light-rate unlock-to-issued p50 no worse than when issue 16 was filed "
            f"({FILED_LIGHT_MS:.0f} ms)",
            "figure": f"{light:.0f} ms",
            "met": light <= FILED_LIGHT_MS,
        },
        {
            "target": f"light-rate unlock-to-issued p50 <= {FILED_LIGHT_RATIO} x floor "
            "signal-to-done p50 (issue 16)",
            "figure": f"{light:.0f} ms vs {floor_light:.0f} ms ({light / floor_light:.2f}x the "
            "floor; the floor's no-op activity against our send, confirming lookup and ledger "
            "write)",
            "met": light <= FILED_LIGHT_RATIO * floor_light,
        },
        {
            "target": "worker RSS < 1 GiB with 20,000 open coupons",
            "figure": f"{rss:.0f} MiB with {count} open",
            "met": rss < 1024,
        },
        {
            "target": "claim p50 with all open <= 1.5 x with 100 open",
            "figure": f"{at_all:.1f} ms vs {at_100:.1f} ms ({at_all / at_100:.2f}x)"
            + _unsettled(get(data, "open_coupons.settle") or {}),
            "met": at_all <= 1.5 * at_100,
        },
        *claims_report.targets(data),
        {
            "target": "catalog sync: every batch synced, the platform's changes in the ledger",
            "figure": f"{sync.get('synced')} of {sync.get('batches')} synced, "
            f"{sync.get('failed')} failed, {sync.get('changes_seen')} of "
            f"{sync.get('changed_at_platform')} changes seen",
            "met": bool(sync)
            and sync.get("synced") == sync.get("batches")
            and sync.get("failed") == 0
            and sync.get("changes_seen") == sync.get("changed_at_platform"),
        },
        {
            "target": "reconciliation: every use behind our back found and repaired, "
            "a second run finds nothing",
            "figure": f"{marked} used at the platform: {first.get('mismatches')} found, "
            f"{first.get('repaired')} repaired; second run {second.get('mismatches')} mismatches",
            "met": bool(recon)
            and first.get("mismatches") == marked
            and first.get("repaired") == marked
            and second.get("mismatches") == 0,
        },
    ]


def _paired(paired: dict[str, Any]) -> str:
    """The pairs of alternating parts' ratios in a few words ("" when not run)."""
    if "error" in paired:
        return f"pairs not measured: {paired['error']}"
    if "ratio_median" not in paired:
        return ""
    unsettled = paired.get("unsettled_parts") or []
    return (
        f"median {paired['ratio_median']:.2f} ({paired['ratio_min']:.2f} to "
        f"{paired['ratio_max']:.2f}) in {paired['pairs']} pairs of alternating parts of "
        f"{paired['items_per_part']}"
        + (f", {len(unsettled)} not settled after" if unsettled else "")
    )


def write_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_plot(data: dict[str, Any], path: Path) -> None:
    names = ["floor (Temporal)", "lifecycle (Temporal)", "peer (DBOS)"]
    throughput = [
        num(get(data, "floor.throughput_per_s")),
        num(get(data, "lifecycle.throughput_per_s")),
        num(get(data, "peer.throughput_per_s")),
    ]
    latency_keys = [
        ("floor light", "floor.light_rate.signal_to_done_ms"),
        ("floor sat.", "floor.signal_to_done_ms"),
        ("lifecycle light", "lifecycle.light_rate.unlock_to_issued_ms"),
        ("lifecycle sat.", "lifecycle.unlock_to_issued_ms"),
        ("peer sat.", "peer.unlock_to_issued_ms"),
    ]
    colors = ["#888888", "#1f77b4", "#ff7f0e"]
    fig, ((left, right, catalog), (storms, claim_rates, sweep)) = plt.subplots(
        2, 3, figsize=(19, 9.6), gridspec_kw={"width_ratios": [3, 3, 2]}
    )
    bars = left.bar(names, [0 if math.isnan(t) else t for t in throughput], color=colors)
    for bar, value in zip(bars, throughput, strict=True):
        label = "n/a" if math.isnan(value) else f"{value:.0f}/s"
        left.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    left.set_title("throughput at saturation (completed per second)")
    left.set_ylabel("per second")

    labels = [label for label, _ in latency_keys]
    p50 = [num(get(data, f"{key}.p50")) for _, key in latency_keys]
    p99 = [num(get(data, f"{key}.p99")) for _, key in latency_keys]
    x = range(len(labels))
    width = 0.4
    right.bar(
        [i - width / 2 for i in x], [0 if math.isnan(v) else v for v in p50], width, label="p50"
    )
    right.bar(
        [i + width / 2 for i in x], [0 if math.isnan(v) else v for v in p99], width, label="p99"
    )
    right.set_xticks(list(x), labels, rotation=20)
    right.set_yscale("log")
    right.set_ylabel("ms (log scale)")
    right.set_title("signal/unlock to done/issued latency")
    right.legend()

    catalog_bars = [
        ("batch sync\n(batches/s)", num(get(data, "catalog_sync.batches_per_s"))),
        ("reconcile + repair\n(coupons/s)", num(get(data, "reconciliation.first.coupons_per_s"))),
        ("reconcile again\n(coupons/s)", num(get(data, "reconciliation.second.coupons_per_s"))),
    ]
    bars = catalog.bar(
        [label for label, _ in catalog_bars],
        [0 if math.isnan(v) else v for _, v in catalog_bars],
        color=["#2ca02c", "#9467bd", "#c5b0d5"],
    )
    for bar, (_, value) in zip(bars, catalog_bars, strict=True):
        label = "n/a" if math.isnan(value) else f"{value:.0f}/s"
        catalog.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    catalog.set_yscale("log")
    tallest = max((v for _, v in catalog_bars if not math.isnan(v)), default=10.0)
    catalog.set_ylim(1, max(tallest, 10.0) * 3)  # room for the labels on a log scale
    catalog.set_ylabel("per second (log scale)")
    catalog.set_title(
        f"catalog: {get(data, 'catalog_sync.batches')} batches, "
        f"{get(data, 'reconciliation.coupons')} coupons"
    )
    claims_report.plot_storms(storms, data)
    claims_report.plot_claim_rates(claim_rates, data)
    claims_report.plot_sweep(sweep, data)
    size = get(data, "size.name")
    fig.suptitle(f"coupon lifecycle benchmark ({size}, {get(data, 'machine.cpu_count')} cpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(data: dict[str, Any], path: Path, plot_name: str) -> None:
    peer_error = get(data, "peer.error")
    peer = (
        f"not measured: {peer_error}"
        if peer_error
        else f"{num(get(data, 'peer.throughput_per_s')):.1f} lifecycles/s, "
        + p50_p99(data, "peer.unlock_to_issued_ms")
    )
    sql = get(data, "lifecycle.sql_per_coupon") or {}
    history = get(data, "lifecycle.history_events_per_coupon") or {}
    waits = get(data, "lifecycle.workflow_task_wait_ms") or {}
    collections = get(data, "lifecycle.worker_gc") or {}
    machine = data.get("machine", {})
    lines = [
        f"# Benchmark {data.get('date')} ({get(data, 'size.name')})",
        "",
        f"Machine: {machine.get('cpu_count')} x {machine.get('cpu_model')}, "
        f"{machine.get('memory_gib')} GiB, Python {machine.get('python')}, "
        f"temporalio {machine.get('temporalio')}; wall time {data.get('wall_s')} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| floor throughput | {num(get(data, 'floor.throughput_per_s')):.1f} workflows/s |",
        f"| floor signal-to-done, light rate | "
        f"{p50_p99(data, 'floor.light_rate.signal_to_done_ms')} |",
        f"| lifecycle throughput | {num(get(data, 'lifecycle.throughput_per_s')):.1f} "
        f"lifecycles/s (ratio to floor {num(get(data, 'lifecycle.ratio_to_floor')):.2f}) |",
        f"| lifecycle / floor in alternating parts | "
        f"{_paired(get(data, 'paired') or {}) or 'n/a'} |",
        f"| unlock-to-issued, light rate | "
        f"{p50_p99(data, 'lifecycle.light_rate.unlock_to_issued_ms')} |",
        f"| unlock-to-issued, saturation | {p50_p99(data, 'lifecycle.unlock_to_issued_ms')} |",
        f"| worker CPU per 1,000 lifecycles | "
        f"{num(get(data, 'lifecycle.worker_cpu_s_per_1000')):.1f} s |",
        f"| workflow task wait (scheduled to started), saturation | mean "
        f"{waits.get('mean', 'n/a')} ms, {waits.get('tasks_per_lifecycle', 'n/a')} tasks "
        "per lifecycle |",
        f"| worker garbage collection, saturation | "
        f"{collections.get('ms_per_lifecycle', 'n/a')} ms per lifecycle, "
        f"{collections.get('full_per_1000', 'n/a')} full collections per 1,000 lifecycles "
        f"(mean {collections.get('full_mean_ms', 'n/a')} ms) |",
        f"| history events per coupon | {history.get('mean')} (to `issued`) |",
        f"| SQL per coupon | {sql.get('statements', 'n/a')} statements "
        f"({sql.get('transaction_control', 'n/a')} of them BEGIN/COMMIT) |",
        f"| open coupons | {get(data, 'open_coupons.count')}, worker RSS "
        f"{get(data, 'open_coupons.worker_rss_mib')} MiB (at 100: "
        f"{get(data, 'open_coupons.worker_rss_mib_at_100')} MiB) |",
        f"| claim latency, 100 open / all open | "
        f"{p50_p99(data, 'open_coupons.claim_latency_ms_at_100')} / "
        f"{p50_p99(data, 'open_coupons.claim_latency_ms_at_all')} |",
        f"| the same, first pass over the pool (one claim per connection) | "
        f"{p50_p99(data, 'open_coupons.claim_latency_first_pass_ms_at_100')} / "
        f"{p50_p99(data, 'open_coupons.claim_latency_first_pass_ms_at_all')} |",
        f"| evicted coupons resumed | {get(data, 'open_coupons.evicted_resumed')}/"
        f"{get(data, 'open_coupons.evicted_sample')} issued |",
        *claims_report.table_rows(data),
        f"| peer (DBOS) | {peer} |",
        f"| catalog sync | {get(data, 'catalog_sync.synced')} batches in "
        f"{num(get(data, 'catalog_sync.wall_s')):.2f} s: "
        f"{num(get(data, 'catalog_sync.batches_per_s')):.1f} batches/s (created at "
        f"{num(get(data, 'catalog_sync.created_per_s')):.1f}/s) |",
        f"| reconciliation, with repairs | {get(data, 'reconciliation.coupons')} coupons, "
        f"{get(data, 'reconciliation.marked_used')} used behind our back: "
        f"{get(data, 'reconciliation.first.mismatches')} found, "
        f"{get(data, 'reconciliation.first.repaired')} repaired in "
        f"{num(get(data, 'reconciliation.first.wall_s')):.2f} s "
        f"({num(get(data, 'reconciliation.first.coupons_per_s')):.0f} coupons/s) |",
        f"| reconciliation, again | {get(data, 'reconciliation.second.mismatches')} "
        f"mismatches in {num(get(data, 'reconciliation.second.wall_s')):.2f} s "
        f"({num(get(data, 'reconciliation.second.coupons_per_s')):.0f} coupons/s) |",
        "",
        "## Targets",
        "",
        "| target | figure | |",
        "|---|---|---|",
    ]
    for target in data.get("targets", []):
        mark = "met" if target["met"] else "**missed**"
        lines.append(f"| {target['target']} | {target['figure']} | {mark} |")
    floor_cpu = get(data, "floor.cpu_by_process") or {}
    life_cpu = get(data, "lifecycle.cpu_by_process") or {}
    if floor_cpu or life_cpu:
        lines += [
            "",
            "## Where the CPU went at saturation (cores busy; the machine has "
            f"{machine.get('cpu_count')})",
            "",
            "| process | floor | lifecycle |",
            "|---|---|---|",
        ]
        for name in dict.fromkeys([*floor_cpu, *life_cpu]):
            floor_cores = floor_cpu.get(name, {}).get("cores", "-")
            life_cores = life_cpu.get(name, {}).get("cores", "-")
            lines.append(f"| {name} | {floor_cores} | {life_cores} |")
    lines += claims_report.sections(data)
    lines += compare.markdown(data)
    lines += ["", f"![throughput and latency]({plot_name})", ""]
    path.write_text("\n".join(lines))


def _unsettled(settle: dict[str, Any]) -> str:
    """What a figure meant to be taken at rest says when the wait for rest gave up."""
    unstarted = (settle.get("workflows") or {}).get("unstarted_left") or 0
    left = settle.get("backlog_left") or 0
    why = [f"{unstarted} claims without their workflow"] if unstarted > 0 else []
    if left > 0:
        why.append(f"{left} workflow tasks still queued after {settle.get('settle_s')} s")
    return f"; not at rest: {', '.join(why)}" if why else ""
