"""The state machine alone: every event in every state."""

from __future__ import annotations

import pytest

from coupons.lifecycle import (
    EVENTS,
    FINAL_STATES,
    MACHINE_STATES,
    STATES,
    AsyncMachineRefused,
    CouponLifecycle,
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


def machine(state: str) -> CouponLifecycle:
    # Task "a" is done and "b" pending while received; past it, both are done.
    done = ["a"] if state == "received" else ["a", "b"]
    return CouponLifecycle(["a", "b"], tasks_done=done, state=state)


def fire(m: CouponLifecycle, event: str) -> None:
    if event == "complete_task":
        m.complete_task("b")
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
        assert m.current_state_value == allowed[event]
    else:
        with pytest.raises(TransitionNotAllowed):
            fire(m, event)
        assert m.current_state_value == state, "a refused event must not move the machine"
    assert m.is_final == (m.current_state_value in FINAL_STATES)


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
    assert (m.current_state_value, m.tasks_done) == (state, machine(state).tasks_done)


@pytest.mark.parametrize("state", list(EXPECTED))
def test_an_unknown_task_is_refused_as_unknown_while_live_and_as_finished_after(
    state: str,
) -> None:
    m = machine(state)
    refused = TransitionNotAllowed if state in FINAL_STATES else UnknownTask
    with pytest.raises(refused):
        m.check("complete_task", "survey")
    with pytest.raises(refused):
        m.complete_task("survey")
    assert m.current_state_value == state


def test_a_task_not_done_is_refused_past_received() -> None:
    """Not reachable through the workflow (it leaves `received` only with every task done),
    but the machine says so itself."""
    m = CouponLifecycle(["a", "b"], tasks_done=["a"], state="usable")
    with pytest.raises(TransitionNotAllowed):
        m.complete_task("b")
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
    assert CouponLifecycle(["first-order"]).state == "received"
    assert CouponLifecycle([]).state == "usable"


def test_tasks_complete_one_by_one_and_duplicates_change_nothing() -> None:
    m = CouponLifecycle(["a", "b"])
    m.complete_task("a")
    assert (m.state, m.tasks_done, m.tasks_pending) == ("received", ["a"], ["b"])
    m.complete_task("a")
    assert (m.state, m.tasks_done) == ("received", ["a"])
    m.complete_task("b")
    assert (m.state, m.tasks_done, m.tasks_pending) == ("usable", ["a", "b"], [])


def test_unknown_task_is_refused_with_its_name_and_changes_nothing() -> None:
    m = CouponLifecycle(["first-order"])
    with pytest.raises(UnknownTask, match=r"unknown task 'survey'.*first-order"):
        m.complete_task("survey")
    assert (m.state, m.tasks_done) == ("received", [])


def test_refused_event_message_names_event_and_state() -> None:
    m = CouponLifecycle(["a"], state="issued")
    with pytest.raises(TransitionNotAllowed, match=r"Cancel.*Issued"):
        m.cancel()


def test_begin_send_moves_to_sending_still_usable_and_blocks_cancel() -> None:
    m = CouponLifecycle([])
    m.begin_send()
    assert (m.current_state_value, m.state) == ("sending", "usable")
    with pytest.raises(TransitionNotAllowed):
        m.cancel()
    with pytest.raises(TransitionNotAllowed):
        m.begin_send()


def test_the_whole_happy_path() -> None:
    m = CouponLifecycle(["first-order"])
    m.complete_task("first-order")
    m.begin_send()
    m.issue()
    m.redeem()
    assert m.state == "redeemed"
    assert m.is_final


# ----- the engine: synchronous, or refused ------------------------------------------------


class _AsyncCallback(CouponLifecycle):
    async def on_enter_issued(self) -> None:
        """What anyone might add: one coroutine makes the library pick its async engine."""


class _AsyncListener:
    async def on_enter_state(self) -> None:
        """An async listener: the same switch, from outside the class."""


def test_a_machine_with_an_async_callback_is_refused_at_construction() -> None:
    with pytest.raises(AsyncMachineRefused, match="silently never happens"):
        _AsyncCallback(["a"], ["a"], state="sending")


async def test_an_async_machine_is_refused_inside_an_event_loop_too() -> None:
    # Where a workflow runs it: without the refusal send() would return an unawaited
    # coroutine and the coupon would stay `sending` with no error (python-statemachine 3.2).
    with pytest.raises(AsyncMachineRefused):
        _AsyncCallback(["a"], ["a"], state="sending")


class _WithAsyncListener(CouponLifecycle):
    listeners = [_AsyncListener]  # noqa: RUF012 (python-statemachine's class listeners)


def test_an_async_listener_is_refused_on_the_class_or_added_later() -> None:
    with pytest.raises(AsyncMachineRefused):
        _WithAsyncListener(["a"])
    m = CouponLifecycle(["a"])
    with pytest.raises(AsyncMachineRefused):
        m.add_listener(_AsyncListener())


def test_the_lifecycle_as_defined_runs_on_the_sync_engine() -> None:
    m = CouponLifecycle(["a"], ["a"], state="sending")
    require_sync_engine(m)
    m.send("issue")
    assert m.state == "issued"
