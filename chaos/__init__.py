"""`make chaos`: fault-injection runs on the embedded stack that count what survives.

Each scenario starts its own stack (PostgreSQL, Temporal dev server, platform simulator,
worker, and the HTTP API where the platform's callbacks are exercised) in a temporary
directory on free ports, claims coupons and completes their tasks while one part
misbehaves, waits for every coupon to be issued (or redeemed, where they are used at the
platform), then checks the invariants of DESIGN.md: nothing lost, one send per coupon, no
wrong final state, and the ledger and the workflow agree.
"""
