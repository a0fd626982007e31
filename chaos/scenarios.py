"""The eight scenarios: what each injects, and the common run around it (the operator
mistakes scenario lives in `chaos.operator`).

Every scenario has the same shape: a fresh stack and campaign; claims spread over
`Size.load_s`, each followed at once by its task completion; the fault injected while
that load flows; then a bounded wait until every acknowledged coupon is issued (for the
callbacks scenario, which uses them at the platform: redeemed), the checks of
`chaos.verify` (and the scenario's own, if it has some), and last a reconciliation of the
campaign's batch (the platform's flow files against the ledger), whose mismatches must be
0 too. `converge_s` counts from the end of the fault (the moment the last part is back;
for the platform scenario, whose faults stay on through the load and a hold after it, the
moment it calms down; for the budget scenario, the moment the budget is back) to the
moment the ledger shows every coupon issued (redeemed), or 0 when they all were before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from chaos import operator as operator_mistakes
from chaos.frame import Run, Scenario, say
from chaos.harness import Acked, Driver, Harness, Via
from chaos.report import ScenarioResult
from chaos.sizes import Size
from chaos.verify import EVIDENCE_PER_KIND, verify
from coupons.contract import CATALOG_SYNC_WORKFLOW
from coupons.ledger import claims as ledger
from coupons.ledger import notifications
from coupons.model import SyncReport
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger("chaos.scenarios")

VERIFY_BUDGET_S = 60.0
# The reconciliation at the end of every scenario (well under a second at these sizes).
RECONCILE_BUDGET_S = 60.0
# What the budget scenario's look at the sync workflows after the fact may take.
OBSERVE_BUDGET_S = 30.0
# A scenario's own checks after the common ones (the callbacks scenario's ledger and
# platform reads, and its wait for the last deliveries).
CHECK_BUDGET_S = 60.0
PROGRESS_EVERY_S = 5.0
# The budget scenario cuts the budget this far into the load, so coupons claimed before
# are issued and those after wait for budget.
BUDGET_CUT_AT = 0.3


# ----- the load ----------------------------------------------------------------------


async def _one_user(run: Run, index: int, start_at: float) -> None:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    driver, size = run.driver, run.size
    user = f"u{index:05d}"
    deadline = time.monotonic() + size.converge_timeout_s
    async with run.gate:
        claims = [driver.claim(user, deadline)]
        if run.scenario.claim_twice:
            claims.append(driver.claim(user, deadline))
        answers = await asyncio.gather(*claims)
    acked = [a for a in answers if a is not None]
    if not acked:
        return
    if len({a.coupon_id for a in acked}) > 1:
        run.result.notes.append(f"user {user} got two coupons from one campaign: {acked}")
    await _report(run, acked[0], run.scenario.reports(size, index), deadline)


async def _report(run: Run, acked: Acked, vias: list[Via], deadline: float) -> None:
    async with run.gate:
        await asyncio.gather(*(run.driver.complete(acked, via, deadline) for via in vias))


async def _load(run: Run) -> None:
    n, spread = run.size.coupons, run.size.load_s
    begin = time.monotonic()
    await asyncio.gather(*(_one_user(run, i, begin + spread * i / n) for i in range(n)))
    say(run.scenario.name, f"{run.at()} load done: {_counts(run.driver)}")


def _counts(driver: Driver) -> str:
    c = driver.counters
    used = f", used at the platform {len(driver.used)}" if driver.used else ""
    return (
        f"claimed {c.claimed} (unacknowledged {c.claims_unacknowledged}), completions "
        f"acked {c.completions_acked}/{c.completions_sent} (failed {c.completions_failed})"
        f"{used}"
    )


async def _progress(run: Run) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        try:
            states = await asyncio.wait_for(run.driver.states(), timeout=3)
            ledger = ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "no claims"
        except Exception:
            ledger = "ledger unreachable"
        say(run.scenario.name, f"{run.at()} {run.phase}: {_counts(run.driver)}; {ledger}")


async def _watch_worker(run: Run) -> None:
    while True:
        await asyncio.sleep(1.0)
        run.harness.ensure_worker()


# ----- the faults --------------------------------------------------------------------


async def _sends_in_flight(run: Run, wait_s: float = 5.0) -> int:
    """Wait (up to `wait_s`) until a send is applied: with the scenario's latency the
    worker is then still waiting for its answer. Returns the sends applied so far."""
    before = (await run.driver.sim_stats())["sends_applied"]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = (await run.driver.sim_stats())["sends_applied"]
        if now > before:
            return now
    return before


async def kill_worker(run: Run, load: asyncio.Task[None]) -> float:
    harness, kills = run.harness, run.size.worker_kills
    gap = run.size.load_s / (kills + 1)
    for k in range(kills):
        await asyncio.sleep(gap if k else gap * 0.7)
        applied = await _sends_in_flight(run)
        worker = harness.stack.worker
        harness.worker_down_on_purpose = True
        pid = worker.pid
        await asyncio.to_thread(worker.kill)
        run.fault(f"SIGKILL worker pid {pid} ({applied} sends applied so far, answers pending)")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(worker.start)
        harness.worker_down_on_purpose = False
        run.fault(f"worker restarted, pid {worker.pid}")
    return time.monotonic()


async def restart_temporal(run: Run, load: asyncio.Task[None]) -> float:
    temporal = run.harness.stack.temporal
    assert temporal is not None
    modes = run.size.temporal_restarts
    gap = run.size.load_s / (len(modes) + 1)
    for mode in modes:
        await asyncio.sleep(gap)
        pid = temporal.pid
        began = time.monotonic()
        if mode == "kill":
            await asyncio.to_thread(temporal.kill)
            run.fault(f"Temporal dev server pid {pid} SIGKILLed")
        else:
            await asyncio.to_thread(temporal.stop)
            run.fault(f"Temporal dev server pid {pid} stopped (SIGTERM)")
        await asyncio.sleep(max(0.0, run.size.temporal_down_s - (time.monotonic() - began)))
        await asyncio.to_thread(temporal.start)
        run.fault(
            f"Temporal dev server back on its file database, pid {temporal.pid}, "
            f"{time.monotonic() - began:.1f} s down"
        )
    return time.monotonic()


async def postgres_outage(run: Run, load: asyncio.Task[None]) -> float:
    postgres = run.harness.stack.postgres
    assert postgres is not None
    outages = run.size.postgres_outages
    gap = run.size.load_s / (len(outages) + 1)
    for mode, down_s in outages:
        await asyncio.sleep(gap)
        pid = postgres.pid
        began = time.monotonic()
        if mode == "kill":
            await asyncio.to_thread(postgres.kill)
            run.fault(f"PostgreSQL pid {pid} and its backends SIGKILLed (crash)")
        else:
            await asyncio.to_thread(postgres.stop)
            run.fault(f"PostgreSQL pid {pid} fast shutdown")
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - began)))
        await asyncio.to_thread(postgres.start)
        run.fault(f"PostgreSQL back, pid {postgres.pid}, {time.monotonic() - began:.1f} s down")
    return time.monotonic()


def platform_knobs(size: Size) -> dict[str, object]:
    return {
        "error_rate": 0.3,
        "ambiguous_rate": 0.15,
        "ambiguous_mode": "hang",
        # Longer than the service's PLATFORM_TIMEOUT_S (5 s): the client gives up first.
        "ambiguous_hang_s": 8,
        "lookup_lag_s": size.lookup_lag_s,
        "rate_limit_per_s": size.rate_limit_per_s,
    }


async def misbehave(run: Run, load: asyncio.Task[None]) -> float:
    knobs = platform_knobs(run.size)
    await run.driver.knobs(**knobs)
    run.fault(
        "platform: 30% sends answer 5xx unapplied, 15% applied then hang 8 s past the "
        f"5 s client timeout, lookups lag {run.size.lookup_lag_s:g} s (LAG_WINDOW_S "
        f"{run.harness.settings.lag_window_s:g}), {run.size.rate_limit_per_s} requests/s"
    )
    await asyncio.sleep(run.size.load_s / 2)
    await run.driver.knobs(ambiguous_mode="5xx")
    run.fault("platform: ambiguous answers switch to applied-then-5xx")
    await load
    hold = run.size.platform_fault_hold_s
    run.fault(f"load done; the platform's faults stay on {hold:g} s more")
    await asyncio.sleep(hold)
    await run.driver.knobs(**CALM_KNOBS)
    run.fault("platform calm again")
    return time.monotonic()


async def no_fault(run: Run, load: asyncio.Task[None]) -> float:
    # The duplicates are the fault: they flow with the load.
    await load
    return time.monotonic()


async def exhaust_budget(run: Run, load: asyncio.Task[None]) -> float:
    """The batch's budget at the platform cut to 0 while completions flow, held past the
    load, then given back; the worker's catalog-sync schedule (not the driver) must see
    it back and wake the coupons that wait for it."""
    driver, size = run.driver, run.size
    await asyncio.sleep(size.load_s * BUDGET_CUT_AT)
    cut = await driver.set_batch(remaining=0)
    cut_at = time.monotonic()
    run.phase = "budget exhausted"
    run.fault(
        f"platform: batch {driver.batch_id}'s remaining budget cut to 0 "
        f"({cut['quantity']} coupons sent before); sends now answer BUDGET_EXHAUSTED"
    )
    watch = asyncio.create_task(_watch_backlog(run))
    try:
        await load
        run.fault(f"load done; the budget stays at 0 {size.budget_hold_s:g} s more")
        await asyncio.sleep(size.budget_hold_s)
    finally:
        watch.cancel()
    await _count_budget_waits(run)
    # No send applies while the budget is 0, so this count is the one the restore needs
    # to give the batch back its whole quantity.
    sent = len(await driver.platform_coupons())
    # Marked before the budget is back: a sync that ends after this mark but read the
    # platform before the restore saw no budget and woke nobody.
    run.marks["budget_back"] = time.time()
    back = await driver.set_batch(remaining=driver.batch_quantity - sent)
    restored_at = time.monotonic()
    run.phase = "budget back"
    run.result.figures["budget_zero_s"] = round(restored_at - cut_at, 1)
    run.fault(
        f"platform: budget back, remaining {back['remaining']} of {back['quantity']} "
        f"({sent} sent); left to the catalog-sync schedule (every "
        f"{run.harness.settings.sync_interval_s:g} s) to notice"
    )
    return restored_at


async def _watch_backlog(run: Run) -> None:
    """What the schedule's syncs record in the ledger while the budget is 0: the backlog
    of usable coupons waiting for budget, and the drift they flag."""
    figures = run.result.figures
    figures.setdefault("syncs_while_exhausted", 0)
    figures.setdefault("backlog_seen_by_sync", 0)
    # The last sync before the cut: every sync after it counts.
    before = await run.driver.ledger_batch()
    last_sync = before.synced_at if before is not None else None
    while True:
        await asyncio.sleep(0.5)
        try:
            batch = await run.driver.ledger_batch()
        except Exception as err:
            log.info("batch unreadable while watching: %s", err)
            continue
        if batch is None or batch.synced_at == last_sync:
            continue
        figures["syncs_while_exhausted"] += 1
        last_sync = batch.synced_at
        if batch.remaining == 0 and batch.backlog > figures["backlog_seen_by_sync"]:
            figures["backlog_seen_by_sync"] = batch.backlog
            budget_drift = [d for d in batch.drift if "budget" in d]
            if budget_drift:
                run.fault(f"catalog sync: remaining 0, drift flagged: {budget_drift[0]}")


async def _count_budget_waits(run: Run) -> None:
    """The coupons that wait for budget as the budget comes back: usable in the ledger,
    and the workflow says what it waits for."""
    driver = run.driver
    usable = await ledger.list_claims(driver.pool, driver.campaign, state="usable", limit=100_000)
    waiting = 0
    for claim in usable:
        acked = driver.acked.get(claim.coupon_id)
        if acked is None:
            continue
        try:
            status = await asyncio.wait_for(
                driver.handle(acked).query(UserCouponWorkflow.status), timeout=10
            )
        except Exception as err:
            log.info("status of %s unreadable: %s", claim.coupon_id, err)
            continue
        if "budget" in status.waiting_for:
            waiting += 1
    run.result.figures["usable_when_budget_back"] = len(usable)
    run.result.figures["waiting_for_budget"] = waiting
    run.fault(f"{len(usable)} coupons usable, {waiting} of them waiting for budget")


async def observe_wakes(run: Run) -> None:
    """From the schedule's sync runs that ended after the budget came back: how many
    coupons they woke, and how soon after the budget the first wake-up sync ended."""
    back = run.marks.get("budget_back")
    if back is None:
        return
    client, batch_id = run.driver.client, run.driver.ledger_batch_id
    woken = 0
    first: list[float] = []
    query = f"WorkflowType = '{CATALOG_SYNC_WORKFLOW}' AND ExecutionStatus = 'Completed'"
    async for execution in client.list_workflows(query):
        ended = execution.close_time
        if ended is None or ended.timestamp() < back:
            continue
        handle = client.get_workflow_handle(
            execution.id, run_id=execution.run_id, result_type=SyncReport
        )
        report = await handle.result()
        for synced in report.batches:
            if synced.batch_id == batch_id and synced.woken:
                woken += synced.woken
                first.append(ended.timestamp() - back)
    run.result.figures["woken_by_sync"] = woken
    if first:
        run.result.figures["first_wake_after_budget_s"] = round(min(first), 2)


# ----- the callbacks scenario ---------------------------------------------------------

# The platform's callback faults: each COUPON.USED notification delivered a second time
# after its first success at this rate, and preceded by a forged probe (alternately signed
# with a wrong key, or the genuine signature over a tampered body) at this rate; a failed
# delivery retried after 0.25 s, doubling (capped at 60 s), given up only after 20 attempts.
CALLBACK_FAULT_KNOBS: dict[str, object] = {
    "callback_duplicate_rate": 0.5,
    "callback_forged_rate": 0.5,
    "callback_retry_s": 0.25,
    "callback_max_attempts": 20,
}
CALLBACK_CAUSE = "redeemed (callback)"
# The platform answers each send this long after applying it, in the callbacks scenario.
CALLBACKS_SEND_LATENCY_MS = 500
# The till looks at the platform's coupons this often, and uses each new one after the
# next of these delays in turn: a notice for one used at once overtakes our own receipt
# of the send (the send's answer is CALLBACKS_SEND_LATENCY_MS late), so the API answers
# 409 and the platform delivers it again; the later ones find the receipt.
TILL_EVERY_S = 0.25
USE_DELAYS_S = (0.0, 0.5, 1.0, 2.0)
# At the end, how long the platform's last deliveries (a retry, a duplicate) may take.
PENDING_WAIT_S = 30.0
# The simulator's line for a failed delivery, and what failed.
_FAILED_DELIVERY = re.compile(r"notification \S+ attempt \d+ failed \((.*)\), next in")
# The API's line for a notification it took: applied, duplicate or finished.
_TAKEN = re.compile(r"callback \S+: platform coupon \S+ used at \S+: (\w+)$")


async def use_and_call_back(run: Run, load: asyncio.Task[None]) -> float:
    """Coupons used at the platform while they are issued; their callbacks duplicated,
    forged and, while the API is down, retried. Returns once every coupon the platform
    sent is used: the moment the API was back for the last time."""
    driver, size = run.driver, run.size
    await driver.knobs(**CALLBACK_FAULT_KNOBS)
    run.fault(
        "platform: each coupon it sends is used by a till 0 to 2 s later (not waiting for "
        "our receipt); each COUPON.USED callback delivered again at rate 0.5, after a "
        "forged probe at rate 0.5; failed deliveries retried after 0.25 s, doubling"
    )
    till = asyncio.create_task(_till(run, load))
    back_at = time.monotonic()
    try:
        gap = size.load_s / (len(size.api_outages) + 1)
        for mode, down_s in size.api_outages:
            await asyncio.sleep(gap)
            back_at = await _api_outage(run, mode, down_s)
        await till
    finally:
        till.cancel()
    run.fault(f"till done: {len(driver.used)} coupons used at the platform")
    return back_at


async def _till(run: Run, load: asyncio.Task[None]) -> None:
    """A shop's till: every coupon the platform has sent is used there, each after the
    next of USE_DELAYS_S, until every acknowledged coupon's is (or the bound runs out)."""
    driver = run.driver
    seen: set[str] = set()
    uses: list[asyncio.Task[None]] = []
    give_up_at: float | None = None

    async def use_after(coupon: dict[str, Any], delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await driver.use(coupon["coupon_id"], coupon["user_id"])

    try:
        while True:
            for coupon in await driver.platform_coupons():
                if coupon["coupon_id"] in seen or coupon["status"] != "sent":
                    continue
                delay_s = USE_DELAYS_S[len(seen) % len(USE_DELAYS_S)]
                seen.add(coupon["coupon_id"])
                uses.append(asyncio.create_task(use_after(coupon, delay_s)))
            if load.done():
                if len(seen) >= len(driver.acked):
                    break
                give_up_at = give_up_at or time.monotonic() + run.size.converge_timeout_s
                if time.monotonic() >= give_up_at:
                    run.result.notes.append(
                        f"the till saw {len(seen)} coupons at the platform of "
                        f"{len(driver.acked)} acknowledged within "
                        f"{run.size.converge_timeout_s:.0f} s of the load"
                    )
                    break
            await asyncio.sleep(TILL_EVERY_S)
        await asyncio.gather(*uses)
    finally:
        for use in uses:
            use.cancel()


async def _api_outage(run: Run, mode: str, down_s: float) -> float:
    """The API process stopped (`stop`: SIGTERM, graceful) or SIGKILLed (`kill`), started
    again `down_s` later; the moment it answers its health check again."""
    harness = run.harness
    api = harness.api
    pid, used, phase = api.pid, len(run.driver.used), run.phase
    began = time.monotonic()
    run.phase = "API down"
    if mode == "kill":
        await asyncio.to_thread(api.kill)
        run.fault(f"API pid {pid} SIGKILLed ({used} coupons used so far)")
    else:
        await asyncio.to_thread(api.stop)
        run.fault(f"API pid {pid} stopped (SIGTERM, graceful; {used} coupons used so far)")
    await asyncio.sleep(max(0.0, down_s - (time.monotonic() - began)))
    await asyncio.to_thread(harness.stack.start_api)
    back_at = time.monotonic()
    run.phase = phase
    down = back_at - began
    figures = run.result.figures
    figures["api_down_s"] = round(figures.get("api_down_s", 0) + down, 1)
    run.fault(f"API back (healthy), pid {api.pid}, {down:.1f} s down")
    return back_at


async def check_callbacks(run: Run) -> None:
    """Every used coupon redeemed through its callback, with one redemption event and one
    applied notification; no forged probe accepted, no notification given up or left
    pending. Figures: the time from use to redeemed, what the platform's deliveries met."""
    driver, result = run.driver, run.result
    checks = result.checks
    for name in (
        "not_redeemed_by_callback",
        "redemption_events_not_one",
        "notifications_applied_not_one",
        "callbacks_forged_accepted",
        "callbacks_given_up",
        "callbacks_pending",
    ):
        checks[name] = 0
    # A retry after a killed API's lost answer, or a duplicate, may still be on its way.
    deadline = time.monotonic() + PENDING_WAIT_S
    stats = await driver.sim_stats()
    while stats["callbacks_pending"] and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        stats = await driver.sim_stats()
    for name in ("callbacks_forged_accepted", "callbacks_given_up", "callbacks_pending"):
        checks[name] = stats[name]
    attempts = {n["coupon_id"]: n["attempts"] for n in await driver.notifications()}

    evidence: list[str] = []
    all_ms: list[float] = []
    first_try_ms: list[float] = []
    redeemed = await driver.redemptions()
    for acked in driver.acked.values():
        platform_id, redemptions = redeemed.get(acked.coupon_id, (None, []))
        applied = await notifications.count_applied(driver.pool, platform_id) if platform_id else 0
        causes = [r.cause for r in redemptions]
        problems = []
        if causes != [CALLBACK_CAUSE]:
            problems.append("not_redeemed_by_callback")
        if len(redemptions) != 1:
            problems.append("redemption_events_not_one")
        if applied != 1:
            problems.append("notifications_applied_not_one")
        for problem in problems:
            checks[problem] += 1
        if problems and len(evidence) < EVIDENCE_PER_KIND:
            evidence.append(
                f"{acked.coupon_id} (platform {platform_id}, used "
                f"{platform_id in driver.used}): redemptions {causes}, notifications "
                f"applied {applied}, delivery attempts {attempts.get(platform_id or '')}"
            )
        if len(redemptions) == 1:
            ms = redemptions[0].use_to_recorded_s * 1000
            all_ms.append(ms)
            if attempts.get(platform_id or "") == 1:
                first_try_ms.append(ms)
    if evidence:
        result.evidence["callbacks"] = evidence

    failures = Counter(_failure_kind(m) for m in _log_matches(run, "simulator", _FAILED_DELIVERY))
    figures = result.figures
    figures["coupons_used"] = len(driver.used)
    _latency_figures(figures, "use_to_redeemed_ms", all_ms)
    _latency_figures(figures, "use_to_redeemed_first_attempt_ms", first_try_ms)
    figures["notifications_retried"] = sum(1 for n in attempts.values() if n > 1)
    figures["delivery_attempts_max"] = max(attempts.values(), default=0)
    for name in (
        "callbacks_delivered",
        "callbacks_duplicated",
        "callbacks_forged_sent",
        "callback_attempts_failed",
    ):
        figures[name] = stats[name]
    figures["failed_api_unreachable"] = failures["unreachable"]
    figures["failed_409_before_receipt"] = failures["409"]
    figures["failed_other"] = failures["other"]
    answers = Counter(_log_matches(run, "api", _TAKEN))
    for answer in ("applied", "duplicate", "finished"):
        figures[f"api_answered_{answer}"] = answers[answer]
    figures["forged_rejected_by_api"] = _log_count(run, "api", "rejected:")
    say(
        run.scenario.name,
        f"{run.at()} use to redeemed p50 {figures.get('use_to_redeemed_ms_p50')} ms, max "
        f"{figures.get('use_to_redeemed_ms_max')} ms; callbacks: {stats['callbacks_delivered']} "
        f"delivered, {stats['callbacks_duplicated']} duplicated, "
        f"{stats['callbacks_forged_sent']} forged ({stats['callbacks_forged_accepted']} "
        f"accepted), {stats['callback_attempts_failed']} attempts failed (API unreachable "
        f"{failures['unreachable']}, 409 before our receipt {failures['409']}), "
        f"{stats['callbacks_given_up']} given up",
    )


def _latency_figures(figures: dict[str, float | int], name: str, ms: list[float]) -> None:
    figures[f"{name}_count"] = len(ms)
    if ms:
        figures[f"{name}_p50"] = round(statistics.median(ms))
        figures[f"{name}_max"] = round(max(ms))


def _failure_kind(error: str) -> str:
    if error.startswith("HTTP 409"):
        return "409"
    if error.startswith("HTTP "):
        return "other"
    return "unreachable"  # refused, reset or timed out: the API was down


def _log_lines(harness: Harness, name: str) -> list[str]:
    path = harness.settings.data_dir / "logs" / f"{name}.log"
    try:
        with path.open(errors="replace") as log_file:
            return log_file.readlines()
    except OSError:
        return []


def _log_matches(run: Run, name: str, pattern: re.Pattern[str]) -> list[str]:
    found = (pattern.search(line) for line in _log_lines(run.harness, name))
    return [match.group(1) for match in found if match is not None]


def _log_count(run: Run, name: str, text: str) -> int:
    return sum(text in line for line in _log_lines(run.harness, name))


CALM_KNOBS: dict[str, object] = {
    "error_rate": 0,
    "ambiguous_rate": 0,
    "lookup_lag_s": 0,
    "rate_limit_per_s": 0,
    "latency_ms": 0,
}


def _mixed(size: Size, index: int) -> list[Via]:
    # Signals and updates interleaved, starting with either, all sent at once.
    first: list[Via] = ["signal", "update"] if index % 2 else ["update", "signal"]
    return [first[i % 2] for i in range(size.duplicates)]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="worker_kill",
            description="The worker SIGKILLed while sends are in flight (the simulator answers "
            "1.5 s after applying each send), several times, and restarted by the driver.",
            fault=kill_worker,
            reports=lambda size, i: ["signal"],
            latency_ms=1500,
        ),
        Scenario(
            name="temporal_restart",
            description="The Temporal dev server (file database) restarted while claims and "
            "completions flow: once gracefully, once SIGKILLed (quick/full), down 10 s each "
            "at full size (5 s quick, 3 s tiny).",
            fault=restart_temporal,
            reports=lambda size, i: ["update" if i % 2 else "signal"],
            latency_ms=200,
        ),
        Scenario(
            name="postgres_outage",
            description="PostgreSQL down while claims and completions flow (10 s per outage at "
            "full size, a fast shutdown and a crash; 5 s quick and 3 s tiny, a crash).",
            fault=postgres_outage,
            reports=lambda size, i: ["update" if i % 2 else "signal"],
            latency_ms=200,
        ),
        Scenario(
            name="platform_faults",
            description="The platform misbehaving throughout: 30% 5xx, ambiguous answers "
            "(applied, then a hang past the client timeout or a 5xx), lookup lag at or past "
            "LAG_WINDOW_S (30 s full), rate limiting; on through the load and a hold after "
            "it, then calm (converge_s counts from the calm).",
            fault=misbehave,
            reports=lambda size, i: ["update" if i % 2 else "signal"],
            lag_window=lambda size: size.lag_window_s,
        ),
        Scenario(
            name="budget_exhausted",
            description="The batch's remaining budget at the platform cut to 0 while claims "
            "and completions flow (sends answer BUDGET_EXHAUSTED: usable coupons must wait, "
            "not fail), held past the load (30 s full, 10 s quick, 3 s tiny), then given "
            "back; the worker's catalog-sync schedule (SYNC_INTERVAL_S 5 s full, 3 s quick, "
            "2 s tiny) sees it back and wakes them (converge_s counts from the budget's "
            "return).",
            fault=exhaust_budget,
            reports=lambda size, i: ["update" if i % 2 else "signal"],
            latency_ms=200,
            sync_interval=lambda size: size.sync_interval_s,
            observe=observe_wakes,
        ),
        Scenario(
            name="duplicate_reports",
            description="Every claim made twice at once, every completion reported several "
            "times at once, signals and updates mixed, and again after the coupon is issued.",
            fault=no_fault,
            reports=_mixed,
            latency_ms=300,
            claim_twice=True,
            late_duplicates=True,
        ),
        Scenario(
            name="callbacks",
            description="Coupons used at the platform as they are issued (a till uses each "
            "0 to 2 s after the platform sent it, some before our receipt is recorded); "
            "every COUPON.USED callback to the API delivered again at rate 0.5 and preceded "
            "by a forged probe at rate 0.5; the API stopped (SIGTERM) and SIGKILLed while "
            "coupons are used, down 10 s each at full size (4 s quick; tiny: one SIGKILL, "
            "3 s), so the platform retries. Each coupon must end redeemed through the "
            "callback, with one redemption event and one applied notification; no forged "
            "probe accepted, none given up (converge_s counts from the API's last return).",
            fault=use_and_call_back,
            reports=lambda size, i: ["update" if i % 2 else "signal"],
            latency_ms=CALLBACKS_SEND_LATENCY_MS,
            final_state="redeemed",
            api=True,
            check=check_callbacks,
        ),
        Scenario(
            name=operator_mistakes.NAME,
            description=operator_mistakes.DESCRIPTION,
            fault=operator_mistakes.make_mistakes,
            reports=lambda size, i: ["update" if i % 2 else "signal"],
            latency_ms=200,
            # `starter.py doctor` checks the stack's API too.
            api=True,
            check=operator_mistakes.check_mistakes,
            quota=operator_mistakes.quota,
            around=operator_mistakes.recorded_stack,
        ),
    )
}


