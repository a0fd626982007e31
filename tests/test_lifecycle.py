"""The state machine alone: every event in every state."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

import pytest
from statemachine.engines.sync import SyncEngine

from coupons.lifecycle import (
    EVENTS,
    FINAL_STATES,
    MACHINE_STATES,
    STATES,
    AsyncMachineRefused,
    CouponLifecycle,
    Lifecycle,
    TransitionNotAllowed,
    UnknownTask,
    check_known_task,
    require_sync_engine,
)

# machine state -> {event: machine state after}; an event missing from a row must raise.
# Written out by hand from DESIGN.md's table, not derived from the machine under test.
# `sending` is `usable` once the send has begun (public state `usable`). `complete_task`
# reports task "b": pending in `received`, a repeated report once the tasks are done.
EXPECTED: dict[str, dict[str, str]] = {
    "received": {"complete_task": "usable", "expire": "expired", "cancel": "cancelled"},
    "usable": {"complete_task": "usable", "cancel": "cancelled", "begin_send": "sending"},
    "sending": {"complete_task": "sending", "issue": "issued", "refuse": "failed"},
    "issued": {"complete_task": "issued", "redeem": "redeemed", "lapse": "lapsed"},
    **{final: {} for final in ("redeemed", "expired", "cancelled", "failed", "lapsed")},
}
PUBLIC = {"sending": "usable"}


def machine(state: str) -> Lifecycle:
    # Task "a" is done and "b" pending while received; past it, both are done.
    done = ["a"] if state == "received" else ["a", "b"]
    return Lifecycle(["a", "b"], tasks_done=done, state=state)


def fire(m: Lifecycle, event: str) -> None:
    if event == "complete_task":
        m.send("complete_task", "b")
    else:
        m.send(event)


def test_the_table_covers_every_state_and_event() -> None:
    assert set(EXPECTED) == set(MACHINE_STATES)
    assert set(EVENTS) == {
        "complete_task",
        "expire",
        "cancel",
        "begin_send",
        "issue",
        "refuse",
        "redeem",
        "lapse",
    }
    assert FINAL_STATES == {"redeemed", "expired", "cancelled", "failed", "lapsed"}


def test_public_states_are_the_ledgers() -> None:
    """The ledger's and the search attribute's values, in the order the CLI lists them."""
    assert STATES == (
        "received",
        "usable",
        "issued",
        "redeemed",
        "expired",
        "cancelled",
        "failed",
        "lapsed",
    )
    for state in MACHINE_STATES:
        assert machine(state).state == PUBLIC.get(state, state)


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("state", list(EXPECTED))
def test_every_event_in_every_state(state: str, event: str) -> None:
    m = machine(state)
    allowed = EXPECTED[state]
    if event in allowed:
        fire(m, event)
        assert m.value == allowed[event]
    else:
        with pytest.raises(TransitionNotAllowed):
            fire(m, event)
        assert m.value == state, "a refused event must not move the machine"
    assert m.is_final == (m.value in FINAL_STATES)


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("state", list(EXPECTED))
def test_check_answers_as_the_event_would_and_moves_nothing(state: str, event: str) -> None:
    m = machine(state)
    args = ("b",) if event == "complete_task" else ()
    if event in EXPECTED[state]:
        m.check(event, *args)
    else:
        with pytest.raises(TransitionNotAllowed):
            m.check(event, *args)
    assert (m.value, m.tasks_done) == (state, machine(state).tasks_done)


@pytest.mark.parametrize("state", list(EXPECTED))
def test_an_unknown_task_is_refused_as_unknown_while_live_and_as_finished_after(
    state: str,
) -> None:
    m = machine(state)
    refused = TransitionNotAllowed if state in FINAL_STATES else UnknownTask
    with pytest.raises(refused):
        m.check("complete_task", "survey")
    with pytest.raises(refused):
        m.send("complete_task", "survey")
    assert m.value == state


def test_a_task_not_done_is_refused_past_received() -> None:
    """Not reachable through the workflow (it leaves `received` only with every task done),
    but the machine says so itself."""
    m = Lifecycle(["a", "b"], tasks_done=["a"], state="usable")
    with pytest.raises(TransitionNotAllowed):
        m.send("complete_task", "b")
    assert m.refusal("complete_task") == (
        "coupon is usable; tasks can only be completed while received"
    )


@pytest.mark.parametrize("state", list(EXPECTED))
def test_a_use_report_is_expected_from_usable_to_issued(state: str) -> None:
    assert machine(state).may_be_used == (state in ("usable", "sending", "issued"))


def test_refusals_in_the_callers_words() -> None:
    assert machine("redeemed").refusal("complete_task") == "coupon is redeemed: it is finished"
    assert machine("sending").refusal("cancel") == (
        "coupon is usable; its send to the platform has begun, so it can no longer be cancelled"
    )
    assert machine("cancelled").refusal("cancel") == (
        "coupon is cancelled; only received coupons, or usable ones not yet sent, can be cancelled"
    )
    assert machine("usable").refusal("expire") == (
        "coupon is usable; only received coupons can be expired"
    )


def test_check_known_task_is_the_one_unknown_task_rule() -> None:
    check_known_task(["a", "b"], "b")
    with pytest.raises(UnknownTask, match=r"unknown task 'c'; this coupon's tasks are: a, b"):
        check_known_task(["a", "b"], "c")
    with pytest.raises(UnknownTask, match=r"this coupon's tasks are: none"):
        check_known_task([], "c")


def test_starts_received_with_tasks_and_usable_without() -> None:
    assert Lifecycle(["first-order"]).state == "received"
    assert Lifecycle([]).state == "usable"


def test_an_unknown_state_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown lifecycle state 'sent'"):
        Lifecycle(["a"], state="sent")


def test_tasks_complete_one_by_one_and_duplicates_change_nothing() -> None:
    m = Lifecycle(["a", "b"])
    m.send("complete_task", "a")
    assert (m.state, m.tasks_done, m.tasks_pending) == ("received", ["a"], ["b"])
    m.send("complete_task", "a")
    assert (m.state, m.tasks_done) == ("received", ["a"])
    m.send("complete_task", "b")
    assert (m.state, m.tasks_done, m.tasks_pending) == ("usable", ["a", "b"], [])


def test_unknown_task_is_refused_with_its_name_and_changes_nothing() -> None:
    m = Lifecycle(["first-order"])
    with pytest.raises(UnknownTask, match=r"unknown task 'survey'.*first-order"):
        m.send("complete_task", "survey")
    assert (m.state, m.tasks_done) == ("received", [])


def test_refused_event_message_names_event_and_state() -> None:
    m = Lifecycle(["a"], state="issued")
    with pytest.raises(TransitionNotAllowed, match=r"Cancel.*Issued"):
        m.send("cancel")


def test_begin_send_moves_to_sending_still_usable_and_blocks_cancel() -> None:
    m = Lifecycle([])
    m.send("begin_send")
    assert (m.value, m.state) == ("sending", "usable")
    with pytest.raises(TransitionNotAllowed):
        m.send("cancel")
    with pytest.raises(TransitionNotAllowed):
        m.send("begin_send")


def test_the_whole_happy_path() -> None:
    m = Lifecycle(["first-order"])
    m.send("complete_task", "first-order")
    for event in ("begin_send", "issue", "redeem"):
        m.send(event)
    assert m.state == "redeemed"
    assert m.is_final


# ----- many coupons, one machine per thread -------------------------------------------------


def test_coupons_taken_in_turns_on_one_thread_keep_their_own_tasks_and_states() -> None:
    first, second = Lifecycle(["a", "b"]), Lifecycle(["x"])
    first.send("complete_task", "a")
    second.send("complete_task", "x")
    with pytest.raises(UnknownTask):
        first.send("complete_task", "x")  # the other coupon's task, refused mid-event
    assert (first.value, first.tasks_done) == ("received", ["a"])
    assert (second.value, second.tasks_done) == ("usable", ["x"])
    first.check("complete_task", "b")  # answers, moves nothing
    assert (first.value, first.tasks_done) == ("received", ["a"])
    first.send("complete_task", "b")
    second.send("begin_send")
    assert (first.value, first.tasks_done) == ("usable", ["a", "b"])
    assert (second.value, second.tasks_done) == ("sending", ["x"])


def test_a_coupon_reaching_a_final_state_leaves_the_next_coupon_a_working_machine() -> None:
    """python-statemachine stops a machine's engine in a final state for good."""
    for final in ("cancel", "expire"):
        ending = Lifecycle(["a"])
        ending.send(final)
        assert ending.is_final
        with pytest.raises(TransitionNotAllowed):
            ending.check("complete_task", "a")
        after = Lifecycle(["a"])
        after.send("complete_task", "a")
        assert after.value == "usable"


