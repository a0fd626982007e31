"""The common run around every scenario: its load, its progress lines, and the driving
from a fresh stack to the verdict (`execute`). The scenarios themselves, one module per
family, are put together in `chaos.scenarios`; this module knows none of them.

Every scenario has the same shape: a fresh stack and campaign; claims spread over
`Size.load_s`, each followed at once by its task completion (or the scenario's own load:
the claim burst's waves); the fault injected while that load flows; then a bounded wait
until every acknowledged coupon is issued (for the callbacks scenario, which uses them at
the platform: redeemed), the checks of
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
import time
from pathlib import Path

from chaos.frame import CALM_KNOBS, Run, Scenario, say
from chaos.harness import Acked, Driver, Harness, Via
from chaos.report import ScenarioResult
from chaos.sizes import Size
from chaos.verify import EVIDENCE_PER_KIND, verify

log = logging.getLogger("chaos.drive")

VERIFY_BUDGET_S = 60.0
# The reconciliation at the end of every scenario (well under a second at these sizes).
RECONCILE_BUDGET_S = 60.0
# What the budget scenario's look at the sync workflows after the fact may take.
OBSERVE_BUDGET_S = 30.0
# A scenario's own checks after the common ones (the callbacks scenario's ledger and
# platform reads, and its wait for the last deliveries).
CHECK_BUDGET_S = 60.0
PROGRESS_EVERY_S = 5.0


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
    say(run.scenario.name, f"{n} users over {spread:g} s")
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


# ----- one scenario, start to verdict ------------------------------------------------


async def _drive(scenario: Scenario, size: Size, harness: Harness, result: ScenarioResult) -> None:
    async with Driver(harness, f"chaos-{scenario.name}", scenario.name) as driver:
        await driver.create_campaign(quota=scenario.quota(size))
        if scenario.latency_ms:
            await driver.knobs(latency_ms=scenario.latency_ms)
        run = Run(scenario, size, harness, driver, result)
        say(scenario.name, "stack up")
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
    load = asyncio.create_task((run.scenario.load or _load)(run))
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


def execute(scenario: Scenario, size: Size, root: Path) -> ScenarioResult:
    """Run one scenario on a fresh stack under `root`; always stops what it started."""
    name = scenario.name
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
