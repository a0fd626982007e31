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
    # Light fixed-rate runs: this many unlocks, spaced evenly at this rate.
    light_n: int
    light_rate_per_s: float
    # Open coupons: how many wait in `received`; claims timed at 100 open and at all open;
    # the oldest `evicted_sample` are completed at the end.
    open_count: int
    open_probe_claims: int
    evicted_sample: int
    storm_claims: int
    storm_quota: int
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
        light_n=100,
        light_rate_per_s=10,
        open_count=20_000,
        open_probe_claims=100,
        evicted_sample=50,
        storm_claims=1000,
        storm_quota=100,
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
        light_n=30,
        light_rate_per_s=10,
        open_count=500,
        open_probe_claims=50,
        evicted_sample=50,
        storm_claims=1000,
        storm_quota=100,
        history_sample=10,
        worker_cache_size=100,
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
        light_n=10,
        light_rate_per_s=10,
        open_count=150,
        open_probe_claims=20,
        evicted_sample=10,
        storm_claims=200,
        storm_quota=20,
        history_sample=5,
        worker_cache_size=50,
        sync_batches=5,
        reconcile_coupons=20,
    ),
}
