"""The operator-mistakes scenario (issue 14): what a person at a shell gets wrong, made
safe, proved while the usual claim and task load flows.

The stack is recorded as `make run` records it (`app.stack.Stack(record=True)`), in a
registry of this scenario's own (COUPONS_STATE_DIR under its root, never the user's), so
`starter.py` run from a shell finds it as it finds `make run` (`app.running`). Three
mistakes, side by side, a quarter into the load:

- Mismatched shells: `starter.py claim` from shells that set nothing but the stack's ports
  (they follow the stack: the claim and its `complete-task` must go through and the coupon
  end issued like any other), and from shells that contradict it (another PLATFORM, another
  DATA_DIR, another CODEC_KEYS_FILE): each must exit 2 naming the setting and write nothing
  (no claim for its user in the ledger, no coupon at the platform).
- Crashes between the platform's change and the ledger's write: a child process
  (`python -m chaos.shells`, with the plain shell's environment) creates, starts,
  pauses and resumes batches with the ledger's completion write replaced by
  `os._exit(137)`, as tests/test_catalog_intents.py does. Then `starter.py batch sync` (the
  catalog sync workflow, on the stack's worker) must leave every batch the simulator holds
  known to the ledger by its platform id, none created twice, no intent pending, each batch
  as last asked.
- Coupons made undecodable by hand: claims whose workflows a client with another key ring
  started (as tests/app/test_wedged.py does); the app reports their task meanwhile (a signal).
  `starter.py coupon wedged --json` must list them (cause undecodable), `starter.py coupon
  recover --all` recover them, and after their task is reported again (an update) each must
  end issued with exactly one send.

The common checks then count every coupon, the shells' and the wedged ones included (lost,
sent twice, wrong state, ...), and last `starter.py doctor --json` must exit 0.

Temporal flags a workflow whose tasks keep failing (`TemporalReportedProblems`, what `coupon
wedged` lists) after 5 consecutive problems by default, about 50 s on the dev server; this
scenario's dev server says 2 (about 11 s), as tests/app/test_wedged.py's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from temporalio.client import Client

from app.claims import ClaimService
from app.wedged import UNDECODABLE, find_wedged
from chaos import shells
from chaos.frame import Run, Scenario
from chaos.harness import TASK, Acked, Harness
from chaos.shells import CRASHED, Answered, command, shell_env, starter
from chaos.sizes import Size
from chaos.verify import EVIDENCE_PER_KIND
from coupons.codec import encrypted_converter, ensure_keys
from coupons.config import PLATFORMS
from coupons.ledger import claims as ledger
from coupons.ledger.batches import Batch, list_batches, pending_intents

log = logging.getLogger("chaos.operator")

NAME = "operator_mistakes"
# Temporal flags a workflow failing its tasks after this many problems in a row (default 5).
PROBLEMS_SETTING = "system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute"
PROBLEMS_AFTER = 2
# How long the wedged coupons may take to be listed (flagged in about 11 s; 60 s would do
# with the default threshold).
WEDGED_WAIT_S = 90.0
# The mistakes start this far into the load, so the load flows around them.
MISTAKES_AT = 0.25


@dataclass(frozen=True)
class Mistakes:
    """How many of each mistake, per size."""

    # Shells setting only the stack's ports that claim and complete a coupon.
    following_shells: int
    # Claims started with a foreign key ring.
    undecodable: int


MISTAKES = {
    "tiny": Mistakes(following_shells=1, undecodable=1),
    "quick": Mistakes(following_shells=3, undecodable=3),
    "full": Mistakes(following_shells=5, undecodable=5),
}

# The batches the crash children create: ours, the operation, and the one whose ledger
# write each child dies at ("": it completes normally), in order; then each batch as the
# ledger must hold it once synced (a create that died before its write was never started:
# the start is the step the dead process never took). Alipay's vouchers have no pause or
# resume (the adapter refuses them): there the third batch is stopped instead.
_CREATES: tuple[tuple[str, str, str], ...] = (
    ("op-crash-create", "create", "create"),
    ("op-crash-start", "create", "start"),
    ("op-crash-change", "create", ""),
)
_CHANGES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "pause-resume": (
        ("op-crash-change", "pause", "pause"),
        ("op-crash-change", "resume", "resume"),
    ),
    "stop": (("op-crash-change", "stop", "stop"),),
}


def crashes(platform: str) -> tuple[tuple[tuple[str, str, str], ...], dict[str, str]]:
    """The crash children's orders on `platform`, and each batch's status once synced."""
    changes = "stop" if platform == "alipay" else "pause-resume"
    expected = {
        "op-crash-create": "created",
        "op-crash-start": "running",
        "op-crash-change": "stopped" if changes == "stop" else "running",
    }
    return _CREATES + _CHANGES[changes], expected


DESCRIPTION = (
    "Operator mistakes while claims and completions flow, on a stack recorded as `make run` "
    "records it: `starter.py claim` from shells that set only the stack's ports (they follow "
    "it: claimed, completed, issued) and from shells that contradict it (another PLATFORM, "
    "DATA_DIR or CODEC_KEYS_FILE: exit 2, nothing written); batches created, started, paused "
    "and resumed (Alipay: stopped) by processes that die (exit 137) between the platform's "
    "answer and the ledger's write, then `starter.py batch sync`: every batch at the "
    "platform known to the ledger, none created twice, no intent left pending; claims "
    "started with a foreign key ring (undecodable), listed by `starter.py coupon wedged`, "
    "recovered by `coupon recover --all`, their task reported again: issued with one send; "
    "at the end `starter.py doctor` exits 0 (converge_s counts from the recovery)."
)


def quota(size: Size) -> int:
    """The campaign's quota: the load's coupons and the scenario's own claims."""
    mistakes = MISTAKES[size.name]
    return size.coupons + mistakes.following_shells + mistakes.undecodable


