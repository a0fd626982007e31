"""Finding wedged coupons: which coupons cannot make progress, and why (the package's
docstring says how, at a bounded cost)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from psycopg_pool import AsyncConnectionPool
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from app.claims import from_claim
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger.claims import Claim
from coupons.lifecycle import FINAL_STATES

log = logging.getLogger(__name__)
UNDECODABLE = "undecodable"
TASK_FAILING = "task_failing"
NOT_STARTED = "not_started"
MISSING = "missing"
CLOSED = "closed"
CAUSES = (UNDECODABLE, TASK_FAILING, NOT_STARTED, MISSING, CLOSED)

WORKFLOW_TYPE = "UserCouponWorkflow"
REPORTED_PROBLEMS = SearchAttributeKey.for_keyword_list("TemporalReportedProblems")
PROBLEMS = ("category=WorkflowTaskFailed", "category=WorkflowTaskTimedOut")
# A single coupon is judged by its pending workflow task too (recover, on any server): the
# third attempt means two failed in a row, the first retry having failed as well.
FAILING_ATTEMPTS = 3
# The dev server's SQLite store times out near 1,000 operations in flight: stay far below.
CONCURRENCY = 20
PAGE = 200
DETAIL_CHARS = 300
# How long past CLAIM_REPAIR_AFTER_S (a dead starter's lease) an unstarted claim may wait
# before it counts as wedged: younger, it is in the workers' outbox like any fresh claim.
REPAIR_GRACE = timedelta(seconds=30)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Wedged:
    coupon_id: str
    workflow_id: str
    campaign_id: str
    ledger_state: str
    cause: str  # one of CAUSES
    detail: str  # why, cut to DETAIL_CHARS (the last task failure's message, a close status)
    since: datetime | None  # first failure of the streak, the claim, or the last ledger change
    run_id: str | None = None  # the stuck or closed run, None when there is none
    attempts: int | None = None  # the failing workflow task's attempt
    status: str | None = None  # the run's status at Temporal (running, terminated, ...)


# ----------------------------------------------------------------- finding them


async def find_wedged(
    pool: AsyncConnectionPool,
    client: Client,
    settings: Settings,
    *,
    limit: int = 1000,
    concurrency: int = CONCURRENCY,
    repair_grace: timedelta = REPAIR_GRACE,
) -> list[Wedged]:
    """Every wedged coupon (up to `limit` per kind), oldest first."""
    found = await _not_started(pool, settings, repair_grace, limit)
    found += await _failing_tasks(pool, client, settings, limit, concurrency)
    seen = {w.coupon_id for w in found}
    found += [
        w
        for w in await _gone(pool, client, settings, limit, concurrency)
        if w.coupon_id not in seen
    ]
    return sorted(found, key=lambda w: w.since or datetime.max.replace(tzinfo=UTC))


def count_by_cause(found: Iterable[Wedged]) -> dict[str, int]:
    """Every cause, 0 when none: a gauge set from this drops to 0 once recovered."""
    counted = Counter(w.cause for w in found)
    return {cause: counted.get(cause, 0) for cause in CAUSES}


async def _not_started(
    pool: AsyncConnectionPool, settings: Settings, grace: timedelta, limit: int
) -> list[Wedged]:
    stale = await ledger.unstarted(
        pool, timedelta(seconds=settings.claim_repair_after_s) + grace, limit
    )
    return [_unstarted(claim) for claim in stale]


def _unstarted(claim: Claim) -> Wedged:
    return _wedged(
        claim,
        NOT_STARTED,
        "the claim's workflow start was never confirmed (the worker's claim repair "
        "should have started it: is a worker running?)",
        since=claim.claimed_at,
    )


async def _failing_tasks(
    pool: AsyncConnectionPool, client: Client, settings: Settings, limit: int, concurrency: int
) -> list[Wedged]:
    problems = ", ".join(_quoted(p) for p in PROBLEMS)
    query = f"{_running(settings)} AND {REPORTED_PROBLEMS.name} IN ({problems})"
    try:
        flagged = [e.id async for e in client.list_workflows(query, limit=limit)]
    except RPCError as err:
        if err.status != RPCStatusCode.INVALID_ARGUMENT:
            raise
        # A server older than the attribute: recover still judges one coupon by its task.
        log.warning("cannot list failing workflow tasks (%s): server too old?", err.message)
        return []
    if not flagged:
        return []
    claims = {c.workflow_id: c for c in await ledger.claims_by_workflow(pool, flagged)}

    async def judge(workflow_id: str) -> Wedged | None:
        claim = claims.get(workflow_id)
        if claim is None:
            return None  # a coupon workflow without a claim row: not ours to resume
        # Judged again from the workflow itself: visibility lags, the run may have healed.
        return await _diagnose_started(client, claim)

    return [w for w in await bounded(flagged, judge, concurrency) if w is not None]


async def _gone(
    pool: AsyncConnectionPool, client: Client, settings: Settings, limit: int, concurrency: int
) -> list[Wedged]:
    """Open claims whose workflow is not running. The ledger's and Temporal's counts agree
    unless one is missing or closed (or a claim is changing right now: the describe at the
    end tells those apart), so only a campaign whose counts differ is checked claim by claim.
    """
    open_claims = await ledger.count_open(pool)
    running = (await client.count_workflows(_running(settings))).count
    if sum(open_claims.values()) == running:
        return []

    async def differs(campaign_id: str) -> bool:
        query = f"{_running(settings)} AND CampaignId = {_quoted(campaign_id)}"
        return (await client.count_workflows(query)).count != open_claims[campaign_id]

    checks = await bounded(open_claims, differs, concurrency)
    found: list[Wedged] = []
    for campaign_id, different in zip(open_claims, checks, strict=True):
        if different and len(found) < limit:
            log.info("campaign %s: open claims and running workflows differ", campaign_id)
            found += await _gone_of(pool, client, settings, campaign_id, concurrency)
    return found[:limit]


async def _gone_of(
    pool: AsyncConnectionPool, client: Client, settings: Settings, campaign: str, concurrency: int
) -> list[Wedged]:
    """A campaign's open claims, a page at a time (one visibility query each), described one
    by one when Temporal does not list their workflow as running."""
    found: list[Wedged] = []
    after = ""
    while page := await ledger.open_page(pool, campaign, after, PAGE):
        after = page[-1].coupon_id
        ids = ", ".join(_quoted(c.workflow_id) for c in page)
        query = f"{_running(settings)} AND WorkflowId IN ({ids})"
        alive = {e.id async for e in client.list_workflows(query)}
        absent = [c for c in page if c.workflow_id not in alive]
        judged = await bounded(absent, lambda c: _diagnose_started(client, c), concurrency)
        found += [w for w in judged if w is not None]
    return found


# ----------------------------------------------------------------- one coupon


async def diagnose(
    pool: AsyncConnectionPool, client: Client, settings: Settings, claim: Claim
) -> Wedged | None:
    """Whether this one coupon is wedged, and why; None when it is not."""
    if not claim.workflow_started:
        overdue = timedelta(seconds=settings.claim_repair_after_s) + REPAIR_GRACE
        return _unstarted(claim) if claim.claimed_at < datetime.now(UTC) - overdue else None
    return await _diagnose_started(client, claim)


async def _diagnose_started(client: Client, claim: Claim) -> Wedged | None:
    try:
        description = await client.get_workflow_handle(claim.workflow_id).describe()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        if claim.state in FINAL_STATES:
            return None  # the ledger holds its whole story; nothing is waiting
        return _wedged(
            claim,
            MISSING,
            f"Temporal has no workflow {claim.workflow_id}, the ledger says {claim.state}",
            since=claim.updated_at,
        )
    if description.status == WorkflowExecutionStatus.RUNNING:
        return await _failing(client, claim, description)
    if claim.state in FINAL_STATES:
        return None
    status = _status_name(description.status)
    return _wedged(
        claim,
        CLOSED,
        f"its workflow is {status} while the ledger says {claim.state}",
        since=description.close_time,
        run_id=description.run_id,
        status=status,
    )


async def _failing(
    client: Client, claim: Claim, description: WorkflowExecutionDescription
) -> Wedged | None:
    """A running workflow whose workflow task keeps failing; None when it does not."""
    pending = description.raw_description.pending_workflow_task
    attempts = pending.attempt if pending.scheduled_time.seconds else 0
    problems = list(description.typed_search_attributes.get(REPORTED_PROBLEMS) or [])
    flagged = any(p in PROBLEMS for p in problems)
    if not flagged and attempts < FAILING_ATTEMPTS:
        return None
    event = await _last_task_problem(client, claim.workflow_id, description.run_id)
    cause, detail = await _classify(client, claim.workflow_id, description.run_id, event, problems)
    since = event.event_time.ToDatetime(tzinfo=UTC) if event is not None else None
    return _wedged(
        claim,
        cause,
        detail,
        since=since,
        run_id=description.run_id,
        attempts=attempts or None,
        status="running",
    )


async def _last_task_problem(
    client: Client, workflow_id: str, run_id: str | None
) -> HistoryEvent | None:
    """The newest WorkflowTaskFailed (or TimedOut) event: read from the history's end, where a
    wedged run's last events are."""
    request = GetWorkflowExecutionHistoryReverseRequest(
        namespace=client.namespace,
        execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id or ""),
        maximum_page_size=50,
    )
    answer = await client.workflow_service.get_workflow_execution_history_reverse(request)
    for event in answer.history.events:
        if event.event_type in (
            EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
        ):
            return event
    return None


