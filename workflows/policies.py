"""How the workflows call their activities: the timeouts and retries they share."""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

# A ledger read or write: one statement or a short transaction, retried by the default policy.
LEDGER_CALL = timedelta(seconds=30)
# A catalog read at the platform that keeps failing gives up on that batch for this run; the
# schedule's next run tries again.
PLATFORM_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=5)
