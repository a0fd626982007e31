"""How big and how long each scenario runs, per `--size`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    name: str
    coupons: int
    # Claims are spread over this long, so claims and completions are still flowing
    # while the faults land.
    load_s: float
    worker_kills: int
    # (how PostgreSQL goes down: "stop" is a fast shutdown, "kill" a crash; seconds down)
    postgres_outages: tuple[tuple[str, float], ...]
    # How the Temporal dev server goes down each time: "stop" (graceful) or "kill".
    temporal_restarts: tuple[str, ...]
    # How long it stays down each time (long enough that the SDK's own retries of a
    # claim or a signal run out and the driver's retries take over).
    temporal_down_s: float
    lookup_lag_s: float
    # The service's LAG_WINDOW_S for the platform scenario: at or under the lag, so the
    # "not visible yet past the window: resend the same key" path runs too.
    lag_window_s: float
    rate_limit_per_s: int
    # The platform's faults stay on this long past the end of the load, then calm down;
    # coupons converge under the faults, the tail after (retry backoff caps at 1 min).
    platform_fault_hold_s: float
    # How many completion reports each coupon gets in the duplicates scenario.
    duplicates: int
    # The budget scenario: the batch's budget stays at 0 this long past the end of the
    # load, and the catalog sync schedule runs this often (SYNC_INTERVAL_S), so the
    # coupons waiting for budget are woken by the schedule, as in production.
    budget_hold_s: float
    sync_interval_s: float
    # The callbacks scenario: how the API goes down while coupons are used at the platform
    # ("stop" is SIGTERM, a graceful shutdown; "kill" SIGKILL) and for how many seconds, so
    # the platform's callbacks fail and are retried.
    api_outages: tuple[tuple[str, float], ...]
    # The claim burst scenario: this many users claim a campaign whose quota is `coupons`,
    # in `burst_waves` waves of users at once spread over `burst_s`, while these parts
    # ("worker", "api", "temporal" or "postgres") are SIGKILLed, each in a random wave once
    # a random share of its users is answered, and started again the given seconds later.
    burst_users: int
    burst_waves: int
    burst_s: float
    burst_kills: tuple[tuple[str, float], ...]
    # After the faults: how long every coupon may take to be issued.
    converge_timeout_s: float
    # Load, faults and convergence; past it the scenario stops and checks what it finds.
    hard_timeout_s: float
    # Scenarios run at once (each on its own stack). Waiting dominates the short sizes
    # (an activity lost with a killed worker is retried only after its heartbeat
    # timeout), so they run side by side; the full size runs one at a time so its
    # timings are not skewed by the others.
    jobs: int


SIZES: dict[str, Size] = {
    "tiny": Size(
        name="tiny",
        coupons=8,
        load_s=6,
        worker_kills=1,
        postgres_outages=(("kill", 3),),
        temporal_restarts=("kill",),
        temporal_down_s=3,
        lookup_lag_s=3,
        lag_window_s=2,
        rate_limit_per_s=10,
        platform_fault_hold_s=10,
        duplicates=4,
        budget_hold_s=3,
        sync_interval_s=2,
        api_outages=(("kill", 3),),
        burst_users=24,
        burst_waves=4,
        burst_s=4,
        burst_kills=(("api", 1), ("worker", 1), ("postgres", 2)),
        converge_timeout_s=75,
        hard_timeout_s=100,
        # Two stacks at a time, not five: each Temporal dev server also binds internal
        # ports of its own choosing, and five at once on two cores once collided (the
        # dev server panicked on "address already in use") in a CI run of the suite.
        jobs=2,
    ),
    "quick": Size(
        name="quick",
        coupons=50,
        load_s=20,
        worker_kills=2,
        postgres_outages=(("kill", 5),),
        temporal_restarts=("stop", "kill"),
        temporal_down_s=5,
        lookup_lag_s=6,
        lag_window_s=5,
        rate_limit_per_s=15,
        platform_fault_hold_s=20,
        duplicates=5,
        budget_hold_s=10,
        sync_interval_s=3,
        api_outages=(("stop", 4), ("kill", 4)),
        burst_users=150,
        burst_waves=8,
        burst_s=20,
        burst_kills=(
            ("worker", 1),
            ("api", 1),
            ("temporal", 3),
            ("worker", 1),
            ("api", 1),
            ("postgres", 3),
        ),
        converge_timeout_s=100,
        hard_timeout_s=150,
        jobs=5,
    ),
    "full": Size(
        name="full",
        coupons=200,
        load_s=40,
        worker_kills=5,
        postgres_outages=(("stop", 10), ("kill", 10)),
        temporal_restarts=("stop", "kill"),
        temporal_down_s=10,
        lookup_lag_s=30,
        lag_window_s=30,
        rate_limit_per_s=40,
        platform_fault_hold_s=60,
        duplicates=6,
        budget_hold_s=30,
        sync_interval_s=5,
        api_outages=(("stop", 10), ("kill", 10)),
        burst_users=600,
        burst_waves=12,
        burst_s=40,
        burst_kills=(
            ("worker", 1),
            ("api", 1),
            ("temporal", 8),
            ("worker", 1),
            ("api", 1),
            ("postgres", 8),
            ("worker", 1),
            ("api", 1),
        ),
        converge_timeout_s=300,
        hard_timeout_s=420,
        jobs=1,
    ),
}
