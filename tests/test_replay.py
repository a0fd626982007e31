"""Today's UserCouponWorkflow must replay every stored history in tests/histories.

A replay failure means a change altered the commands of running workflows: guard it
with `workflow.patched` instead. Never re-record the corpus to make this test pass;
`scripts/record_histories.py` only extends it after an intentional, patched change.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.exceptions import ActivityError
from temporalio.worker import Replayer

# This module defines a workflow, so the sandbox re-imports it: pass the rest through.
with workflow.unsafe.imports_passed_through():
    import workflows
    from activities.catalog import CatalogActivities
    from app.workers import workflow_runner
    from coupons import contract as act
    from coupons.contract import END_CAMPAIGN_WORKFLOW
    from coupons.lifecycle import FINAL_STATES
    from coupons.model import (
        COUPON_STATE,
        BatchReconciliation,
        CouponInput,
        CouponStatus,
        ReconcileInput,
        ReconcileReport,
        SyncInput,
        SyncReport,
        coupon_workflow_id,
    )
    from tests.conftest import published_search_attributes
    from workflows.catalog_sync import PARALLEL as SYNC_PARALLEL
    from workflows.catalog_sync import CatalogSyncWorkflow
    from workflows.end_campaign import COUNTS, EndCampaignRun, EndCampaignWorkflow
    from workflows.policies import LEDGER_CALL, PLATFORM_RETRY
    from workflows.reconcile import BATCH_FAILURE_REPORTED, ReconcileWorkflow
    from workflows.user_coupon import FIRST_POLL_AFTER_BACKOFF, UserCouponWorkflow

HISTORIES = Path(__file__).parent / "histories"
FILES = sorted(HISTORIES.glob("*.json"))

_payloads = DataConverter.default.payload_converter
T = TypeVar("T")


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


# ----- the catalog sync and reconciliation ----------------------------------------------
# Recorded by `scripts/record_histories.py --type catalog_sync` (and `--type reconcile`),
# each in a folder of its own.

CATALOG_SYNC_FILES = sorted((HISTORIES / "catalog_sync").glob("*.json"))
RECONCILE_FILES = sorted((HISTORIES / "reconcile").glob("*.json"))


def load_named(path: Path) -> WorkflowHistory:
    """A stored history under an id made of its folder and name (its workflow reads none)."""
    return WorkflowHistory.from_json(f"{path.parent.name}:{path.stem}", path.read_text())


def started_with(history: WorkflowHistory, input_type: type[T]) -> T:
    started = history.events[0].workflow_execution_started_event_attributes
    [input] = _payloads.from_payloads(started.input.payloads, [input_type])
    return input  # type: ignore[no-any-return]


def result_of(history: WorkflowHistory, result_type: type[T]) -> T:
    """The workflow's result; the history must end in its completion."""
    last = history.events[-1]
    assert last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    payloads = last.workflow_execution_completed_event_attributes.result.payloads
    [result] = _payloads.from_payloads(payloads, [result_type])
    return result  # type: ignore[no-any-return]


async def replay_failures(workflow_class: type, files: list[Path]) -> list[str]:
    """Each stored history of `files` that fails to replay on `workflow_class`, and why."""
    assert files, "no histories: run scripts/record_histories.py --type <the workflow's type>"
    histories = {path: load_named(path) for path in files}
    file_of = {history.run_id: path for path, history in histories.items()}
    assert len(file_of) == len(files), "two stored histories share a run id"
    results = await replayer(workflow_class).replay_workflows(
        one_by_one(histories.values()), raise_on_replay_failure=False
    )
    return sorted(
        f"{file_of[run_id].relative_to(HISTORIES.parent)}: {type(err).__name__}: {err}"
        for run_id, err in results.replay_failures.items()
    )


async def test_every_stored_catalog_sync_history_replays() -> None:
    failures = await replay_failures(CatalogSyncWorkflow, CATALOG_SYNC_FILES)
    assert not failures, "replay failed for " + "; ".join(failures)


def test_the_stored_catalog_syncs_are_what_they_are_named() -> None:
    """A sync of every batch in two rounds, with drift and a woken coupon; a sync of named
    batches where the one the ledger does not know is reported failed, not the whole sync."""
    folder = HISTORIES / "catalog_sync"
    every = load_named(folder / "every_batch_in_two_rounds.json")
    assert started_with(every, SyncInput).batch_ids is None
    report = result_of(every, SyncReport)
    assert len(report.batches) > SYNC_PARALLEL and report.failed == []
    assert len(report.drifted) == 2
    assert [b.woken for b in report.batches if b.woken] == [1]

    named = load_named(folder / "named_batches_one_failed.json")
    asked = started_with(named, SyncInput).batch_ids
    report = result_of(named, SyncReport)
    assert asked is not None and len(asked) == 3
    [failed] = report.failed
    assert failed.startswith(f"{asked[1]}: ")
    assert [b.batch_id for b in report.batches] == [asked[0], asked[2]]
    assert [b.batch_id for b in report.drifted] == [asked[2]]


