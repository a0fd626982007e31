"""What the workflow and the activities agree on: names, error types and time limits.

The workflows call activities by reference (`workflow.execute_activity_method(
PlatformActivities.issue_coupon, ...)`), but the activity type names below are what every
stored history records: they never change, whatever the methods are called.
"""

from datetime import timedelta

# Activity type names, given to `@activity.defn(name=...)` in `activities/`.
RECORD_TRANSITION = "record_transition"
ISSUE_COUPON = "issue_coupon"
WAIT_FOR_REDEMPTION = "wait_for_redemption"
LOOKUP_COUPON = "lookup_coupon"
SYNCABLE_BATCHES = "syncable_batches"
SYNC_BATCH = "sync_batch"
ALL_BATCHES = "all_batches"
RECONCILE_BATCH = "reconcile_batch"
AWAIT_STATES = "await_states"
COUNT_RECEIVED = "count_received"
EXPIRE_RECEIVED_PAGE = "expire_received_page"
# Its successor (EndCampaignWorkflow after the patch "end-campaign-counts"): one page, each
# coupon's update bounded, the page resumed from its heartbeat, counts back instead of ids.
EXPIRE_RECEIVED_COUPONS = "expire_received_coupons"

# Handlers of the coupon workflow that activities reach by name (`activities/` never
# imports `workflows/`), or that are sent with a start (`start_signal` takes a name).
REPORT_REDEMPTION = "report_redemption"
TASK_DONE = "task_done"
CANCEL = "cancel"
BUDGET_AVAILABLE = "budget_available"
EXPIRE_COUPON = "expire_coupon"

# Workflow types and the ids of their runs, for schedules and the command line.
CATALOG_SYNC_WORKFLOW = "CatalogSyncWorkflow"
RECONCILE_WORKFLOW = "ReconcileWorkflow"
END_CAMPAIGN_WORKFLOW = "EndCampaignWorkflow"
CATALOG_SYNC_SCHEDULE = "catalog-sync"
RECONCILE_SCHEDULE = "reconcile-daily"

# Error types the activities raise and the workflow reads. No Python exception class is
# named like these, so an exception that escapes an activity can never pass for them.
SEND_REFUSED = "send_refused"
NOT_YET_REDEEMED = "not_yet_redeemed"
# Retried, never final: the send went through but could not be confirmed yet.
LOOKUP_FAILED = "lookup_failed"
RECEIPT_NOT_VISIBLE = "receipt_not_visible"
# The batch cannot send now (budget used up, paused): the coupon waits for it.
BATCH_UNAVAILABLE = "batch_unavailable"

# Why a campaign end left a coupon `received` (EndCampaignWorkflow reports each with one).
# Its workflow is not started yet: the claim was answered by the ledger, the starter is behind.
STUCK_NOT_STARTED = "not_started"
# Its workflow did not take the expiry in time: no worker polls its task queue, or its
# workflow task keeps failing.
STUCK_NO_ANSWER = "no_answer"
# Its workflow took the expiry, but the ledger did not show it `expired` within the wait.
STUCK_LEDGER_LAG = "ledger_lag"
# Temporal refused the update for another reason (its status code is in the detail).
STUCK_REFUSED = "refused"

# The issue activity heartbeats while it waits for a lagging lookup; a single platform
# call must answer well inside the heartbeat timeout, and the whole attempt (the send
# plus the lag window) inside the start-to-close timeout.
# 15 s: a send lost with a killed worker is resent that soon (chaos: worker_kill).
ISSUE_HEARTBEAT = timedelta(seconds=15)
ISSUE_START_TO_CLOSE = timedelta(minutes=5)


def platform_task_queue(task_queue: str) -> str:
    """Platform calls run on their own, rate-limited task queue, named after the main one."""
    return f"{task_queue}-platform"