# ----- the stack: recorded, quick to flag failing tasks --------------------------------


@contextlib.contextmanager
def recorded_stack(harness: Harness) -> Iterator[None]:
    """The harness's stack recorded as `make run`'s, in a registry of its own, with its dev
    server flagging failing tasks sooner; for as long as the stack runs."""
    before = os.environ.get("COUPONS_STATE_DIR")
    os.environ["COUPONS_STATE_DIR"] = str(shells.registry(harness))
    harness.stack.record = True
    harness.stack.temporal_dynamic_config[PROBLEMS_SETTING] = PROBLEMS_AFTER
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COUPONS_STATE_DIR", None)
        else:
            os.environ["COUPONS_STATE_DIR"] = before


# ----- what the scenario counts -----------------------------------------------------


@dataclass
class Tally:
    """The scenario's own checks (each must end at 0) and their evidence."""

    checks: dict[str, int]
    evidence: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)

    def fail(self, check: str, why: str) -> None:
        self.checks[check] += 1
        items = self.evidence.setdefault(check, [])
        if len(items) < EVIDENCE_PER_KIND:
            items.append(why)


def _tally(run: Run) -> Tally:
    return Tally(run.result.checks, run.result.evidence, run.result.notes)


CHECKS = (
    "following_shells_failed",
    "mismatched_shells_not_refused",
    "mismatched_shells_wrote",
    "crashes_missed",
    "batch_sync_failed",
    "platform_batches_unknown_to_ledger",
    "batches_created_twice",
    "intents_left_pending",
    "batches_not_as_asked",
    "wedged_not_listed",
    "wedged_not_recovered",
    "wedged_after_recovery",
    "doctor_not_ok",
)


# ----- the fault ----------------------------------------------------------------------


async def make_mistakes(run: Run, load: asyncio.Task[None]) -> float:
    """The three mistakes at once, a quarter into the load; returns when the last is
    recovered from (the wedged coupons recovered, their tasks reported again)."""
    for check in CHECKS:
        run.result.checks[check] = 0
    mistakes = MISTAKES[run.size.name]
    await asyncio.sleep(run.size.load_s * MISTAKES_AT)
    run.phase = "operator mistakes"
    await asyncio.gather(
        _mismatched_shells(run, mistakes),
        _crashes(run),
        _undecodable(run, mistakes),
    )
    run.phase = "load"
    return time.monotonic()


def _add_coupon(run: Run, coupon_id: str, user_id: str, workflow_id: str) -> Acked:
    """A coupon the scenario claimed itself, checked like the load's."""
    acked = Acked(coupon_id, user_id, workflow_id, time.monotonic())
    run.driver.acked[coupon_id] = acked
    run.driver.counters.claimed += 1
    return acked


