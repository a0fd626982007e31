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
  or TimedOut event, the first problem of the streak (Temporal writes no event for the
  retries of a failing task, and the SDK reports a failure on a task's first attempt only).
  A failure names the cause (a CodecError is `undecodable`); a timeout does not, so the
  run's input is decoded here: if it cannot be, the coupon is `undecodable` too.
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

from app.wedged.find import (
    CAUSES,
    CLOSED,
    MISSING,
    NOT_STARTED,
    REPORTED_PROBLEMS,
    TASK_FAILING,
    UNDECODABLE,
    Wedged,
    as_rows,
    count_by_cause,
    diagnose,
    find_wedged,
)
from app.wedged.recover import Recovery, recover, recover_all

__all__ = [
    "CAUSES",
    "CLOSED",
    "MISSING",
    "NOT_STARTED",
    "REPORTED_PROBLEMS",
    "TASK_FAILING",
    "UNDECODABLE",
    "Recovery",
    "Wedged",
    "as_rows",
    "count_by_cause",
    "diagnose",
    "find_wedged",
    "recover",
    "recover_all",
]
