"""`make chaos` itself: every scenario at its tiny size, as the command runs it.

A regression in the harness (or a coupon lost, sent twice or left in a wrong state
under a crash, a reconciliation that finds the platform and the ledger apart, or a
platform callback applied twice, never, or forged, or an operator's mistake that is not
made safe: a contradicting shell that writes, a platform batch the ledger never learns of,
a wedged coupon left wedged, or a claim burst under kills that grants over the quota or
leaves a claim without exactly one workflow) fails here. Timings are read from the run,
never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from chaos.report import MUST_BE_ZERO
from chaos.scenarios import SCENARIOS
from chaos.sizes import SIZES

ROOT = Path(__file__).resolve().parent.parent


def test_every_scenario_at_tiny_size_loses_nothing(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "chaos", "--size", "tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    written = list(tmp_path.glob("tiny-chaos-*.json"))
    assert len(written) == 1, output
    assert written[0].with_suffix(".md").exists()
    results = json.loads(written[0].read_text())
    assert [r["name"] for r in results] == list(SCENARIOS), output
    for result in results:
        assert result["error"] is None, (result["name"], result["error"], output)
        assert result["coupons"] > 0, (result["name"], output)
        counts = {name: result[name] for name in MUST_BE_ZERO}
        assert counts == dict.fromkeys(MUST_BE_ZERO, 0), (result["name"], result, output)
        assert not any(result["checks"].values()), (result["name"], result, output)
        assert result["converge_s"] is not None, (result["name"], result["notes"], output)
    # The budget fault met the flow: coupons waited for budget (the sync saw them as its
    # backlog) and the schedule's sync woke them once it was back.
    [budget] = [r for r in results if r["name"] == "budget_exhausted"]
    figures = budget["figures"]
    assert figures["waiting_for_budget"] > 0, (budget, output)
    assert figures["backlog_seen_by_sync"] > 0, (budget, output)
    assert figures["woken_by_sync"] >= figures["waiting_for_budget"], (budget, output)
    # The callbacks met every fault: every coupon used at the platform and redeemed through
    # its callback (the checks above: once, by the callback, nothing forged accepted, nothing
    # given up), deliveries failed while the API was down and were retried, and duplicates
    # or forged probes were sent.
    [callbacks] = [r for r in results if r["name"] == "callbacks"]
    figures = callbacks["figures"]
    assert callbacks["checks"], (callbacks, output)
    assert figures["coupons_used"] == callbacks["coupons"], (callbacks, output)
    assert figures["use_to_redeemed_ms_count"] == callbacks["coupons"], (callbacks, output)
    assert figures["failed_api_unreachable"] > 0, (callbacks, output)
    assert figures["callbacks_duplicated"] + figures["callbacks_forged_sent"] > 0, callbacks
    # Every operator mistake was made and met (its checks above are 0): the contradicting
    # shells refused, processes died between the platform and the ledger and left a batch
    # the ledger did not know until the sync, coupons wedged and recovered, doctor content.
    [mistakes] = [r for r in results if r["name"] == "operator_mistakes"]
    figures = mistakes["figures"]
    assert mistakes["checks"], (mistakes, output)
    assert figures["refused_mismatched_shells"] == 3, (mistakes, output)
    assert figures["following_shells_issued"] == figures["following_shells_claimed"] > 0
    assert figures["crashes_between_platform_and_ledger"] >= 3, (mistakes, output)
    assert figures["platform_batches_unknown_before_sync"] > 0, (mistakes, output)
    assert figures["platform_batches_unknown_to_ledger"] == 0, (mistakes, output)
    assert figures["wedged_before_recovery"] >= figures["wedged_issued"] > 0, (mistakes, output)
    assert figures["wedged_after_recovery"] == 0, (mistakes, output)
    assert figures["doctor_exit_code"] == 0, (mistakes, output)
    # The claim burst met its kills: more users than the quota (the rest answered sold_out),
    # the quota granted exactly and every grant acknowledged, each kill landing while the
    # driver's calls were in flight, tasks reported the instant the claim was answered, and
    # every claim's workflow looked up in Temporal (its checks above: 0).
    [burst] = [r for r in results if r["name"] == "claim_burst_kills"]
    figures = burst["figures"]
    assert burst["checks"], (burst, output)
    assert figures["kills"] == len(SIZES["tiny"].burst_kills), (burst, output)
    assert figures["calls_in_flight_at_kills"] > 0, (burst, output)
    assert figures["granted"] == figures["quota"] == figures["acknowledged"] == burst["coupons"]
    assert figures["refused_sold_out"] == figures["users"] - figures["granted"] > 0, burst
    assert figures["claimed_counter"] == figures["granted"], (burst, output)
    assert figures["workflows_checked"] == figures["granted"], (burst, output)
    assert figures["completions_at_once"] > 0, (burst, output)
    assert run.returncode == 0, output
    assert "converge s" in run.stdout and "reconcile" in run.stdout  # the table
