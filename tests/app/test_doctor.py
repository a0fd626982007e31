"""`starter.py doctor` as a person runs it: all well on a healthy stack (exit 0), and with
each part stopped in turn, that part named and exit 1. Its drift finding against the
ledger and the simulator alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool

from app.doctor import drift
from app.embedded import free_ports
from app.stack import Stack
from coupons import catalog
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import new_campaign, set_at_platform

ROOT = Path(__file__).resolve().parents[2]


PORTS = ("PG_PORT", "TEMPORAL_PORT", "TEMPORAL_UI_PORT", "SIMULATOR_PORT", "API_PORT")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, dict[str, str]]]:
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        **dict(zip(PORTS, map(str, free_ports(len(PORTS))), strict=True)),
        "WORKER_METRICS_PORT": "off",
        "COUPONS_STATE_DIR": str(tmp_path / "state"),
    }
    running = Stack(Settings.from_env(env), api=True, record=True, demo=False)
    # The record names this stack for the shells that follow it (app.running).
    os.environ["COUPONS_STATE_DIR"] = env["COUPONS_STATE_DIR"]
    try:
        running.start()
        yield running, env
    finally:
        os.environ.pop("COUPONS_STATE_DIR", None)
        running.stop()


def doctor(env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    """The doctor run from a shell that only knows the stack's PostgreSQL and Temporal ports
    (and its registry): it follows the running stack for the rest."""
    shell = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SIM_", "PLATFORM"))},
        "PG_PORT": env["PG_PORT"],
        "TEMPORAL_PORT": env["TEMPORAL_PORT"],
        "COUPONS_STATE_DIR": env["COUPONS_STATE_DIR"],
    }
    for key in ("DATA_DIR", "DATABASE_URL", "TEMPORAL_ADDRESS", "API_PORT", "SIMULATOR_PORT"):
        shell.pop(key, None)
    ran = subprocess.run(
        [sys.executable, "starter.py", "doctor", "--json"],
        cwd=ROOT,
        env=shell,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return ran.returncode, json.loads(ran.stdout), ran.stderr


def not_well(answer: dict[str, Any]) -> set[str]:
    return {f["part"] for f in answer["findings"] if f["ok"] is False}


def test_doctor_says_all_is_well_then_names_each_part_stopped_in_turn(
    stack: tuple[Stack, dict[str, str]],
) -> None:
    running, env = stack
    deadline = time.monotonic() + 60
    while True:  # the worker's pollers and schedules come up a moment after the start
        code, answer, err = doctor(env)
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert code == 0, (answer, err)
    assert answer["ok"] is True and not_well(answer) == set()
    assert str(running.settings.data_dir) in answer["stack"]
    parts = {f["part"] for f in answer["findings"]}
    assert {"PostgreSQL", "Temporal", "worker", "platform", "API", "catalog sync"} <= parts
    assert {"reconciliation", "workflow tasks", "drift", "wedged coupons"} <= parts

    assert running.api is not None and running.simulator is not None
    assert running.temporal is not None and running.postgres is not None
    stopped: list[tuple[str, Any]] = [
        ("API", running.api),
        ("worker", running.worker),
        ("platform", running.simulator),
        ("Temporal", running.temporal),
        ("PostgreSQL", running.postgres),
    ]
    for part, server in stopped:
        server.stop()
        code, answer, err = doctor(env)
        assert code == 1, (part, answer)
        assert part in not_well(answer), (part, answer)
        assert "not well: " in err and part in err, (part, err)


async def test_drift_is_what_the_last_sync_found_and_still_holds_now(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    campaign = await new_campaign(pool, platform, quota=10)
    assert (await drift(pool, platform)).ok is True  # never drifted
    for i in range(3):
        await ledger.claim(pool, campaign.id, f"owed-{i}")  # received, deadline open
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=2)
    assert (await catalog.batches.sync_batch(pool, platform, campaign.batch_id)).drift

    short = await drift(pool, platform)
    assert short.ok is False
    assert "2 coupons left, below the 3 we still owe" in short.detail, short.detail
    # No platform to look at (its settings are wrong): the last sync's word stands, so said.
    unlooked = await drift(pool, None, "WECHAT_APIV3_KEY_FILE=/nowhere: no such file")
    assert unlooked.ok is False
    assert "not looked at again: WECHAT_APIV3_KEY_FILE=/nowhere" in unlooked.detail

    # Covered again (as when the sync had caught sends in flight): no problem now, and the
    # last sync's word is still shown until the next sync replaces it.
    await set_at_platform(pool, simulator, campaign.batch_id, remaining=3)
    covered = await drift(pool, platform)
    assert covered.ok is True
    assert covered.detail.startswith("none now; at their last sync:"), covered.detail
    assert "below the 3 we still owe" in covered.detail
    stored = await catalog.batches.get_batch(pool, campaign.batch_id)
    assert stored.drift  # the doctor only looks; it writes nothing
