"""The funnel report (`starter.py report`): its numbers are the ledger's, counted straight
in PostgreSQL; its JSON; its PNG; its refusals.

One test drives coupons through the real lifecycle (dev server, workers, simulator) into
every state a workflow reaches in seconds; another writes the ledger directly, to pin the
claim-to-task times to the second and to reach `lapsed` (the end of a coupon's validity).
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.testing import WorkflowEnvironment

from app.cli import main
from coupons import catalog, report, tenants
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger.campaigns import CampaignSpec
from coupons.model import CancelRequest, ExpireRequest, RedemptionReport, TaskCompletion, Transition
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import (
    TASK,
    claims_of,
    close_workflows,
    execute,
    handle_of,
    new_batch,
    new_campaign,
    new_id,
    running_workers,
    scalar,
    wait_for_state,
)
from workflows.user_coupon import UserCouponWorkflow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """The command line's environment: the test's schema, and a data directory of its own
    for the default chart path. The report needs neither Temporal nor the platform."""
    return {**settings.to_env(), "DATA_DIR": str(tmp_path / "data")}


async def starter(env: dict[str, str], capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """`starter.py` in-process; in a thread, since it runs its own event loop."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(args), env)
    out, err = capsys.readouterr()
    return Ran(code, out, err)


async def report_json(env: dict[str, str], capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    ran = await starter(env, capsys, "report", *args, "--json")
    assert (ran.code, ran.err) == (0, ""), ran
    return json.loads(ran.out)


async def reached(pool: AsyncConnectionPool, campaign_id: str, state: str) -> int:
    """Coupons of the campaign that ever entered `state`, counted straight in the ledger."""
    n: int = await scalar(
        pool,
        "SELECT count(DISTINCT e.coupon_id) FROM coupon_events e"
        " JOIN claims c ON c.coupon_id = e.coupon_id"
        " WHERE c.campaign_id = %s AND e.to_state = %s",
        campaign_id,
        state,
    )
    return n


async def claimed(pool: AsyncConnectionPool, campaign_id: str) -> int:
    n: int = await scalar(pool, "SELECT count(*) FROM claims WHERE campaign_id = %s", campaign_id)
    return n


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, which must be one: signature, then the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:8]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.endswith(b"IEND\xaeB`\x82")  # written to the end
    return width, height


# ----------------------------------------------------------------- the real lifecycle


