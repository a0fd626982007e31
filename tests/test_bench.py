"""The benchmark harness, run end to end at its tiny size: every part runs, and the JSON
holds every figure the issues ask for with sane values, and the catalog's and the claim
storm's counts hold (in process and through the HTTP API). Timings are never asserted
against targets here: those are read from a full run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = (
    "floor.throughput_per_s",
    "floor.light_rate.signal_to_done_ms.p50",
    "lifecycle.throughput_per_s",
    "lifecycle.ratio_to_floor",
    "lifecycle.unlock_to_issued_ms.p50",
    "lifecycle.unlock_to_issued_ms.p99",
    "lifecycle.light_rate.unlock_to_issued_ms.p50",
    "lifecycle.worker_cpu_s_per_1000",
    "lifecycle.history_events_per_coupon.mean",
    "lifecycle.sql_per_coupon",
    "open_coupons.count",
    "open_coupons.worker_rss_mib",
    "open_coupons.evicted_resumed_ok",
    "claim_storm.granted",
    "claim_storm.quota",
    "claim_storm.throughput_per_s",
    "claim_storm.claim_latency_ms.p50",
    "claim_storm.claim_latency_ms.p99",
    "claim_storm_api.granted",
    "claim_storm_api.quota",
    "claim_storm_api.throughput_per_s",
    "claim_storm_api.claim_latency_ms.p50",
    "claim_storm_api.claim_latency_ms.p99",
    "peer.throughput_per_s",
    "catalog_sync.batches_per_s",
    "catalog_sync.wall_s",
    "reconciliation.first.coupons_per_s",
    "reconciliation.second.coupons_per_s",
    "machine.cpu_count",
    "machine.temporalio",
)


def lookup(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        assert isinstance(node, dict) and key in node, f"missing {path}"
        node = node[key]
    return node


def test_tiny_bench_end_to_end(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "tiny", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert "lifecycle saturation" in run.stdout  # progress lines while it runs
    [json_file] = tmp_path.glob("tiny-*.json")
    assert json_file.with_suffix(".png").stat().st_size > 0
    assert "## Targets" in json_file.with_suffix(".md").read_text()
    data = json.loads(json_file.read_text())

    for path in REQUIRED:
        lookup(data, path)
    # The storm by both paths: exactly the quota granted and in the ledger, every other
    # claim refused as sold out.
    for path in ("claim_storm", "claim_storm_api"):
        storm = data[path]
        assert storm["quota"] == data["size"]["storm_quota"], (path, storm)
        assert storm["granted"] == storm["claims_in_ledger"] == storm["quota"], (path, storm)
        assert storm["refused"] == {"sold_out": storm["claims"] - storm["quota"]}, (path, storm)
    for part in ("floor", "lifecycle"):
        assert data[part]["throughput_per_s"] > 0
    for key in ("floor.signal_to_done_ms", "lifecycle.unlock_to_issued_ms"):
        summary = lookup(data, key)
        assert 0 < summary["p50"] <= summary["p99"]
    assert data["lifecycle"]["ratio_to_floor"] > 0
    assert data["lifecycle"]["history_events_per_coupon"]["mean"] > 0
    assert data["lifecycle"]["sql_per_coupon"]["statements"] > 0
    assert data["open_coupons"]["count"] == data["size"]["open_count"]
    assert data["open_coupons"]["worker_rss_mib"] > 0
    assert data["open_coupons"]["evicted_resumed_ok"] is True
    # The peer either measured or said why not; never a made-up number.
    peer = data["peer"]
    assert (peer["throughput_per_s"] or 0) > 0 or peer.get("error")
    assert not math.isnan(data["lifecycle"]["unlock_to_issued_ms"]["p99"])
    # The catalog: every batch synced, the platform's changes in the ledger; every use
    # made behind the service's back found and repaired, and a second look finds nothing.
    sync = data["catalog_sync"]
    assert sync["synced"] == sync["batches"] == data["size"]["sync_batches"]
    assert sync["failed"] == 0
    assert sync["changes_seen"] == sync["changed_at_platform"] > 0
    recon = data["reconciliation"]
    assert recon["coupons"] >= data["size"]["reconcile_coupons"]
    assert recon["marked_used"] > 0
    first, second = recon["first"], recon["second"]
    assert first["mismatches"] == recon["marked_used"], recon
    assert first["mismatch_kinds"] == {"state": recon["marked_used"]}, recon
    assert first["repaired"] == recon["marked_used"], recon
    assert first["platform_used"] == recon["marked_used"], recon
    assert second["mismatches"] == 0, recon
    assert second["platform_sent"] == second["ledger_coupons"] == recon["coupons"], recon
    assert len(data["targets"]) == 8
    assert all(t["met"] for t in data["targets"][-2:]), data["targets"]
