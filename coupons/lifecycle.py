"""The coupon lifecycle: the one source of states and transitions.

Pure and synchronous on purpose: no I/O, no clocks. The workflow holds a coupon's
`Lifecycle`, feeds it events, reads where it landed, and persists the effects through
activities, so the same machine runs inside Temporal's deterministic sandbox, in replay
and in plain unit tests. The workflow asks it what may happen now (`check`, the state,
the predicates below) instead of restating its rules.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from statemachine import State, StateMachine
from statemachine.engines.sync import SyncEngine
from statemachine.exceptions import TransitionNotAllowed

__all__ = [
    "EVENTS",
    "FINAL_STATES",
    "MACHINE_STATES",
    "STATES",
    "AsyncMachineRefused",
    "CouponLifecycle",
    "Lifecycle",
    "TransitionNotAllowed",
    "UnknownTask",
    "check_known_task",
    "require_sync_engine",
]


class UnknownTask(ValueError):
    """A task key the coupon's campaign does not require."""


def check_known_task(required_tasks: Sequence[str], task: str) -> None:
    """Raise `UnknownTask` for a task the coupon's campaign never named: the one place that
    says what an unknown task is (the machine's validator, the service's early refusal)."""
    if task not in required_tasks:
        known = ", ".join(required_tasks) or "none"
        raise UnknownTask(f"unknown task {task!r}; this coupon's tasks are: {known}")


class AsyncMachineRefused(TypeError):
    """A lifecycle machine that python-statemachine would run on its async engine."""


def require_sync_engine(machine: StateMachine) -> None:
    """Refuse a machine python-statemachine would run on its async engine.

    python-statemachine 3.2 picks the engine per instance, when it is built: one
    coroutine callback anywhere (an `async def on_enter_issued` in a subclass, an async
    listener) makes it an `AsyncEngine` (statemachine/statemachine.py,
    `StateMachine._get_engine`; `CallbacksRegistry.async_or_sync` in callbacks.py). Its
    `send` then runs the event through `run_async_from_sync` (utils.py), which, inside a
    running event loop, as every workflow runs, returns the coroutine instead of running
    it: nothing moves, the state stays where it was, and no error is raised. The check
    reads the library's private `_engine` and `_callbacks`, so pyproject.toml pins the
    minor release it was read from; a release that renames them is refused here too.
    """
    engine = vars(machine).get("_engine")
    callbacks = vars(machine).get("_callbacks")
    if type(engine) is SyncEngine and getattr(callbacks, "has_async_callbacks", None) is False:
        return
    raise AsyncMachineRefused(
        f"{type(machine).__name__} would run on python-statemachine's "
        f"{type(engine).__name__} engine: the lifecycle must stay synchronous (no async "
        "callbacks or listeners), because inside a workflow's event loop an async machine's "
        "send() returns an unawaited coroutine and the transition silently never happens"
    )


# Internal states: sub-states the ledger, the search attribute and the status never show;
# each maps to the public state it is part of.
PUBLIC_STATE_OF = {"sending": "usable"}


class CouponLifecycle(StateMachine):
    """received → usable → issued → redeemed, with the exits of each step.

    `received` waits for the campaign's tasks (patent: 已领取); `usable` is entitled but
    not yet in the wallet (可使用); `issued` is in the wallet with a receipt. `sending` is
    `usable` once the send to the platform has begun: the coupon may already be in the
    wallet, so it can no longer be cancelled, and only the platform's answer moves it on.
    """

    received = State(initial=True)
    usable = State()
    sending = State("Usable, sending")
    issued = State()
    redeemed = State(final=True)
    expired = State(final=True)
    cancelled = State(final=True)
    failed = State(final=True)
    lapsed = State(final=True)

    # A task that leaves others pending keeps the coupon in `received`; the last one
    # moves it to `usable`. Once the tasks are done, a repeated report of one is answered
    # (nothing moves) until the coupon is final. The validator refuses task keys the
    # campaign never named, in every live state.
    complete_task = (
        received.to(usable, cond="completes_all_tasks", validators="is_known_task")
        | received.to.itself(internal=True, validators="is_known_task")  # type: ignore[no-untyped-call]
        | usable.to.itself(internal=True, cond="is_done_task", validators="is_known_task")  # type: ignore[no-untyped-call]
        | sending.to.itself(internal=True, cond="is_done_task", validators="is_known_task")  # type: ignore[no-untyped-call]
        | issued.to.itself(internal=True, cond="is_done_task", validators="is_known_task")  # type: ignore[no-untyped-call]
    )
    expire = received.to(expired)
    # Once the send has begun the coupon may already be in the wallet: no cancel then.
    cancel = received.to(cancelled) | usable.to(cancelled)
    begin_send = usable.to(sending)
    issue = sending.to(issued)
    refuse = sending.to(failed)
    redeem = issued.to(redeemed)
    lapse = issued.to(lapsed)

    def __init__(self) -> None:
        # A coupon's tasks and state are loaded before each event (`Lifecycle`).
        self.required_tasks: tuple[str, ...] = ()
        self.tasks_done: list[str] = []
        super().__init__()
        require_sync_engine(self)

    def add_listener(self, *listeners: object) -> CouponLifecycle:
        # A listener added later keeps the engine built at construction, and the library
        # does not re-read its callbacks: the sync engine would call an async listener's
        # coroutines without awaiting them. Re-read by the library's own rule, and refused
        # like one given at construction.
        super().add_listener(*listeners)  # type: ignore[no-untyped-call]
        self._callbacks.async_or_sync()  # type: ignore[no-untyped-call]
        require_sync_engine(self)
        return self

    # ----- guards and actions -------------------------------------------------------------

    def is_known_task(self, task: str) -> None:
        check_known_task(self.required_tasks, task)

    def completes_all_tasks(self, task: str) -> bool:
        return all(t == task or t in self.tasks_done for t in self.required_tasks)

    def is_done_task(self, task: str) -> bool:
        return task in self.tasks_done

    def on_complete_task(self, task: str) -> None:
        if task not in self.tasks_done:
            self.tasks_done.append(task)


