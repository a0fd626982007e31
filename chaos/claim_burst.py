"""The claim burst family: a flash sale. The campaign's quota is released in drops, one
per wave, and each drop is rushed by a wave of users at once, three per coupon, one in
three claiming in process (`ClaimService`, as an app embedding the service), the others
through the HTTP API. Meanwhile the worker (it starts and runs the coupons' workflows),
the API, PostgreSQL and (quick, full) the Temporal dev server are SIGKILLed, each in a
random wave once a random share of its users is answered (`kill_during_burst`), and
started again. Two of every three granted coupons have their task reported through the
API the instant their claim is answered (its workflow may not exist yet), the third a
moment later.

Once every acknowledged coupon is issued, `check_burst` counts what must be 0: claims over
the quota, a `claimed` counter apart from the claims, an acknowledged claim the ledger
does not hold, a refused user holding a coupon (or a `sold_out` below the final quota), a
claim never answered, a ledger claim whose workflow id has no run or more than one in
Temporal (or whose `workflow_started` is still false), a task report refused, never
acknowledged, or acknowledged and lost (its coupon never `usable`). The common checks
(`chaos.verify`) count the lost coupons and the duplicate sends.

The kill points come from a seed, printed with the faults: `CHAOS_SEED=<seed>` replays
the same ones (the calls they meet still vary with timing)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from temporalio.client import WorkflowExecution

from chaos.frame import Run, Scenario, say
from chaos.harness import Via
from chaos.sizes import Size
from chaos.verify import EVIDENCE_PER_KIND
from coupons.catalog.campaigns import update_campaign
from coupons.errors import Refused
from coupons.ledger import claims as ledger
from coupons.ledger.campaigns import Campaign, get_campaign

log = logging.getLogger("chaos.claim_burst")

SEED_ENV = "CHAOS_SEED"
# One per scenario process (each scenario runs in a child of its own).
SEED = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1_000_000))
SOLD_OUT = "sold_out"
# The third of the granted coupons reported late wait this long (uniform) after the answer.
LATE_REPORT_S = (0.5, 2.5)
# A coupon whose task counted is in one of these states (or wrong, which verify counts).
TASK_COUNTED = frozenset({"usable", "issued", "redeemed"})
# How long Temporal's visibility and the starts' confirmations in the ledger may take to
# show one workflow per claim once every coupon is issued.
WORKFLOWS_SETTLE_S = 15.0
# The users of a wave arrive within this long of its drop, each at a random moment (people
# do not press at the same microsecond, and the in-process path, quicker than the API's,
# would otherwise take every drop).
WAVE_SPREAD_S = 0.2
# Calls in flight at once from the burst: every user of a wave at once (far below the dev
# server's trouble zone at these sizes).
BURST_CONCURRENCY = 300


@dataclass(frozen=True)
class Kill:
    part: str
    wave: int
    # The share of the wave's users answered when the kill lands: mid-wave, while its
    # claims and their reports are in flight.
    answered: float
    down_s: float


def _wave_at(size: Size, wave: int) -> float:
    return wave * size.burst_s / size.burst_waves


def _wave_of(size: Size, index: int) -> int:
    """Users in contiguous blocks, so each wave has both paths and both report kinds."""
    return index * size.burst_waves // size.burst_users


def plan(size: Size, seed: int) -> list[Kill]:
    """Each kill during a distinct random wave (in the size's order), once a random share
    of that wave's users has been answered."""
    rng = random.Random(seed)
    waves = sorted(rng.sample(range(size.burst_waves), len(size.burst_kills)))
    return [
        Kill(part, wave, round(rng.uniform(0.1, 0.9), 2), down_s)
        for (part, down_s), wave in zip(size.burst_kills, waves, strict=True)
    ]


def _users_of(size: Size, wave: int) -> list[str]:
    return [f"u{i:05d}" for i in range(size.burst_users) if _wave_of(size, i) == wave]


# ----- the load -------------------------------------------------------------------


def _via_api(index: int) -> bool:
    """Two users in three claim through the API (the one an outage keeps waiting)."""
    return index % 3 != 0


def _reported_late(index: int) -> bool:
    return index % 3 == 2


def _report_via(index: int) -> Via:
    return "update" if (index // 2) % 2 else "signal"


async def burst(run: Run) -> None:
    """Wave after wave: a drop of the quota, then every user of the wave claims at once;
    each granted coupon's task is reported through the API at once (or, one in three, a
    moment later)."""
    driver, size = run.driver, run.size
    await driver.open_api()
    run.gate = asyncio.Semaphore(BURST_CONCURRENCY)
    rng = random.Random(f"{SEED} users")
    arrivals = [rng.uniform(0, WAVE_SPREAD_S) for _ in range(size.burst_users)]
    delays = [
        rng.uniform(*LATE_REPORT_S) if _reported_late(i) else 0.0 for i in range(size.burst_users)
    ]
    deadline = time.monotonic() + size.converge_timeout_s

    async def user(index: int) -> None:
        await asyncio.sleep(arrivals[index])
        async with run.gate:
            acked = await driver.claim(f"u{index:05d}", deadline, api=_via_api(index))
        if acked is None:
            return
        await asyncio.sleep(delays[index])
        async with run.gate:
            await driver.complete(acked, _report_via(index), deadline, api=True)

    # One drop at a time, in order (the lock is fair, the waves come in order): a drop held
    # up by an outage must not land after the next and lower the quota again.
    drops = asyncio.Lock()

    async def wave(number: int) -> None:
        await asyncio.sleep(max(0.0, run.t0 + _wave_at(size, number) - time.monotonic()))
        async with drops:
            await _release(run, _quota_after(run, number), deadline)
        await asyncio.gather(*(user(int(u[1:])) for u in _users_of(size, number)))

    quota = run.scenario.quota(size)
    say(
        run.scenario.name,
        f"{size.burst_users} users claim a quota of {quota}, released in {size.burst_waves} "
        f"drops over {size.burst_s:g} s, each drop rushed by the next wave of users at once",
    )
    await asyncio.gather(*(wave(number) for number in range(size.burst_waves)))
    c = driver.counters
    say(
        run.scenario.name,
        f"{run.at()} burst done: {c.claimed} granted, {len(driver.refused)} refused, "
        f"completions acked {c.completions_acked}/{c.completions_sent}",
    )


def _quota_after(run: Run, wave: int) -> int:
    """The campaign's quota once `wave`'s drop is out: an equal share per wave."""
    return run.scenario.quota(run.size) * (wave + 1) // run.size.burst_waves


async def _release(run: Run, quota: int, deadline: float) -> None:
    """Raise the campaign's quota to `quota`, as its operator does at each drop; tried
    again while PostgreSQL is down."""
    while True:
        try:
            await update_campaign(run.driver.pool, run.driver.campaign, quota=quota)
            return
        except Refused:
            raise
        except Exception as err:
            if time.monotonic() >= deadline:
                raise
            log.info("raising the quota to %d: %r; trying again", quota, err)
            await asyncio.sleep(0.5)


# ----- the faults -----------------------------------------------------------------


async def kill_during_burst(run: Run, load: asyncio.Task[None]) -> float:
    """The size's kills at the plan's points: the worker's one after the other, and apart
    from them those of the API and the servers, one after the other (the API does not
    start while Temporal or PostgreSQL is down: killed during their outage, it would stay
    down until they are back, and its users out of the burst). The moment the last part
    was back."""
    kills = plan(run.size, SEED)
    run.fault(
        f"seed {SEED} ({SEED_ENV}={SEED} replays these points): "
        + ", ".join(f"{k.part} in wave {k.wave} at {k.answered:.0%} answered" for k in kills)
    )
    chains: dict[bool, list[Kill]] = defaultdict(list)
    for kill in kills:
        chains[kill.part == "worker"].append(kill)
    backs = await asyncio.gather(*(_one_by_one(run, chain) for chain in chains.values()))
    run.result.figures["kills"] = len(kills)
    return max(backs, default=time.monotonic())


async def _one_by_one(run: Run, kills: list[Kill]) -> float:
    back = time.monotonic()
    for kill in kills:
        await _mid_wave(run, kill)
        back = await _outage(run, kill)
    return back


async def _mid_wave(run: Run, kill: Kill) -> None:
    """Until the kill's share of its wave is answered and some of the driver's calls are
    in flight (at most half the gap to the next wave past its start: a wave held up by
    another fault is met while it waits). A wave answered in a few milliseconds could
    otherwise be met between its calls, with none of them cut."""
    size, driver = run.size, run.driver
    begin = run.t0 + _wave_at(size, kill.wave)
    await asyncio.sleep(max(0.0, begin - time.monotonic()))
    users = _users_of(size, kill.wave)
    until = begin + size.burst_s / size.burst_waves / 2
    while time.monotonic() < until:
        acked = {a.user_id for a in driver.acked.values()}
        answered = sum(u in acked or u in driver.refused for u in users)
        if answered >= kill.answered * len(users) and driver.counters.in_flight:
            return
        await asyncio.sleep(0.001)


def _part(run: Run, name: str) -> tuple[int | None, Callable[[], None], Callable[[], None]]:
    """The part's pid, its kill and its start (the API's waits until it answers)."""
    stack = run.harness.stack
    if name == "worker":
        return stack.worker.pid, stack.worker.kill, stack.worker.start
    if name == "api":
        return run.harness.api.pid, run.harness.api.kill, stack.start_api
    server = stack.temporal if name == "temporal" else stack.postgres
    assert server is not None, f"the stack runs no {name}"
    return server.pid, server.kill, server.start


async def _outage(run: Run, kill: Kill) -> float:
    harness, counters, figures = run.harness, run.driver.counters, run.result.figures
    in_flight, answered = counters.in_flight, counters.claimed + len(run.driver.refused)
    pid, stop, start = _part(run, kill.part)
    began = time.monotonic()
    if kill.part == "worker":
        harness.worker_down_on_purpose = True
    await asyncio.to_thread(stop)
    figures["calls_in_flight_at_kills"] = figures.get("calls_in_flight_at_kills", 0) + in_flight
    run.fault(
        f"SIGKILL {kill.part} pid {pid} in wave {kill.wave} ({in_flight} driver calls in "
        f"flight, {answered} claims answered so far)"
    )
    await asyncio.sleep(max(0.0, kill.down_s - (time.monotonic() - began)))
    await _start_until_up(run, kill.part, start)
    if kill.part == "worker":
        harness.worker_down_on_purpose = False
    pid, _, _ = _part(run, kill.part)
    run.fault(f"{kill.part} back, pid {pid}, {time.monotonic() - began:.1f} s down")
    return time.monotonic()


async def _start_until_up(run: Run, name: str, start: Callable[[], None]) -> None:
    """Start the part again, and again while it fails to come up, as `make run`'s
    supervisor does (the API does not start while Temporal is down)."""
    deadline = time.monotonic() + run.size.converge_timeout_s
    failures = 0
    while True:
        try:
            await asyncio.to_thread(start)
            break
        except Exception as err:
            failures += 1
            if time.monotonic() >= deadline:
                raise
            log.warning("%s did not come back (%s); starting it again", name, err)
            await asyncio.sleep(1.0)
    if failures:
        run.result.notes.append(
            f"{name} failed to start {failures} times before it came back (another part "
            "it needs at start was down)"
        )


# ----- the checks -----------------------------------------------------------------


class _Tally:
    """The scenario's checks (each must end at 0), with a few examples per non-zero one."""

    def __init__(self, run: Run, names: tuple[str, ...]) -> None:
        self.result = run.result
        self.checks = dict.fromkeys(names, 0)
        self.evidence: dict[str, list[str]] = defaultdict(list)

    def count(self, name: str, why: str, n: int = 1) -> None:
        self.checks[name] += n
        if len(self.evidence[name]) < EVIDENCE_PER_KIND:
            self.evidence[name].append(why)

    def close(self) -> None:
        self.result.checks.update(self.checks)
        self.result.evidence.update(self.evidence)


async def check_burst(run: Run) -> None:
    """The claims against the quota and the answers, the reports, then the workflows."""
    claims = await _campaign_claims(run)
    campaign = await get_campaign(run.driver.pool, run.driver.campaign)
    assert campaign is not None
    _check_claims(run, claims, campaign)
    _check_reports(run, {c.coupon_id: c for c in claims})
    await _check_workflows(run)
    _figures(run, claims, campaign)


async def _campaign_claims(run: Run) -> list[ledger.Claim]:
    where = ledger.ClaimFilter(campaign_id=run.driver.campaign, limit=100_000)
    return await ledger.find_claims(run.driver.pool, where)


def _check_claims(run: Run, claims: list[ledger.Claim], campaign: Campaign) -> None:
    """None over the quota, every answer as the ledger has it, every user answered."""
    driver, quota = run.driver, run.scenario.quota(run.size)
    tally = _Tally(
        run,
        (
            "over_quota",
            "quota_not_released",
            "claimed_counter_off",
            "sold_out_below_quota",
            "acknowledged_not_in_ledger",
            "refused_but_holding",
            "refused_not_sold_out",
            "claims_never_answered",
        ),
    )
    if len(claims) > quota:
        tally.count("over_quota", f"{len(claims)} claims, quota {quota}", len(claims) - quota)
    if campaign.quota != quota:
        # The checks below are about the whole quota: every drop must be out.
        tally.count("quota_not_released", f"the campaign's quota is {campaign.quota}, not {quota}")
    if campaign.claimed != len(claims):
        why = f"campaign.claimed {campaign.claimed}, claims {len(claims)}"
        tally.count("claimed_counter_off", why, abs(campaign.claimed - len(claims)))
    refused_sold_out = sum(code == SOLD_OUT for code in driver.refused.values())
    if len(claims) < quota and refused_sold_out:
        why = f"{refused_sold_out} refused sold_out with {len(claims)} of {quota} claimed"
        tally.count("sold_out_below_quota", why, refused_sold_out)
    by_coupon = {c.coupon_id: c for c in claims}
    for acked in driver.acked.values():
        held = by_coupon.get(acked.coupon_id)
        if held is None or (held.user_id, held.workflow_id) != (acked.user_id, acked.workflow_id):
            tally.count("acknowledged_not_in_ledger", f"{acked} vs the ledger's {held}")
    holders = {c.user_id for c in claims}
    for user, code in sorted(driver.refused.items()):
        if user in holders:
            tally.count("refused_but_holding", f"{user} refused {code} but holds a claim")
        if code != SOLD_OUT:
            tally.count("refused_not_sold_out", f"{user} refused {code}")
    answered = {a.user_id for a in driver.acked.values()} | driver.refused.keys()
    for user in (f"u{index:05d}" for index in range(run.size.burst_users)):
        if user not in answered:
            tally.count("claims_never_answered", user)
    tally.close()


def _check_reports(run: Run, by_coupon: dict[str, ledger.Claim]) -> None:
    """Every report answered and none refused; every acknowledged one counted."""
    driver, c = run.driver, run.driver.counters
    tally = _Tally(
        run, ("completions_refused", "completions_never_acknowledged", "completions_lost")
    )
    refused = c.completions_sent - c.completions_acked - c.completions_failed
    if refused:
        examples = [r for r in c.refusals if not r.startswith("claim ")][:EVIDENCE_PER_KIND]
        tally.count("completions_refused", "; ".join(examples), refused)
    if c.completions_failed:
        tally.count("completions_never_acknowledged", "see chaos.log", c.completions_failed)
    for coupon_id in sorted(driver.completed):
        held = by_coupon.get(coupon_id)
        if held is None or held.state not in TASK_COUNTED:
            state = held.state if held else "no claim"
            tally.count("completions_lost", f"{coupon_id}: reported done, now {state}")
    tally.close()


async def _check_workflows(run: Run) -> None:
    """Every claim in the ledger (acknowledged or not) has exactly one run of its workflow
    id in Temporal and `workflow_started` true; given WORKFLOWS_SETTLE_S to show it."""
    deadline = time.monotonic() + WORKFLOWS_SETTLE_S
    gate = asyncio.Semaphore(20)

    async def runs_of(workflow_id: str) -> list[WorkflowExecution]:
        async with gate:
            query = f'WorkflowId = "{workflow_id}"'
            return [w async for w in run.driver.client.list_workflows(query)]

    while True:
        tally = _Tally(run, ("workflows_missing", "workflows_duplicated", "workflows_not_marked"))
        claims = await _campaign_claims(run)
        found = await asyncio.gather(*(runs_of(c.workflow_id) for c in claims))
        for claim, runs in zip(claims, found, strict=True):
            if not runs:
                tally.count("workflows_missing", f"{claim.coupon_id} ({claim.state}): no run")
            elif len(runs) > 1:
                ids = ", ".join(f"{w.run_id} {w.status.name if w.status else '?'}" for w in runs)
                tally.count("workflows_duplicated", f"{claim.workflow_id}: {len(runs)} runs: {ids}")
            if not claim.workflow_started:
                tally.count("workflows_not_marked", f"{claim.coupon_id}: workflow_started false")
        if not any(tally.checks.values()) or time.monotonic() >= deadline:
            tally.close()
            run.result.figures["workflows_checked"] = len(claims)
            return
        await asyncio.sleep(1.0)


def _figures(run: Run, claims: list[ledger.Claim], campaign: Campaign) -> None:
    """What the burst met: the answers, the paths, the retries."""
    driver, c = run.driver, run.driver.counters
    acked = [int(a.user_id[1:]) for a in driver.acked.values()]
    run.result.figures.update(
        users=run.size.burst_users,
        quota=run.scenario.quota(run.size),
        granted=len(claims),
        claimed_counter=campaign.claimed,
        acknowledged=len(acked),
        refused_sold_out=sum(code == SOLD_OUT for code in driver.refused.values()),
        claims_in_process=sum(not _via_api(i) for i in acked),
        claims_via_api=sum(_via_api(i) for i in acked),
        completions_at_once=sum(not _reported_late(i) for i in acked),
        completions_late=sum(_reported_late(i) for i in acked),
        claims_retried=c.retried.get("claim", 0),
        claims_answered_on_retry=c.claims_found_held,
        completions_retried=c.retried.get("signal", 0) + c.retried.get("update", 0),
        seed=SEED,
    )


CLAIM_BURST_KILLS = Scenario(
    name="claim_burst_kills",
    description="A flash sale: the quota released in drops, each rushed by a wave of three "
    "users per coupon at once (one in three claiming in process, the others through the "
    "HTTP API) while the worker, the API, PostgreSQL and (quick, full) the Temporal dev "
    "server are SIGKILLed at random points of the burst; two in three granted coupons' "
    "task reported through the API the instant the claim is answered. Checks: none over "
    "quota, every acknowledged claim in the ledger, one workflow per claim, no report "
    "lost or refused.",
    fault=kill_during_burst,
    reports=lambda size, i: [],  # the burst reports on its own
    api=True,
    check=check_burst,
    load=burst,
)
