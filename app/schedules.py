"""The Temporal Schedules of the catalog: the batch sync and the daily reconciliation.

The worker creates them at start, or brings an existing one in line with its settings,
so changing `SYNC_INTERVAL_S` takes effect at the next worker start.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from coupons import contract as act
from coupons.config import Settings
from coupons.model import ReconcileInput, SyncInput

log = logging.getLogger(__name__)

# The longest one run may last, scheduled or started by hand (app/service). Both workflows
# are pinned to the worker version that started them (app/versioning.py): a run whose
# version's workers were all replaced before it finished would wait for ever, and as
# overlapping runs are skipped, so would every later scheduled one. Past this bound the run
# times out and the next one due starts on the current version. Cutting a slow run short
# loses nothing: both read the platform afresh and their ledger writes are idempotent. A
# sync of every batch takes seconds to minutes; a reconciliation reads each batch's flow
# files, once a day.
SYNC_RUN_TIMEOUT = timedelta(minutes=30)
RECONCILE_RUN_TIMEOUT = timedelta(hours=12)


def catalog_schedules(settings: Settings) -> dict[str, Schedule]:
    return {
        act.CATALOG_SYNC_SCHEDULE: _schedule(
            settings,
            act.CATALOG_SYNC_WORKFLOW,
            SyncInput(),
            act.CATALOG_SYNC_SCHEDULE,
            "catalog sync: every batch in use, read at the platform",
            ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.sync_interval_s))]
            ),
            SYNC_RUN_TIMEOUT,
        ),
        act.RECONCILE_SCHEDULE: _schedule(
            settings,
            act.RECONCILE_WORKFLOW,
            ReconcileInput(),
            act.RECONCILE_SCHEDULE,
            "daily reconciliation of every batch with the platform's flows",
            ScheduleSpec(
                calendars=[
                    ScheduleCalendarSpec(
                        hour=[ScheduleRange(settings.reconcile_hour_utc)],
                        minute=[ScheduleRange(0)],
                        second=[ScheduleRange(0)],
                    )
                ]
            ),
            RECONCILE_RUN_TIMEOUT,
        ),
    }


def _schedule(
    settings: Settings,
    workflow: str,
    arg: SyncInput | ReconcileInput,
    schedule_id: str,
    summary: str,
    spec: ScheduleSpec,
    run_timeout: timedelta,
) -> Schedule:
    """One run of `workflow` at each time of `spec`, with the schedule's id as workflow id."""
    return Schedule(
        action=ScheduleActionStartWorkflow(
            workflow,
            arg,
            id=schedule_id,
            task_queue=settings.task_queue,
            static_summary=summary,
            execution_timeout=run_timeout,
        ),
        spec=spec,
        # SKIP: a run still going when the next is due makes the next one pointless.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def ensure_schedules(client: Client, settings: Settings) -> None:
    for schedule_id, schedule in catalog_schedules(settings).items():
        try:
            await client.create_schedule(schedule_id, schedule)
            log.info("created schedule %s", schedule_id)
        except ScheduleAlreadyRunningError:

            def replace(
                current: ScheduleUpdateInput, schedule: Schedule = schedule
            ) -> ScheduleUpdate:
                # An operator's pause (and its note) outlives a worker restart.
                state = current.description.schedule.state
                return ScheduleUpdate(schedule=dataclasses.replace(schedule, state=state))

            await client.get_schedule_handle(schedule_id).update(replace)
