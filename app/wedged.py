"""Wedged coupons: found, counted, listed and recovered, with the ledger as the truth.

A coupon is wedged when its workflow cannot make progress on its own. The causes:

- `undecodable`: every workflow task fails because a payload is encrypted with a key the
  worker's key ring lacks (a shell started it with another CODEC_KEYS_FILE);
- `task_failing`: every workflow task fails or times out for any other reason (a bug,
  nondeterminism after a deploy);
- `not_started`: the ledger claim's workflow start was never confirmed, past the time the
  worker's claim repair should have started it;
- `missing`: the ledger says the workflow was started, Temporal has no such workflow
  (Temporal's data lost or deleted);
- `closed`: the ledger's state is not final, yet the workflow is closed (terminated, failed,
  timed out).

How they are found, at a bounded cost whatever the number of coupons:

- Task failures: Temporal's own `TemporalReportedProblems` search attribute, which the server
  sets on a workflow after consecutive workflow task failures or timeouts (5 by default,
  dynamic config `system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute`) and
  clears at its next good task. One visibility query lists exactly the wedged runs, so the
  cost follows the wedged, not the open coupons; describing every running workflow for its
  pending task's attempt instead would cost one call per open coupon per round. Then, for
  each one (bounded concurrency), its pending task's attempt and the last WorkflowTaskFailed
  event, which is the first failure of the streak (Temporal writes no event for the retries
  of a failing task) and whose failure names the cause (a CodecError is `undecodable`).
- Missing or closed workflows: the ledger's count of started, unfinished claims against
  Temporal's count of running coupon workflows; only when they differ, the same by campaign,
  and only a campaign whose counts differ has its open claims checked page by page (one
  visibility query per 200), the ones without a running workflow described one by one.

Recovery keeps the claim and never sends twice: the stuck run is terminated (that run only,
by its run id), then a fresh run under the same workflow id resumes the ledger's state
(`received` with the task reports the stuck run had received, `usable`, or `issued` with the
ledger's receipt). A usable coupon's send starts again with the coupon's one idempotency
key, so a send the platform made but the ledger never recorded returns the same coupon;
ledger writes are idempotent. The new run is encoded with this process's key ring.
"""

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
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from app.claims import ClaimService
from coupons.config import Settings
from coupons.errors import Refused
from coupons.ledger import claims as ledger
from coupons.ledger.claims import Claim
from coupons.lifecycle import FINAL_STATES
from coupons.model import TaskCompletion

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
# How long past CLAIM_REPAIR_AFTER_S an unstarted claim may wait: the repair runs every 10 s.
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


@dataclass
class Recovery:
    coupon_id: str
    workflow_id: str
    ledger_state: str
    # restarted (a fresh run resumes the ledger's state), started (the claim's first start),
    # terminated (the ledger is final: only the stuck run stopped), none (nothing to do, or
    # nothing safe to do: see detail), already_recovered (another process did it), error
    action: str
    detail: str
    cause: str | None = None
    stopped_run_id: str | None = None
    new_run_id: str | None = None


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
    return Wedged(
        coupon_id=claim.coupon_id,
        workflow_id=claim.workflow_id,
        campaign_id=claim.campaign_id,
        ledger_state=claim.state,
        cause=NOT_STARTED,
        detail="the claim's workflow start was never confirmed (the worker's claim repair "
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

    return [w for w in await _bounded(flagged, judge, concurrency) if w is not None]


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

    checks = await _bounded(open_claims, differs, concurrency)
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
        judged = await _bounded(absent, lambda c: _diagnose_started(client, c), concurrency)
        found += [w for w in judged if w is not None]
    return found


# ----------------------------------------------------------------- one coupon


async def diagnose(
    pool: AsyncConnectionPool, client: Client, settings: Settings, claim: Claim
) -> Wedged | None:
    """Whether this one coupon is wedged, and why; None when it is not."""
    if not claim.workflow_started:
        return _unstarted(claim)
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
    cause, detail = await _classify(client, event, problems)
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
    client: Client, event: HistoryEvent | None, problems: list[str]
) -> tuple[str, str]:
    """(cause, detail) of a failing workflow task, from its failure as this process reads it."""
    if event is None:
        return TASK_FAILING, _cut("workflow task failing: " + (", ".join(problems) or "?"))
    if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
        return TASK_FAILING, "workflow task timed out again and again (worker stuck or too slow)"
    attributes = event.workflow_task_failed_event_attributes
    kind = WorkflowTaskFailedCause.Name(attributes.cause).removeprefix(
        "WORKFLOW_TASK_FAILED_CAUSE_"
    )
    try:
        error = await client.data_converter.decode_failure(attributes.failure)
    except Exception as err:
        # The failure itself is encrypted with a key this process does not hold either.
        return UNDECODABLE, _cut(f"{kind}: failure unreadable here: {err}")
    error_type = error.type if isinstance(error, ApplicationError) else type(error).__name__
    cause = UNDECODABLE if error_type == "CodecError" else TASK_FAILING
    return cause, _cut(f"{kind}: {error_type}: {error}")


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
    return Wedged(
        coupon_id=claim.coupon_id,
        workflow_id=claim.workflow_id,
        campaign_id=claim.campaign_id,
        ledger_state=claim.state,
        cause=cause,
        detail=_cut(detail),
        since=since,
        run_id=run_id,
        attempts=attempts,
        status=status,
    )


# ----------------------------------------------------------------- recovering them