class Lifecycle:
    """Where one coupon stands in `CouponLifecycle`, kept as plain values: what a workflow
    holds between events.

    A python-statemachine instance is its class's callbacks bound afresh: about 210 objects
    in reference cycles, 39 KB and 0.4 ms to build (python-statemachine 3.2). A worker keeps
    a thousand coupons cached for weeks, so it holds no machine per coupon: each event runs
    on its thread's one machine, loaded with these values first (`current_state_value`, the
    library's way to set a state), and the values are read back. Nothing awaits between the
    load and the read, so no other coupon touches that machine meanwhile, and the machine
    keeps nothing of a coupon between events. It is built again after a final state (the
    library stops it there) and after an event that did not finish.
    """

    __slots__ = ("required_tasks", "tasks_done", "value")

    def __init__(
        self,
        required_tasks: Iterable[str],
        tasks_done: Iterable[str] = (),
        state: str | None = None,
    ) -> None:
        self.required_tasks: tuple[str, ...] = tuple(required_tasks)
        self.tasks_done: list[str] = [t for t in tasks_done if t in self.required_tasks]
        if state is None:
            state = "received" if self.tasks_pending else "usable"
        if state not in MACHINE_STATES:
            raise ValueError(f"unknown lifecycle state {state!r}; states: {MACHINE_STATES}")
        #: The machine's state, internal ones (`sending`) included.
        self.value = state

    # ----- where it is ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The public state: what the ledger, the search attribute and the status show."""
        return PUBLIC_STATE_OF.get(self.value, self.value)

    @property
    def tasks_pending(self) -> list[str]:
        return [t for t in self.required_tasks if t not in self.tasks_done]

    @property
    def is_final(self) -> bool:
        return self.value in FINAL_STATES

    @property
    def may_be_used(self) -> bool:
        """The coupon is in the wallet or on its way there: a report of its use may come
        (one can overtake our own confirmation of the send), to be taken once `issued`."""
        return self.value in ("usable", "sending", "issued")

    # ----- what may happen now, and moving ------------------------------------------------

    def send(self, event: str, *args: str) -> None:
        """Run `event` on the machine; refused (`TransitionNotAllowed`, `UnknownTask`), it
        moves nothing."""
        machine = self._run(event, *args)
        self.value = str(machine.current_state_value)
        self.tasks_done = machine.tasks_done

    def check(self, event: str, *args: str) -> None:
        """Raise what `send(event, *args)` would raise now, moving nothing: the machine
        moves, these values do not, so an update validator can refuse before anything
        happens."""
        self._run(event, *args)

    def refusal(self, event: str) -> str:
        """Why `event` is refused now, in the caller's words."""
        state = self.state
        if self.is_final and event == "complete_task":
            return f"coupon is {state}: it is finished"
        if self.value == "sending" and event == "cancel":
            why = "its send to the platform has begun, so it can no longer be cancelled"
        else:
            why = _ONLY.get(event, f"{event} is not allowed now")
        return f"coupon is {state}; {why}"

    def _run(self, event: str, *args: str) -> CouponLifecycle:
        machine = self._loaded()
        finished = False
        try:
            machine.send(event, *args)
            finished = True
        finally:
            # This thread's next event gets a new machine after one that did not finish (a
            # refusal leaves it clean, but the SDK's deadlock interrupt, a BaseException, can
            # leave the event queued or the engine's lock held for the next coupon), and
            # after a final state (python-statemachine stops its engine there for good).
            if not finished or machine.is_terminated:
                _THIS_THREAD.machine = None
        return machine

    def _loaded(self) -> CouponLifecycle:
        machine: CouponLifecycle | None = getattr(_THIS_THREAD, "machine", None)
        if machine is None:
            machine = _THIS_THREAD.machine = CouponLifecycle()
        machine.required_tasks = self.required_tasks
        machine.tasks_done = list(self.tasks_done)
        machine.current_state_value = self.value
        return machine


# Each thread's one machine (`Lifecycle`): a workflow's activations run on the SDK's executor
# threads, any number at once, each to its end without a pause.
_THIS_THREAD = threading.local()

# Where each event the caller may ask for is allowed, in the caller's words.
_ONLY = {
    "complete_task": "tasks can only be completed while received",
    "cancel": "only received coupons, or usable ones not yet sent, can be cancelled",
    "expire": "only received coupons can be expired",
}

# Every state the machine has, and the public ones: the ledger's, the search attribute's.
MACHINE_STATES: tuple[str, ...] = tuple(s.id for s in CouponLifecycle.states)
STATES: tuple[str, ...] = tuple(s for s in MACHINE_STATES if s not in PUBLIC_STATE_OF)
FINAL_STATES: frozenset[str] = frozenset(s.id for s in CouponLifecycle.states if s.final)
EVENTS: tuple[str, ...] = tuple(e.id for e in CouponLifecycle.events)  # type: ignore[attr-defined]

# The class as defined here is checked at import, so a worker whose lifecycle gained an
# async callback fails when it loads its workflows, not at a coupon's first transition.
require_sync_engine(CouponLifecycle())
