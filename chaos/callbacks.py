"""The callbacks family: coupons used at the platform's till as they are issued, their
COUPON.USED callbacks duplicated, forged and, while the API is stopped or killed, retried
(`use_and_call_back`); `check_callbacks` then counts what must be 0 (each coupon redeemed
once through its callback, no forged probe accepted, none given up) and reads the figures
(use to redeemed, what the platform's deliveries met, what the API answered)."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections import Counter
from typing import Any

from chaos.frame import Run, Scenario, say
from chaos.harness import Harness
from chaos.verify import EVIDENCE_PER_KIND
from coupons.ledger import notifications

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
            await _uses_under_way(run, gap)
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


async def _uses_under_way(run: Run, within_s: float, since: int | None = None) -> None:
    """Until the till has used more coupons than `since` (by default, than now), at most
    `within_s`: an outage that starts between uses, or before the first one on a slow
    machine, would meet no callback."""
    used = len(run.driver.used) if since is None else since
    until = time.monotonic() + within_s
    while time.monotonic() < until:
        if len(run.driver.used) > used:
            return
        await asyncio.sleep(0.01)


async def _api_outage(run: Run, mode: str, down_s: float) -> float:
    """The API process stopped (`stop`: SIGTERM, graceful) or SIGKILLed (`kill`), started
    again `down_s` later, or later still once the till has used a coupon while it was
    down; the moment it answers its health check again."""
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
    used_when_down = len(run.driver.used)
    await asyncio.sleep(max(0.0, down_s - (time.monotonic() - began)))
    # Down at least until the till has used a coupon meanwhile, so that the platform meets
    # the stopped API: on a loaded machine the sends can come slower than the outage lasts.
    await _uses_under_way(run, run.size.converge_timeout_s, since=used_when_down)
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


CALLBACKS = Scenario(
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
)