async def _mismatched_shells(run: Run, mistakes: Mistakes) -> None:
    harness, campaign, tally = run.harness, run.driver.campaign, _tally(run)
    settings = harness.settings
    other_platform = next(p for p in PLATFORMS if p != settings.platform)
    foreign_keys = settings.data_dir.parent / "shell-codec-keys.json"
    ensure_keys(foreign_keys)
    contradicting = {
        "PLATFORM": other_platform,
        "DATA_DIR": str(settings.data_dir.parent / "another-data"),
        "CODEC_KEYS_FILE": str(foreign_keys),
    }

    async def following(index: int) -> bool:
        user = f"op-shell-{index}"
        env = shell_env(harness)
        claimed = await starter(env, "claim", "--campaign", campaign, "--user", user)
        if claimed.rc != 0:
            tally.fail("following_shells_failed", claimed.describe())
            return False
        answer = claimed.json()
        _add_coupon(run, answer["coupon_id"], user, answer["workflow_id"])
        done = await starter(env, "complete-task", "--coupon", answer["coupon_id"], "--task", TASK)
        run.driver.counters.completions_sent += 1
        if done.rc != 0:
            run.driver.counters.completions_failed += 1
            tally.fail("following_shells_failed", done.describe())
            return False
        run.driver.counters.completions_acked += 1
        return True

    async def contradicting_shell(name: str, value: str) -> bool:
        user = f"op-refused-{name.lower().replace('_', '-')}"
        answered = await starter(
            shell_env(harness, **{name: value}), "claim", "--campaign", campaign, "--user", user
        )
        if answered.rc != 2 or name not in answered.err:
            tally.fail("mismatched_shells_not_refused", f"{name}={value}: {answered.describe()}")
            return False
        written = await ledger.find_claims(
            run.driver.pool, ledger.ClaimFilter(campaign_id=campaign, user_id=user)
        )
        if written:
            tally.fail("mismatched_shells_wrote", f"{name}={value}: {len(written)} claims")
            return False
        return True

    followed = await asyncio.gather(*(following(i) for i in range(mistakes.following_shells)))
    refused = await asyncio.gather(*(contradicting_shell(n, v) for n, v in contradicting.items()))
    figures = run.result.figures
    figures["following_shells_claimed"] = sum(followed)
    figures["refused_mismatched_shells"] = sum(refused)
    run.fault(
        f"shells: {sum(followed)}/{len(followed)} setting only the stack's ports claimed and "
        f"completed; {sum(refused)}/{len(refused)} contradicting it "
        f"({', '.join(contradicting)}) refused with exit 2, nothing written"
    )


async def _crash_child(run: Run, batch_id: str, operation: str, crash_on: str) -> Answered:
    order = {"batch_id": batch_id, "operation": operation, "crash_on": crash_on}
    answered = await command(shell_env(run.harness), "-m", "chaos.shells", json.dumps(order))
    log.info("crash child %s: %s", order, answered.describe())
    return answered


async def _crashes(run: Run) -> None:
    tally, figures = _tally(run), run.result.figures
    crashed = 0
    # Looked at right after each crash: the catalog-sync schedule may run before the last
    # one, and it is meant to learn of them.
    unknown: set[str] = set()
    orders, _ = crashes(run.harness.settings.platform)
    for batch_id, operation, crash_on in orders:
        answered = await _crash_child(run, batch_id, operation, crash_on)
        expected = CRASHED if crash_on else 0
        if answered.rc != expected:
            tally.fail("crashes_missed", f"{batch_id} {operation}: {answered.describe()}")
        elif crash_on:
            crashed += 1
        strangers = _unknown_to_ledger(
            await run.driver.sim_batches(), await list_batches(run.driver.pool)
        )
        unknown.update(b["batch_id"] for b in strangers)
    figures["crashes_between_platform_and_ledger"] = crashed
    pending = await pending_intents(run.driver.pool)
    figures["intents_pending_before_sync"] = len(pending)
    figures["platform_batches_unknown_before_sync"] = len(unknown)
    run.fault(
        f"catalog: {crashed} processes died between the platform's answer and the ledger's "
        f"write ({', '.join(f'{c[1]} {c[0]}' for c in orders if c[2])}); "
        f"{len(pending)} intents pending, {len(unknown)} platform batches unknown to the ledger "
        "right after their crash"
    )

    synced = await starter(shell_env(run.harness), "batch", "sync", "--json")
    if synced.rc != 0:
        tally.fail("batch_sync_failed", synced.describe())
    await _compare_batches(run)


