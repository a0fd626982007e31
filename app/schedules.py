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


def catalog_schedules(settings: Settings) -> dict[str, Schedule]:
    # SKIP: a sync still running when the next is due makes the next one pointless.
    policy = SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP)
    return {
        act.CATALOG_SYNC_SCHEDULE: Schedule(
            action=ScheduleActionStartWorkflow(
                act.CATALOG_SYNC_WORKFLOW,
                SyncInput(),
                id=act.CATALOG_SYNC_SCHEDULE,
                task_queue=settings.task_queue,
                static_summary="catalog sync: every batch in use, read at the platform",
            ),
            spec=ScheduleSpec(
                intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.sync_interval_s))]
            ),
            policy=policy,
        ),
        act.RECONCILE_SCHEDULE: Schedule(
            action=ScheduleActionStartWorkflow(
                act.RECONCILE_WORKFLOW,
                ReconcileInput(),
                id=act.RECONCILE_SCHEDULE,
                task_queue=settings.task_queue,
                static_summary="daily reconciliation of every batch with the platform's flows",
            ),
            spec=ScheduleSpec(
                calendars=[
                    ScheduleCalendarSpec(
                        hour=[ScheduleRange(settings.reconcile_hour_utc)],
                        minute=[ScheduleRange(0)],
                        second=[ScheduleRange(0)],
                    )
                ]
            ),
            policy=policy,
        ),
    }


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
