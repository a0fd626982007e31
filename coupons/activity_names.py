"""Activity names, shared by the activity definitions and the workflow.

The workflow calls activities by name so that `workflows/` never imports the modules
that do I/O (psycopg, httpx, platform adapters).
"""

RECORD_TRANSITION = "record_transition"
ISSUE_COUPON = "issue_coupon"
WAIT_FOR_REDEMPTION = "wait_for_redemption"
LOOKUP_COUPON = "lookup_coupon"

# Error types the activities raise and the workflow reads.
PLATFORM_REFUSED = "PlatformRefused"
NOT_YET_REDEEMED = "NotYetRedeemed"

# Refusals of the workflow's updates: stable codes that callers (CLI, apps) act on.
UNKNOWN_TASK = "unknown_task"
WRONG_STATE = "wrong_state"