def _unknown_to_ledger(
    platform: list[dict[str, Any]], batches: list[Batch]
) -> list[dict[str, Any]]:
    known = {b.platform_batch_id for b in batches if b.platform_batch_id}
    return [b for b in platform if b["batch_id"] not in known]


async def _compare_batches(run: Run) -> None:
    tally, figures, pool = _tally(run), run.result.figures, run.driver.pool
    platform = await run.driver.sim_batches()
    batches = await list_batches(pool)
    stats = await run.driver.sim_stats()
    figures["platform_batches"] = stats["batches"]
    figures["ledger_batches"] = len(batches)
    unknown = _unknown_to_ledger(platform, batches)
    figures["platform_batches_unknown_to_ledger"] = len(unknown)
    for stranger in unknown:
        tally.fail("platform_batches_unknown_to_ledger", f"platform batch {stranger}")
    for name, count in Counter(b["name"] for b in platform).items():
        if count > 1:
            tally.fail("batches_created_twice", f"{count} platform batches named {name!r}")
    if stats["batches"] != len(platform):
        tally.notes.append(
            f"/sim/stats counts {stats['batches']} batches, its store {len(platform)}"
        )
    for intent in await pending_intents(pool):
        tally.fail(
            "intents_left_pending",
            f"batch {intent.batch_id} {intent.operation} ({intent.attempts} attempts: "
            f"{intent.last_error})",
        )
    held = {b.id: b for b in batches}
    by_platform_id = {b["batch_id"]: b for b in platform}
    _, expected = crashes(run.harness.settings.platform)
    for batch_id, status in expected.items():
        batch = held.get(batch_id)
        at_platform = by_platform_id.get(batch.platform_batch_id) if batch else None
        if batch is None or batch.status != status or at_platform is None:
            seen = (
                f"{batch.status} ({batch.platform_batch_id or 'no platform id'})" if batch else None
            )
            tally.fail(
                "batches_not_as_asked",
                f"{batch_id}: ledger {seen}, expected {status}; platform {at_platform}",
            )
    run.fault(
        f"catalog: after `starter.py batch sync`, {len(platform)} batches at the platform, "
        f"{len(batches)} in the ledger, {len(unknown)} unknown to it"
    )


async def _undecodable(run: Run, mistakes: Mistakes) -> None:
    driver, harness, tally, figures = run.driver, run.harness, _tally(run), run.result.figures
    settings = harness.settings
    foreign_keys = settings.data_dir.parent / "foreign-codec-keys.json"
    ensure_keys(foreign_keys)
    config = driver.client.config()
    config["data_converter"] = encrypted_converter(foreign_keys)
    shell = Client(**config)
    claims = ClaimService(driver.pool, shell, settings)
    deadline = time.monotonic() + run.size.converge_timeout_s
    wedged: list[Acked] = []
    for index in range(mistakes.undecodable):
        claimed = await claims.claim_started(driver.campaign, f"op-wedged-{index}")
        wedged.append(_add_coupon(run, claimed.coupon_id, claimed.user_id, claimed.workflow_id))
    run.fault(
        f"coupons: {len(wedged)} claims' workflows started by a client with another key ring "
        "(undecodable to the worker)"
    )
    # The app reports their task meanwhile: the stuck run takes the signal, cannot act on it.
    await asyncio.gather(*(driver.complete(a, "signal", deadline) for a in wedged))

    ours = {a.coupon_id for a in wedged}
    listed = await _wait_listed(run, ours)
    env = shell_env(harness)
    before = await starter(env, "coupon", "wedged", "--json")
    rows = before.json()["wedged"] if before.rc == 0 else []
    figures["wedged_before_recovery"] = len(rows)
    causes = {row["coupon_id"]: row["cause"] for row in rows}
    for coupon_id in sorted(ours):
        if causes.get(coupon_id) != UNDECODABLE:
            tally.fail(
                "wedged_not_listed",
                f"{coupon_id}: listed as {causes.get(coupon_id)} ({before.describe()}; "
                f"seen by find_wedged in time: {coupon_id in listed})",
            )
    run.fault(
        f"`starter.py coupon wedged`: {len(rows)} wedged "
        f"({', '.join(f'{c} {n}' for c, n in Counter(causes.values()).items()) or 'none'})"
    )

    recovered = await starter(env, "coupon", "recover", "--all", "--json")
    done: list[dict[str, Any]] = recovered.json()["recovered"] if recovered.out.strip() else []
    actions = {r["coupon_id"]: r["action"] for r in done}
    figures["recovered"] = sum(action == "restarted" for action in actions.values())
    # The task the app reported while the coupon was wedged, carried over to the new run.
    figures["recovered_with_task_reported_while_wedged"] = sum(
        r["coupon_id"] in ours and r["action"] == "restarted" and TASK in r["detail"] for r in done
    )
    for coupon_id in sorted(ours):
        if actions.get(coupon_id) != "restarted":
            tally.fail(
                "wedged_not_recovered",
                f"{coupon_id}: {actions.get(coupon_id)} ({recovered.describe()})",
            )
    run.fault(
        f"`starter.py coupon recover --all`: {figures['recovered']} restarted from the ledger"
    )
    # The app reports again (it was never answered): by update, answered with the state.
    await asyncio.gather(*(driver.complete(a, "update", deadline) for a in wedged))

    after = await starter(env, "coupon", "wedged", "--json")
    left = after.json()["wedged"] if after.rc == 0 else None
    figures["wedged_after_recovery"] = len(left) if left is not None else -1
    if left is None:
        tally.fail("wedged_after_recovery", after.describe())
    for row in left or []:
        tally.fail("wedged_after_recovery", f"{row['coupon_id']}: {row['cause']}")
    run.fault(f"tasks reported again; `starter.py coupon wedged`: {len(left or [])} wedged")


