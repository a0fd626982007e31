"""The peer: the same claim → task → issue lifecycle on DBOS Transact, in its own process
(`python -m bench.peer_dbos`, settings from the environment), on the same PostgreSQL
server (databases of its own) and the same simulator over HTTP.

It reuses the service's ledger functions and platform adapter, so only the durable
execution engine differs: a DBOS workflow claims (a step), waits for the task with
`DBOS.recv`, then one step sends with the coupon's idempotency key, confirms the coupon
is visible and records the receipt, as the issue activity does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from app.embedded import ManagedProcess
from bench.load import closed_loop, progress
from bench.stats import summary_ms
from coupons.catalog.campaigns import ensure_campaign
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.model import Receipt, Transition, idempotency_key
from coupons.platforms.base import Platform, SendRequest
from coupons.platforms.configured import make_platform

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP_DATABASE = "bench_peer"
SYSTEM_DATABASE = "bench_peer_dbos"
CAMPAIGN = "bench-peer"
TASK = "first-order"
CONFIRM_BACKOFF = (0.2, 0.4, 0.8, 1.6, 3.2, 5.0)
RESULT_TIMEOUT_S = 180.0


class _Parts:
    """What the steps use; set once the process has its pool and platform client."""

    pool: AsyncConnectionPool | None = None
    platform: Platform | None = None


def _pool() -> AsyncConnectionPool:
    assert _Parts.pool is not None
    return _Parts.pool


def _platform() -> Platform:
    assert _Parts.platform is not None
    return _Parts.platform


def _define() -> Any:
    """Register the workflow and its steps; importing dbos stays out of the parent."""
    from dbos import DBOS

    @DBOS.step()
    async def claim_step(campaign: str, user: str) -> dict[str, str]:
        claim, _ = await ledger.claim(_pool(), campaign, user)
        return {"coupon_id": claim.coupon_id, "batch_id": claim.batch_id}

    # Retried like the issue activity: the same idempotency key on every attempt.
    @DBOS.step(retries_allowed=True, max_attempts=20, interval_seconds=1.0, backoff_rate=2.0)
    async def issue_step(coupon_id: str, batch_id: str, user: str) -> float:
        now = datetime.now(UTC)
        await ledger.record(
            _pool(), coupon_id, Transition("received", "usable", f"tasks done: {TASK}", now)
        )
        key = idempotency_key(coupon_id)
        sent = await _platform().send_coupon(SendRequest(batch_id, user, key))
        for delay in CONFIRM_BACKOFF:
            seen = await _platform().get_coupon(sent.user_id, sent.coupon_id)
            if seen is not None:
                break
            await asyncio.sleep(delay)
        else:
            raise RuntimeError(f"coupon {sent.coupon_id} not visible yet")
        confirmed = datetime.now(UTC)
        # As the issue activity does: the times as the platform's lookup shows them.
        receipt = Receipt(sent.coupon_id, key, seen.sent_at, seen.valid_until, confirmed, sent.raw)
        issued = Transition("usable", "issued", "platform confirmed the send", confirmed)
        await ledger.record_receipt(_pool(), coupon_id, receipt, issued)
        return time.time()

    @DBOS.workflow()
    async def peer_lifecycle(campaign: str, user: str) -> float:
        claim = await claim_step(campaign, user)
        # The app learns the claim went through (the claim API's answer) before it can
        # report the task, as with the Temporal service.
        await DBOS.set_event_async("claimed", claim["coupon_id"])
        task = await DBOS.recv_async("task", timeout_seconds=RESULT_TIMEOUT_S)
        if task != TASK:
            raise RuntimeError(f"no task completion received (got {task!r})")
        done: float = await issue_step(claim["coupon_id"], claim["batch_id"], user)
        return done

    return peer_lifecycle


async def _measure(settings: Settings, n: int, concurrency: int) -> dict[str, Any]:
    from dbos import DBOS, SetWorkflowID

    lifecycle = _define()
    admin = f"postgresql://postgres@127.0.0.1:{settings.pg_port}/postgres"
    app_url = f"postgresql://postgres@127.0.0.1:{settings.pg_port}/{APP_DATABASE}"
    db.create_database(admin, APP_DATABASE)
    await db.migrate_url(app_url)
    DBOS(
        config={
            "name": "coupon-bench-peer",
            "system_database_url": (
                f"postgresql://postgres@127.0.0.1:{settings.pg_port}/{SYSTEM_DATABASE}"
            ),
            # As many connections as the coupon worker's pool plus the bench client's.
            "sys_db_pool_size": settings.db_pool_size * 2,
        }
    )
    DBOS.launch()
    run = f"{int(time.time())}"
    try:
        async with db.pool(app_url, max_size=settings.db_pool_size) as pool:
            _Parts.pool = pool
            _Parts.platform = make_platform(settings)
            await ensure_campaign(
                pool,
                _Parts.platform,
                CAMPAIGN,
                required_tasks=[TASK],
                quota=1_000_000,
                task_deadline=timedelta(days=7),
            )

            async def one(i: int, prefix: str) -> float:
                workflow_id = f"peer-{run}-{prefix}-{i}"
                with SetWorkflowID(workflow_id):
                    handle = await DBOS.start_workflow_async(
                        lifecycle, CAMPAIGN, f"{prefix}-{run}-{i}"
                    )
                await DBOS.get_event_async(workflow_id, "claimed", timeout_seconds=60)
                sent = time.time()
                await DBOS.send_async(workflow_id, TASK, topic="task")
                done: float = await asyncio.wait_for(handle.get_result(), RESULT_TIMEOUT_S)
                return done - sent

            await closed_loop("peer warm-up", 10, 10, lambda i: one(i, "warm"))
            saturated = await closed_loop(
                "peer saturation", n, concurrency, lambda i: one(i, "sat")
            )
            issued = (await ledger.count_by_state(pool, CAMPAIGN)).get("issued", 0)
            await _Parts.platform.aclose()
    finally:
        DBOS.destroy()
    progress("peer", f"{saturated.throughput_per_s:.1f} lifecycles/s at saturation (DBOS)")
    from importlib.metadata import version

    return {
        "engine": f"DBOS Transact {version('dbos')}",
        "lifecycles": n,
        "concurrency": concurrency,
        **saturated.saturation_figures(),
        "unlock_to_issued_ms": summary_ms(saturated.latencies_s),
        "issued_in_ledger": issued,
        "databases": {"ledger": APP_DATABASE, "dbos_system": SYSTEM_DATABASE},
        "note": "unlock = DBOS.send of the task after the claim event; issued = the issue "
        "step's end, after the receipt is written",
    }


def run_peer(
    settings: Settings,
    env: dict[str, str],
    log_dir: Path,
    *,
    n: int,
    concurrency: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Run the peer in its own process; on any failure, say why instead of a number."""
    out = log_dir / "peer.json"
    process = ManagedProcess(
        "DBOS peer",
        [
            sys.executable,
            "-m",
            "bench.peer_dbos",
            "--n",
            str(n),
            "--concurrency",
            str(concurrency),
            "--out",
            str(out),
        ],
        log_dir / "peer.log",
        env={**env, **settings.to_env(), "PYTHONUNBUFFERED": "1"},
        cwd=PROJECT_ROOT,
    )
    process.start()
    began = time.monotonic()
    try:
        while process.alive and time.monotonic() - began < timeout_s:
            time.sleep(0.5)
    finally:
        timed_out = process.alive
        process.stop()
    if out.exists():
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exited {process.returncode}"
    return {
        "throughput_per_s": None,
        "error": f"DBOS peer {why}; last lines of its log:\n{process.log_tail(15)}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.from_env()
    try:
        result = asyncio.run(_measure(settings, args.n, args.concurrency))
    except Exception as err:
        log.exception("peer failed")
        result = {"throughput_per_s": None, "error": f"{type(err).__name__}: {err}"}
    args.out.write_text(json.dumps(result, indent=2))
    return 0 if result.get("error") is None else 1


if __name__ == "__main__":
    sys.exit(main())
