"""The state machine alone: every event in every state."""

from __future__ import annotations

import pytest

from coupons.lifecycle import (
    EVENTS,
    FINAL_STATES,
    STATES,
    CouponLifecycle,
    TransitionNotAllowed,
    UnknownTask,
)

# (state, send_started) -> {event: state after}; an event missing from a row must raise.
# Written out by hand from DESIGN.md's table, not derived from the machine under test.
EXPECTED: dict[tuple[str, bool], dict[str, str]] = {
    ("received", False): {"complete_task": "usable", "expire": "expired", "cancel": "cancelled"},
    ("usable", False): {"cancel": "cancelled", "begin_send": "usable"},
    ("usable", True): {"issue": "issued", "refuse": "failed"},
    ("issued", False): {"redeem": "redeemed", "lapse": "lapsed"},
    **{(final, False): {} for final in ("redeemed", "expired", "cancelled", "failed", "lapsed")},
}


def machine(state: str, send_started: bool) -> CouponLifecycle:
    # Task "a" is done and "b" pending, so completing "b" finishes the tasks.
    return CouponLifecycle(["a", "b"], tasks_done=["a"], state=state, send_started=send_started)


def fire(m: CouponLifecycle, event: str) -> None:
    if event == "complete_task":
        m.complete_task("b")
    else:
        m.send(event)


def test_the_table_covers_every_state_and_event() -> None:
    assert {state for state, _ in EXPECTED} == set(STATES)
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


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize(("state", "send_started"), list(EXPECTED))
def test_every_event_in_every_state(state: str, send_started: bool, event: str) -> None:
    m = machine(state, send_started)
    allowed = EXPECTED[(state, send_started)]
    if event in allowed:
        fire(m, event)
        assert m.state == allowed[event]
    else:
        with pytest.raises(TransitionNotAllowed):
            fire(m, event)
        assert m.state == state, "a refused event must not move the machine"
        assert m.send_started == send_started


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


def test_begin_send_marks_the_send_and_blocks_cancel() -> None:
    m = CouponLifecycle([])
    m.begin_send()
    assert m.send_started
    with pytest.raises(TransitionNotAllowed):
        m.cancel()


def test_the_whole_happy_path() -> None:
    m = CouponLifecycle(["first-order"])
    m.complete_task("first-order")
    m.begin_send()
    m.issue()
    m.redeem()
    assert m.state == "redeemed"
    assert m.is_final
