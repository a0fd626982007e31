"""The coupon lifecycle: the one source of states and transitions.

Pure and synchronous on purpose: no I/O, no clocks, no threads. The workflow feeds it
events, reads where it landed, and persists the effects through activities, so the
same machine runs inside Temporal's deterministic sandbox, in replay and in plain
unit tests.
"""

from __future__ import annotations

from collections.abc import Iterable

from statemachine import State, StateMachine
from statemachine.exceptions import TransitionNotAllowed

__all__ = ["FINAL_STATES", "STATES", "CouponLifecycle", "TransitionNotAllowed", "UnknownTask"]


class UnknownTask(ValueError):
    """A task key the coupon's campaign does not require."""


class CouponLifecycle(StateMachine):
    """received → usable → issued → redeemed, with the exits of each step.

    `received` waits for the campaign's tasks (patent: 已领取); `usable` is entitled but
    not yet in the wallet (可使用); `issued` is in the wallet with a receipt.
    """

    received = State(initial=True)
    usable = State()
    issued = State()
    redeemed = State(final=True)
    expired = State(final=True)
    cancelled = State(final=True)
    failed = State(final=True)
    lapsed = State(final=True)

    # A task that leaves others pending keeps the coupon in `received`; the last one
    # moves it to `usable`. The validator refuses task keys the campaign never named.
    complete_task = received.to(usable, cond="completes_all_tasks", validators="is_known_task") | (
        received.to.itself(internal=True, validators="is_known_task")  # type: ignore[no-untyped-call]
    )
    expire = received.to(expired)
    # Once the send has begun the coupon may already be in the wallet: no cancel then.
    cancel = received.to(cancelled) | usable.to(cancelled, unless="send_started")
    begin_send = usable.to.itself(internal=True, unless="send_started")  # type: ignore[no-untyped-call]
    issue = usable.to(issued, cond="send_started")
    refuse = usable.to(failed, cond="send_started")
    redeem = issued.to(redeemed)
    lapse = issued.to(lapsed)

    def __init__(
        self,
        required_tasks: Iterable[str],
        tasks_done: Iterable[str] = (),
        state: str | None = None,
        send_started: bool = False,
    ) -> None:
        self.required_tasks: tuple[str, ...] = tuple(required_tasks)
        self.tasks_done: list[str] = [t for t in tasks_done if t in self.required_tasks]
        self.send_started = send_started
        if state is None:
            state = "received" if self.tasks_pending else "usable"
        super().__init__(start_value=state)

    @property
    def state(self) -> str:
        return str(self.current_state_value)

    @property
    def tasks_pending(self) -> list[str]:
        return [t for t in self.required_tasks if t not in self.tasks_done]

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def is_known_task(self, task: str) -> None:
        if task not in self.required_tasks:
            known = ", ".join(self.required_tasks) or "none"
            raise UnknownTask(f"unknown task {task!r}; this coupon's tasks are: {known}")

    def completes_all_tasks(self, task: str) -> bool:
        return not [t for t in self.tasks_pending if t != task]

    def on_complete_task(self, task: str) -> None:
        if task not in self.tasks_done:
            self.tasks_done.append(task)

    def on_begin_send(self) -> None:
        self.send_started = True


STATES: tuple[str, ...] = tuple(s.id for s in CouponLifecycle.states)
FINAL_STATES: frozenset[str] = frozenset(s.id for s in CouponLifecycle.states if s.final)
EVENTS: tuple[str, ...] = tuple(e.id for e in CouponLifecycle.events)  # type: ignore[attr-defined]