async def _classify(
    client: Client,
    workflow_id: str,
    run_id: str | None,
    event: HistoryEvent | None,
    problems: list[str],
) -> tuple[str, str]:
    """(cause, detail) of a failing workflow task, from its failure as this process reads it."""
    if event is None:
        return TASK_FAILING, cut_detail("workflow task failing: " + (", ".join(problems) or "?"))
    if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
        # A timeout says nothing of why, and may be the only problem recorded: the SDK reports
        # a task's failure on its first attempt only, and lets the retries time out
        # (temporalio/sdk-core, managed_run.rs: `should_report` is `attempt <= 1`). The first
        # attempt may itself have timed out (a worker killed mid-task, a poll answer the
        # server lost under load), and every retry failed on a payload since. So the run's
        # input is read here: a worker with this key ring cannot read it either.
        unreadable = await input_unreadable(client, workflow_id, run_id)
        if unreadable is not None:
            return UNDECODABLE, cut_detail(f"workflow task timing out: input {unreadable}")
        return TASK_FAILING, "workflow task timed out again and again (worker stuck or too slow)"
    attributes = event.workflow_task_failed_event_attributes
    kind = WorkflowTaskFailedCause.Name(attributes.cause).removeprefix(
        "WORKFLOW_TASK_FAILED_CAUSE_"
    )
    try:
        error = await client.data_converter.decode_failure(attributes.failure)
    except Exception as err:
        # The failure itself is encrypted with a key this process does not hold either.
        return UNDECODABLE, cut_detail(f"{kind}: failure unreadable here: {err}")
    error_type = error.type if isinstance(error, ApplicationError) else type(error).__name__
    cause = UNDECODABLE if error_type == "CodecError" else TASK_FAILING
    return cause, cut_detail(f"{kind}: {error_type}: {error}")


