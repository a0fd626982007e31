"""The run's outputs: JSON with every figure, a PNG plot and a short markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here, and none needed for a file
import matplotlib.pyplot as plt


def _get(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its figure, its bound and whether it was met."""
    ratio = _num(_get(data, "lifecycle.ratio_to_floor"))
    light = _num(_get(data, "lifecycle.light_rate.unlock_to_issued_ms.p50"))
    floor_light = _num(_get(data, "floor.light_rate.signal_to_done_ms.p50"))
    rss = _num(_get(data, "open_coupons.worker_rss_mib"))
    count = _get(data, "open_coupons.count")
    at_100 = _num(_get(data, "open_coupons.claim_latency_ms_at_100.p50"))
    at_all = _num(_get(data, "open_coupons.claim_latency_ms_at_all.p50"))
    granted = _get(data, "claim_storm.granted")
    quota = _get(data, "claim_storm.quota")
    api_granted = _get(data, "claim_storm_api.granted")
    api_quota = _get(data, "claim_storm_api.quota")
    sync = _get(data, "catalog_sync") or {}
    recon = _get(data, "reconciliation") or {}
    marked = recon.get("marked_used")
    first = recon.get("first") or {}
    second = recon.get("second") or {}
    return [
        {
            "target": "lifecycle throughput >= 0.5 x floor",
            "figure": f"ratio {ratio:.2f}",
            "met": ratio >= 0.5,
        },
        {
            "target": "light-rate unlock-to-issued p50 <= 2 x floor signal-to-done p50",
            "figure": f"{light:.0f} ms vs 2 x {floor_light:.0f} ms = {2 * floor_light:.0f} ms "
            f"({light / floor_light:.2f}x the floor)",
            "met": light <= 2 * floor_light,
        },
        {
            "target": "worker RSS < 1 GiB with 20,000 open coupons",
            "figure": f"{rss:.0f} MiB with {count} open",
            "met": rss < 1024,
        },
        {
            "target": "claim p50 with all open <= 1.5 x with 100 open",
            "figure": f"{at_all:.1f} ms vs {at_100:.1f} ms ({at_all / at_100:.2f}x)",
            "met": at_all <= 1.5 * at_100,
        },
        {
            "target": "claim storm: granted == quota",
            "figure": f"{granted} granted, quota {quota}",
            "met": granted == quota,
        },
        {
            "target": "claim storm through the HTTP API: granted == quota",
            "figure": f"{api_granted} granted, quota {api_quota}",
            "met": api_granted is not None and api_granted == api_quota,
        },
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


def write_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_plot(data: dict[str, Any], path: Path) -> None:
    names = ["floor (Temporal)", "lifecycle (Temporal)", "peer (DBOS)"]
    throughput = [
        _num(_get(data, "floor.throughput_per_s")),
        _num(_get(data, "lifecycle.throughput_per_s")),
        _num(_get(data, "peer.throughput_per_s")),
    ]
    latency_keys = [
        ("floor light", "floor.light_rate.signal_to_done_ms"),
        ("floor sat.", "floor.signal_to_done_ms"),
        ("lifecycle light", "lifecycle.light_rate.unlock_to_issued_ms"),
        ("lifecycle sat.", "lifecycle.unlock_to_issued_ms"),
        ("peer sat.", "peer.unlock_to_issued_ms"),
    ]
    colors = ["#888888", "#1f77b4", "#ff7f0e"]
    fig, (left, right, catalog, storm) = plt.subplots(
        1, 4, figsize=(21, 4.8), gridspec_kw={"width_ratios": [3, 3, 2, 2]}
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
    p50 = [_num(_get(data, f"{key}.p50")) for _, key in latency_keys]
    p99 = [_num(_get(data, f"{key}.p99")) for _, key in latency_keys]
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
        ("batch sync\n(batches/s)", _num(_get(data, "catalog_sync.batches_per_s"))),
        ("reconcile + repair\n(coupons/s)", _num(_get(data, "reconciliation.first.coupons_per_s"))),
        ("reconcile again\n(coupons/s)", _num(_get(data, "reconciliation.second.coupons_per_s"))),
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
        f"catalog: {_get(data, 'catalog_sync.batches')} batches, "
        f"{_get(data, 'reconciliation.coupons')} coupons"
    )
    _plot_storm(storm, data)
    size = _get(data, "size.name")
    fig.suptitle(f"coupon lifecycle benchmark ({size}, {_get(data, 'machine.cpu_count')} cpus)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STORM_PATHS = (("in process", "claim_storm"), ("HTTP API", "claim_storm_api"))


def _plot_storm(axes: Any, data: dict[str, Any]) -> None:
    """The claim storm's latency by path, p50 and p99, with each path's throughput."""
    labels = [
        f"{name}\n{_num(_get(data, f'{key}.throughput_per_s')):.0f} claims/s"
        for name, key in STORM_PATHS
    ]
    width = 0.4
    for offset, quantile in ((-width / 2, "p50"), (width / 2, "p99")):
        values = [_num(_get(data, f"{key}.claim_latency_ms.{quantile}")) for _, key in STORM_PATHS]
        axes.bar(
            [i + offset for i in range(len(labels))],
            [0 if math.isnan(v) else v for v in values],
            width,
            label=quantile,
        )
    axes.set_xticks(list(range(len(labels))), labels)
    axes.set_ylabel("claim latency, ms")
    axes.set_title(
        f"claim storm: {_get(data, 'claim_storm.claims')} claims at once, "
        f"quota {_get(data, 'claim_storm.quota')}"
    )
    axes.legend()


def _storm_row(data: dict[str, Any], key: str) -> str:
    return (
        f"{_get(data, f'{key}.granted')} granted of quota {_get(data, f'{key}.quota')} from "
        f"{_get(data, f'{key}.claims')} claims, {_ms(data, f'{key}.claim_latency_ms')}, "
        f"{_num(_get(data, f'{key}.throughput_per_s')):.0f} claims/s"
    )


def _storm_section(data: dict[str, Any]) -> list[str]:
    """The two paths of the claim storm side by side."""

    def cells(pick: Any) -> str:
        return " | ".join(str(pick(key)) for _, key in STORM_PATHS)

    def latency(key: str) -> str:
        summary = _get(data, f"{key}.claim_latency_ms") or {}
        return " / ".join(f"{_num(summary.get(q)):.0f}" for q in ("p50", "p99", "max"))

    def refused(key: str) -> str:
        found = _get(data, f"{key}.refused") or {}
        return ", ".join(f"{code} {n}" for code, n in sorted(found.items())) or "none"

    api_pool = _get(data, "claim_storm_api.api_pool_connections")
    return [
        "",
        "## Claim storm, in process and through the HTTP API",
        "",
        "Every claim at once, each by its own user, against a campaign of its own per path. "
        "In process: `ClaimService` on a pool of "
        f"{_get(data, 'claim_storm.pool_connections')} connections. HTTP API: "
        "`POST /v1/campaigns/{id}/claims` with a tenant's app key from "
        f"{_get(data, 'claim_storm_api.http_connections')} clients of one HTTP connection "
        f"each to the API process (its own pool: {api_pool} connections). Latency is the "
        "client's: queueing for a connection included, on both paths.",
        "",
        "| | " + " | ".join(name for name, _ in STORM_PATHS) + " |",
        "|---|---|---|",
        "| granted of quota | "
        + cells(lambda k: f"{_get(data, f'{k}.granted')} of {_get(data, f'{k}.quota')}")
        + " |",
        "| claims in the ledger | " + cells(lambda k: _get(data, f"{k}.claims_in_ledger")) + " |",
        "| refused | " + cells(refused) + " |",
        "| claim latency p50 / p99 / max, ms | " + cells(latency) + " |",
        "| throughput, claims/s | "
        + cells(lambda k: f"{_num(_get(data, f'{k}.throughput_per_s')):.0f}")
        + " |",
        "| wall time, s | " + cells(lambda k: _get(data, f"{k}.wall_s")) + " |",
        "| repeated by the client (503, no answer) | - | "
        + (
            ", ".join(
                f"{why} {n}"
                for why, n in sorted((_get(data, "claim_storm_api.retried") or {}).items())
            )
            or "none"
        )
        + " |",
    ]


def _ms(data: dict[str, Any], key: str) -> str:
    p50 = _num(_get(data, f"{key}.p50"))
    p99 = _num(_get(data, f"{key}.p99"))
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms"


def write_markdown(data: dict[str, Any], path: Path, plot_name: str) -> None:
    peer_error = _get(data, "peer.error")
    peer = (
        f"not measured: {peer_error}"
        if peer_error
        else f"{_num(_get(data, 'peer.throughput_per_s')):.1f} lifecycles/s, "
        + _ms(data, "peer.unlock_to_issued_ms")
    )
    sql = _get(data, "lifecycle.sql_per_coupon") or {}
    history = _get(data, "lifecycle.history_events_per_coupon") or {}
    machine = data.get("machine", {})
    lines = [
        f"# Benchmark {data.get('date')} ({_get(data, 'size.name')})",
        "",
        f"Machine: {machine.get('cpu_count')} x {machine.get('cpu_model')}, "
        f"{machine.get('memory_gib')} GiB, Python {machine.get('python')}, "
        f"temporalio {machine.get('temporalio')}; wall time {data.get('wall_s')} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| floor throughput | {_num(_get(data, 'floor.throughput_per_s')):.1f} workflows/s |",
        f"| floor signal-to-done, light rate | {_ms(data, 'floor.light_rate.signal_to_done_ms')} |",
        f"| lifecycle throughput | {_num(_get(data, 'lifecycle.throughput_per_s')):.1f} "
        f"lifecycles/s (ratio to floor {_num(_get(data, 'lifecycle.ratio_to_floor')):.2f}) |",
        f"| unlock-to-issued, light rate | "
        f"{_ms(data, 'lifecycle.light_rate.unlock_to_issued_ms')} |",
        f"| unlock-to-issued, saturation | {_ms(data, 'lifecycle.unlock_to_issued_ms')} |",
        f"| worker CPU per 1,000 lifecycles | "
        f"{_num(_get(data, 'lifecycle.worker_cpu_s_per_1000')):.1f} s |",
        f"| history events per coupon | {history.get('mean')} (to `issued`) |",
        f"| SQL per coupon | {sql.get('statements', 'n/a')} statements "
        f"({sql.get('transaction_control', 'n/a')} of them BEGIN/COMMIT) |",
        f"| open coupons | {_get(data, 'open_coupons.count')}, worker RSS "
        f"{_get(data, 'open_coupons.worker_rss_mib')} MiB (at 100: "
        f"{_get(data, 'open_coupons.worker_rss_mib_at_100')} MiB) |",
        f"| claim latency, 100 open / all open | "
        f"{_ms(data, 'open_coupons.claim_latency_ms_at_100')} / "
        f"{_ms(data, 'open_coupons.claim_latency_ms_at_all')} |",
        f"| evicted coupons resumed | {_get(data, 'open_coupons.evicted_resumed')}/"
        f"{_get(data, 'open_coupons.evicted_sample')} issued |",
        f"| claim storm, in process | {_storm_row(data, 'claim_storm')} |",
        f"| claim storm, HTTP API | {_storm_row(data, 'claim_storm_api')} |",
        f"| peer (DBOS) | {peer} |",
        f"| catalog sync | {_get(data, 'catalog_sync.synced')} batches in "
        f"{_num(_get(data, 'catalog_sync.wall_s')):.2f} s: "
        f"{_num(_get(data, 'catalog_sync.batches_per_s')):.1f} batches/s (created at "
        f"{_num(_get(data, 'catalog_sync.created_per_s')):.1f}/s) |",
        f"| reconciliation, with repairs | {_get(data, 'reconciliation.coupons')} coupons, "
        f"{_get(data, 'reconciliation.marked_used')} used behind our back: "
        f"{_get(data, 'reconciliation.first.mismatches')} found, "
        f"{_get(data, 'reconciliation.first.repaired')} repaired in "
        f"{_num(_get(data, 'reconciliation.first.wall_s')):.2f} s "
        f"({_num(_get(data, 'reconciliation.first.coupons_per_s')):.0f} coupons/s) |",
        f"| reconciliation, again | {_get(data, 'reconciliation.second.mismatches')} "
        f"mismatches in {_num(_get(data, 'reconciliation.second.wall_s')):.2f} s "
        f"({_num(_get(data, 'reconciliation.second.coupons_per_s')):.0f} coupons/s) |",
        "",
        "## Targets",
        "",
        "| target | figure | |",
        "|---|---|---|",
    ]
    for target in data.get("targets", []):
        mark = "met" if target["met"] else "**missed**"
        lines.append(f"| {target['target']} | {target['figure']} | {mark} |")
    floor_cpu = _get(data, "floor.cpu_by_process") or {}
    life_cpu = _get(data, "lifecycle.cpu_by_process") or {}
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
    lines += _storm_section(data)
    lines += ["", f"![throughput and latency]({plot_name})", ""]
    path.write_text("\n".join(lines))
