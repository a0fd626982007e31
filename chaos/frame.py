"""What every chaos scenario shares while it runs: the scenario's definition, the run's
state, and the platform's calm knobs. The load and the driving are in `chaos.drive`, each
family's faults and checks in its own module (`chaos.processes`, `chaos.platform_faults`,
`chaos.duplicates`, `chaos.callbacks`, `chaos.operator`), the table in `chaos.scenarios`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from chaos.harness import Driver, Harness, Via
from chaos.report import ScenarioResult
from chaos.sizes import Size

# Calls in flight from the driver at once: enough to keep claims and completions
# flowing, far below the dev server's trouble zone (about 1,000 in flight).
DRIVER_CONCURRENCY = 40

# The simulator's knobs with no fault on: what the platform scenario ends with, and what
# every scenario's checks run under.
CALM_KNOBS: dict[str, object] = {
    "error_rate": 0,
    "ambiguous_rate": 0,
    "lookup_lag_s": 0,
    "rate_limit_per_s": 0,
    "latency_ms": 0,
}


@dataclass
class Run:
    """What a scenario's fault and load share while it runs."""

    scenario: Scenario
    size: Size
    harness: Harness
    driver: Driver
    result: ScenarioResult
    t0: float = field(default_factory=time.monotonic)
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(DRIVER_CONCURRENCY))
    phase: str = "load"
    # Wall-clock moments a fault marks for what is read after it (time.time()).
    marks: dict[str, float] = field(default_factory=dict)

    def at(self) -> str:
        return f"t={time.monotonic() - self.t0:5.1f}s"

    def fault(self, text: str) -> None:
        line = f"{self.at()} {text}"
        self.result.faults.append(line)
        say(self.scenario.name, line)


def say(name: str, text: str) -> None:
    print(f"[{name}] {text}", flush=True)


FaultFn = Callable[[Run, "asyncio.Task[None]"], Awaitable[float]]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    fault: FaultFn
    # The completion reports each coupon gets (all sent at once when more than one).
    reports: Callable[[Size, int], list[Via]]
    latency_ms: float = 0.0
    claim_twice: bool = False
    lag_window: Callable[[Size], float] = lambda size: 30.0
    # After the checks: every issued coupon reported done again (signal and update);
    # any new send counts as a duplicate.
    late_duplicates: bool = False
    # SYNC_INTERVAL_S of the scenario's worker (the catalog-sync schedule).
    sync_interval: Callable[[Size], float] = lambda size: 300.0
    # After convergence: read what the fault left to read (the scenario's figures).
    observe: Callable[[Run], Awaitable[None]] | None = None
    # The state every acknowledged coupon must end in.
    final_state: str = "issued"
    # The stack runs the HTTP API too (the simulator's callbacks go to it).
    api: bool = False
    # After the common checks: the scenario's own counts that must be 0 (`result.checks`);
    # unlike `observe`, a failure to read them fails the scenario.
    check: Callable[[Run], Awaitable[None]] | None = None
    # The campaign's quota (and its batch's size): the load's coupons, and any the scenario
    # claims on its own.
    quota: Callable[[Size], int] = lambda size: size.coupons
    # Entered before the scenario's stack starts, left after it stops: what the scenario
    # changes about its stack (the operator scenario records it as `make run` does).
    around: Callable[[Harness], AbstractContextManager[None]] | None = None
    # The scenario's own load in place of the common one (`chaos.drive`: one claim per user
    # spread over `Size.load_s`, each followed by its reports); it runs beside `fault`.
    load: Callable[[Run], Coroutine[Any, Any, None]] | None = None
