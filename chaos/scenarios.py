"""The nine scenarios, in the order a run takes them: the table, put together from one
module per family. The common run around each is `chaos.drive`; what they share while
they run, `chaos.frame`. Imports go one way: the families import the frame (and the
harness), this module imports the families, the runner and `python -m chaos` import this.
"""

from __future__ import annotations

from chaos import callbacks, claim_burst, duplicates, operator, platform_faults, processes
from chaos.frame import Scenario

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        processes.WORKER_KILL,
        processes.TEMPORAL_RESTART,
        processes.POSTGRES_OUTAGE,
        claim_burst.CLAIM_BURST_KILLS,
        platform_faults.PLATFORM_FAULTS,
        platform_faults.BUDGET_EXHAUSTED,
        duplicates.DUPLICATE_REPORTS,
        callbacks.CALLBACKS,
        operator.SCENARIO,
    )
}