async def recover(
    pool: AsyncConnectionPool, client: Client, settings: Settings, coupon_id: str
) -> Recovery:
    """Recover one coupon if it is wedged; a coupon that is not is left alone (action none).

    Refused `unknown_coupon` when the ledger has no such claim.
    """
    claim = await ledger.get_claim(pool, coupon_id)
    if claim is None:
        raise Refused("unknown_coupon", f"no coupon {coupon_id!r}")
    found = await diagnose(pool, client, settings, claim)
    if found is None:
        return _recovery(claim, "none", "not wedged: its workflow is making progress")
    return await _recover(pool, client, settings, claim, found)


async def recover_all(
    pool: AsyncConnectionPool,
    client: Client,
    settings: Settings,
    *,
    concurrency: int = 10,
    repair_grace: timedelta = REPAIR_GRACE,
) -> list[Recovery]:
    """Recover every coupon `find_wedged` lists; one that fails is reported, not raised."""
    found = await find_wedged(pool, client, settings, repair_grace=repair_grace)

    async def one(wedged: Wedged) -> Recovery:
        try:
            return await recover(pool, client, settings, wedged.coupon_id)
        except Exception as err:
            log.exception("could not recover coupon %s", wedged.coupon_id)
            return Recovery(
                wedged.coupon_id,
                wedged.workflow_id,
                wedged.ledger_state,
                "error",
                _cut(f"{type(err).__name__}: {err}"),
                cause=wedged.cause,
            )

    return await _bounded(found, one, concurrency)


async def _recover(
    pool: AsyncConnectionPool, client: Client, settings: Settings, claim: Claim, found: Wedged
) -> Recovery:
    service = ClaimService(pool, client, settings)
    if found.cause == NOT_STARTED:
        await service.start_workflow(claim)  # the claim's own start, as the repair makes it
        return _recovery(claim, "started", "its workflow started", found)
    if found.status == "completed":
        # Never expected (a run writes its final state before it completes); the reuse
        # policy would refuse a new run anyway. An operator decides.
        return _recovery(
            claim, "none", f"its run completed, the ledger says {claim.state}: check by hand", found
        )
    if found.cause == UNDECODABLE and await _readable_here(client, claim, found):
        # The worker lacks a key this process holds: a new run would fail there the same way.
        return _recovery(
            claim,
            "none",
            "this process reads its payloads and the worker does not: give the worker this "
            "key ring (CODEC_KEYS_FILE), then it goes on by itself",
            found,
        )
    stopped = None
    if found.status == "running":
        stopped = await _terminate(client, claim, found)
    if claim.state in FINAL_STATES:
        return _recovery(
            claim, "terminated", "the ledger is final: the stuck run stopped", found, stopped
        )
    receipt = await ledger.receipt_of(pool, claim.coupon_id) if claim.state == "issued" else None
    if claim.state == "issued" and receipt is None:
        raise Refused("inconsistent", f"coupon {claim.coupon_id} is issued without a receipt")
    tasks = await _reported_tasks(client, claim, found) if claim.state == "received" else []
    try:
        new_run = await service.restart_workflow(claim, tasks, receipt)
    except WorkflowAlreadyStartedError:
        return _recovery(
            claim, "already_recovered", "a new run was already started", found, stopped
        )
    log.warning(
        "recovered coupon %s (%s): new run %s resumes %s",
        claim.coupon_id,
        found.cause,
        new_run,
        claim.state,
    )
    said = f"a new run resumes the ledger's {claim.state}"
    if tasks:
        said += f" with the tasks reported to the stuck run ({', '.join(tasks)})"
    return _recovery(claim, "restarted", said, found, stopped, new_run)


async def _terminate(client: Client, claim: Claim, found: Wedged) -> str | None:
    """Terminate the stuck run, by its id: never a newer run another recovery started."""
    handle = client.get_workflow_handle(claim.workflow_id, run_id=found.run_id)
    try:
        await handle.terminate(
            reason=f"wedged ({found.cause}): recovered from the ledger ({claim.state}) by a new run"
        )
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        return None  # it closed meanwhile
    return found.run_id


async def _readable_here(client: Client, claim: Claim, found: Wedged) -> bool:
    """Whether this process's key ring decrypts the stuck run's input."""
    handle = client.get_workflow_handle(claim.workflow_id, run_id=found.run_id)
    async for event in handle.fetch_history_events():
        started = event.workflow_execution_started_event_attributes
        try:
            await client.data_converter.decode(started.input.payloads)
        except Exception:
            return False
        return True
    return False


async def _reported_tasks(client: Client, claim: Claim, found: Wedged) -> list[str]:
    """The tasks reported to the stuck run by signal, for a `received` coupon (the ledger keeps
    no partial progress); those this process cannot read (undecodable) are not taken, and the
    app's report of them has to come again."""
    if found.run_id is None:
        return []
    handle = client.get_workflow_handle(claim.workflow_id, run_id=found.run_id)
    tasks: list[str] = []
    async for event in handle.fetch_history_events():
        if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            continue
        signaled = event.workflow_execution_signaled_event_attributes
        if signaled.signal_name != "task_done":
            continue
        try:
            [completion] = await client.data_converter.decode(
                signaled.input.payloads, [TaskCompletion]
            )
        except Exception:
            log.warning("a task report to %s cannot be read here: not taken", claim.workflow_id)
            continue
        task = completion.task
        if task in claim.required_tasks and task not in tasks:
            tasks.append(task)
    return tasks


def _recovery(
    claim: Claim,
    action: str,
    detail: str,
    found: Wedged | None = None,
    stopped: str | None = None,
    new_run: str | None = None,
) -> Recovery:
    return Recovery(
        coupon_id=claim.coupon_id,
        workflow_id=claim.workflow_id,
        ledger_state=claim.state,
        action=action,
        detail=detail,
        cause=found.cause if found else None,
        stopped_run_id=stopped,
        new_run_id=new_run,
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


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


async def _bounded(
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