# ----- one scenario, start to verdict ------------------------------------------------


async def _drive(scenario: Scenario, size: Size, harness: Harness, result: ScenarioResult) -> None:
    async with Driver(harness, f"chaos-{scenario.name}", scenario.name) as driver:
        await driver.create_campaign(quota=scenario.quota(size))
        if scenario.latency_ms:
            await driver.knobs(latency_ms=scenario.latency_ms)
        run = Run(scenario, size, harness, driver, result)
        say(scenario.name, f"stack up; {size.coupons} users over {size.load_s:g} s")
        helpers = [asyncio.create_task(_progress(run)), asyncio.create_task(_watch_worker(run))]
        try:
            await asyncio.wait_for(_phases(run), timeout=size.hard_timeout_s)
        except TimeoutError:
            result.notes.append(
                f"hard timeout: load, faults and convergence took over "
                f"{size.hard_timeout_s:.0f} s; checked as found"
            )
        finally:
            for helper in helpers:
                helper.cancel()
        await _restore(run)
        run.phase = "verify"
        await asyncio.wait_for(
            verify(driver, result, scenario.final_state), timeout=VERIFY_BUDGET_S
        )
        if scenario.check is not None:
            await asyncio.wait_for(scenario.check(run), timeout=CHECK_BUDGET_S)
        if scenario.late_duplicates and result.converge_s is not None:
            await _late_duplicates(run)
        if scenario.observe is not None:
            try:
                await asyncio.wait_for(scenario.observe(run), timeout=OBSERVE_BUDGET_S)
            except Exception as err:
                result.notes.append(f"could not read the scenario's figures: {err!r}")
        await _reconcile(run)
        c = driver.counters
        result.coupons = len(driver.acked)
        result.claims_unacknowledged = c.claims_unacknowledged
        result.completions_sent = c.completions_sent
        result.completions_failed = c.completions_failed
        if c.retried:
            retried = ", ".join(f"{kind} {n}" for kind, n in sorted(c.retried.items()))
            result.notes.append(f"driver calls retried while a part was down: {retried}")
        if c.delayed:
            delayed = ", ".join(f"{kind} {n}" for kind, n in sorted(c.delayed.items()))
            result.notes.append(f"driver calls that took over 2 s (held up by a fault): {delayed}")
        result.notes += [f"refused: {r}" for r in c.refusals[:10]]
        result.notes += harness.worker_restarts
        repairs = _worker_log_count(harness, "repairing claim")
        if repairs:
            result.notes.append(
                f"the worker's repair loop started {repairs} workflows whose claim had not yet "
                "confirmed its start (held up by the fault; the start is idempotent by workflow id)"
            )
        result.platform_stats = await driver.sim_stats()


