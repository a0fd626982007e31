"""`make bench`: throughput and latency of the coupon lifecycle against the raw Temporal
floor and a DBOS peer, open-coupon scale and claim storms, on a fresh embedded stack."""