async def _wait_listed(run: Run, coupon_ids: set[str]) -> set[str]:
    """Until `find_wedged` lists every one of `coupon_ids` (Temporal flags them after two
    failed workflow tasks); those it listed."""
    driver = run.driver
    give_up = time.monotonic() + WEDGED_WAIT_S
    listed: set[str] = set()
    while time.monotonic() < give_up:
        found = await find_wedged(driver.pool, driver.client, run.harness.settings)
        listed = {w.coupon_id for w in found if w.cause == UNDECODABLE} & coupon_ids
        if listed == coupon_ids:
            break
        await asyncio.sleep(1.0)
    return listed


# ----- the scenario's own checks, after the common ones --------------------------------


async def check_mistakes(run: Run) -> None:
    """Every coupon of the scenario's own issued with one send (the common checks count
    them too), and `starter.py doctor` content with the stack."""
    figures = run.result.figures
    platform = await run.driver.platform_coupons()
    sends = Counter(c["user_id"] for c in platform)
    states = {
        c.coupon_id: c.state
        for c in await ledger.find_claims(
            run.driver.pool, ledger.ClaimFilter(campaign_id=run.driver.campaign, limit=100_000)
        )
    }
    for prefix, figure in (
        ("op-shell-", "following_shells_issued"),
        ("op-wedged-", "wedged_issued"),
    ):
        mine = [a for a in run.driver.acked.values() if a.user_id.startswith(prefix)]
        figures[figure] = sum(
            states.get(a.coupon_id) == "issued" and sends[a.user_id] == 1 for a in mine
        )
    # What the contradicting shells must not have written at the platform either.
    for user, count in sends.items():
        if user.startswith("op-refused-"):
            _tally(run).fail("mismatched_shells_wrote", f"{count} platform coupons for {user}")
    doctor = await starter(shell_env(run.harness), "doctor", "--json")
    figures["doctor_exit_code"] = doctor.rc
    if doctor.rc != 0:
        try:
            findings = doctor.json()["findings"]
            problems = [f"{f['part']}: {f['detail']}" for f in findings if f["ok"] is not True]
        except (ValueError, KeyError, TypeError):
            problems = [doctor.describe()]
        for problem in problems or [doctor.describe()]:
            _tally(run).fail("doctor_not_ok", problem)
    run.fault(f"`starter.py doctor`: exit {doctor.rc}")


SCENARIO = Scenario(
    name=NAME,
    description=DESCRIPTION,
    fault=make_mistakes,
    reports=lambda size, i: ["update" if i % 2 else "signal"],
    latency_ms=200,
    # `starter.py doctor` checks the stack's API too.
    api=True,
    check=check_mistakes,
    quota=quota,
    around=recorded_stack,
)
