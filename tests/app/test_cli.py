"""The command line: every catalog command, its refusals and its output, on the real stack.

Most tests run `app.cli.main` in-process (in a thread: it runs its own event loop)
with the environment of the test's settings, against the dev server, the test's
PostgreSQL schema and the simulator over HTTP; `running_workers` serves the commands that
run workflows. The first tests run `starter.py` as a process: the parts it needs are
down, and the answer must be one clear line with exit code 1.

Exit codes: 0 success, 2 any refusal (`error: <code>: <message>` on stderr, nothing
written), 1 a part that cannot be reached.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from app import wedged
from app.claims import ClaimService
from app.cli import main
from app.cli.render import expiry_view
from app.embedded import EmbeddedPostgres, free_port
from coupons import catalog, tenants
from coupons.config import Settings
from coupons.errors import InvalidField
from coupons.ledger import claims as ledger
from coupons.platforms.generic.adapter import RestPlatform
from coupons.validation import parse_duration, parse_time
from tests.conftest import (
    close_workflows,
    handle_of,
    new_campaign,
    new_id,
    row_count,
    running_workers,
    scalar,
    set_at_platform,
    sim_stats,
    wait_for_state,
)

ROOT = Path(__file__).resolve().parents[2]


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
    # `repair` starts workflows: it needs Temporal first (a claim needs only the ledger).
    result = starter(
        "repair",
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
    claims = ClaimService(pool, dev_env.client, settings)
    claimed = await claims.claim_started(campaign.id, "u1")
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


async def test_a_cancel_before_the_workflow_starts_starts_it(
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    platform: RestPlatform,
    settings: Settings,
) -> None:
    campaign = await new_campaign(pool, platform)
    claim, _ = await ledger.claim(pool, campaign.id, "u1")  # answered; no starter got to it
    result = starter(
        "cancel",
        "--coupon",
        claim.coupon_id,
        "--timeout",
        "2",
        DATABASE_URL=settings.database_url,
        TEMPORAL_ADDRESS=dev_env.client.service_client.config.target_host,
        TASK_QUEUE=settings.task_queue,
    )
    # Started by the cancel itself; no worker polls this test's queue to apply it.
    assert result.returncode == 1
    assert result.stderr.startswith("error: no worker answered in time"), result.stderr
    started = await ledger.get_claim(pool, claim.coupon_id)
    assert started is not None and started.workflow_started
    described = await dev_env.client.get_workflow_handle(claim.workflow_id).describe()
    assert described.status == WorkflowExecutionStatus.RUNNING


# ----------------------------------------------------------------- in-process harness


@dataclass
class Ran:
    code: int
    out: str
    err: str


class Cli:
    """`starter.py` in-process, configured like the test's workers."""

    def __init__(self, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
        self.env = env
        self._capsys = capsys

    async def __call__(self, *args: str) -> Ran:
        self._capsys.readouterr()
        code = await asyncio.to_thread(self._main, list(args))
        out, err = self._capsys.readouterr()
        return Ran(code, out, err)

    def _main(self, argv: list[str]) -> int:
        try:
            return main(argv, self.env)
        except SystemExit as exit:  # argparse's answer to a usage error
            return int(exit.code or 0)

    async def json(self, *args: str) -> Any:
        """Run with --json; it must succeed and print nothing on stderr."""
        return await self.coupon_json(*args, "--json")

    async def coupon_json(self, *args: str) -> Any:
        """Run a coupon command (JSON always); it must succeed, nothing on stderr."""
        ran = await self(*args)
        assert (ran.code, ran.err) == (0, ""), ran
        return json.loads(ran.out)

    async def claim(self, campaign_id: str, user_id: str) -> Any:
        return await self.coupon_json("claim", "--campaign", campaign_id, "--user", user_id)

    async def table(self, *args: str) -> str:
        """Run for a person's eyes; it must succeed and print plain text (stdout is a pipe)."""
        ran = await self(*args)
        assert (ran.code, ran.err) == (0, ""), ran
        assert "\x1b" not in ran.out  # no colours or cursor moves when stdout is not a TTY
        assert all(line == line.rstrip() for line in ran.out.splitlines()), ran.out
        return ran.out

    async def refused(self, *args: str, code: str) -> str:
        """Run; it must be refused with `code`: exit 2, one line on stderr, nothing on stdout."""
        ran = await self(*args)
        assert (ran.code, ran.out) == (2, ""), ran
        assert ran.err.startswith(f"error: {code}: "), ran.err
        assert ran.err.count("\n") == 1, ran.err
        return ran.err


@pytest.fixture
def cli(
    dev_env: WorkflowEnvironment, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> Cli:
    env = {
        **settings.to_env(),
        "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
    }
    return Cli(env, capsys)


def iso(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


async def new_cli_batch(cli: Cli, *flags: str) -> dict[str, Any]:
    batch: dict[str, Any] = await cli.json(
        "batch", "create", "--id", new_id("b"), "--quantity", "20", *flags
    )
    return batch


async def new_cli_campaign(cli: Cli, batch_id: str, *flags: str) -> dict[str, Any]:
    campaign: dict[str, Any] = await cli.json(
        "campaign", "create", "--id", new_id("c"), "--batch", batch_id, "--quota", "10", *flags
    )
    return campaign


async def wait_for_ledger_states(
    pool: AsyncConnectionPool, coupon_ids: list[str], state: str, timeout_s: float = 30.0
) -> None:
    states: dict[str, str] = {}
    try:
        async with asyncio.timeout(timeout_s):
            while set(states.values()) != {state} or len(states) != len(coupon_ids):
                await asyncio.sleep(0.2)
                states = await ledger.states_of(pool, coupon_ids)
    except TimeoutError:
        pytest.fail(f"still {states} after {timeout_s}s, expected all {state}")


# ----------------------------------------------------------------- durations and times


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("90s", timedelta(seconds=90)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
    ],
)
def test_durations_in_days_hours_minutes_and_seconds_parse(text: str, expected: timedelta) -> None:
    assert parse_duration("--deadline", text) == expected


@pytest.mark.parametrize(
    "text", ["", "7", "7x", "d", "1.5h", "-1d", "1h1d", " 7d", "7d ", "7 d", "0s", "0d0h", "P7D"]
)
def test_anything_else_is_refused_as_a_duration_naming_the_flag(text: str) -> None:
    with pytest.raises(InvalidField) as refused:
        parse_duration("--deadline", text)
    assert refused.value.field == "--deadline"
    assert str(refused.value).startswith("invalid_request: --deadline: ")
    assert repr(text) in str(refused.value)


def test_an_absurdly_long_duration_is_refused_not_a_crash() -> None:
    with pytest.raises(InvalidField, match="out of range: at most 366 days"):
        parse_duration("--deadline", "99999999999d")


def test_times_must_name_their_timezone() -> None:
    assert parse_time("--starts-at", "2026-06-01T00:00:00Z") == datetime(2026, 6, 1, tzinfo=UTC)
    assert parse_time("--starts-at", "2026-06-01T08:00:00+08:00") == datetime(
        2026, 6, 1, tzinfo=UTC
    )
    for naive in ("2026-06-01T00:00:00", "2026-06-01"):
        with pytest.raises(InvalidField, match="has no timezone") as refused:
            parse_time("--ends-at", naive)
        assert refused.value.field == "--ends-at"
    for garbage in ("tomorrow", "2026-13-01T00:00:00Z", ""):
        with pytest.raises(InvalidField, match="not an ISO 8601 time") as refused:
            parse_time("--deadline-at", garbage)
        assert refused.value.field == "--deadline-at"


# ----------------------------------------------------------------- batches


async def test_batch_create_makes_one_batch_at_the_simulator_however_often_it_runs(
    cli: Cli, simulator: httpx.AsyncClient
) -> None:
    before = await sim_stats(simulator)
    batch_id = new_id("b")
    args = ("batch", "create", "--id", batch_id, "--quantity", "100", "--value", "300")
    first = await cli.json(*args, "--min-spend", "1000", "--valid-days", "10", "--name", "Spring")
    again = await cli.json(*args, "--min-spend", "1000", "--valid-days", "10", "--name", "Spring")

    assert (await sim_stats(simulator))["batches"] - before["batches"] == 1
    assert again["platform_batch_id"] == first["platform_batch_id"]
    assert {k: first[k] for k in ("id", "status", "quantity", "remaining", "name")} == {
        "id": batch_id,
        "status": "running",
        "quantity": 100,
        "remaining": 100,
        "name": "Spring",
    }
    assert (first["face_value_cents"], first["min_spend_cents"], first["valid_days"]) == (
        300,
        1000,
        10,
    )
    at_platform = (await simulator.get(f"/v1/batches/{first['platform_batch_id']}")).json()
    assert (at_platform["status"], at_platform["remaining"]) == ("running", 100)


async def test_batch_create_no_start_and_a_window_are_passed_to_the_platform(
    cli: Cli, simulator: httpx.AsyncClient
) -> None:
    starts = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    ends = starts + timedelta(days=3)
    batch = await new_cli_batch(
        cli,
        "--no-start",
        "--per-user-limit",
        "3",
        "--starts-at",
        iso(starts.astimezone(UTC)).replace("+00:00", "Z"),
        "--ends-at",
        iso(ends),
    )
    assert (batch["status"], batch["per_user_limit"]) == ("created", 3)
    assert datetime.fromisoformat(batch["starts_at"]) == starts
    assert datetime.fromisoformat(batch["ends_at"]) == ends
    at_platform = (await simulator.get(f"/v1/batches/{batch['platform_batch_id']}")).json()
    assert at_platform["status"] == "created"


async def test_batch_create_with_other_terms_or_bad_input_is_refused_and_writes_nothing(
    cli: Cli, simulator: httpx.AsyncClient
) -> None:
    batch = await new_cli_batch(cli)
    before = await sim_stats(simulator)
    taken = ("batch", "create", "--id", batch["id"])
    err = await cli.refused(*taken, "--quantity", "21", code="batch_exists")
    assert batch["id"] in err

    now = datetime.now(UTC)
    fresh = ("batch", "create", "--id", new_id("b"), "--quantity", "20")
    bad = {
        ("--quantity", "0"): "--quantity: 0 is out of range: 1 to 100,000,000 coupons",
        # Issue 14's moments: a batch too big for the ledger was created at the platform first,
        # and 1e20 came back as the platform's HTTP 500.
        ("--quantity", "2147483648"): "--quantity: 2147483648 is out of range: 1 to 100,000,000",
        ("--quantity", "1e20"): "--quantity: '1e20' is not a whole number",
        ("--value", "0"): "--value-cents/--value: ",
        ("--valid-days", "0"): "--valid-days: ",
        (
            "--starts-at",
            "2026-06-01T00:00:00",
        ): "--starts-at: '2026-06-01T00:00:00' has no timezone",
        ("--ends-at", "next week"): "--ends-at: 'next week' is not an ISO 8601 time",
        ("--starts-at", iso(now), "--ends-at", iso(now - timedelta(hours=1))): "ends_at: ",
    }
    for flags, message in bad.items():
        err = await cli.refused(*fresh, *flags, code="invalid_request")
        assert message in err, (flags, err)
    err = await cli.refused(
        "batch", "create", "--id", "no spaces", "--quantity", "1", code="invalid_request"
    )
    assert "--id: 'no spaces' is not valid" in err

    assert (await sim_stats(simulator))["batches"] == before["batches"]
    listed = await cli.json("batch", "list")
    assert [(b["id"], b["quantity"]) for b in listed["batches"]] == [(batch["id"], 20)]


async def test_an_unreachable_platform_is_one_line_and_exit_1(cli: Cli) -> None:
    cli.env["PLATFORM_URL"] = f"http://127.0.0.1:{free_port()}"
    ran = await cli("batch", "create", "--id", new_id("b"), "--quantity", "5")
    assert (ran.code, ran.out) == (1, "")
    assert ran.err.startswith(f"error: the platform at {cli.env['PLATFORM_URL']} failed: "), ran
    assert ran.err.count("\n") == 1


async def test_batch_list_and_show_give_the_synced_figures(cli: Cli) -> None:
    assert (await cli.json("batch", "list")) == {"batches": []}
    assert (await cli.table("batch", "list")) == "no batches\n"
    first = await new_cli_batch(cli)
    second = await new_cli_batch(cli, "--no-start")
    campaign = await new_cli_campaign(cli, first["id"])

    listed = await cli.json("batch", "list")
    assert [(b["id"], b["status"], b["remaining"], b["drift"]) for b in listed["batches"]] == [
        (first["id"], "running", 20, []),
        (second["id"], "created", 20, []),
    ]
    table = (await cli.table("batch", "list")).splitlines()
    assert table[0].split() == [
        "id", "platform", "id", "status", "quantity", "remaining", "owed", "backlog", "synced",
        "at", "drift",
    ]  # fmt: skip
    assert table[1].split()[:7] == [
        first["id"], first["platform_batch_id"], "running", "20", "20", "0", "0"
    ]  # fmt: skip

    shown = await cli.json("batch", "show", first["id"])
    assert shown["remaining"] == 20
    assert shown["platform_batch_id"] == first["platform_batch_id"]
    assert shown["campaigns"] == [
        {"id": campaign["id"], "status": "active", "quota": 10, "claimed": 0}
    ]
    text = await cli.table("batch", "show", first["id"])
    assert first["platform_batch_id"] in text and campaign["id"] in text
    assert re.search(r"remaining\s+20\b", text), text

    await cli.refused("batch", "show", "nope", code="unknown_batch")
    await cli.refused("batch", "show", "no/pe", code="invalid_request")


async def test_batch_start_pause_resume_stop_follow_the_platform_and_a_wrong_one_is_refused(
    cli: Cli, simulator: httpx.AsyncClient
) -> None:
    batch = await new_cli_batch(cli, "--no-start")
    seen = []
    for action in ("start", "pause", "resume", "stop"):
        changed = await cli.json("batch", action, batch["id"])
        at_platform = (await simulator.get(f"/v1/batches/{batch['platform_batch_id']}")).json()
        seen.append((changed["status"], at_platform["status"]))
    assert seen == [
        ("running", "running"),
        ("paused", "paused"),
        ("running", "running"),
        ("stopped", "stopped"),
    ]
    err = await cli.refused("batch", "resume", batch["id"], code="wrong_state")
    assert batch["id"] in err
    assert (await cli.json("batch", "show", batch["id"]))["status"] == "stopped"
    await cli.refused("batch", "pause", batch["id"], code="wrong_state")  # stopped for good
    # Repeating what is done is a no-op.
    assert re.search(r"status\s+stopped\b", await cli.table("batch", "stop", batch["id"]))
    await cli.refused("batch", "pause", "nope", code="unknown_batch")


async def test_batch_sync_shows_the_platforms_new_figures_and_drift(
    cli: Cli,
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    batch = await new_cli_batch(cli, "--quantity", "100")
    campaign = await new_cli_campaign(cli, batch["id"], "--task", "first-order")
    claimed = await cli.claim(campaign["id"], "u1")
    assert claimed["state"] == "received"  # owed: its task may still be done
    try:
        async with running_workers(dev_env.client, pool, settings):
            await set_at_platform(pool, simulator, batch["id"], remaining=40)
            report = await cli.json("batch", "sync", "--batch", batch["id"])
            assert report["workflow_id"].startswith("catalog-sync:manual:")
            assert (report["drifted"], report["failed"]) == (0, [])
            (synced,) = report["batches"]
            assert (synced["batch_id"], synced["remaining"], synced["owed"], synced["drift"]) == (
                batch["id"],
                40,
                1,
                [],
            )
            listed = await cli.json("batch", "list")
            assert [b["remaining"] for b in listed["batches"]] == [40]

            # Below what we owe: drift, in the sync's answer and in the list.
            await set_at_platform(pool, simulator, batch["id"], remaining=0)
            text = await cli.table("batch", "sync")  # no --batch: every batch in use
            assert "below the 1 we still owe" in text, text
            assert "1 batches synced, 1 drifted" in text
            shown = await cli.json("batch", "show", batch["id"])
            assert shown["remaining"] == 0
            assert shown["drift"] == ["the platform has 0 coupons left, below the 1 we still owe"]
            assert "below the 1 we still owe" in await cli.table("batch", "list")
    finally:
        await close_workflows(dev_env.client, [claimed["workflow_id"]])


async def test_batch_sync_refuses_an_unknown_batch_at_once_and_says_when_no_worker_runs_it(
    cli: Cli, dev_env: WorkflowEnvironment
) -> None:
    await cli.refused("batch", "sync", "--batch", "nope", code="unknown_batch")
    batch = await new_cli_batch(cli)
    # No worker polls this test's task queue.
    ran = await cli("batch", "sync", "--batch", batch["id"], "--timeout", "1")
    assert (ran.code, ran.out) == (1, "")
    found = re.match(
        r"error: workflow (catalog-sync:manual:\S+) did not finish within 1 s", ran.err
    )
    assert found, ran.err
    await close_workflows(dev_env.client, [found[1]])


# ----------------------------------------------------------------- campaigns


async def test_campaign_create_takes_every_flag_and_the_same_again_is_a_no_op(cli: Cli) -> None:
    batch = await new_cli_batch(cli, "--quantity", "50")
    now = datetime.now(UTC).replace(microsecond=0)
    deadline_at = (now + timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    starts_at = (now - timedelta(hours=1)).astimezone(timezone(timedelta(hours=8))).isoformat()
    ends_at = (now + timedelta(days=5)).astimezone(timezone(timedelta(hours=-5))).isoformat()
    flags = (
        "campaign", "create", "--id", new_id("c"), "--batch", batch["id"], "--quota", "20",
        "--per-user-limit", "1", "--task", "first-order=First order", "--task", "survey",
        "--deadline", "1d12h", "--deadline-at", deadline_at, "--starts-at", starts_at,
        "--ends-at", ends_at, "--name", "Spring sale",
    )  # fmt: skip
    created = await cli.json(*flags)
    assert created["created"] is True
    assert {k: created[k] for k in ("batch_id", "status", "quota", "claimed", "remaining")} == {
        "batch_id": batch["id"],
        "status": "active",
        "quota": 20,
        "claimed": 0,
        "remaining": 20,
    }
    assert created["tasks"] == [
        {"key": "first-order", "name": "First order"},
        {"key": "survey", "name": "survey"},
    ]
    assert (created["per_user_limit"], created["name"]) == (1, "Spring sale")
    assert created["task_deadline_s"] == timedelta(days=1, hours=12).total_seconds()
    assert datetime.fromisoformat(created["deadline_at"]) == now + timedelta(days=10)
    assert datetime.fromisoformat(created["starts_at"]) == now - timedelta(hours=1)
    assert datetime.fromisoformat(created["ends_at"]) == now + timedelta(days=5)

    again = await cli.json(*flags)
    assert again == {**created, "created": False}
    text = await cli.table(*flags)
    assert "first-order (First order), survey" in text
    assert "1d12h after the claim, at the latest" in text

    other = list(flags)
    other[other.index("--quota") + 1] = "21"
    err = await cli.refused(*other, code="campaign_exists")
    assert "campaign update" in err
    assert (await cli.json("campaign", "show", created["id"]))["quota"] == 20


async def test_each_invalid_campaign_definition_is_refused_naming_the_field_and_writes_nothing(
    cli: Cli,
) -> None:
    now = datetime.now(UTC)
    batch = await new_cli_batch(cli, "--ends-at", iso(now + timedelta(days=10)))
    bad = {
        ("--quota", "21"): "quota: 21 is more than batch",
        ("--batch", "nope"): "batch: unknown batch 'nope'",
        ("--task", "a", "--task", "a=Again"): "tasks: task key 'a' appears twice",
        ("--task", "a="): "--task: '' is not valid: 1 to 100 printable characters",
        ("--task", "a b"): "task: 'a b' is not valid",
        ("--per-user-limit", "0"): "--per-user-limit: ",
        ("--per-user-limit", "2"): "per_user_limit: 2 is more than batch",
        ("--starts-at", iso(now), "--ends-at", iso(now - timedelta(hours=1))): "ends_at: ",
        ("--ends-at", iso(now + timedelta(days=11))): "ends_at: the claim window ends after",
        ("--deadline-at", iso(now + timedelta(days=11))): "deadline_at: the task deadline is after",
        ("--deadline", "20d"): "task_deadline: a claim at",
        ("--deadline", "7x"): "--deadline: '7x' is not a duration",
        ("--deadline", "0s"): "--deadline: '0s' must be longer than zero",
        ("--starts-at", "2026-06-01T00:00"): "--starts-at: '2026-06-01T00:00' has no timezone",
        ("--deadline-at", "soon"): "--deadline-at: 'soon' is not an ISO 8601 time",
    }
    for flags, message in bad.items():
        args = ["campaign", "create", "--id", new_id("c"), "--quota", "20", *flags]
        if "--batch" not in flags:
            args += ["--batch", batch["id"]]
        err = await cli.refused(*args, code="invalid_request")
        assert message in err, (flags, err)
    assert (await cli.json("campaign", "list")) == {"campaigns": []}


async def test_campaign_update_changes_only_the_given_fields(cli: Cli) -> None:
    batch = await new_cli_batch(cli)
    campaign = await new_cli_campaign(cli, batch["id"], "--task", "a=Sign in", "--deadline", "7d")
    cid = campaign["id"]

    def unchanged(now: dict[str, Any], *fields: str) -> dict[str, Any]:
        skip = {"updated_at", "created", *fields}
        return {k: v for k, v in now.items() if k not in skip}

    bigger = await cli.json("campaign", "update", cid, "--quota", "12", "--name", "Bigger")
    assert (bigger["quota"], bigger["name"]) == (12, "Bigger")
    assert unchanged(bigger, "quota", "name", "remaining") == unchanged(
        campaign, "quota", "name", "remaining"
    )
    no_tasks = await cli.json("campaign", "update", cid, "--no-tasks")
    assert (no_tasks["tasks"], no_tasks["task_deadline_s"]) == ([], 7 * 86400)
    no_deadline = await cli.json("campaign", "update", cid, "--no-deadline")
    assert (no_deadline["task_deadline_s"], no_deadline["deadline_at"]) == (None, None)
    again = await cli.json("campaign", "update", cid, "--task", "b=Buy", "--deadline", "2h")
    assert (again["tasks"], again["task_deadline_s"], again["quota"]) == (
        [{"key": "b", "name": "Buy"}],
        7200,
        12,
    )

    refusals = {
        (): ("invalid_request", "nothing to change"),
        ("--no-tasks", "--task", "x"): ("invalid_request", "--no-tasks: "),
        ("--no-deadline", "--deadline", "1d"): ("invalid_request", "--no-deadline: "),
        ("--quota", "21"): ("invalid_request", "quota: 21 is more than batch"),
        ("--deadline", "soon"): ("invalid_request", "--deadline: 'soon' is not a duration"),
        ("--batch", "nope"): ("invalid_request", "batch: unknown batch 'nope'"),
    }
    for flags, (code, message) in refusals.items():
        err = await cli.refused("campaign", "update", cid, *flags, code=code)
        assert message in err, (flags, err)
    await cli.refused("campaign", "update", "nope", "--quota", "3", code="unknown_campaign")
    assert await cli.json("campaign", "show", cid) == {**again, "states": {}}


async def test_campaign_list_filters_and_show_and_stats_count_coupons_by_state(
    cli: Cli, dev_env: WorkflowEnvironment
) -> None:
    one, two = await new_cli_batch(cli), await new_cli_batch(cli)
    first = await new_cli_campaign(cli, one["id"], "--task", "first-order")
    second = await new_cli_campaign(cli, two["id"])
    await cli.json("campaign", "pause", second["id"])

    by_batch = await cli.json("campaign", "list", "--batch", one["id"])
    assert [c["id"] for c in by_batch["campaigns"]] == [first["id"]]
    paused = await cli.json("campaign", "list", "--status", "paused")
    assert [(c["id"], c["status"]) for c in paused["campaigns"]] == [(second["id"], "paused")]
    table = await cli.table("campaign", "list")
    assert table.splitlines()[0].split()[:5] == ["campaign", "batch", "status", "claimed", "quota"]
    assert first["id"] in table and second["id"] in table
    assert (await cli.table("campaign", "list", "--status", "ended")) == "no campaigns\n"

    coupons = [await cli.claim(first["id"], user) for user in ("u1", "u2")]
    try:
        shown = await cli.json("campaign", "show", first["id"])
        assert (shown["claimed"], shown["quota"], shown["states"]) == (2, 10, {"received": 2})
        text = await cli.table("campaign", "show", first["id"])
        assert "2 of 10" in text and re.search(r"received\s+2\b", text), text
        stats = await cli.coupon_json("stats", "--campaign", first["id"])
        assert (stats["claimed"], stats["remaining"], stats["states"]) == (2, 8, {"received": 2})
    finally:
        await close_workflows(dev_env.client, [c["workflow_id"] for c in coupons])
    await cli.refused("campaign", "show", "nope", code="unknown_campaign")
    await cli.refused("stats", "--campaign", "nope", code="unknown_campaign")


async def test_every_claim_refusal_exits_2_with_its_code_and_claims_nothing(
    cli: Cli, dev_env: WorkflowEnvironment, pool: AsyncConnectionPool
) -> None:
    # Five campaigns of 10 share it: the batch holds all their quotas.
    batch = await new_cli_batch(cli, "--quantity", "50")
    now = datetime.now(UTC)
    one = await new_cli_campaign(cli, batch["id"], "--task", "t")
    one_left = (await cli.json("campaign", "update", one["id"], "--quota", "1"))["id"]
    later = await new_cli_campaign(cli, batch["id"], "--starts-at", iso(now + timedelta(hours=1)))
    over = await new_cli_campaign(
        cli,
        batch["id"],
        "--starts-at",
        iso(now - timedelta(hours=2)),
        "--ends-at",
        iso(now - timedelta(hours=1)),
    )
    paused = await new_cli_campaign(cli, batch["id"], "--task", "t")
    ended = await new_cli_campaign(cli, batch["id"])

    held = await cli.claim(one_left, "u1")
    try:
        await cli.refused("claim", "--campaign", one_left, "--user", "u2", code="sold_out")
        again = await cli.claim(one_left, "u1")
        assert (again["coupon_id"], again["created"]) == (held["coupon_id"], False)
        await cli.refused(
            "claim", "--campaign", later["id"], "--user", "u1", code="campaign_not_open"
        )
        await cli.refused("claim", "--campaign", over["id"], "--user", "u1", code="campaign_closed")
        assert (await cli.json("campaign", "pause", paused["id"]))["status"] == "paused"
        await cli.refused(
            "claim", "--campaign", paused["id"], "--user", "u1", code="campaign_paused"
        )
        assert (await cli.json("campaign", "end", ended["id"]))["status"] == "ended"
        await cli.refused("claim", "--campaign", ended["id"], "--user", "u1", code="campaign_ended")
        await cli.refused("claim", "--campaign", "nope", "--user", "u1", code="unknown_campaign")
        assert await ledger.count_by_state(pool, one_left) == {"received": 1}
        for campaign in (later, over, paused, ended):
            assert await ledger.count_by_state(pool, campaign["id"]) == {}

        # Resumed, the paused campaign takes claims again; resuming twice is a no-op.
        assert (await cli.json("campaign", "resume", paused["id"]))["status"] == "active"
        assert (await cli.json("campaign", "resume", paused["id"]))["status"] == "active"
        resumed = await cli.claim(paused["id"], "u1")
        await close_workflows(dev_env.client, [resumed["workflow_id"]])
        # An ended campaign stays ended.
        await cli.refused("campaign", "resume", ended["id"], code="wrong_state")
        await cli.refused("campaign", "pause", ended["id"], code="wrong_state")
        await cli.refused("campaign", "update", ended["id"], "--quota", "5", code="wrong_state")
        await cli.refused("campaign", "pause", "nope", code="unknown_campaign")
    finally:
        await close_workflows(dev_env.client, [held["workflow_id"]])


async def test_a_finished_coupon_is_wrong_state_to_every_coupon_command(
    cli: Cli, dev_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings
) -> None:
    batch = await new_cli_batch(cli)
    campaign = await new_cli_campaign(cli, batch["id"], "--task", "survey")
    coupon = await cli.claim(campaign["id"], "u1")
    cid = coupon["coupon_id"]
    try:
        async with running_workers(dev_env.client, pool, settings):
            # The worker's starter starts the workflow behind the claim's answer.
            await wait_for_state(handle_of(dev_env.client, coupon["workflow_id"]), "received")
            shown = await cli.coupon_json("show", "--coupon", cid)
            assert (shown["state"], shown["workflow_state"]) == ("received", "received")
            assert shown["tasks"] == {
                "required": ["survey"],
                "done": [],
                "deadline": shown["tasks"]["deadline"],
            }
            assert shown["waiting_for"].startswith("task completion")
            cancelled = await cli.coupon_json("cancel", "--coupon", cid, "--reason", "test")
            assert cancelled == {"coupon_id": cid, "state": "cancelled"}
            # The workflow records the cancel in the ledger, then closes.
            handle = dev_env.client.get_workflow_handle(coupon["workflow_id"])
            async with asyncio.timeout(30):
                await handle.result()
            for args in (
                ("cancel",),
                ("cancel", "--no-wait"),
                ("complete-task", "--task", "survey"),
                ("complete-task", "--task", "survey", "--wait"),
            ):
                err = await cli.refused(*args, "--coupon", cid, code="wrong_state")
                assert f"coupon {cid!r} is cancelled: it is finished" in err, (args, err)
            await cli.refused(
                "complete-task", "--coupon", cid, "--task", "quiz", code="unknown_task"
            )
            shown = await cli.coupon_json("show", "--coupon", cid)
            assert shown["state"] == "cancelled"
            assert [e["to_state"] for e in shown["events"]] == ["received", "cancelled"]
    finally:
        await close_workflows(dev_env.client, [coupon["workflow_id"]])
    for args in (("show",), ("cancel",), ("complete-task", "--task", "survey")):
        await cli.refused(*args, "--coupon", "nope:u1:1", code="unknown_coupon")


async def test_campaign_end_without_expiry_needs_no_temporal(cli: Cli) -> None:
    batch = await new_cli_batch(cli)
    campaign = await new_cli_campaign(cli, batch["id"])
    cli.env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{free_port()}"
    ended = await cli.json("campaign", "end", campaign["id"])
    assert (ended["status"], ended["expiry"]) == ("ended", None)
    # The expiry needs Temporal: refused before anything changes, the campaign stays active.
    other = await new_cli_campaign(cli, batch["id"])
    ran = await cli("campaign", "end", other["id"], "--expire-pending")
    assert (ran.code, ran.out) == (1, "")
    assert ran.err.startswith("error: cannot reach Temporal"), ran.err
    assert (await cli.json("campaign", "show", other["id"]))["status"] == "active"


async def test_campaign_end_expire_pending_expires_received_coupons_through_their_workflows(
    cli: Cli, dev_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings
) -> None:
    batch = await new_cli_batch(cli)
    campaign = await new_cli_campaign(cli, batch["id"], "--task", "survey=Answer the survey")
    cid = campaign["id"]
    coupons = [await cli.claim(cid, f"u{i}") for i in range(3)]
    coupon_ids = [c["coupon_id"] for c in coupons]
    try:
        async with running_workers(dev_env.client, pool, settings):
            # A refused update exits 2 as well, with the validator's code.
            await cli.refused(
                "complete-task", "--coupon", coupon_ids[0], "--task", "quiz", "--wait",
                code="unknown_task",
            )  # fmt: skip
            ended = await cli.json("campaign", "end", cid, "--expire-pending", "--reason", "over")
            assert ended["status"] == "ended"
            assert ended["expiry"] == {
                "workflow_id": f"end-campaign:{cid}",
                "campaign_id": cid,
                "total": 3,
                "expired": 3,
                "skipped": 0,
                "done": True,
                "stuck": 0,
                "stuck_coupons": [],
                "passes": 1,
                "runs": 1,
            }
            # The workflows took the expiry; each writes it to the ledger a moment later.
            await wait_for_ledger_states(pool, coupon_ids, "expired", timeout_s=10)
            view = await ledger.coupon_view(pool, coupon_ids[0])
            assert view is not None
            last = view["events"][-1]
            assert (last["from_state"], last["to_state"]) == ("received", "expired")
            assert "over" in last["cause"]

            # Again: the campaign stays ended and a new run finds nothing left.
            text = await cli.table("campaign", "end", cid, "--expire-pending")
            assert (
                f"0 received coupons expired, 0 skipped (of 0) by workflow end-campaign:{cid}"
                in text
            )
            await cli.refused("claim", "--campaign", cid, "--user", "late", code="campaign_ended")
    finally:
        await close_workflows(dev_env.client, [c["workflow_id"] for c in coupons])


async def test_campaign_end_no_wait_names_the_workflow_and_bad_flags_change_nothing(
    cli: Cli, dev_env: WorkflowEnvironment
) -> None:
    batch = await new_cli_batch(cli)
    campaign = await new_cli_campaign(cli, batch["id"])
    cid = campaign["id"]
    for flags in (("--reason", "over"), ("--no-wait",)):
        err = await cli.refused("campaign", "end", cid, *flags, code="invalid_request")
        assert f"{flags[0]}: applies only with --expire-pending" in err
    assert (await cli.json("campaign", "show", cid))["status"] == "active"
    await cli.refused("campaign", "end", "nope", "--expire-pending", code="unknown_campaign")

    # No worker polls this test's task queue: the workflow is started and left to run.
    ended = await cli.json("campaign", "end", cid, "--expire-pending", "--no-wait")
    workflow_id = f"end-campaign:{cid}"
    try:
        assert (ended["status"], ended["expiry"]) == (
            "ended",
            {"workflow_id": workflow_id, "done": False},
        )
        described = await dev_env.client.get_workflow_handle(workflow_id).describe()
        assert described.status == WorkflowExecutionStatus.RUNNING
        # Waiting for it, with nobody to answer, gives up clearly after --timeout.
        ran = await cli("campaign", "end", cid, "--expire-pending", "--timeout", "1")
        assert (ran.code, ran.out) == (1, "")
        assert ran.err.startswith("error: no worker answered for 1 s"), ran.err
        assert workflow_id in ran.err
    finally:
        await close_workflows(dev_env.client, [workflow_id])


# ----------------------------------------------------------------- reconciliation


async def test_reconcile_reports_a_use_behind_our_back_then_repairs_it(
    cli: Cli,
    dev_env: WorkflowEnvironment,
    pool: AsyncConnectionPool,
    settings: Settings,
    simulator: httpx.AsyncClient,
) -> None:
    batch = await new_cli_batch(cli)
    campaign = await new_cli_campaign(cli, batch["id"])  # no tasks: usable at claim
    coupons: list[dict[str, Any]] = []
    try:
        async with running_workers(dev_env.client, pool, settings):
            coupons += [await cli.claim(campaign["id"], user) for user in ("u1", "u2")]
            coupon_ids = [c["coupon_id"] for c in coupons]
            await wait_for_ledger_states(pool, coupon_ids, "issued")
            view = await ledger.coupon_view(pool, coupon_ids[0])
            assert view is not None and view["receipt"] is not None
            used = view["receipt"]["platform_coupon_id"]
            # Used at a till: the platform knows, we are not told (the first poll is minutes off).
            (await simulator.post(f"/sim/coupons/{used}/use")).raise_for_status()

            text = await cli.table("reconcile", "--batch", batch["id"], "--no-repair")
            assert "the platform sent 2 and saw 1 used; the ledger has 2 coupons" in text
            assert re.search(
                rf"state\s+{coupon_ids[0]}\s+{used}\s+used at the platform, issued here", text
            ), text

            listed = await cli.json("reconcile", "--batch", batch["id"], "--no-repair")
            assert (listed["mismatches"], listed["repaired"]) == (1, 0)
            assert listed["workflow_id"].startswith("reconcile:manual:")
            (found,) = listed["batches"]
            assert {k: found[k] for k in ("batch_id", "platform_sent", "platform_used")} == {
                "batch_id": batch["id"],
                "platform_sent": 2,
                "platform_used": 1,
            }
            assert found["ledger_coupons"] == 2
            (mismatch,) = found["mismatches"]
            assert {k: mismatch[k] for k in ("kind", "coupon_id", "platform_coupon_id")} == {
                "kind": "state",
                "coupon_id": coupon_ids[0],
                "platform_coupon_id": used,
            }
            assert mismatch["repair"] != "redeem requested"  # --no-repair: nothing was asked
            assert "used at the platform" in mismatch["detail"]
            assert (await ledger.states_of(pool, coupon_ids))[coupon_ids[0]] == "issued"

            repaired = await cli.json("reconcile", "--batch", batch["id"])
            assert (repaired["mismatches"], repaired["repaired"]) == (1, 1)
            assert repaired["batches"][0]["mismatches"][0]["repair"] == "redeem requested"
            assert await ledger.states_of(pool, coupon_ids) == {
                coupon_ids[0]: "redeemed",
                coupon_ids[1]: "issued",
            }

            clean = await cli.json("reconcile")  # every batch
            assert (clean["mismatches"], clean["repaired"]) == (0, 0)
            assert [b["batch_id"] for b in clean["batches"]] == [batch["id"]]
            assert "0 mismatches, 0 repaired in 1 batches" in await cli.table("reconcile")
    finally:
        await close_workflows(dev_env.client, [c["workflow_id"] for c in coupons])


async def test_reconcile_goes_on_past_a_batch_it_cannot_do_and_exits_1_naming_it(
    cli: Cli, dev_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings
) -> None:
    """The run reconciles every batch it can (issue 17 item 5); the command prints what it
    found, then names the batch it could not do, and exits 1 (as `batch sync` does)."""
    kept = await new_cli_batch(cli)
    gone = await new_cli_batch(cli)
    await scalar(
        pool,
        "UPDATE batches SET platform_batch_id = %s WHERE id = %s RETURNING id",
        new_id("unknown-at-platform"),
        gone["id"],
    )
    async with running_workers(dev_env.client, pool, settings, starter=False):
        ran = await cli("reconcile", "--json")  # every batch
        text = await cli("reconcile")
    assert ran.code == 1, ran
    found = json.loads(ran.out)
    assert kept["id"] in [b["batch_id"] for b in found["batches"]]
    [failed] = found["failed"]
    assert failed.startswith(f"{gone['id']}: ") and "BATCH_NOT_FOUND" in failed
    assert ran.err.startswith(f"error: 1 batches could not be reconciled: {gone['id']}: "), ran
    assert text.code == 1 and f"failed: {gone['id']}: " in text.out, text


async def test_reconcile_refuses_an_unknown_batch_at_once(cli: Cli) -> None:
    await cli.refused("reconcile", "--batch", "nope", "--json", code="unknown_batch")
    await cli.refused("reconcile", "--batch", "no pe", code="invalid_request")
    await cli.refused("reconcile", "--timeout", "0", code="invalid_request")


# ----------------------------------------------------------------- tenants and keys


def secret_of(api_key: str) -> str:
    """The secret part of `ck_<key id>_<secret>`."""
    return api_key.split("_", 2)[2]


async def new_cli_tenant(cli: Cli) -> dict[str, Any]:
    tenant: dict[str, Any] = await cli.coupon_json("tenant", "create", "--name", new_id("app"))
    return tenant


async def test_tenant_create_prints_a_working_admin_key_once_and_logs_nothing_of_it(
    cli: Cli, pool: AsyncConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # everything any library logs
    name = new_id("Acme")
    ran = await cli("tenant", "create", "--name", name)
    assert (ran.code, ran.err) == (0, ""), ran
    created = json.loads(ran.out)
    assert set(created) == {"tenant_id", "name", "created_at", "key_id", "scope", "api_key"}
    assert (created["name"], created["scope"]) == (name, "admin")
    assert created["api_key"].startswith(f"ck_{created['key_id']}_")
    secret = secret_of(created["api_key"])
    assert ran.out.count(secret) == 1
    assert caplog.records  # the capture sees what the command logs
    assert not [r for r in caplog.records if secret in r.getMessage()]

    key = await tenants.authenticate(pool, created["api_key"])
    assert key is not None
    assert (key.id, key.tenant_id, key.scope) == (created["key_id"], created["tenant_id"], "admin")

    listed = await cli.coupon_json("tenant", "list")
    assert listed == {
        "tenants": [
            {"id": "default", "name": "default", "created_at": listed["tenants"][0]["created_at"]},
            {"id": created["tenant_id"], "name": name, "created_at": created["created_at"]},
        ]
    }


def test_starter_prints_the_new_key_on_stdout_only(settings: Settings) -> None:
    """As a script sees it: the secret once on stdout, nothing on stderr."""
    result = starter(
        "tenant", "create", "--name", new_id("shop"), DATABASE_URL=settings.database_url
    )
    assert (result.returncode, result.stderr) == (0, ""), result
    created = json.loads(result.stdout)
    assert result.stdout.count(secret_of(created["api_key"])) == 1


async def test_tenant_create_refusals_exit_2_and_write_nothing(
    cli: Cli, pool: AsyncConnectionPool
) -> None:
    taken = await new_cli_tenant(cli)
    before = (await row_count(pool, "tenants"), await row_count(pool, "api_keys"))
    err = await cli.refused("tenant", "create", "--name", taken["name"], code="tenant_exists")
    assert taken["name"] in err
    await cli.refused("tenant", "create", "--name", "default", code="tenant_exists")
    for bad in ("", "   ", "x" * 101):
        err = await cli.refused("tenant", "create", "--name", bad, code="invalid_request")
        assert err.startswith("error: invalid_request: --name: "), err
    assert (await row_count(pool, "tenants"), await row_count(pool, "api_keys")) == before


async def test_key_create_list_and_revoke(cli: Cli, pool: AsyncConnectionPool) -> None:
    tenant = await new_cli_tenant(cli)
    tid = tenant["tenant_id"]
    ran = await cli("key", "create", "--tenant", tid, "--scope", "app")
    assert (ran.code, ran.err) == (0, ""), ran
    app = json.loads(ran.out)
    assert set(app) == {"tenant_id", "key_id", "scope", "api_key"}
    assert (app["tenant_id"], app["scope"]) == (tid, "app")
    assert ran.out.count(secret_of(app["api_key"])) == 1
    key = await tenants.authenticate(pool, app["api_key"])
    assert key is not None and (key.id, key.tenant_id, key.scope) == (app["key_id"], tid, "app")

    ran = await cli("key", "list", "--tenant", tid)
    assert (ran.code, ran.err) == (0, ""), ran
    listed = json.loads(ran.out)
    assert listed["tenant_id"] == tid
    assert [(k["key_id"], k["scope"], k["revoked_at"]) for k in listed["keys"]] == [
        (tenant["key_id"], "admin", None),
        (app["key_id"], "app", None),
    ]
    assert all(
        set(k) == {"key_id", "tenant_id", "scope", "created_at", "revoked_at"}
        for k in listed["keys"]
    )
    # Never a secret, nor its digest, in any form.
    for issued in (tenant, app):
        secret = secret_of(issued["api_key"])
        digest = hashlib.sha256(secret.encode()).digest()
        for form in (secret, digest.hex(), base64.b64encode(digest).decode()):
            assert form not in ran.out

    revoked = await cli.coupon_json("key", "revoke", app["key_id"])
    assert (revoked["key_id"], revoked["tenant_id"], revoked["scope"]) == (
        app["key_id"],
        tid,
        "app",
    )
    assert revoked["revoked_at"] is not None
    assert await tenants.authenticate(pool, app["api_key"]) is None
    assert await tenants.authenticate(pool, tenant["api_key"]) is not None  # the others work
    again = await cli.coupon_json("key", "revoke", app["key_id"])  # a no-op
    assert again == revoked
    listed = await cli.coupon_json("key", "list", "--tenant", tid)
    assert [k["revoked_at"] for k in listed["keys"]] == [None, revoked["revoked_at"]]

    # The default tenant (the operator's) can hold keys too.
    default = await cli.coupon_json("key", "create", "--tenant", "default", "--scope", "admin")
    assert (default["tenant_id"], default["scope"]) == ("default", "admin")


async def test_key_refusals_exit_2_with_their_code_and_write_nothing(
    cli: Cli, pool: AsyncConnectionPool
) -> None:
    tid = (await new_cli_tenant(cli))["tenant_id"]
    before = await row_count(pool, "api_keys")
    for scope in ("root", "ADMIN", ""):
        err = await cli.refused(
            "key", "create", "--tenant", tid, "--scope", scope, code="invalid_request"
        )
        assert err.startswith("error: invalid_request: --scope: "), err
    await cli.refused(
        "key", "create", "--tenant", "tnt_nope", "--scope", "app", code="unknown_tenant"
    )
    err = await cli.refused(
        "key", "create", "--tenant", "no pe", "--scope", "app", code="invalid_request"
    )
    assert err.startswith("error: invalid_request: --tenant: "), err
    await cli.refused("key", "list", "--tenant", "tnt_nope", code="unknown_tenant")
    err = await cli.refused("key", "list", "--tenant", "", code="invalid_request")
    assert err.startswith("error: invalid_request: --tenant: "), err
    await cli.refused("key", "revoke", "k0123456789abcdef", code="unknown_key")
    err = await cli.refused("key", "revoke", "no/pe", code="invalid_request")
    assert err.startswith("error: invalid_request: key: "), err
    assert await row_count(pool, "api_keys") == before
    # A usage error (a missing flag) is argparse's: exit 2 as well.
    assert (await cli("key", "create", "--tenant", tid)).code == 2
    assert await row_count(pool, "api_keys") == before


async def test_batch_and_campaign_create_take_a_tenant(
    cli: Cli, pool: AsyncConnectionPool, simulator: httpx.AsyncClient
) -> None:
    tid = (await new_cli_tenant(cli))["tenant_id"]
    theirs = await new_cli_batch(cli, "--tenant", tid)
    assert theirs["tenant_id"] == tid
    ours = await new_cli_batch(cli)
    assert ours["tenant_id"] == "default"

    campaign = await new_cli_campaign(cli, theirs["id"], "--tenant", tid)
    assert campaign["tenant_id"] == tid
    assert (await catalog.campaigns.get_campaign(pool, campaign["id"], tid)).batch_id == theirs[
        "id"
    ]
    default = await new_cli_campaign(cli, ours["id"])
    assert default["tenant_id"] == "default"

    # Another tenant's batch is as unknown as none, whichever way round.
    err = await cli.refused(
        "campaign", "create", "--id", new_id("c"), "--batch", theirs["id"], "--quota", "1",
        code="invalid_request",
    )  # fmt: skip
    assert f"batch: unknown batch {theirs['id']!r}" in err
    err = await cli.refused(
        "campaign", "create", "--id", new_id("c"), "--batch", ours["id"], "--quota", "1",
        "--tenant", tid, code="invalid_request",
    )  # fmt: skip
    assert f"batch: unknown batch {ours['id']!r}" in err

    # An unknown tenant is refused before anything reaches the platform.
    before = await sim_stats(simulator)
    await cli.refused(
        "batch", "create", "--id", new_id("b"), "--quantity", "5", "--tenant", "tnt_nope",
        code="unknown_tenant",
    )  # fmt: skip
    await cli.refused(
        "campaign", "create", "--id", new_id("c"), "--batch", theirs["id"], "--quota", "1",
        "--tenant", "tnt_nope", code="unknown_tenant",
    )  # fmt: skip
    err = await cli.refused(
        "batch", "create", "--id", new_id("b"), "--quantity", "5", "--tenant", "no pe",
        code="invalid_request",
    )  # fmt: skip
    assert "tenant: " in err
    assert (await sim_stats(simulator))["batches"] == before["batches"]
    # The batch id another tenant holds stays theirs.
    await cli.refused(
        "batch", "create", "--id", theirs["id"], "--quantity", "20", code="batch_exists"
    )
    listed = await cli.json("batch", "list")
    assert [(b["id"], b["tenant_id"]) for b in listed["batches"]] == [
        (theirs["id"], tid),
        (ours["id"], "default"),
    ]

    # The other catalog commands see every tenant's.
    shown = await cli.json("campaign", "show", campaign["id"])
    assert (shown["tenant_id"], shown["batch_id"]) == (tid, theirs["id"])
    assert re.search(rf"tenant\s+{tid}\b", await cli.table("batch", "show", theirs["id"]))
    paused = await cli.json("campaign", "pause", campaign["id"])
    assert (paused["status"], paused["tenant_id"]) == ("paused", tid)
    listed_campaigns = await cli.json("campaign", "list")
    assert {c["id"]: c["tenant_id"] for c in listed_campaigns["campaigns"]} == {
        campaign["id"]: tid,
        default["id"]: "default",
    }


async def test_coupon_wedged_lists_by_cause_and_recover_leaves_a_healthy_coupon_alone(
    cli: Cli,
) -> None:
    """The commands over app.wedged (tests/app/test_wedged.py wedges coupons for real)."""
    batch = await new_cli_batch(cli)
    campaign = await new_cli_campaign(cli, batch["id"], "--task", "a")
    coupon = await cli.coupon_json("claim", "--campaign", campaign["id"], "--user", "ann")
    listed = await cli.json("coupon", "wedged")
    assert coupon["coupon_id"] not in [w["coupon_id"] for w in listed["wedged"]]
    assert set(listed["by_cause"]) == set(wedged.CAUSES)
    healthy = await cli.json("coupon", "recover", coupon["coupon_id"])
    assert [(r["coupon_id"], r["action"]) for r in healthy["recovered"]] == [
        (coupon["coupon_id"], "none")
    ]
    await cli.refused("coupon", "recover", "nope:nobody:1", code="unknown_coupon")
    ran = await cli("coupon", "recover")
    assert ran.code == 2 and "one of the arguments coupon --all is required" in ran.err


def test_a_campaign_end_that_left_coupons_received_says_how_many_and_why() -> None:
    stuck = [
        {"coupon_id": "c:a:1", "reason": "no_answer", "detail": ""},
        {"coupon_id": "c:b:1", "reason": "not_started", "detail": ""},
        {"coupon_id": "c:d:1", "reason": "no_answer", "detail": ""},
    ]
    expiry = {
        "workflow_id": "end-campaign:c",
        "total": 8,
        "expired": 5,
        "skipped": 0,
        "done": True,
        "stuck": 3,
        "stuck_coupons": stuck,
    }
    assert expiry_view(expiry).plain == (  # type: ignore[union-attr]
        "5 received coupons expired, 0 skipped (of 8) by workflow end-campaign:c; "
        "3 left received (no_answer 2, not_started 1)"
    )