async def test_the_funnel_of_a_real_run_matches_a_direct_count_in_postgresql(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
    simulator: httpx.AsyncClient,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    client = dev_env.client
    service = claims_of(pool, client, settings)
    (await simulator.put("/sim/knobs", json={"restricted_users": ["risky"]})).raise_for_status()
    campaign = await new_campaign(pool, platform)
    users = ["waits", "issued-1", "issued-2", "redeem", "risky", "cancel", "expire"]
    async with running_workers(client, pool, settings):
        results = await asyncio.gather(*(service.claim(campaign.id, u) for u in users))
        h = {u: handle_of(client, r.workflow_id) for u, r in zip(users, results, strict=True)}
        done = TaskCompletion(TASK)
        await asyncio.gather(
            *(h[u].execute_update(UserCouponWorkflow.complete_task, done) for u in users[1:5]),
            h["cancel"].execute_update(UserCouponWorkflow.cancel_coupon, CancelRequest()),
            h["expire"].execute_update(UserCouponWorkflow.expire_coupon, ExpireRequest()),
        )
        await wait_for_state(h["redeem"], "issued")
        await h["redeem"].signal(
            UserCouponWorkflow.report_redemption, RedemptionReport(datetime.now(UTC))
        )
        # Quiescence: a closed workflow has recorded everything, and an issued coupon's
        # ledger write precedes its workflow's move.
        async with asyncio.timeout(30):
            await asyncio.gather(
                *(h[u].result() for u in ("redeem", "risky", "cancel", "expire")),
                *(wait_for_state(h[u], "issued") for u in ("issued-1", "issued-2")),
            )
    await close_workflows(client, (r.workflow_id for r in results))
    out = tmp_path / "real.png"
    shown = await report_json(env, capsys, "--campaign", campaign.id, "--out", str(out))

    # Done-when 4: the report's numbers are a direct count in PostgreSQL...
    direct = {"claimed": await claimed(pool, campaign.id)}
    for state in (*report.STAGES[1:], *report.EXITS):
        direct[state] = await reached(pool, campaign.id, state)
    assert {**shown["funnel"], **shown["exits"]} == direct
    # ... and what this run did: the four that did the task were usable, the failed one
    # (the platform refuses its user) was never issued.
    assert shown["funnel"] == {"claimed": 7, "usable": 4, "issued": 3, "redeemed": 1}
    assert shown["exits"] == {"expired": 1, "cancelled": 1, "failed": 1, "lapsed": 0}
    assert shown["states"] == {
        "received": 1,
        "issued": 2,
        "redeemed": 1,
        "expired": 1,
        "cancelled": 1,
        "failed": 1,
    }
    assert shown["conversion"] == {
        "claimed_to_usable": 4 / 7,
        "usable_to_issued": 3 / 4,
        "issued_to_redeemed": 1 / 3,
        "claimed_to_redeemed": 1 / 7,
    }
    times = shown["claim_to_task"]
    assert times["coupons"] == 4
    assert sum(b["coupons"] for b in times["histogram"]) == 4
    # The tasks were done within the test's half minute.
    assert 0 <= times["p50_s"] <= times["p90_s"] <= times["p99_s"] <= times["max_s"] < 30
    today = datetime.now(UTC).date().isoformat()
    assert shown["claims_per_day"] == [{"day": today, "claims": 7}]
    assert shown["chart"] == str(out)
    assert png_size(out) == (1400, 900)


# ----------------------------------------------------------------- the ledger, to the second

# Each user's path after the claim: (seconds from claim to usable, later states).
PATHS: dict[str, tuple[float | None, list[str]]] = {
    "waits": (None, []),
    "usable": (5, []),
    "issued": (30, ["issued"]),
    "redeemed": (120, ["issued", "redeemed"]),
    "lapsed": (4000, ["issued", "lapsed"]),
    "failed": (90_000, ["failed"]),
    "cancelled-usable": (700_000, ["cancelled"]),
    "expired": (None, ["expired"]),
    "cancelled": (None, ["cancelled"]),
}


async def test_stages_count_every_coupon_that_reached_them_and_times_are_exact(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    campaign = await new_campaign(pool, platform, quota=len(PATHS))
    coupons = {user: (await ledger.claim(pool, campaign.id, user))[0].coupon_id for user in PATHS}
    # Two claims two days ago: the day between has none and is listed all the same.
    await execute(
        pool,
        "UPDATE claims SET claimed_at = claimed_at - interval '2 days'"
        " WHERE campaign_id = %s AND user_id IN ('waits', 'failed')",
        campaign.id,
    )
    for user, (to_usable_s, later) in PATHS.items():
        claim = await ledger.get_claim(pool, coupons[user])
        assert claim is not None
        at, state = claim.claimed_at, "received"
        if to_usable_s is not None:
            at += timedelta(seconds=to_usable_s)
            await ledger.record(pool, claim.coupon_id, Transition(state, "usable", "tasks", at))
            state = "usable"
        for step in later:
            at += timedelta(minutes=1)
            await ledger.record(pool, claim.coupon_id, Transition(state, step, "test", at))
            state = step

    funnel = await report.funnel_report(pool, campaign.id)

    assert [(s.name, s.coupons) for s in funnel.stages] == [
        ("claimed", 9),
        ("usable", 6),
        ("issued", 3),
        ("redeemed", 1),
    ]
    for stage in funnel.stages[1:]:
        assert stage.coupons == await reached(pool, campaign.id, stage.name)
    assert [s.from_previous for s in funnel.stages] == [None, 6 / 9, 3 / 6, 1 / 3]
    assert funnel.overall == 1 / 9
    assert {e.name: e.coupons for e in funnel.exits} == {
        "expired": 1,
        "cancelled": 2,
        "failed": 1,
        "lapsed": 1,
    }
    assert [e.of_claimed for e in funnel.exits] == [1 / 9, 2 / 9, 1 / 9, 1 / 9]
    assert funnel.states == {
        "received": 1,
        "usable": 1,
        "issued": 1,
        "redeemed": 1,
        "lapsed": 1,
        "failed": 1,
        "cancelled": 2,
        "expired": 1,
    }

    times = funnel.task_times
    seconds = [s for s, _ in PATHS.values() if s is not None]
    assert times.coupons == len(seconds)
    # PostgreSQL's percentile_cont interpolates as numpy's default does.
    expected = numpy.percentile(seconds, [50, 90, 99])
    assert [times.p50_s, times.p90_s, times.p99_s] == pytest.approx(list(expected))
    assert times.max_s == pytest.approx(700_000)
    assert {b.label: b.coupons for b in times.bins} == {
        "<10s": 1,
        "10s-1m": 1,
        "1m-10m": 1,
        "10m-1h": 0,
        "1h-6h": 1,
        "6h-1d": 0,
        "1d-3d": 1,
        "3d-7d": 0,
        "7d+": 1,
    }

    # Days in UTC, taken from the ledger's own clock as the claims were.
    today = (await scalar(pool, "SELECT (now() AT TIME ZONE 'UTC')::date")).isoformat()
    assert [(d.day.isoformat(), d.claims) for d in funnel.claims_per_day][-1] == (today, 7)
    assert [d.claims for d in funnel.claims_per_day] == [2, 0, 7]


async def test_a_skew_between_the_workflow_and_ledger_clocks_is_no_negative_time(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    campaign = await new_campaign(pool, platform)
    claim, _ = await ledger.claim(pool, campaign.id, "u1")
    before = claim.claimed_at - timedelta(seconds=3)
    await ledger.record(pool, claim.coupon_id, Transition("received", "usable", "tasks", before))
    times = (await report.funnel_report(pool, campaign.id)).task_times
    assert (times.p50_s, times.max_s, times.bins[0].coupons) == (0, 0, 1)


# ----------------------------------------------------------------- the command


async def test_the_table_json_and_chart_of_the_command(
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    campaign = await new_campaign(pool, platform, required_tasks=[])  # usable at claim
    for user in ("u1", "u2", "u3"):
        await ledger.claim(pool, campaign.id, user)

    shown = await report_json(env, capsys, "--campaign", campaign.id)
    assert set(shown) == {
        "campaign_id",
        "tenant_id",
        "at",
        "funnel",
        "exits",
        "conversion",
        "states",
        "claim_to_task",
        "claims_per_day",
        "chart",
    }
    assert (shown["campaign_id"], shown["tenant_id"]) == (campaign.id, "default")
    assert datetime.fromisoformat(shown["at"]).utcoffset() == timedelta(0)
    assert shown["funnel"] == {"claimed": 3, "usable": 3, "issued": 0, "redeemed": 0}
    assert shown["conversion"]["usable_to_issued"] == 0
    assert shown["conversion"]["issued_to_redeemed"] is None  # nothing issued to convert
    histogram = shown["claim_to_task"]["histogram"]
    assert histogram[0] == {"bin": "<10s", "from_s": 0, "to_s": 10, "coupons": 3}
    assert histogram[-1] == {"bin": "7d+", "from_s": 7 * 86400, "to_s": None, "coupons": 0}
    # By default the chart goes under the data directory, named for the campaign and day.
    day = shown["at"][:10]
    default = Path(env["DATA_DIR"]) / "reports" / f"{campaign.id}-{day}.png"
    assert shown["chart"] == str(default)
    assert png_size(default) == (1400, 900)

    out = tmp_path / "deep" / "funnel.PNG"  # its folder is made
    ran = await starter(env, capsys, "report", "--campaign", campaign.id, "--out", str(out))
    assert (ran.code, ran.err) == (0, ""), ran
    lines = ran.out.splitlines()
    assert lines[0].startswith(f"campaign {campaign.id} (tenant default), from the ledger at ")
    assert "\x1b" not in ran.out  # a pipe gets plain text
    rows = [line.split() for line in lines]
    assert ["usable", "3", "100.0%", "100.0%"] in rows
    assert ["issued", "0", "0.0%", "0.0%"] in rows
    assert ["redeemed", "0", "-", "0.0%"] in rows
    assert ["lapsed", "0", "0.0%"] in rows
    assert "claimed → redeemed: 0.0%" in lines
    assert "now: 3 usable" in lines
    assert ["<10s", "3"] in rows
    assert lines[-1] == f"chart: {out}"
    assert png_size(out) == (1400, 900)


async def test_a_campaign_without_claims_says_so_and_still_draws_its_chart(
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    campaign = await new_campaign(pool, platform)
    out = tmp_path / "empty.png"
    ran = await starter(env, capsys, "report", "--campaign", campaign.id, "--out", str(out))
    assert (ran.code, ran.err) == (0, ""), ran
    assert ran.out.splitlines()[1:] == ["no claims yet", f"chart: {out}"]
    assert png_size(out) == (1400, 900)

    shown = await report_json(env, capsys, "--campaign", campaign.id, "--out", str(out))
    assert shown["funnel"] == {"claimed": 0, "usable": 0, "issued": 0, "redeemed": 0}
    assert set(shown["conversion"].values()) == {None}
    assert shown["states"] == {}
    times = shown["claim_to_task"]
    assert (times["coupons"], times["p50_s"], times["max_s"]) == (0, None, None)
    assert shown["claims_per_day"] == []


async def test_refusals_exit_2_and_write_no_chart(
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    tenant, _ = await tenants.create_tenant(pool, new_id("shop"))
    batch = await new_batch(pool, platform, tenant_id=tenant.id)
    theirs, _ = await catalog.campaigns.create_campaign(
        pool, CampaignSpec(id=new_id("c"), batch_id=batch.id, quota=5, tenant_id=tenant.id)
    )
    ours = await new_campaign(pool, platform)
    out = tmp_path / "refused.png"

    async def refused(code: str, *args: str) -> str:
        ran = await starter(env, capsys, "report", *args, "--out", str(out))
        assert (ran.code, ran.out) == (2, ""), ran
        assert ran.err.startswith(f"error: {code}: "), ran.err
        assert ran.err.count("\n") == 1, ran.err
        return ran.err

    assert "no campaign 'nope'" in await refused("unknown_campaign", "--campaign", "nope")
    assert "campaign: " in await refused("invalid_request", "--campaign", "no pe")
    # A tenant sees only its own: another's campaign is as unknown as none.
    await refused("unknown_campaign", "--campaign", ours.id, "--tenant", tenant.id)
    await refused("unknown_tenant", "--campaign", theirs.id, "--tenant", "tnt_nope")
    assert not out.exists()
    shown = await report_json(
        env, capsys, "--campaign", theirs.id, "--tenant", tenant.id, "--out", str(out)
    )
    assert shown["tenant_id"] == tenant.id
    # Without --tenant the operator sees every tenant's.
    assert (await report_json(env, capsys, "--campaign", theirs.id))["tenant_id"] == tenant.id

    svg = str(tmp_path / "funnel.svg")
    err = (await starter(env, capsys, "report", "--campaign", ours.id, "--out", svg)).err
    assert err.startswith("error: invalid_request: --out: ") and "must end in .png" in err
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    ran = await starter(
        env, capsys, "report", "--campaign", ours.id, "--out", str(blocked / "x.png")
    )
    assert ran.code == 2 and ran.err.startswith("error: invalid_request: --out: cannot write")