async def _phases(run: Run) -> None:
    load = asyncio.create_task(_load(run))
    try:
        fault_end = await run.scenario.fault(run, load)
        await load
    finally:
        load.cancel()
    run.phase = "converging"
    state = run.scenario.final_state
    reached_at = await run.driver.wait_all_in(state, run.size.converge_timeout_s)
    if reached_at is None:
        run.result.notes.append(
            f"not every coupon {state} within {run.size.converge_timeout_s:.0f} s of the load"
        )
        return
    run.result.converge_s = round(max(0.0, reached_at - fault_end), 2)
    say(run.scenario.name, f"{run.at()} all {len(run.driver.acked)} coupons {state}")


def _worker_log_count(harness: Harness, text: str) -> int:
    path = harness.settings.data_dir / "logs" / "worker.log"
    try:
        with path.open(errors="replace") as log_file:
            return sum(text in line for line in log_file)
    except OSError:
        return 0


async def _restore(run: Run) -> None:
    """Every part up and the platform calm, so the checks see the final state."""
    stack = run.harness.stack
    for name, part in (("PostgreSQL", stack.postgres), ("Temporal", stack.temporal)):
        if part is not None and not part.alive:
            run.result.notes.append(f"{name} was down at the end of the run: started for checks")
            try:
                await asyncio.to_thread(part.start)
            except Exception as err:
                # A start the hard timeout interrupted may still be under way.
                run.result.notes.append(f"starting {name} for the checks: {err}")
    api = stack.api
    if api is not None and not api.alive:
        run.result.notes.append("the API was down at the end of the run: started for checks")
        try:
            await asyncio.to_thread(stack.start_api)
        except Exception as err:
            run.result.notes.append(f"starting the API for the checks: {err}")
    run.harness.worker_down_on_purpose = False
    run.harness.ensure_worker()
    await run.driver.knobs(**CALM_KNOBS)