async def test_every_stored_reconcile_history_replays() -> None:
    failures = await replay_failures(ReconcileWorkflow, RECONCILE_FILES)
    assert not failures, "replay failed for " + "; ".join(failures)


def test_the_stored_reconciliations_are_what_they_are_named() -> None:
    """Uses behind our back repaired (the wait for the ledger recorded too), every batch
    with one repaired and one clean, and uses found but left for an operator."""
    folder = HISTORIES / "reconcile"
    repaired = result_of(load_named(folder / "one_batch_uses_repaired.json"), ReconcileReport)
    [batch] = repaired.batches
    assert (repaired.mismatches, repaired.repaired, len(batch.repairs_requested)) == (2, 2, 2)

    every = load_named(folder / "every_batch_one_repaired_one_clean.json")
    assert started_with(every, ReconcileInput).batch_id is None
    report = result_of(every, ReconcileReport)
    assert sorted((len(b.mismatches), b.repaired) for b in report.batches) == [(0, 0), (1, 1)]

    left = load_named(folder / "one_batch_found_not_repaired.json")
    assert started_with(left, ReconcileInput).repair is False
    [batch] = result_of(left, ReconcileReport).batches
    assert [m.repair for m in batch.mismatches] == [None]
    assert (batch.repairs_requested, batch.repaired) == ([], 0)

    # After BATCH_FAILURE_REPORTED: the first batch failed and was reported, the next done.
    failed = load_named(folder / "every_batch_one_failed.json")
    assert started_with(failed, ReconcileInput).batch_id is None
    assert patches_of(failed) == {BATCH_FAILURE_REPORTED}
    report = result_of(failed, ReconcileReport)
    [why] = report.failed
    assert "BATCH_NOT_FOUND" in why
    assert (len(report.batches), report.repaired) == (1, 1)


@workflow.defn(name=act.CATALOG_SYNC_WORKFLOW)
class OneAtATimeSyncWorkflow(CatalogSyncWorkflow):
    """CatalogSyncWorkflow reading its batches one at a time instead of SYNC_PARALLEL at
    once: a change of its commands that `workflow.patched` would have to guard."""

    @workflow.run
    async def run(self, input: SyncInput) -> SyncReport:
        batch_ids = input.batch_ids
        if batch_ids is None:
            batch_ids = await workflow.execute_activity_method(
                CatalogActivities.syncable_batches, start_to_close_timeout=LEDGER_CALL
            )
        report = SyncReport(batches=[])
        for batch_id in batch_ids:
            try:
                report.batches.append(await self._sync(batch_id))
            except ActivityError as err:
                report.failed.append(f"{batch_id}: {err.cause or err}")
        return report


@workflow.defn(name=act.RECONCILE_WORKFLOW)
class NoRepairWaitReconcileWorkflow(ReconcileWorkflow):
    """ReconcileWorkflow trusting its repair signals instead of waiting for the ledger to
    show them: one activity fewer, unguarded."""

    @workflow.run
    async def run(self, input: ReconcileInput) -> ReconcileReport:
        return await super().run(input)

    async def _reconcile(self, batch_id: str, repair: bool) -> BatchReconciliation:
        return await workflow.execute_activity_method(
            CatalogActivities.reconcile_batch,
            ReconcileInput(batch_id, repair),
            task_queue=act.platform_task_queue(workflow.info().task_queue),
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(minutes=1),
            retry_policy=PLATFORM_RETRY,
        )


@workflow.defn(name=act.RECONCILE_WORKFLOW)
class FailOnFirstBatchReconcileWorkflow(ReconcileWorkflow):
    """ReconcileWorkflow as it was before BATCH_FAILURE_REPORTED: a batch that fails fails
    the run (an old worker handed a run that went on past a failed batch)."""

    @workflow.run
    async def run(self, input: ReconcileInput) -> ReconcileReport:
        batch_ids = [input.batch_id] if input.batch_id is not None else []
        if input.batch_id is None:
            batch_ids = await workflow.execute_activity_method(
                CatalogActivities.all_batches, start_to_close_timeout=LEDGER_CALL
            )
        report = ReconcileReport(batches=[])
        for batch_id in batch_ids:
            report.batches.append(await self._reconcile(batch_id, input.repair))
        return report