class _Interrupt(BaseException):
    """As the SDK's deadlock interrupt, raised into a workflow's thread at any point."""


def test_an_event_interrupted_on_its_way_leaves_nothing_for_the_threads_next_coupon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Interrupted after python-statemachine queued the event and before its engine ran it:
    kept, the machine would run that event for the next coupon on the thread."""
    Lifecycle(["a"]).check("complete_task", "a")  # the thread's machine exists
    interrupted = Lifecycle([], state="usable")

    def interrupt(self: SyncEngine, *args: object) -> None:
        raise _Interrupt

    with monkeypatch.context() as patched:
        patched.setattr(SyncEngine, "processing_loop", interrupt)
        with pytest.raises(_Interrupt):
            interrupted.send("begin_send")
    assert interrupted.value == "usable"
    following = Lifecycle(["a"], ["a"], state="usable")
    following.send("complete_task", "a")  # a repeated report: nothing moves
    assert (following.value, following.tasks_done) == ("usable", ["a"])
    interrupted.send("begin_send")
    assert interrupted.value == "sending"


def test_threads_each_run_their_coupons_on_their_own_machine() -> None:
    """As the SDK's executor threads do: many threads at once, each event to its end."""
    threads, per_thread = 4, 200
    start = threading.Barrier(threads)
    finished: list[list[Lifecycle]] = []
    failures: list[BaseException] = []

    def run(k: int) -> None:
        try:
            coupons = [Lifecycle([f"t{k}", "b"]) for _ in range(per_thread)]
            start.wait()
            for event, args in (("complete_task", (f"t{k}",)), ("complete_task", ("b",))):
                for coupon in coupons:
                    coupon.send(event, *args)
            for coupon in coupons[::2]:
                coupon.send("begin_send")
            finished.append(coupons)
        except BaseException as err:  # reported below: a thread's failure fails the test
            failures.append(err)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == []
    for k, coupons in enumerate(sorted(finished, key=lambda c: c[0].required_tasks)):
        assert {(c.value, tuple(c.tasks_done)) for c in coupons[::2]} == {
            ("sending", (f"t{k}", "b"))
        }
        assert {(c.value, tuple(c.tasks_done)) for c in coupons[1::2]} == {
            ("usable", (f"t{k}", "b"))
        }


