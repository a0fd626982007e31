"""The command line when a part it needs is down: one clear line, exit 1, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from psycopg_pool import AsyncConnectionPool
from temporalio.testing import WorkflowEnvironment

from coupons.config import Settings
from coupons.embedded import EmbeddedPostgres, free_port
from coupons.ledger import claims as ledger
from coupons.platforms.rest import RestPlatform
from tests.conftest import claims_of, new_campaign

ROOT = Path(__file__).resolve().parent.parent


def starter(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "starter.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_postgres_down_is_one_line_and_exit_1() -> None:
    closed = free_port()
    result = starter(
        "stats", "--campaign", "demo", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/x"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: cannot reach PostgreSQL")
    assert "Traceback" not in result.stderr


def test_temporal_down_is_one_line_and_exit_1(postgres: EmbeddedPostgres) -> None:
    closed = free_port()
    result = starter(
        "claim",
        "--campaign",
        "demo",
        "--user",
        "u1",
        DATABASE_URL=postgres.url(),
        TEMPORAL_ADDRESS=f"127.0.0.1:{closed}",
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach Temporal at 127.0.0.1:{closed}")
    assert "Traceback" not in result.stderr


def test_bad_setting_is_named_and_exit_2() -> None:
    result = starter("stats", "--campaign", "demo", PG_PORT="many")
    assert result.returncode == 2
    assert "PG_PORT='many' is not a valid int" in result.stderr


async def test_waiting_commands_give_up_clearly_when_no_worker_answers(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    campaign = await new_campaign(pool, platform)
    # Claimed and started, but no worker polls this test's task queue.
    claimed = await claims_of(pool, dev_env.client, settings).claim(campaign.id, "u1")
    env = {
        "DATABASE_URL": settings.database_url,
        "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "TASK_QUEUE": settings.task_queue,
    }
    args = ("--coupon", claimed.coupon_id, "--timeout", "2")
    for command in (("complete-task", *args, "--task", "first-order", "--wait"), ("cancel", *args)):
        result = starter(*command, **env)
        assert result.returncode == 1, result
        assert result.stderr.startswith("error: no worker answered in time"), result.stderr


async def test_a_coupon_without_its_workflow_yet_says_so(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    campaign = await new_campaign(pool, platform)
    claim, _ = await ledger.claim(pool, campaign.id, "u1")  # a crash before the start
    result = starter(
        "cancel",
        "--coupon",
        claim.coupon_id,
        DATABASE_URL=settings.database_url,
        TEMPORAL_ADDRESS=dev_env.client.service_client.config.target_host,
    )
    assert result.returncode == 1
    assert "has no workflow yet" in result.stderr, result.stderr