async def _reconcile(run: Run) -> None:
    """The reconciliation of the campaign's batch, check only: the platform's sent and
    used flows against the ledger. Every mismatch counts against the scenario."""
    result, began = run.result, time.monotonic()
    try:
        report = await run.driver.reconcile(RECONCILE_BUDGET_S)
    except Exception as err:
        log.exception("reconciliation failed")
        result.notes.append(f"reconciliation could not run: {type(err).__name__}: {err}")
        return
    took = time.monotonic() - began
    result.reconcile_mismatches = report.mismatches
    for batch in report.batches:
        result.notes.append(
            f"reconciliation (check only) of batch {batch.batch_id} in {took:.2f} s: platform "
            f"sent {batch.platform_sent}, used {batch.platform_used}; ledger "
            f"{batch.ledger_coupons} coupons; {len(batch.mismatches)} mismatches"
        )
        if batch.mismatches:
            result.evidence["reconcile_mismatches"] = [
                f"{m.kind} {m.coupon_id or m.platform_coupon_id}: {m.detail}"
                for m in batch.mismatches[:EVIDENCE_PER_KIND]
            ]
    say(run.scenario.name, f"{run.at()} reconciled: {report.mismatches} mismatches")


async def _late_duplicates(run: Run) -> None:
    """Report every issued coupon's task again, both ways: answered, never refused."""
    deadline = time.monotonic() + 60
    before = (await run.driver.sim_stats())["sends_applied"]
    coupons = list(run.driver.acked.values())
    await asyncio.gather(
        *(_report(run, acked, ["signal", "update"], deadline) for acked in coupons)
    )
    after = (await run.driver.sim_stats())["sends_applied"]
    if after != before:
        run.result.duplicate_sends += after - before
        run.result.notes.append(f"late duplicate reports caused {after - before} new sends")
    run.fault(f"late duplicates: {len(coupons)} coupons reported done again (signal + update)")


def execute(name: str, size: Size, root: Path) -> ScenarioResult:
    """Run one scenario on a fresh stack under `root`; always stops what it started."""
    scenario = SCENARIOS[name]
    result = ScenarioResult(name=name, description=scenario.description, size=size.name)
    began = time.monotonic()
    harness = Harness(
        root,
        lag_window_s=scenario.lag_window(size),
        sync_interval_s=scenario.sync_interval(size),
        api=scenario.api,
    )
    around = scenario.around(harness) if scenario.around else contextlib.nullcontext()
    with around:
        try:
            harness.start()
            asyncio.run(_drive(scenario, size, harness, result))
        except Exception as err:
            log.exception("scenario %s failed", name)
            result.error = f"{type(err).__name__}: {err}"
        finally:
            harness.stop()
            result.wall_s = round(time.monotonic() - began, 1)
    return result
