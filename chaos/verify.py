"""The invariant checks run once a scenario has converged (or run out of time).

Per acknowledged coupon it reads the ledger (claim, receipt, events), the workflow's
`status` query and the platform's own list of the batch's coupons, and sorts what it
finds into the counts of `ScenarioResult`. Every user claims exactly once in these
campaigns, so the platform's coupons grouped by user are the sends of one coupon.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from temporalio.service import RPCError, RPCStatusCode

from chaos.harness import Acked, Driver
from chaos.report import ScenarioResult
from coupons.ledger import claims as ledger
from coupons.lifecycle import FINAL_STATES
from coupons.model import idempotency_key
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger("chaos.verify")

EVIDENCE_PER_KIND = 5
# The workflow learns `issued` when the issue activity completes, a moment after the
# activity wrote it to the ledger: disagreements get this long to settle.
SETTLE_S = 20.0


@dataclass
class Seen:
    coupon_id: str
    user_id: str
    ledger_state: str | None
    last_event: str | None
    receipt_id: str | None
    workflow_state: str | None
    workflow_receipt_id: str | None
    workflow_error: str | None
    platform: list[dict[str, Any]]
    # (from, to) of every ledger event, in order; the workflow's own transitions, with
    # the claim's `received` (written by the claim, not the workflow) in front.
    events: list[tuple[str | None, str]]
    workflow_trail: list[str]
    # Signals the workflow refused (a signal cannot answer, so it records them).
    ignored: list[str]

    def describe(self) -> str:
        sent = ", ".join(
            f"{c['coupon_id']} key {c['idempotency_key'][:8]}.. at {c['sent_at']}"
            for c in self.platform
        )
        workflow = self.workflow_state or f"none ({self.workflow_error})"
        return (
            f"{self.coupon_id}: ledger {self.ledger_state}, last event {self.last_event}, "
            f"workflow {workflow}, receipt {self.receipt_id}, platform [{sent}]"
        )

    @property
    def agrees(self) -> bool:
        same_state = self.ledger_state == self.last_event == self.workflow_state
        return same_state and self.receipt_id == self.workflow_receipt_id and self.trail_ok

    @property
    def trail_ok(self) -> bool:
        """One event per state entered, each leaving the state the one before entered,
        the same path the workflow took."""
        chained = all(before[1] == after[0] for before, after in pairwise(self.events))
        return chained and [to for _, to in self.events] == self.workflow_trail


async def _look(driver: Driver, acked: Acked, platform: list[dict[str, Any]]) -> Seen:
    view = await ledger.coupon_view(driver.pool, acked.coupon_id)
    ledger_state = last_event = receipt_id = None
    events: list[tuple[str | None, str]] = []
    if view is not None:
        ledger_state = view["claim"].state
        events = [(e["from_state"], e["to_state"]) for e in view["events"]]
        last_event = events[-1][1] if events else None
        receipt = view["receipt"]
        receipt_id = receipt["platform_coupon_id"] if receipt else None
    workflow_state = workflow_receipt = workflow_error = None
    trail: list[str] = []
    ignored: list[str] = []
    try:
        status = await asyncio.wait_for(
            driver.handle(acked).query(UserCouponWorkflow.status), timeout=15
        )
        workflow_state = status.state
        workflow_receipt = status.receipt.platform_coupon_id if status.receipt else None
        trail = ["received"] + [t.to_state for t in status.transitions]
        ignored = list(status.ignored_signals)
    except RPCError as err:
        workflow_error = "not found" if err.status == RPCStatusCode.NOT_FOUND else str(err)[:120]
    except Exception as err:
        workflow_error = f"{type(err).__name__}: {str(err)[:120]}"
    return Seen(
        acked.coupon_id,
        acked.user_id,
        ledger_state,
        last_event,
        receipt_id,
        workflow_state,
        workflow_receipt,
        workflow_error,
        platform,
        events,
        trail,
        ignored,
    )


async def _look_all(
    driver: Driver, coupons: list[Acked], by_user: dict[str, list[dict[str, Any]]]
) -> list[Seen]:
    gate = asyncio.Semaphore(20)

    async def one(acked: Acked) -> Seen:
        async with gate:
            return await _look(driver, acked, by_user.get(acked.user_id, []))

    return list(await asyncio.gather(*(one(a) for a in coupons)))


async def verify(driver: Driver, result: ScenarioResult, target: str = "issued") -> None:
    """Sort every acknowledged coupon into the counts; each must end in `target` (`issued`,
    or `redeemed` where the scenario uses its coupons)."""
    platform_coupons = await driver.platform_coupons()
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for coupon in platform_coupons:
        by_user[coupon["user_id"]].append(coupon)

    acked = list(driver.acked.values())
    seen = {s.coupon_id: s for s in await _look_all(driver, acked, by_user)}
    # Give the workflows a moment to catch up with the ledger before calling it a
    # disagreement (or a missing workflow: a query during a restart may time out).
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        unsettled = [driver.acked[c] for c, s in seen.items() if not s.agrees]
        if not unsettled:
            break
        await asyncio.sleep(1.0)
        for s in await _look_all(driver, unsettled, by_user):
            seen[s.coupon_id] = s

    evidence: dict[str, list[str]] = defaultdict(list)

    def count(kind: str, s: Seen, why: str) -> None:
        setattr(result, kind, getattr(result, kind) + 1)
        if len(evidence[kind]) < EVIDENCE_PER_KIND:
            evidence[kind].append(f"{why}: {s.describe()}")

    for s in seen.values():
        states = {s.ledger_state, s.workflow_state}
        if s.ledger_state is None:
            count("lost", s, "no ledger claim")
        elif s.workflow_state is None:
            count("lost", s, "no workflow")
        elif states & (FINAL_STATES - {target}):
            count("wrong_state", s, f"final state other than {target}")
        elif target not in states:
            count("stuck", s, f"never {target}")
            if not states & {"issued", target}:
                count("lost", s, "never issued")
        elif s.ledger_state in {"issued", target} and (s.receipt_id is None or not s.platform):
            count("lost", s, "issued without a receipt or a coupon at the platform")
        if len(s.platform) > 1:
            count("duplicate_sends", s, f"{len(s.platform)} coupons at the platform")
        elif s.platform and s.platform[0]["idempotency_key"] != idempotency_key(s.coupon_id):
            count("duplicate_sends", s, "the platform's coupon carries another key")
        if not s.trail_ok:
            trail = " > ".join(f"{a}->{b}" for a, b in s.events)
            count("disagreeing", s, f"event trail [{trail}] vs workflow {s.workflow_trail}")
        elif not s.agrees:
            count("disagreeing", s, "ledger, events and workflow differ")
        elif s.receipt_id is not None and s.receipt_id not in {c["coupon_id"] for c in s.platform}:
            count("disagreeing", s, "receipt names a coupon the platform does not hold")

    refused_signals = [s for s in seen.values() if s.ignored]
    if refused_signals:
        example = refused_signals[0]
        result.notes.append(
            f"{len(refused_signals)} coupons refused a signal, e.g. {example.coupon_id}: "
            f"{example.ignored[0]}"
        )

    ours = {a.user_id for a in acked}
    strays = [c for c in platform_coupons if c["user_id"] not in ours]
    if strays:
        result.notes.append(
            f"{len(strays)} platform coupons for users whose claim was never acknowledged"
        )
    unacked = [
        c
        for c in await ledger.find_claims(
            driver.pool, ledger.ClaimFilter(campaign_id=driver.campaign, limit=100_000)
        )
        if c.coupon_id not in driver.acked
    ]
    if unacked:
        unacked_states = sorted({c.state for c in unacked})
        result.notes.append(
            f"{len(unacked)} ledger claims the driver never saw acknowledged (states "
            f"{', '.join(unacked_states)}): not counted as coupons"
        )
    result.evidence = dict(evidence)
    log.info(
        "verified %d coupons: lost %d, duplicates %d, wrong %d, disagreeing %d, stuck %d",
        len(seen),
        result.lost,
        result.duplicate_sends,
        result.wrong_state,
        result.disagreeing,
        result.stuck,
    )
