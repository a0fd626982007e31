"""The floor: the least a signal-then-activity workflow can cost on this server.

Kept apart from the worker code so the workflow sandbox imports nothing but temporalio.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

FLOOR_WORKFLOW = "BenchFloor"
FLOOR_ACTIVITY = "bench_floor_noop"
FLOOR_SIGNAL = "go"


@workflow.defn(name=FLOOR_WORKFLOW)
class FloorWorkflow:
    """Waits for one signal, then runs one no-op activity on the `-platform` queue, the
    way the coupon workflow waits for its task and then runs its issue activity."""

    def __init__(self) -> None:
        self._go = False

    @workflow.run
    async def run(self) -> float:
        await workflow.wait_condition(lambda: self._go)
        # The activity answers with its wall-clock time: the end of signal-to-done.
        done: float = await workflow.execute_activity(
            FLOOR_ACTIVITY,
            start_to_close_timeout=timedelta(seconds=30),
            task_queue=f"{workflow.info().task_queue}-platform",
            result_type=float,
        )
        return done

    @workflow.signal(name=FLOOR_SIGNAL)
    def go(self) -> None:
        self._go = True
