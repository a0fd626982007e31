"""How the workflows call their activities and how long they wait: the timeouts, retries and
rechecks, apart from the workflows' logic."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from coupons import contract as act

# A ledger read or write: one statement or a short transaction, retried by the default policy.
LEDGER_CALL = timedelta(seconds=30)
# A catalog read at the platform that keeps failing gives up on that batch for this run; the
# schedule's next run tries again.
PLATFORM_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=5)

# The coupon workflow's.
LEDGER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
# Sending retries forever on 5xx, timeouts and rate limits, always with the same
# idempotency key; only a definitive refusal stops it (and marks the coupon failed).
ISSUE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    # Short enough that coupons follow a recovered platform within half a minute.
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=[act.SEND_REFUSED],
)
# The retries of the redemption poll are the polling loop (a retry writes no history);
# the coupon's validity timer, not a retry limit, ends it.
REDEMPTION_POLL = RetryPolicy(
    initial_interval=timedelta(minutes=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(hours=6),
)
# The last look at validity end waits out any platform outage: never fail the workflow.
FINAL_LOOKUP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5), maximum_interval=timedelta(minutes=10)
)
PLATFORM_CALL_TIMEOUT = timedelta(seconds=30)
# A coupon waiting for budget tries again when the catalog sync sees budget, or after its
# recheck: this long at first, then twice as long after each recheck that found none.
BUDGET_RECHECK = timedelta(minutes=10)
# The recheck is only the fallback for a sync that does not run: the catalog-sync schedule
# (every 5 minutes by default) wakes waiting coupons as soon as it sees budget. Two hours
# bound how late a coupon learns of budget with no sync at all, keep 100,000 waiting coupons
# to about 14 refused sends a second (under 3% of WeChat Pay's 500 sends a second, so the
# sends that can be paid are not crowded out), and cost a coupon about 130 history events a
# day (12 rechecks of 11 events).
BUDGET_RECHECK_CAP = timedelta(hours=2)
# A run that waits for budget continues as new once its history holds this many events, or
# earlier if the server suggests it (by default at 4K events or 4 MB, past the issue's
# bound of 2,000). At the recheck's cap a run lasts about a week of waiting, so a month's
# wait is four or five runs; the server warns at 10K events and ends a run at 51,200.
HISTORY_LIMIT = 1_000
