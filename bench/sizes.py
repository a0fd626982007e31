"""How big each part of the benchmark runs: full (the issue's figures), quick, tiny (tests)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Size:
    name: str
    # Saturation runs: this many items, this many in flight at once (closed loop). The
    # same concurrency for the floor, the lifecycle and the peer keeps the ratio fair.
    floor_n: int
    lifecycle_n: int
    peer_n: int
    concurrency: int
    # The floor and the lifecycle again, in this many pairs of alternating parts of
    # `paired_n` items each, so that each ratio sees the machine of the same minute.
    paired_parts: int
    paired_n: int
    # Light fixed-rate runs: this many unlocks, spaced evenly at this rate.
    light_n: int
    light_rate_per_s: float
    # Open coupons: how many wait in `received`; claims timed at 100 open and at all open;
    # the oldest `evicted_sample` are completed at the end.
    open_count: int
    open_probe_claims: int
    evicted_sample: int
    # Claim bursts: this many claims at once against this quota; the large burst (0: not
    # run) too.
    storm_claims: int
    storm_quota: int
    large_storm_claims: int
    large_storm_quota: int
    # The single-row commit rate and SELECT 1 rate, each measured this long; the Temporal
    # server's start rate over this many starts.
    reference_s: float
    reference_starts: int
    # Steady claims, open loop: offered at this rate for this long; then a sweep of offered
    # rates, this long each. A claim the generator cannot send within the late limit of
    # its planned time is skipped (counted); the wait for the claims' workflows is bounded.
    steady_rate_per_s: float
    steady_s: float
    sweep_rates_per_s: tuple[float, ...]
    sweep_step_s: float
    late_limit_s: float
    workflow_wait_s: float
    history_sample: int
    # The worker's workflow cache: smaller than the open coupons, so the oldest are evicted
    # and must be replayed from history when their task completes.
    worker_cache_size: int
    # The catalog: batches in one catalog sync; issued coupons in the reconciled batch (the
    # lifecycle part's, topped up to this many when it issued fewer).
    sync_batches: int
    reconcile_coupons: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SIZES = {
    "full": Size(
        name="full",
        floor_n=2000,
        lifecycle_n=2000,
        peer_n=1000,
        concurrency=100,
        paired_parts=4,
        paired_n=500,
        light_n=100,
        light_rate_per_s=10,
        open_count=20_000,
        # Ten claims per connection of the bench's pool (CLIENT_POOL): bench/open_coupons.py.
        open_probe_claims=500,
        evicted_sample=50,
        storm_claims=1000,
        storm_quota=100,
        large_storm_claims=10_000,
        large_storm_quota=1000,
        reference_s=5,
        reference_starts=2000,
        steady_rate_per_s=500,
        steady_s=20,
        sweep_rates_per_s=(100, 250, 500, 1000),
        sweep_step_s=5,
        late_limit_s=30,
        workflow_wait_s=120,
        history_sample=20,
        worker_cache_size=1000,
        sync_batches=200,
        reconcile_coupons=2000,
    ),
    "quick": Size(
        name="quick",
        floor_n=300,
        lifecycle_n=300,
        peer_n=200,
        concurrency=100,
        paired_parts=2,
        paired_n=300,
        light_n=30,
        light_rate_per_s=10,
        open_count=500,
        open_probe_claims=150,
        evicted_sample=50,
        storm_claims=1000,
        storm_quota=100,
        large_storm_claims=10_000,
        large_storm_quota=1000,
        reference_s=3,
        reference_starts=1000,
        steady_rate_per_s=500,
        steady_s=5,
        sweep_rates_per_s=(100, 250, 500, 1000),
        sweep_step_s=2,
        late_limit_s=5,
        workflow_wait_s=60,
        history_sample=10,
        # Under the open coupons (500) so the oldest are evicted, yet above what the
        # lifecycle part keeps busy: each issued coupon's last workflow task (the `issued`
        # search attribute, its first redemption timer) waits seconds behind newer claims,
        # and at 100 the worker had evicted it by then and replayed its history.
        worker_cache_size=300,
        sync_batches=50,
        reconcile_coupons=500,
    ),
    # For the test suite: every part runs, only to prove the harness works.
    "tiny": Size(
        name="tiny",
        floor_n=40,
        lifecycle_n=40,
        peer_n=30,
        concurrency=40,
        paired_parts=1,
        paired_n=40,
        light_n=10,
        light_rate_per_s=10,
        open_count=150,
        open_probe_claims=20,
        evicted_sample=10,
        storm_claims=200,
        storm_quota=20,
        large_storm_claims=0,
        large_storm_quota=0,
        reference_s=1,
        reference_starts=100,
        steady_rate_per_s=50,
        steady_s=2,
        sweep_rates_per_s=(25, 50),
        sweep_step_s=1,
        late_limit_s=5,
        workflow_wait_s=30,
        history_sample=5,
        worker_cache_size=50,
        sync_batches=5,
        reconcile_coupons=20,
    ),
}
