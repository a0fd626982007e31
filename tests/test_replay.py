"""Today's UserCouponWorkflow must replay every stored history in tests/histories.

A replay failure means a change altered the commands of running workflows: guard it
with `workflow.patched` instead. Never re-record the corpus to make this test pass;
`scripts/record_histories.py` only extends it after an intentional, patched change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import Replayer

# This module defines a workflow, so the sandbox re-imports it: pass the rest through.
with workflow.unsafe.imports_passed_through():
    from app.workers import workflow_runner
    from coupons.contract import END_CAMPAIGN_WORKFLOW
    from coupons.lifecycle import FINAL_STATES
    from coupons.model import COUPON_STATE, CouponInput, CouponStatus, coupon_workflow_id
    from tests.conftest import published_search_attributes
    from workflows.end_campaign import COUNTS, EndCampaignRun, EndCampaignWorkflow
    from workflows.user_coupon import FIRST_POLL_AFTER_BACKOFF, UserCouponWorkflow

HISTORIES = Path(__file__).parent / "histories"
FILES = sorted(HISTORIES.glob("*.json"))

_payloads = DataConverter.default.payload_converter


def load(path: Path) -> WorkflowHistory:
    """The stored history under the workflow id it ran with (read from its input)."""
    text = path.read_text()
    events = WorkflowHistory.from_json("unknown", text).events
    started = events[0].workflow_execution_started_event_attributes
    [coupon] = _payloads.from_payloads(started.input.payloads, [CouponInput])
    return WorkflowHistory.from_json(coupon_workflow_id(coupon.coupon_id), text)


def coupon_states(history: WorkflowHistory) -> list[str]:
    """Every `CouponState` the workflow published, from its start to its last upsert."""
    published = (
        attributes.get(COUPON_STATE) for attributes in published_search_attributes(history)
    )
    return [state for state in published if state is not None]


def final_status(history: WorkflowHistory) -> CouponStatus | None:
    """The workflow's result, None if the history does not end in its completion."""
    last = history.events[-1]
    if last.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
        return None
    result = last.workflow_execution_completed_event_attributes.result.payloads
    [status] = _payloads.from_payloads(result, [CouponStatus])
    return status  # type: ignore[no-any-return]


def replayer(*workflows: type) -> Replayer:
    # The same sandbox runner (and passthrough modules) as the production worker.
    return Replayer(workflows=list(workflows), workflow_runner=workflow_runner())


async def one_by_one(histories: Iterable[WorkflowHistory]) -> AsyncIterator[WorkflowHistory]:
    for history in histories:
        yield history


def test_corpus_is_stored() -> None:
    assert FILES, f"no histories in {HISTORIES}: run scripts/record_histories.py"
    run_ids = [load(path).run_id for path in FILES]
    assert len(set(run_ids)) == len(run_ids), "two stored histories share a run id"


async def test_every_stored_history_replays() -> None:
    histories = {path.name: load(path) for path in FILES}
    file_of = {history.run_id: name for name, history in histories.items()}
    results = await replayer(UserCouponWorkflow).replay_workflows(
        one_by_one(histories.values()), raise_on_replay_failure=False
    )
    failures = {file_of[run_id]: err for run_id, err in results.replay_failures.items()}
    assert not failures, "replay failed for " + "; ".join(
        f"tests/histories/{name}: {type(err).__name__}: {err}"
        for name, err in sorted(failures.items())
    )


def test_corpus_covers_every_final_state() -> None:
    reached: dict[str, list[str]] = {}
    for path in FILES:
        history = load(path)
        states = coupon_states(history)
        assert states, f"{path.name}: no CouponState in the history"
        status = final_status(history)
        # A closed workflow's last published state is the one it returned. (A history of
        # a workflow still open is welcome too: it counts with its current state.)
        if status is not None:
            assert states[-1] == status.state, f"{path.name}: {states} but result {status.state}"
        reached.setdefault(states[-1], []).append(path.name)
    assert set(reached) >= FINAL_STATES, (
        f"no stored history ends {sorted(FINAL_STATES - set(reached))}; "
        f"final states covered: {reached}"
    )


