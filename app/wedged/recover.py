"""Recovering a wedged coupon from the ledger's state: the stuck run stopped, a fresh run
resuming what the ledger holds, never a second send (the package's docstring says how)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from app.claims import ClaimService, from_claim
from app.wedged.find import (
    NOT_STARTED,
    UNDECODABLE,
    Wedged,
    bounded,
    cut_detail,
    diagnose,
    find_wedged,
    input_unreadable,
)
from coupons.config import Settings
from coupons.errors import Refused
from coupons.ledger import claims as ledger
from coupons.ledger.claims import Claim
from coupons.lifecycle import FINAL_STATES
from coupons.model import TaskCompletion

log = logging.getLogger(__name__)


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
        return from_claim(
            Recovery,
            claim,
            ledger_state=claim.state,
            action="none",
            detail="not wedged: its workflow is making progress",
        )
    return await _recover(pool, client, settings, claim, found)


async def recover_all(
    pool: AsyncConnectionPool, client: Client, settings: Settings, *, concurrency: int = 10
) -> list[Recovery]:
    """Recover every coupon `find_wedged` lists; one that fails is reported, not raised."""
    found = await find_wedged(pool, client, settings)

    async def one(wedged: Wedged) -> Recovery:
        try:
            return await recover(pool, client, settings, wedged.coupon_id)
        except Exception as err:
            log.exception("could not recover coupon %s", wedged.coupon_id)
            return _recovery(wedged, "error", cut_detail(f"{type(err).__name__}: {err}"))

    return await bounded(found, one, concurrency)


async def _recover(
    pool: AsyncConnectionPool, client: Client, settings: Settings, claim: Claim, found: Wedged
) -> Recovery:
    service = ClaimService(pool, client, settings)
    if found.cause == NOT_STARTED:
        await service.start_workflow(claim)  # the claim's own start, as the repair makes it
        return _recovery(found, "started", "its workflow started")
    if found.status == "completed":
        # Never expected (a run writes its final state before it completes); the reuse
        # policy would refuse a new run anyway. An operator decides.
        return _recovery(
            found, "none", f"its run completed, the ledger says {claim.state}: check by hand"
        )
    if (
        found.cause == UNDECODABLE
        and await input_unreadable(client, claim.workflow_id, found.run_id) is None
    ):
        # The worker lacks a key this process holds: a new run would fail there the same way.
        return _recovery(
            found,
            "none",
            "this process reads its payloads and the worker does not: give the worker this "
            "key ring (CODEC_KEYS_FILE), then it goes on by itself",
        )
    stopped = None
    if found.status == "running":
        stopped = await _terminate(client, claim, found)
    if claim.state in FINAL_STATES:
        return _recovery(found, "terminated", "the ledger is final: the stuck run stopped", stopped)
    receipt = await ledger.receipt_of(pool, claim.coupon_id) if claim.state == "issued" else None
    if claim.state == "issued" and receipt is None:
        raise Refused("inconsistent", f"coupon {claim.coupon_id} is issued without a receipt")
    tasks = await _reported_tasks(client, claim, found) if claim.state == "received" else []
    try:
        new_run = await service.restart_workflow(claim, tasks, receipt)
    except WorkflowAlreadyStartedError:
        return _recovery(found, "already_recovered", "a new run was already started", stopped)
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
    return _recovery(found, "restarted", said, stopped, new_run)


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
    found: Wedged, action: str, detail: str, stopped: str | None = None, new_run: str | None = None
) -> Recovery:
    """What was done to the wedged coupon `found` (whose ledger state is the claim's)."""
    return Recovery(
        found.coupon_id,
        found.workflow_id,
        found.ledger_state,
        action,
        detail,
        cause=found.cause,
        stopped_run_id=stopped,
        new_run_id=new_run,
    )
