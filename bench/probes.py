"""What the benchmark reads to observe the service from outside: from PostgreSQL, when
each coupon's `issued` event was written, how many granted claims still wait for their
workflow, and how many SQL statements ran; from the worker's metrics, how long its
workflow tasks waited to be started and its garbage collections took.

Every statement here carries the /* bench */ marker, so the statement counts leave the
benchmark's own reads out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import AsyncConnectionPool

from coupons.config import Settings
from coupons.metrics import GC_PAUSE

log = logging.getLogger(__name__)

MARK = "/* bench */"
POLL_EVERY_S = 0.05
STATS_FLUSH_S = 1.5


class IssuedWatcher:
    """One poll loop over `coupon_events` that wakes whoever waits for a coupon's `issued`.

    Each poll asks only for the coupons still awaited (a unique-index lookup each), so it
    stays cheap however many coupons the ledger holds, and a row committed out of id order
    is never missed.
    """

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._waiting: dict[str, asyncio.Future[datetime]] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> IssuedWatcher:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def issued_at(self, coupon_id: str, timeout_s: float) -> datetime:
        """When the ledger recorded the coupon's `issued` event (PostgreSQL's clock)."""
        future = self._waiting.get(coupon_id)
        if future is None:
            future = self._waiting[coupon_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        finally:
            self._waiting.pop(coupon_id, None)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_EVERY_S)
            wanted = [c for c, f in self._waiting.items() if not f.done()]
            if not wanted:
                continue
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(
                        f"{MARK} SELECT coupon_id, recorded_at FROM coupon_events"
                        " WHERE to_state = 'issued' AND coupon_id = ANY(%s)",
                        (wanted,),
                    )
                    rows = await cur.fetchall()
            except psycopg.Error:
                log.exception("issued poll failed; trying again")
                continue
            for coupon_id, recorded_at in rows:
                future = self._waiting.get(coupon_id)
                if future is not None and not future.done():
                    future.set_result(recorded_at)


async def unstarted_claims(pool: AsyncConnectionPool, campaign_id: str) -> int:
    """Granted claims of the campaign whose workflow is not started yet."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"{MARK} SELECT count(*) FROM claims WHERE campaign_id = %s AND NOT workflow_started",
            (campaign_id,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


# The SDK's histogram of each workflow task's wait from scheduled to started, in ms: on the
# worker's shared queue and its sticky queue alike (both labelled with the shared one).
TASK_WAIT = "temporal_workflow_task_schedule_to_start_latency"


@dataclass(frozen=True)
class WorkerHistograms:
    """Two of the worker's histograms, read in one scrape of its metrics."""

    # The coupons' queue's workflow tasks so far: their waits from scheduled to started
    # summed (ms), and how many.
    task_waits: tuple[float, float]
    # Its garbage collections so far, by generation ("2": full): seconds summed, and how many.
    gc_pauses: dict[str, tuple[float, float]]


async def worker_histograms(settings: Settings) -> WorkerHistograms | None:
    """The worker's histograms the bench reports, now; None with the worker's metrics off."""
    url = settings.worker_metrics_url
    if url is None:
        return None
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(url)
        response.raise_for_status()
    waits = _by_label(response.text, TASK_WAIT, "task_queue")
    return WorkerHistograms(
        task_waits=waits.get(settings.task_queue, (0.0, 0.0)),
        gc_pauses=_by_label(response.text, GC_PAUSE, "generation"),
    )


def _by_label(exposition: str, name: str, by: str) -> dict[str, tuple[float, float]]:
    """Histogram `name` in a Prometheus exposition: (sum, count) by label `by`."""
    sums: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in (f"{name}_sum", f"{name}_count"):
                totals = sums.setdefault(sample.labels.get(by, ""), [0.0, 0.0])
                totals[1 if sample.name.endswith("_count") else 0] += sample.value
    return {key: (total, count) for key, (total, count) in sums.items()}


def enable_statement_stats(admin_url: str) -> None:
    """Ask PostgreSQL to load pg_stat_statements at its next start."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"{MARK} ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")


def create_statement_stats(url: str) -> bool:
    """Create the extension in the ledger's database; False when it cannot load."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"{MARK} CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute(f"{MARK} SELECT pg_stat_statements_reset()")
        return True
    except psycopg.Error as err:
        log.warning("pg_stat_statements unavailable (%s); counting transactions instead", err)
        return False


async def statement_counts(pool: AsyncConnectionPool, with_statements: bool) -> dict[str, int]:
    """Statements run so far in this database, minus the benchmark's own; or, without
    pg_stat_statements, its transactions (the benchmark's own polls included)."""
    # Backends publish their transaction counters at most about once a second.
    await asyncio.sleep(STATS_FLUSH_S)
    async with pool.connection() as conn:
        counts: dict[str, int] = {}
        if with_statements:
            cur = await conn.execute(
                f"{MARK} SELECT coalesce(sum(s.calls), 0),"
                " coalesce(sum(s.calls)"
                " FILTER (WHERE s.query ~* '^\\s*(begin|commit|rollback)'), 0)"
                " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
                " WHERE d.datname = current_database()"
                " AND s.query NOT LIKE %s AND s.query NOT ILIKE %s",
                (f"%{MARK}%", "%pg_stat_statements%"),
            )
            row = await cur.fetchone()
            assert row is not None
            counts["statements"] = int(row[0])
            counts["transaction_control"] = int(row[1])
            counts["statements_without_transaction_control"] = int(row[0]) - int(row[1])
            return counts
        cur = await conn.execute(
            f"{MARK} SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
        row = await cur.fetchone()
        counts["transactions"] = int(row[0]) if row else 0
        return counts


def per_item(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, Any]:
    return {key: round((after[key] - before[key]) / n, 2) for key in after if key in before}