async def input_unreadable(client: Client, workflow_id: str, run_id: str | None) -> str | None:
    """Why this process's data converter cannot decode the run's input, None when it can."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    async for event in handle.fetch_history_events(page_size=1):  # the start is the first
        started = event.workflow_execution_started_event_attributes
        try:
            await client.data_converter.decode(started.input.payloads)
        except Exception as err:
            return f"unreadable here: {err}"
        return None
    return None


def _wedged(
    claim: Claim,
    cause: str,
    detail: str,
    *,
    since: datetime | None,
    run_id: str | None = None,
    attempts: int | None = None,
    status: str | None = None,
) -> Wedged:
    return from_claim(
        Wedged,
        claim,
        ledger_state=claim.state,
        cause=cause,
        detail=cut_detail(detail),
        since=since,
        run_id=run_id,
        attempts=attempts,
        status=status,
    )


# ----------------------------------------------------------------- helpers


def _running(settings: Settings) -> str:
    """The visibility query of this service's running coupon workflows (its task queue: other
    deployments may share the namespace)."""
    return (
        f"WorkflowType = {_quoted(WORKFLOW_TYPE)} AND TaskQueue = {_quoted(settings.task_queue)}"
        " AND ExecutionStatus = 'Running'"
    )


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _status_name(status: WorkflowExecutionStatus | None) -> str:
    return status.name.lower() if status is not None else "unknown"


def cut_detail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


async def bounded(
    items: Iterable[T], work: Callable[[T], Awaitable[R]], concurrency: int
) -> list[R]:
    """`work` on each item, at most `concurrency` at once, results in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: T) -> R:
        async with gate:
            return await work(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


def as_rows(found: Iterable[Wedged]) -> list[Mapping[str, object]]:
    """For `--json`: plain values, times in ISO 8601."""
    return [
        {
            "coupon_id": w.coupon_id,
            "workflow_id": w.workflow_id,
            "campaign_id": w.campaign_id,
            "ledger_state": w.ledger_state,
            "cause": w.cause,
            "detail": w.detail,
            "since": w.since.isoformat() if w.since else None,
            "run_id": w.run_id,
            "attempts": w.attempts,
            "status": w.status,
        }
        for w in found
    ]