@pytest.mark.parametrize(
    ("altered", "path"),
    [
        (FailOnFirstBatchReconcileWorkflow, "reconcile/every_batch_one_failed.json"),
        (OneAtATimeSyncWorkflow, "catalog_sync/every_batch_in_two_rounds.json"),
        (OneAtATimeSyncWorkflow, "catalog_sync/named_batches_one_failed.json"),
        (NoRepairWaitReconcileWorkflow, "reconcile/one_batch_uses_repaired.json"),
        (NoRepairWaitReconcileWorkflow, "reconcile/every_batch_one_repaired_one_clean.json"),
    ],
)
async def test_an_unpatched_catalog_workflow_change_fails_replay(altered: type, path: str) -> None:
    history = load_named(HISTORIES / path)
    results = await replayer(altered).replay_workflows(
        one_by_one([history]), raise_on_replay_failure=False
    )
    failure = results.replay_failures.get(history.run_id)
    assert isinstance(failure, workflow.NondeterminismError), (
        f"tests/histories/{path} replayed against an incompatible workflow: {failure!r}"
    )


async def test_a_change_the_history_never_reached_replays() -> None:
    """The altered reconciliation differs only where repairs were requested: a run that
    requested none replays on it (the check above fails for the change, not for any)."""
    assert not await replay_failures(
        NoRepairWaitReconcileWorkflow, [HISTORIES / "reconcile/one_batch_found_not_repaired.json"]
    )


# ----- every workflow type, every patch -------------------------------------------------


def workflow_classes() -> dict[str, type]:
    """Every workflow the `workflows` package defines, by its Temporal type name."""
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(workflows.__path__):
        module = importlib.import_module(f"workflows.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type):
                definition = workflow._Definition.from_class(value)
                if definition is not None and definition.name is not None:
                    found[definition.name] = value
    return found


def patch_ids_in(module: ModuleType) -> set[str]:
    """The patch ids `module` asks `workflow.patched` or `workflow.deprecate_patch` about."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("patched", "deprecate_patch")
        ):
            continue
        [arg] = node.args
        if isinstance(arg, ast.Name):
            found.add(getattr(module, arg.id))
        elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.add(arg.value)
        else:
            raise AssertionError(f"{module.__name__}: read the patch id {ast.unparse(arg)}")
    return found


def stored_histories() -> dict[Path, WorkflowHistory]:
    """Every stored history, of every type, in every folder."""
    return {path: load_named(path) for path in sorted(HISTORIES.rglob("*.json"))}


def workflow_type(history: WorkflowHistory) -> str:
    return history.events[0].workflow_execution_started_event_attributes.workflow_type.name


async def test_every_workflow_type_has_stored_histories_and_they_all_replay() -> None:
    """The corpus holds histories of each workflow the `workflows` package defines (a new
    one fails here until it has some), and one replayer with all of them replays all."""
    classes = workflow_classes()
    assert len(classes) >= 4, classes
    histories = stored_histories()
    of_type: dict[str, list[Path]] = {}
    for path, history in histories.items():
        of_type.setdefault(workflow_type(history), []).append(path)
    assert set(of_type) == set(classes), (
        f"workflow types with no stored history: {sorted(set(classes) - set(of_type))}; "
        f"stored histories of no workflow: {sorted(set(of_type) - set(classes))}"
    )
    file_of = {history.run_id: path for path, history in histories.items()}
    assert len(file_of) == len(histories), "two stored histories share a run id"
    results = await replayer(*classes.values()).replay_workflows(
        one_by_one(histories.values()), raise_on_replay_failure=False
    )
    failures = [f"{file_of[run_id]}: {err!r}" for run_id, err in results.replay_failures.items()]
    assert not failures, "replay failed for " + "; ".join(sorted(failures))


def test_every_patch_of_every_workflow_has_both_sides_stored() -> None:
    """For each `workflow.patched` id in a workflow's module, a stored history of that
    workflow recorded it (the new side) and one did not (the old side)."""
    patches: dict[str, list[set[str]]] = {}
    for history in stored_histories().values():
        patches.setdefault(workflow_type(history), []).append(patches_of(history))
    missing = []
    for name, cls in workflow_classes().items():
        recorded = patches.get(name, [])
        for patch in patch_ids_in(inspect.getmodule(cls) or workflows):
            if not any(patch in found for found in recorded):
                missing.append(f"{name}: no history from after {patch}")
            if all(patch in found for found in recorded):
                missing.append(f"{name}: no history from before {patch}")
    assert not missing, "; ".join(missing)