def test_every_stored_lapse_comes_after_the_validity_ends() -> None:
    lapsed = 0
    for path in FILES:
        status = final_status(load(path))
        if status is None or status.state != "lapsed":
            continue
        lapsed += 1
        assert status.receipt is not None
        assert status.transitions[-1].at >= status.receipt.valid_until, path.name
    assert lapsed >= 1


# ----- the check can fail -------------------------------------------------------------


@workflow.defn(name="UserCouponWorkflow")
class UnpatchedChangeWorkflow(UserCouponWorkflow):
    """UserCouponWorkflow with an unguarded new command before everything else: the kind
    of change `workflow.patched` exists for."""

    @workflow.run
    async def run(self, input: CouponInput) -> CouponStatus:
        await workflow.sleep(timedelta(seconds=1), summary="a new, unpatched timer")
        return await super().run(input)


@pytest.mark.parametrize("name", ["received_cancelled.json", "issued_redeemed_by_signal.json"])
async def test_an_unpatched_command_change_fails_replay(name: str) -> None:
    history = load(HISTORIES / name)
    results = await replayer(UnpatchedChangeWorkflow).replay_workflows(
        one_by_one([history]), raise_on_replay_failure=False
    )
    failure = results.replay_failures.get(history.run_id)
    assert isinstance(failure, workflow.NondeterminismError), (
        f"tests/histories/{name} replayed against an incompatible workflow: {failure!r}"
    )


def patches_of(history: WorkflowHistory) -> set[str]:
    """The ids of the patches a history recorded (its `core_patch` markers)."""
    found = set()
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
            continue
        for payload in event.marker_recorded_event_attributes.details["patch-data"].payloads:
            found.add(_payloads.from_payloads([payload])[0]["id"])
    return found


def test_the_corpus_holds_both_sides_of_every_patch() -> None:
    """Histories from before the patches prove the old branches; after each, the new one."""
    recorded = {path.name: patches_of(load(path)) for path in FILES}
    assert any(not patches for patches in recorded.values()), "no history from before patches"
    for patch in (FIRST_POLL_AFTER_BACKOFF,):
        assert any(patch in patches for patches in recorded.values()), f"no history has {patch}"


# ----- the campaign end ---------------------------------------------------------------

# Its own folder: the checks above read every history in tests/histories as a coupon's.
END_CAMPAIGN_FILES = sorted((HISTORIES / "end_campaign").glob("*.json"))


def load_end_campaign(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(f"end-campaign:{path.stem}", path.read_text())


async def test_every_stored_end_campaign_history_replays_on_both_sides_of_its_patch() -> None:
    """Runs from before COUNTS (id lists, one pass) and after it (counts, passes, a run
    that continued as new, one that reported stuck coupons) replay on today's code."""
    recorded: dict[str, set[str]] = {}
    for path in END_CAMPAIGN_FILES:
        history = load_end_campaign(path)
        await replayer(EndCampaignWorkflow).replay_workflow(history)
        recorded[path.name] = patches_of(history)
    assert any(not patches for patches in recorded.values()), "no history from before COUNTS"
    assert any(COUNTS in patches for patches in recorded.values()), f"no history has {COUNTS}"


@workflow.defn(name=END_CAMPAIGN_WORKFLOW)
class UnpatchedEndCampaignWorkflow(EndCampaignWorkflow):
    """EndCampaignWorkflow taking today's path without asking `workflow.patched`."""

    @workflow.run
    async def run(self, input: EndCampaignRun) -> Any:
        return await self._run_with_counts(input)


async def test_an_unpatched_end_campaign_fails_replay_of_a_run_from_before() -> None:
    history = load_end_campaign(HISTORIES / "end_campaign" / "before_counts.json")
    results = await replayer(UnpatchedEndCampaignWorkflow).replay_workflows(
        one_by_one([history]), raise_on_replay_failure=False
    )
    assert isinstance(results.replay_failures.get(history.run_id), workflow.NondeterminismError)
