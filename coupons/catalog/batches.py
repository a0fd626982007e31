"""Step 1 of the method, its batches: created at the platform on demand and synced to our
ledger, each change to one written as an intent before the platform is asked, and where a
batch drifted from what the ledger promised.

Everything here validates first and writes after, so a refused request changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool

from coupons import validation as rules
from coupons.errors import InvalidField, Refused
from coupons.ledger import batches
from coupons.ledger.batches import Batch
from coupons.ledger.tenants import DEFAULT_TENANT, get_tenant
from coupons.model import BatchSync
from coupons.platforms.base import (
    FINISHED_BATCH,
    BatchAction,
    BatchSpec,
    BatchStatus,
    FixesRequest,
    Platform,
    PlatformBatch,
    PlatformError,
    PlatformKeyReused,
    PlatformNotReady,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
)
from coupons.validation import validate_id

log = logging.getLogger(__name__)


# How long creating a batch waits for the platform to let it start.
START_PATIENCE = timedelta(minutes=3)
DEFAULT_VALID_DAYS = 30
DAY = timedelta(days=1)


def batch_request_key(batch_id: str) -> str:
    """The platform-side creation key of our batch: a retried create finds the first one."""
    return f"batch-{batch_id}"


async def create_batch(
    pool: AsyncConnectionPool,
    platform: Platform,
    batch_id: str,
    *,
    quantity: int,
    face_value_cents: int = 500,
    min_spend_cents: int = 0,
    valid_days: int | None = None,
    per_user_limit: int = 1,
    name: str | None = None,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    start: bool = True,
    tenant_id: str = DEFAULT_TENANT,
) -> Batch:
    """Create batch `batch_id` of `tenant_id` at the platform (once, however often this
    runs), store it, and start it unless `start` is False. `valid_days` None: as long as the
    window given, else 30.

    The create is written to the ledger (the batch `pending`, the whole request kept) before
    the platform is asked, and completed after its answer. A batch the ledger holds already
    is not asked for anew: a pending create is sent again as it was kept, under the same
    key, and the batch is read back from the platform (and started, when it was left
    created), so running this again after a crash or a start that gave up finishes it,
    whatever process runs it."""
    validate_id("batch", batch_id)
    if await get_tenant(pool, tenant_id) is None:
        raise Refused("unknown_tenant", f"no tenant {tenant_id!r}")
    existing = await batches.get_batch(pool, batch_id)
    if existing is not None and existing.tenant_id != tenant_id:
        raise Refused("batch_exists", f"batch id {batch_id!r} is taken")
    rules.QUANTITY.check("quantity", quantity)
    rules.FACE_VALUE_CENTS.check("value", face_value_cents)
    rules.MIN_SPEND_CENTS.check("min_spend", min_spend_cents)
    rules.PER_USER_LIMIT.check("per_user_limit", per_user_limit)
    check_texts_and_times(name=name, starts_at=starts_at, ends_at=ends_at)
    if starts_at is not None and ends_at is not None and ends_at <= starts_at:
        raise InvalidField("ends_at", "the batch's window ends before it starts")
    if valid_days is None:
        window = ends_at - starts_at if starts_at is not None and ends_at is not None else None
        valid_days = math.ceil(window / DAY) if window is not None else DEFAULT_VALID_DAYS
    rules.VALID_DAYS.check("valid_days", valid_days)
    asked = BatchSpec(
        request_key=batch_request_key(batch_id),
        name=name or f"batch {batch_id}",
        face_value_cents=face_value_cents,
        min_spend_cents=min_spend_cents,
        quantity=quantity,
        valid_days=valid_days,
        per_user_limit=per_user_limit,
        starts_at=starts_at,
        ends_at=ends_at,
    )
    while existing is None:
        # The intent first: a crash, a ledger failure or a lost answer after the platform's
        # call leaves a pending create that the next sync finishes, never a batch at the
        # platform that the ledger has not heard of. A ledger that cannot write it stops
        # here, before the platform is asked anything.
        intent = await batches.begin_create(pool, batch_id, tenant_id, _request(platform, asked))
        if intent is not None:
            return await _created(pool, platform, intent, tenant_id, start)
        # Taken meanwhile by a create running at the same time: that batch (or, if the
        # platform refused it since, the id is free again).
        existing = await batches.get_batch(pool, batch_id)
        if existing is not None and existing.tenant_id != tenant_id:
            raise Refused("batch_exists", f"batch id {batch_id!r} is taken")
    return await _finished(pool, platform, existing, asked, start)


async def _created(
    pool: AsyncConnectionPool,
    platform: Platform,
    intent: batches.BatchIntent,
    tenant_id: str,
    start: bool,
) -> Batch:
    """Send the create `intent` wrote, store the answer, and start the batch if asked."""
    try:
        stored = await _send(pool, platform, intent, tenant_id)
    except PlatformRefused as err:
        if isinstance(err, PlatformKeyReused):
            raise Refused(
                "batch_exists",
                f"batch {intent.batch_id!r} exists with other terms: {err.message}",
            ) from err
        raise Refused("platform_refused", f"the platform refused the batch: {err}") from err
    # In the ledger before it is started, so a start that fails leaves no batch at the
    # platform that the ledger has never heard of.
    if start and stored.status == BatchStatus.CREATED:
        stored = await _started(pool, platform, stored)
    log.info(
        "batch %s is %s at the platform as %s", stored.id, stored.status, stored.platform_batch_id
    )
    return stored


# The terms a pending create is compared on when asked for again (a done one: on what the
# platform holds, which is what `_finished` compares).
_PENDING_TERMS = (
    "name",
    "quantity",
    "face_value_cents",
    "min_spend_cents",
    "valid_days",
    "per_user_limit",
)


async def _finished(
    pool: AsyncConnectionPool,
    platform: Platform,
    existing: Batch,
    asked: BatchSpec,
    start: bool,
) -> Batch:
    """A batch asked for again: the same one (its pending create sent again under its key,
    started now if it was left created), or a refusal naming the term it differs in. Not
    created again: a platform that takes the whole request as its key (WeChat Pay, its
    window included) would see another request."""
    differ = await _differences(pool, existing, asked)
    if differ:
        raise Refused(
            "batch_exists", f"batch {existing.id!r} exists with other terms: {'; '.join(differ)}"
        )
    settled = await _settle(pool, platform, existing)
    seen = await platform.get_batch(settled.batch.platform_batch_id)
    stored = await batches.upsert_batch(pool, existing.id, seen, existing.tenant_id)
    if start and seen.status == BatchStatus.CREATED:
        stored = await _started(pool, platform, stored)
    return stored


async def _differences(pool: AsyncConnectionPool, existing: Batch, asked: BatchSpec) -> list[str]:
    """How `asked` differs from the batch held: from what the platform holds once created,
    from the request kept (all its terms, and a window when one is asked) while pending."""
    if existing.status == batches.PENDING:
        creates = [
            i for i in await batches.pending_intents(pool, existing.id) if i.operation == "create"
        ]
        if creates:
            kept = batches.spec_of(creates[0])
            names = [*_PENDING_TERMS, *(w for w in ("starts_at", "ends_at") if getattr(asked, w))]
            held = {name: getattr(kept, name) for name in names}
            wanted = {name: getattr(asked, name) for name in names}
            return _differing(held, wanted)
    held = {"quantity": existing.quantity, "face_value_cents": existing.face_value_cents}
    return _differing(
        held, {"quantity": asked.quantity, "face_value_cents": asked.face_value_cents}
    )


def _differing(held: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    return [
        f"{name} {held[name]}, not {asked[name]}" for name in asked if held[name] != asked[name]
    ]


async def _started(pool: AsyncConnectionPool, platform: Platform, batch: Batch) -> Batch:
    """Start the batch and store what the platform says of it, asking again while the
    platform cannot start it yet: WeChat Pay registers a new stock for about a minute
    (卡包信息尚未注册完成). The start is an intent first: one that gives up stays pending,
    and the next sync finishes it. A refusal, or a platform still not ready after
    START_PATIENCE, says the batch exists and how to finish it."""
    finish = f"batch {batch.id!r} exists but did not start; `batch start {batch.id}` finishes it"
    intent = await _intend(pool, batch, BatchAction.START)
    try:
        return await _start_when_ready(pool, platform, intent, batch.tenant_id)
    except PlatformRefused as err:
        raise Refused("platform_refused", f"{finish} once this is mended: {err.message}") from err
    except PlatformNotReady as err:
        raise PlatformUnavailable(
            err.code, f"{err.message}; {finish} (or the next catalog sync)"
        ) from err


async def _start_when_ready(
    pool: AsyncConnectionPool, platform: Platform, intent: batches.BatchIntent, tenant_id: str
) -> Batch:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + START_PATIENCE.total_seconds()
    wait_s = 1.0
    while True:
        try:
            return await _send(pool, platform, intent, tenant_id)
        except (PlatformNotReady, PlatformRateLimited) as err:
            if loop.time() + wait_s > give_up:
                raise PlatformNotReady(err.code, err.message) from err
            # Said once loudly: a person waiting on `batch create` should know why.
            (log.warning if wait_s == 1.0 else log.info)(
                "batch %s cannot start yet (%s): asking again for up to %.0f s",
                intent.batch_id,
                err,
                give_up - loop.time(),
            )
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, 15.0)


async def get_batch(
    pool: AsyncConnectionPool, batch_id: str, tenant_id: str | None = None
) -> Batch:
    """The batch (of `tenant_id`, when given: another tenant's is as unknown as none)."""
    validate_id("batch", batch_id)
    batch = await batches.get_batch(pool, batch_id, tenant_id)
    if batch is None:
        raise Refused("unknown_batch", f"no batch {batch_id!r}")
    return batch


async def change_batch(
    pool: AsyncConnectionPool,
    platform: Platform,
    batch_id: str,
    action: BatchAction,
    tenant_id: str | None = None,
) -> Batch:
    """Start, pause, resume or stop the batch: the batch's unfinished intents first (in the
    order they were asked), then this one, written before the call."""
    settled = await _settle(pool, platform, await get_batch(pool, batch_id, tenant_id))
    batch = settled.batch
    if settled.waiting is not None and settled.waiting.operation != action:
        # Sent now, it could be overtaken by the older one when that one goes through.
        raise PlatformUnavailable(
            "INTENT_PENDING",
            f"batch {batch_id!r}: its {settled.waiting.operation} is not done at the platform "
            f"yet ({settled.why}); ask again shortly",
        )
    intent = await _intend(pool, batch, action)
    try:
        return await _send(pool, platform, intent, batch.tenant_id)
    except PlatformRefused as err:
        raise Refused("wrong_state", f"batch {batch_id!r}: {err.message}") from err


async def sync_batch(pool: AsyncConnectionPool, platform: Platform, batch_id: str) -> BatchSync:
    """Finish the batch's unfinished intents, read it at the platform, store it, and flag
    where it drifted from the ledger."""
    settled = await _settle(pool, platform, await get_batch(pool, batch_id))
    seen, owes, now = await look(pool, platform, settled.batch)
    stored = await batches.upsert_batch(pool, batch_id, seen)
    drift = [*now, *settled.drift]
    if drift:
        log.warning("batch %s drifted: %s", batch_id, "; ".join(drift))
    await batches.record_sync(pool, batch_id, owes.owed, owes.backlog, drift)
    return BatchSync(
        batch_id=batch_id,
        platform_batch_id=seen.batch_id,
        status=seen.status.value,
        quantity=seen.quantity,
        remaining=seen.remaining,
        owed=owes.owed,
        backlog=owes.backlog,
        drift=drift,
        synced_at=stored.synced_at,
    )


# ------------------------------------------------------------------ intents

# What a batch is once each change is done: the platform may say "already done" by
# answering the batch in that status (every adapter makes a repeat a no-op), or by a
# refusal while it is.
_DONE_AS = {
    BatchAction.START: frozenset({BatchStatus.RUNNING}),
    BatchAction.PAUSE: frozenset({BatchStatus.PAUSED}),
    BatchAction.RESUME: frozenset({BatchStatus.RUNNING}),
    BatchAction.STOP: FINISHED_BATCH,
}


def _request(platform: Platform, spec: BatchSpec) -> BatchSpec:
    """`spec` as the platform will be sent it; a request it cannot take is refused here."""
    if not isinstance(platform, FixesRequest):
        return spec
    try:
        return platform.batch_request(spec)
    except PlatformRefused as err:
        raise Refused("platform_refused", f"the platform refused the batch: {err}") from err


async def _intend(
    pool: AsyncConnectionPool, batch: Batch, action: BatchAction
) -> batches.BatchIntent:
    return await batches.intend_change(
        pool, batch.id, action, batch.platform_batch_id, batch_request_key(batch.id)
    )


async def _send(
    pool: AsyncConnectionPool,
    platform: Platform,
    intent: batches.BatchIntent,
    tenant_id: str,
    *,
    resend: bool = False,
) -> Batch:
    """Ask the platform what `intent` keeps, under its key, once; record the outcome: done
    (the batch as answered), refused (PlatformRefused raised), or unanswered (the error
    raised, the intent still pending).

    A resent create whose key the platform says was used for another request is not a
    refusal of ours: the platform may hold a batch under our key that an earlier send made
    (a request that was not kept whole), so the batch stays pending, in sight, with the
    error, for an operator."""
    try:
        answer = await _ask(platform, intent)
    except PlatformKeyReused as err:
        if not resend:
            await batches.refuse_intent(pool, intent, str(err))
            raise
        await batches.intent_unanswered(pool, intent, str(err))
        raise
    except PlatformRefused as err:
        done = await _already_done(platform, intent)
        if done is None:
            await batches.refuse_intent(pool, intent, str(err))
            raise
        answer = done
    except PlatformError as err:
        await batches.intent_unanswered(pool, intent, str(err))
        raise
    return await batches.complete_intent(pool, intent, answer, tenant_id)


async def _ask(platform: Platform, intent: batches.BatchIntent) -> PlatformBatch:
    if intent.operation == "create":
        return await platform.create_batch(batches.spec_of(intent))
    return await platform.change_batch(
        intent.request["platform_batch_id"], BatchAction(intent.request["action"])
    )


async def _already_done(platform: Platform, intent: batches.BatchIntent) -> PlatformBatch | None:
    """The batch, when a refused change is one the platform shows done (a resend after an
    answer that was lost, say); None otherwise (and for a create, which has no batch yet)."""
    if intent.operation == "create":
        return None
    action = BatchAction(intent.request["action"])
    try:
        seen = await platform.get_batch(intent.request["platform_batch_id"])
    except PlatformError:
        return None  # the refusal stands
    return seen if seen.status in _DONE_AS[action] else None


@dataclass(frozen=True)
class _Settled:
    batch: Batch  # as the ledger holds it once its intents were sent
    # The oldest intent still pending (the platform not ready for it yet), and why.
    waiting: batches.BatchIntent | None = None
    why: str = ""

    @property
    def drift(self) -> list[str]:
        if self.waiting is None:
            return []
        return [f"{self.waiting.operation} not done at the platform yet ({self.why}): asked again"]


async def _settle(pool: AsyncConnectionPool, platform: Platform, batch: Batch) -> _Settled:
    """Finish the batch's pending intents, oldest first, each sent again as it was kept.

    A refused change is recorded and passed over: it changed nothing. A change the platform
    is not ready for yet stays pending, and the ones after it wait behind it (they were
    asked after it). Raises when the create is refused (Refused: the batch is gone) or not
    answered, or when the platform cannot be reached (the caller, or the sync activity's
    retries, ask again)."""
    for intent in await batches.pending_intents(pool, batch.id):
        try:
            batch = await _send(pool, platform, intent, batch.tenant_id, resend=True)
        except PlatformKeyReused as err:
            log.error(
                "batch %s: the platform holds another request under key %s (%s); the batch "
                "stays pending until an operator settles it at the platform",
                batch.id,
                intent.request_key,
                err,
            )
            raise Refused(
                "batch_exists",
                f"batch {batch.id!r}: the platform holds another request under its key "
                f"{intent.request_key!r}: {err.message}",
            ) from err
        except PlatformRefused as err:
            if intent.operation == "create":
                log.error(
                    "the platform refused batch %s's pending create (key %s): %s",
                    batch.id,
                    intent.request_key,
                    err,
                )
                raise Refused(
                    "platform_refused", f"the platform refused batch {batch.id!r}: {err}"
                ) from err
            log.warning("batch %s: the pending %s was refused: %s", batch.id, intent.operation, err)
        except (PlatformNotReady, PlatformRateLimited) as err:
            if intent.operation == "create":
                raise
            return _Settled(batch, intent, str(err))
    return _Settled(batch)


async def look(
    pool: AsyncConnectionPool, platform: Platform, batch: Batch
) -> tuple[PlatformBatch, batches.Obligations, list[str]]:
    """The batch at the platform now, what the ledger owes from it now, and where the one
    no longer covers the other; writes nothing."""
    seen = await platform.get_batch(batch.platform_batch_id)
    owes = await batches.obligations(pool, batch.id)
    return seen, owes, drift_of(seen, owes)


def drift_of(seen: PlatformBatch, owes: batches.Obligations) -> list[str]:
    """Where the platform's batch no longer covers what the ledger promised."""
    drift = []
    if seen.remaining < owes.owed:
        drift.append(
            f"the platform has {seen.remaining} coupons left, below the {owes.owed} we still owe"
        )
    if owes.backlog and seen.remaining == 0:
        drift.append(f"budget exhausted: {_waiting(owes.backlog)} for budget")
    if owes.backlog and seen.status == BatchStatus.PAUSED:
        drift.append(f"paused at the platform: {_waiting(owes.backlog)} for it")
    if seen.status in FINISHED_BATCH and owes.active_campaigns:
        drift.append(
            f"{seen.status.value} at the platform while campaigns use it: "
            + ", ".join(owes.active_campaigns)
        )
    return drift


def _waiting(backlog: int) -> str:
    return f"{backlog} usable coupon waits" if backlog == 1 else f"{backlog} usable coupons wait"


def check_texts_and_times(**values: str | datetime | None) -> None:
    """The rules of coupons.validation for names and times, as the command line and the API
    apply them, for Python callers that come in neither way."""
    for field, value in values.items():
        if isinstance(value, datetime):
            rules.plausible(field, value)
        elif value is not None:
            rules.NAME.check(field, value)