def test_a_coupon_holds_its_values_and_no_machine() -> None:
    """The point of `Lifecycle`: a cached coupon costs the collector a few objects, not the
    two hundred a python-statemachine instance is."""

    def tracked_per_item(make: Callable[[], object]) -> float:
        gc.collect()
        before = len(gc.get_objects())
        items = [make() for _ in range(500)]
        per_item = (len(gc.get_objects()) - before) / len(items)
        del items
        return per_item

    assert tracked_per_item(lambda: Lifecycle(["a", "b"], ["a"])) <= 10  # 3: itself, 2 sequences
    assert tracked_per_item(CouponLifecycle) >= 100


# ----- the engine: synchronous, or refused ------------------------------------------------


class _AsyncCallback(CouponLifecycle):
    async def on_enter_issued(self) -> None:
        """What anyone might add: one coroutine makes the library pick its async engine."""


class _AsyncListener:
    async def on_enter_state(self) -> None:
        """An async listener: the same switch, from outside the class."""


def test_a_machine_with_an_async_callback_is_refused_at_construction() -> None:
    with pytest.raises(AsyncMachineRefused, match="silently never happens"):
        _AsyncCallback()


async def test_an_async_machine_is_refused_inside_an_event_loop_too() -> None:
    # Where a workflow runs it: without the refusal send() would return an unawaited
    # coroutine and the coupon would stay `sending` with no error (python-statemachine 3.2).
    with pytest.raises(AsyncMachineRefused):
        _AsyncCallback()


class _WithAsyncListener(CouponLifecycle):
    listeners = [_AsyncListener]  # noqa: RUF012 (python-statemachine's class listeners)


def test_an_async_listener_is_refused_on_the_class_or_added_later() -> None:
    with pytest.raises(AsyncMachineRefused):
        _WithAsyncListener()
    m = CouponLifecycle()
    with pytest.raises(AsyncMachineRefused):
        m.add_listener(_AsyncListener())


def test_the_lifecycle_as_defined_runs_on_the_sync_engine() -> None:
    m = CouponLifecycle()
    require_sync_engine(m)
    m.current_state_value = "sending"
    m.send("issue")
    assert m.current_state_value == "issued"
