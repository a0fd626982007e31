"""The platform simulator's core, protocol-neutral: batches, sends, lookups with lag, uses, flow
files, the fault knobs, redemption notifications and the `/sim/*` control plane.

A real HTTP coupon platform: tests, the demo, chaos runs and benchmarks talk to it over the
network exactly as they would to a third-party platform. State lives in SQLite so it survives
restarts, and the control plane (the same in every mode) turns the knobs that make a platform
hard to live with: latency, errors, ambiguous timeouts, lookup lag, rate limits, restricted
users, and changes batches behind the service's back (budget raised or cut, a batch paused or
stopped by an operator). `POST /sim/coupons/{id}/use` is the shop's till.

Batches live like WeChat Pay stocks: created, then started; paused and resumed; stopped for
good, or expired once their window is over. Coupons are sent only by a running batch inside
its window. Each batch publishes flow files (every coupon sent, every coupon used) that a
caller downloads and verifies by their SHA1, the platform's own record to reconcile against.

When a coupon is used, the platform notifies the merchant: a POST to the `callback_url` knob,
signed the face's way, kept in SQLite until the receiver takes it, retried with exponential
backoff, given up after `callback_max_attempts` (see `notifier.Notifier`).

The core knows no platform: each protocol is a face (`core.Face`) in its platform's own folder
(`coupons/platforms/<platform>/simulator.py`) that imports this package, never the other way;
`coupons.platforms.simulator` picks the face by `--mode` and serves the app `app.create_app`
builds.
"""
