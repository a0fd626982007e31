"""The API process with Temporal down: it starts, and a claim, which needs PostgreSQL
alone, is answered; what needs a coupon's workflow answers 503 and changes nothing."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
from psycopg_pool import AsyncConnectionPool

from app.embedded import ManagedProcess, free_port
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.platforms.generic.adapter import RestPlatform
from coupons.tenants import create_key
from tests.conftest import TASK, new_campaign

ROOT = Path(__file__).resolve().parents[3]


def _until_up(api: ManagedProcess, url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert api.alive, api.log_tail()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, api.log_tail()
        time.sleep(0.1)


async def test_the_api_starts_and_answers_claims_while_temporal_is_down(
    api_settings: Settings, pool: AsyncConnectionPool, platform: RestPlatform, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there: Temporal is down
    settings = replace(
        api_settings, temporal_address_override=f"127.0.0.1:{closed}", data_dir=tmp_path
    )
    campaign = await new_campaign(pool, platform, quota=5)
    key = await create_key(pool, campaign.tenant_id, "app")
    env = {
        **os.environ,
        **settings.to_env(),
        # A stack registered on this machine must not lend this process its settings.
        "COUPONS_STATE_DIR": str(tmp_path / "state"),
    }
    api = ManagedProcess(
        "API", [sys.executable, "-m", "app.api"], tmp_path / "api.log", env=env, cwd=ROOT
    )
    api.start()
    try:
        url = settings.api_url
        _until_up(api, url)
        headers = {"Authorization": f"Bearer {key.api_key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
            claimed = await http.post(
                f"/v1/campaigns/{campaign.id}/claims", json={"user_id": "ann"}
            )
            assert claimed.status_code == 201, claimed.text
            coupon = claimed.json()
            assert coupon["state"] == "received"
            # The task needs the coupon's workflow: refused for now, as a problem.
            done = await http.post(
                f"/v1/coupons/{coupon['coupon_id']}/tasks/{TASK}/complete",
                json={"user_id": "ann"},
            )
            assert done.status_code == 503, done.text
            assert done.headers["content-type"].startswith("application/problem+json")
            assert done.json()["detail"].startswith(f"cannot reach Temporal at 127.0.0.1:{closed}")
    finally:
        api.stop()
    stored = await ledger.get_claim(pool, coupon["coupon_id"])
    assert stored is not None and (stored.state, stored.workflow_started) == ("received", False)
