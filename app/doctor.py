"""`starter.py doctor`: the first thing to run when something looks wrong.

It says which stack this shell speaks to (a live `make run` stack found by app.running,
or the environment's settings alone) and checks each part on its own, with a short timeout,
so a part that is down is named and the others are still checked: PostgreSQL, Temporal,
the worker (its pollers on both task queues, and its process when the stack recorded it),
the platform (the simulator or the real one), the API, the schedules and their last runs,
workflows whose tasks keep failing, the ledger's drift and unfinished platform changes, the
last reconciliation, and wedged coupons. Healthy means every finding is; only then exit 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest, GetSystemInfoRequest
from temporalio.client import Client, ScheduleDescription, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from app import wedged
from app.running import StackRecord, record_settings, stack_settings, without_password
from coupons import contract
from coupons.catalog.batches import look
from coupons.config import ConfigError, Settings
from coupons.ledger import db
from coupons.ledger.batches import list_batches, pending_intents
from coupons.platforms.base import Platform, PlatformError
from coupons.platforms.configured import make_platform
from coupons.temporal import connect

# Each check's own limit: a part that hangs is as down as one that refuses.
CHECK_TIMEOUT_S = 5.0
# A poller asks again at least this often (a long poll lasts about a minute): a worker whose
# last poll is older is gone.
POLLER_STALE = timedelta(minutes=2)
# A sync whose last run is older than this many intervals has stopped running.
SYNC_LATE_INTERVALS = 3
# An intent older than this, still pending, is one the syncs cannot finish on their own.
INTENT_LATE = timedelta(minutes=15)


@dataclass
class Finding:
    part: str
    ok: bool | None  # None: not checked, as a part it needs is down
    detail: str


@dataclass
class Diagnosis:
    stack: str  # which stack this shell speaks to
    settings: dict[str, str]  # its settings, as variables, no secret
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok is True for f in self.findings)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.ok is False]


async def diagnose(settings: Settings, record: StackRecord | None) -> Diagnosis:
    if record is not None:
        stack = f"the make run stack ({record.describe()}, platform {settings.platform})"
    else:
        stack = "no running make run stack found: the environment's settings"
    found = Diagnosis(stack, record_settings(settings))
    settings = settings.with_stack_secrets()
    pool, client = await asyncio.gather(_pool(settings, found), _client(settings, found))
    try:
        checks: list[Awaitable[list[Finding]]] = [
            _platform(settings),
            # The stack's own API: where it listens is not followed (app.running).
            _api(stack_settings(record) if record is not None else settings),
        ]
        if client is not None:
            checks += [_worker(client, settings, record), _schedules(client, settings)]
            checks.append(_failing_workflows(client, settings))
        else:
            found.findings += _unchecked("Temporal", "worker", "schedules", "workflow tasks")
        if pool is not None:
            checks.append(_ledger(pool, settings))
        else:
            found.findings += _unchecked("PostgreSQL", "drift", "platform changes")
        if pool is not None and client is not None:
            checks.append(_wedged(pool, client, settings))
        else:
            found.findings += _unchecked("PostgreSQL and Temporal", "wedged coupons")
        for findings in await asyncio.gather(*(_bounded(check) for check in checks)):
            found.findings += findings
    finally:
        if pool is not None:
            await pool.close()
    return found


def _unchecked(needs: str, *parts: str) -> list[Finding]:
    return [Finding(part, None, f"not checked: needs {needs}") for part in parts]


async def _bounded(check: Awaitable[list[Finding]]) -> list[Finding]:
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT_S * 2)
    except TimeoutError:
        name = getattr(check, "__name__", "a check").lstrip("_")
        return [Finding(name, False, f"no answer within {CHECK_TIMEOUT_S * 2:g} s")]


async def _pool(settings: Settings, found: Diagnosis) -> AsyncConnectionPool | None:
    url = without_password(settings.database_url)
    pool = db.pool(settings.database_url, max_size=2, timeout_s=CHECK_TIMEOUT_S)
    try:
        await asyncio.wait_for(pool.open(wait=True), CHECK_TIMEOUT_S)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT max(version) FROM schema_migrations")
            row = await cur.fetchone()
    except Exception as err:
        await pool.close()
        found.findings.append(Finding("PostgreSQL", False, f"{url}: down ({_said(err)})"))
        return None
    latest = db.migrations()[-1][0]
    applied = row[0] if row else None
    ok = applied == latest
    detail = f"{url}: up, schema version {applied}" + ("" if ok else f" (code needs {latest})")
    found.findings.append(Finding("PostgreSQL", ok, detail))
    return pool


async def _client(settings: Settings, found: Diagnosis) -> Client | None:
    where = f"{settings.temporal_address}, namespace {settings.temporal_namespace}"
    try:
        client = await asyncio.wait_for(connect(settings), CHECK_TIMEOUT_S)
        info = await client.workflow_service.get_system_info(
            GetSystemInfoRequest(), timeout=timedelta(seconds=CHECK_TIMEOUT_S)
        )
    except Exception as err:
        found.findings.append(Finding("Temporal", False, f"{where}: down ({_said(err)})"))
        return None
    found.findings.append(Finding("Temporal", True, f"{where}: up, server {info.server_version}"))
    return client


async def _worker(client: Client, settings: Settings, record: StackRecord | None) -> list[Finding]:
    findings = []
    process = next((c for c in record.children if c.name == "worker"), None) if record else None
    if process is not None and not process.alive:
        findings.append(
            Finding("worker", False, f"pid {process.pid}: not running (make run restarts it)")
        )
    queues = (
        (settings.task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, "workflows"),
        (settings.platform_task_queue, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY, "platform calls"),
    )
    now = datetime.now(UTC)
    for queue, kind, what in queues:
        answer = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=settings.temporal_namespace,
                task_queue=TaskQueue(name=queue),
                task_queue_type=kind,
            ),
            timeout=timedelta(seconds=CHECK_TIMEOUT_S),
        )
        recent = [
            p.identity
            for p in answer.pollers
            if now - p.last_access_time.ToDatetime(tzinfo=UTC) < POLLER_STALE
        ]
        if recent and (process is None or process.alive):
            detail = f"task queue {queue!r} ({what}): {len(recent)} poller(s), {recent[0]}"
            findings.append(Finding("worker", True, detail))
        elif not recent:
            findings.append(
                Finding("worker", False, f"task queue {queue!r} ({what}): no worker polls it")
            )
    return findings


async def _platform(settings: Settings) -> list[Finding]:
    embedded = settings.platform_url_override is None
    url = f"{settings.simulator_url}/health" if embedded else settings.platform_url
    what = f"{settings.platform} simulator" if embedded else f"{settings.platform} platform"
    async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S, trust_env=not embedded) as http:
        try:
            answer = await http.get(url)
        except httpx.HTTPError as err:
            return [Finding("platform", False, f"{what} at {url}: down ({_said(err)})")]
    # A real platform's base URL answers 4xx to a bare GET: it is up. 5xx is not.
    ok = answer.status_code == 200 if embedded else answer.status_code < 500
    return [Finding("platform", ok, f"{what} at {url}: HTTP {answer.status_code}")]


async def _api(settings: Settings) -> list[Finding]:
    url = f"{settings.api_url}/health"
    async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S, trust_env=False) as http:
        try:
            answer = await http.get(url)
        except httpx.HTTPError as err:
            return [Finding("API", False, f"{url}: down ({_said(err)})")]
    return [Finding("API", answer.status_code == 200, f"{url}: HTTP {answer.status_code}")]


async def _schedules(client: Client, settings: Settings) -> list[Finding]:
    findings = []
    every = {
        contract.CATALOG_SYNC_SCHEDULE: timedelta(seconds=settings.sync_interval_s),
        contract.RECONCILE_SCHEDULE: timedelta(days=1),
    }
    for schedule_id, interval in every.items():
        part = "reconciliation" if schedule_id == contract.RECONCILE_SCHEDULE else "catalog sync"
        try:
            described = await client.get_schedule_handle(schedule_id).describe()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            detail = f"schedule {schedule_id!r} does not exist (the worker creates it at start)"
            findings.append(Finding(part, False, detail))
            continue
        findings.append(await _last_run(client, part, schedule_id, described, interval))
    return findings


async def _last_run(
    client: Client, part: str, schedule_id: str, described: ScheduleDescription, every: timedelta
) -> Finding:
    paused = described.schedule.state.paused
    upcoming = described.info.next_action_times
    then = f"next {_when(upcoming[0])}" if upcoming and not paused else "paused"
    if not described.info.recent_actions:
        return Finding(part, not paused, f"schedule {schedule_id!r}: no run yet, {then}")
    last = described.info.recent_actions[-1]
    workflow_id = getattr(last.action, "workflow_id", None)
    status = "started"
    if workflow_id is not None:
        run = await client.get_workflow_handle(workflow_id).describe()
        status = _status(run.status)
    late = not paused and datetime.now(UTC) - last.started_at > every * SYNC_LATE_INTERVALS
    ok = status in ("running", "completed") and not late
    detail = f"schedule {schedule_id!r}: last run {_when(last.started_at)} {status}, {then}"
    return Finding(part, ok, detail + (" (late: no run for several intervals)" if late else ""))


async def _failing_workflows(client: Client, settings: Settings) -> list[Finding]:
    """Workflows of any type on our task queue whose tasks keep failing (the server flags
    them with TemporalReportedProblems); coupons among them are listed as wedged too."""
    query = (
        f"TaskQueue = '{settings.task_queue}' AND ExecutionStatus = 'Running'"
        f" AND {wedged.REPORTED_PROBLEMS.name} IS NOT NULL"
    )
    try:
        counted = await client.count_workflows(query)
    except RPCError as err:
        return [Finding("workflow tasks", False, f"cannot count failing tasks: {err.message}")]
    if counted.count:
        detail = (
            f"{counted.count} workflow(s) failing their tasks: "
            f'temporal workflow list --query "{query}"'
        )
        return [Finding("workflow tasks", False, detail)]
    return [Finding("workflow tasks", True, "no workflow is failing its tasks")]


async def _ledger(pool: AsyncConnectionPool, settings: Settings) -> list[Finding]:
    try:
        platform = make_platform(settings)
    except ConfigError as err:  # the platform check names it too
        findings = [await drift(pool, None, str(err))]
    else:
        try:
            findings = [await drift(pool, platform)]
        finally:
            await platform.aclose()
    pending = await pending_intents(pool)
    late = [i for i in pending if datetime.now(UTC) - i.created_at > INTENT_LATE]
    detail = f"{len(pending)} platform change(s) waiting for the next sync" if pending else "none"
    if late:
        detail = "; ".join(
            f"batch {i.batch_id} {i.operation} pending since {_when(i.created_at)}"
            f" ({i.attempts} attempt(s): {i.last_error or 'no answer'})"
            for i in late
        )
    findings.append(Finding("platform changes", not late, detail))
    return findings


async def drift(
    pool: AsyncConnectionPool, platform: Platform | None, unusable: str = ""
) -> Finding:
    """Where the platform's batches no longer cover what the ledger owes: as each batch's
    last sync found it, looked at again now where it found any.

    A sync can catch sends in flight: applied at the platform, not yet `issued` in the
    ledger (the confirming lookup, or a worker's death before the receipt, between them),
    so a batch with exactly the stock it owes looks short until the next sync. Only what
    still holds now is a problem."""
    batches = await list_batches(pool)
    drifted = [b for b in batches if b.drift]
    if not drifted:
        return Finding("drift", True, f"none in {len(batches)} batch(es) at their last sync")
    still, gone = [], []
    for b in drifted:
        last = ", ".join(b.drift)
        why_not, now = unusable, list[str]()
        if platform is not None:
            try:
                _, _, now = await asyncio.wait_for(look(pool, platform, b), CHECK_TIMEOUT_S)
            except (PlatformError, TimeoutError) as err:
                why_not = str(err) or "no answer in time"
        if platform is None or why_not:
            still.append(f"batch {b.id}: {last} (at its last sync; not looked at again: {why_not})")
            continue
        if now:
            still.append(f"batch {b.id}: {', '.join(now)}")
        else:
            gone.append(f"batch {b.id} ({last})")
    if still:
        return Finding("drift", False, "; ".join(still))
    return Finding(
        "drift",
        True,
        "none now; at their last sync: " + "; ".join(gone) + " (the next sync clears it)",
    )


async def _wedged(pool: AsyncConnectionPool, client: Client, settings: Settings) -> list[Finding]:
    found = await wedged.find_wedged(pool, client, settings, limit=100)
    if not found:
        return [Finding("wedged coupons", True, "none")]
    counts = ", ".join(f"{c} {n}" for c, n in wedged.count_by_cause(found).items() if n)
    detail = f"{len(found)}: {counts} (starter.py coupon wedged; coupon recover --all)"
    return [Finding("wedged coupons", False, detail)]


def _status(status: WorkflowExecutionStatus | None) -> str:
    return status.name.lower().replace("_", " ") if status is not None else "unknown"


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _said(err: BaseException) -> str:
    """One short line for a person: the SDKs' own messages run to a screen."""
    text = str(err).strip()
    if isinstance(err, TimeoutError):
        return f"no answer within {CHECK_TIMEOUT_S:g} s"
    if isinstance(err, httpx.ConnectError) or "refused" in text.lower():
        return "cannot connect"
    return text.splitlines()[0][:160] if text else type(err).__name__
