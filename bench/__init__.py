"""`make bench`: throughput and latency of the coupon lifecycle against the raw Temporal
floor and a DBOS peer, open-coupon scale, and claims (bursts, steady open-loop load, a sweep
of offered rates) beside the same run's PostgreSQL single-row commit rate, on a fresh
embedded stack; each figure beside the previous committed run's."""
