"""The platform's behaviour, protocol-neutral, and the `Face` a protocol puts on it.

Over 500 lines on purpose: the one store-backed behaviour every face puts its protocol on
(batches, sends, lookups, uses, flows, faults); its parts share one transaction each.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import random
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from coupons.platforms.simcore.errors import SimError, generic_error
from coupons.platforms.simcore.knobs import FaceKnob, Knobs, positive_count
from coupons.platforms.simcore.notifier import Herald, Notifier
from coupons.platforms.simcore.store import Store, iso

log = logging.getLogger("coupons.platforms.simulator")

# The protocol request being answered, for a face whose answer depends on it even where the
# core answers (a rate limit): WeChat Pay, switching keys, signs with the key the request names.
CURRENT_REQUEST: ContextVar[Request | None] = ContextVar("current_request", default=None)

# Stored batch statuses. "expired" is stored only when the control plane forces it; otherwise
# a batch reads expired once the clock passes its `ends_at`.
FINISHED = frozenset({"stopped", "expired"})
# action: (the statuses it leaves, the status it leads to). An action whose target is already
# the status is a no-op, so a retried call after a lost answer is harmless.
ACTIONS: dict[str, tuple[frozenset[str], str]] = {
    "start": (frozenset({"created"}), "running"),
    "pause": (frozenset({"running"}), "paused"),
    "resume": (frozenset({"paused"}), "running"),
    "stop": (frozenset({"created", "running", "paused"}), "stopped"),
}
# What the control plane may force a batch into, whatever the protocol's actions allow.
CONTROL_STATUSES = ("running", "paused", "stopped", "expired")
# What a batch is made of, whatever the protocol calls it.
BATCH_TERMS = (
    "name",
    "face_value_cents",
    "min_spend_cents",
    "quantity",
    "valid_days",
    "per_user_limit",
)
FLOW_KINDS = ("sent", "used")
FLOW_COLUMNS = ("coupon_id", "batch_id", "user_id", "idempotency_key", "at")
NOTIFICATIONS_LISTED = 100  # GET /sim/notifications answers this many unless asked for more
# Flow files are kept in memory; a caller downloads one right after asking for it, so only the
# newest few are kept and an old token answers FILE_NOT_FOUND (ask for the flow again).
FLOW_FILES_KEPT = 256

Handler = Callable[[Request], Awaitable[Response]]


# ---------------------------------------------------------------- request helpers


async def json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise SimError("INVALID_REQUEST", "body must be JSON") from None
    if not isinstance(body, dict):
        raise SimError("INVALID_REQUEST", "body must be a JSON object")
    return body


def text_field(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise SimError("INVALID_REQUEST", f"{name} must be a non-empty string")
    return value


def integer_field(body: Mapping[str, Any], name: str, *, minimum: int) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SimError("INVALID_REQUEST", f"{name} must be an integer >= {minimum}")
    return value


def moment_field(body: Mapping[str, Any], name: str) -> datetime | None:
    """An optional ISO 8601 time; it must carry its timezone, since a platform cannot guess it."""
    value = body.get(name)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise SimError("INVALID_REQUEST", f"{name} must be an ISO 8601 time with a timezone")
    return moment.astimezone(UTC)


def _a(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def _flow_csv(records: list[tuple[str, ...]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(FLOW_COLUMNS)
    writer.writerows(records)
    return buffer.getvalue().encode()


# ---------------------------------------------------------------- faces


class Face(Herald, Protocol):
    """One platform protocol spoken over the core: its routes, ids, errors and notifications.

    The core decides what happens (a batch's life, sends, budgets, lag, faults); a face only
    says it in its platform's words and checks its platform's signatures. A face may also
    declare knobs of its own protocol as a `knobs` mapping of `FaceKnob`s (`face_knobs`).
    """

    name: str

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        """The protocol's routes, each handler wrapped with `sim.protocol(self, handler)`."""
        ...

    def error_response(self, error: SimError) -> Response: ...

    def new_batch_id(self) -> str: ...

    def new_coupon_id(self) -> str: ...


def face_knobs(face: Face) -> dict[str, FaceKnob]:
    """The knobs `face` declares (none unless it has a `knobs` mapping)."""
    declared: Mapping[str, FaceKnob] = getattr(face, "knobs", {})
    return dict(declared)


@dataclass(frozen=True)
class EndpointLimit:
    """An endpoint's published frequency limit: at most `count` calls each `period_s`
    seconds, counted per `group` (endpoints that share one limit share a group)."""

    group: str
    count: int
    period_s: float


@dataclass(frozen=True)
class FlowFile:
    token: str
    sha1: str
    records: int
    content: bytes


# ---------------------------------------------------------------- the simulator


class Simulator:
    """The platform's behaviour, protocol-neutral: batches, sends, lookups, uses, flows, the
    knobs' faults and the control plane. Its operations raise `SimError`; the face in front
    of it turns them into its protocol's answers."""

    def __init__(self, data_path: Path, knobs: Knobs, face: Face, keys_dir: Path) -> None:
        self.store = Store(data_path)
        self.knobs = knobs
        self.face = face
        self.keys_dir = keys_dir
        self.rng = random.Random(knobs.seed)
        self._window = (0, 0)  # (second, requests seen in it)
        # Per limit group: (when its window began, monotonic; calls seen in it).
        self._endpoint_windows: dict[str, tuple[float, int]] = {}
        # What the knobs were at start: DELETE /sim/knobs brings them back.
        self._start_knobs = knobs.values()
        self._files: OrderedDict[str, bytes] = OrderedDict()  # flow file token -> CSV bytes
        self.counters = dict.fromkeys(
            (
                "sends_applied",
                "sends_replayed",
                "lookups_not_found",
                "errors_injected",
                "ambiguous_injected",
                "rate_limited",
            ),
            0,
        )
        self.notifier = Notifier(self.store, knobs, self.rng, self.counters, face)

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.knobs.clock_offset_s)

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def _batch_status(self, row: sqlite3.Row, now: datetime | None = None) -> str:
        # Stopped stays stopped after its window ends: it was ended by hand, not by time.
        status: str = row["status"]
        if status in FINISHED:
            return status
        moment = self.now() if now is None else now
        return "expired" if moment > datetime.fromisoformat(row["ends_at"]) else status

    def _batch_json(self, row: sqlite3.Row) -> dict[str, Any]:
        return {
            "batch_id": row["batch_id"],
            "name": row["name"],
            "status": self._batch_status(row),
            "face_value_cents": row["face_value_cents"],
            "min_spend_cents": row["min_spend_cents"],
            "quantity": row["quantity"],
            "remaining": row["remaining"],
            "valid_days": row["valid_days"],
            "per_user_limit": row["per_user_limit"],
            "starts_at": row["starts_at"],
            "ends_at": row["ends_at"],
            "created_at": row["created_at"],
            "extra": json.loads(row["request"]).get("extra", {}),
        }

    def _coupon_json(self, row: sqlite3.Row) -> dict[str, Any]:
        if row["used_at"] is not None:
            status = "used"
        elif self.now() > datetime.fromisoformat(row["valid_until"]):
            status = "expired"
        else:
            status = "sent"
        return {
            "coupon_id": row["coupon_id"],
            "batch_id": row["batch_id"],
            "user_id": row["user_id"],
            "status": status,
            "sent_at": row["sent_at"],
            "valid_until": row["valid_until"],
            "used_at": row["used_at"],
            "idempotency_key": row["idempotency_key"],
        }

    # -- the protocol wrapper ---------------------------------------------------

    def _check_rate(self) -> None:
        limit = self.knobs.rate_limit_per_s
        if limit <= 0:
            return
        second = int(time.monotonic())
        seen = self._window[1] + 1 if self._window[0] == second else 1
        self._window = (second, seen)
        if seen > limit:
            self.counters["rate_limited"] += 1
            raise SimError("RATE_LIMITED", f"more than {limit} requests per second")

    def _check_endpoint(self, limit: EndpointLimit) -> None:
        if not self.knobs.endpoint_limits:
            return
        # A window begins with its first call: `count` calls in any `period_s` from there.
        now = time.monotonic()
        began, seen = self._endpoint_windows.get(limit.group, (now, 0))
        if now - began >= limit.period_s:
            began, seen = now, 0
        seen += 1
        self._endpoint_windows[limit.group] = (began, seen)
        if seen > limit.count:
            self.counters["rate_limited"] += 1
            raise SimError(
                "RATE_LIMITED",
                f"{limit.group}: more than {limit.count} calls in {limit.period_s:g} s",
            )

    def protocol(self, face: Face, handler: Handler, limit: EndpointLimit | None = None) -> Handler:
        """A protocol endpoint: the rate limits (the knob's, and the endpoint's own `limit`),
        the face's error answers, the latency knob."""

        async def endpoint(request: Request) -> Response:
            token = CURRENT_REQUEST.set(request)
            try:
                self._check_rate()
                if limit is not None:
                    self._check_endpoint(limit)
                response: Response = await handler(request)
            except SimError as exc:
                response = face.error_response(exc)
            finally:
                CURRENT_REQUEST.reset(token)
            if self.knobs.latency_ms > 0:
                await asyncio.sleep(self.knobs.latency_ms / 1000)
            return response

        return endpoint

    @staticmethod
    def control(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except SimError as exc:
                return generic_error(exc)

        return endpoint

    # -- core operations ----------------------------------------------------------

    def create_batch(
        self,
        request_key: str,
        terms: Mapping[str, Any],
        starts_at: datetime | None,
        ends_at: datetime | None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """A new batch, `created` (not started); the same `request_key` with the same terms
        finds the batch it made (created False), with other terms it is refused."""
        spec = {name: terms[name] for name in BATCH_TERMS}
        now = self.now()
        begins = starts_at or now
        ends = ends_at or begins + timedelta(days=spec["valid_days"])
        if ends <= begins:
            raise SimError("INVALID_REQUEST", "ends_at must be after starts_at")
        # Only an explicit window is part of the request: a default one depends on when the
        # request arrived, and a retry without a window must find the batch it created.
        window = (("starts_at", starts_at), ("ends_at", ends_at))
        asked = {
            **spec,
            **{name: iso(moment) for name, moment in window if moment is not None},
            **({"extra": dict(extra)} if extra else {}),
        }
        with self.store.tx() as db:
            row = db.execute(
                "SELECT * FROM batches WHERE request_key = ?", (request_key,)
            ).fetchone()
            if row is not None:
                if json.loads(row["request"]) != json.loads(json.dumps(asked)):
                    raise SimError(
                        "IDEMPOTENCY_KEY_REUSED", "request_key was used for another batch"
                    )
                return self._batch_json(row), False
            batch_id = self.face.new_batch_id()
            db.execute(
                "INSERT INTO batches (batch_id, request_key, status, remaining, created_at,"
                f" starts_at, ends_at, request, {', '.join(spec)})"
                f" VALUES (?, ?, 'created', ?, ?, ?, ?, ?, {', '.join('?' * len(spec))})",
                (
                    batch_id,
                    request_key,
                    spec["quantity"],
                    iso(now),
                    iso(begins),
                    iso(ends),
                    json.dumps(asked, sort_keys=True),
                    *spec.values(),
                ),
            )
            row = self._batch_row(db, batch_id)
        log.info("batch %s created (%s coupons)", batch_id, spec["quantity"])
        return self._batch_json(row), True

    @staticmethod
    def _batch_row(db: sqlite3.Connection, batch_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        if row is None:
            raise SimError("BATCH_NOT_FOUND", f"no batch {batch_id}")
        return row

    def batch_by_request_key(self, request_key: str) -> dict[str, Any] | None:
        row = self.store.db.execute(
            "SELECT * FROM batches WHERE request_key = ?", (request_key,)
        ).fetchone()
        return None if row is None else self._batch_json(row)

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._batch_json(self._batch_row(self.store.db, batch_id))

    def change_batch(self, batch_id: str, action: str) -> dict[str, Any]:
        if action not in ACTIONS:
            raise SimError("NOT_FOUND", f"no action {action}; one of {', '.join(ACTIONS)}")
        leaves, target = ACTIONS[action]
        with self.store.tx() as db:
            row = self._batch_row(db, batch_id)
            status = self._batch_status(row)
            if status == target:
                return self._batch_json(row)
            if status not in leaves:
                raise SimError(
                    "BATCH_STATE_INVALID", f"cannot {action} {_a(status)} {status} batch"
                )
            db.execute("UPDATE batches SET status = ? WHERE batch_id = ?", (target, batch_id))
            row = self._batch_row(db, batch_id)
        log.info("batch %s: %s, now %s", batch_id, action, target)
        return self._batch_json(row)

    async def send(self, batch_id: str, user_id: str, key: str) -> tuple[dict[str, Any], bool]:
        """Send a coupon of `batch_id` to `user_id`, once per `key`; the error and ambiguity
        knobs apply here, so every face has them."""
        if self._roll(self.knobs.error_rate):
            self.counters["errors_injected"] += 1
            log.info("send %s: injected SYSTEM_ERROR, not applied", key)
            raise SimError("SYSTEM_ERROR", "system error, please retry")

        row, created = self._apply_send(batch_id, user_id, key)
        self.counters["sends_applied" if created else "sends_replayed"] += 1
        coupon = self._coupon_json(row)

        if self._roll(self.knobs.ambiguous_rate):
            # The send is committed; the caller just cannot tell. Only resending the same key
            # finds out what happened.
            self.counters["ambiguous_injected"] += 1
            log.info("send %s: applied, answering ambiguously (%s)", key, self.knobs.ambiguous_mode)
            if self.knobs.ambiguous_mode == "5xx":
                raise SimError("SYSTEM_ERROR", "system error, please retry")
            await asyncio.sleep(self.knobs.ambiguous_hang_s)
        return coupon, created

    def _apply_send(self, batch_id: str, user_id: str, key: str) -> tuple[sqlite3.Row, bool]:
        with self.store.tx() as db:
            row = db.execute("SELECT * FROM coupons WHERE idempotency_key = ?", (key,)).fetchone()
            if row is not None:
                if (row["batch_id"], row["user_id"]) != (batch_id, user_id):
                    raise SimError(
                        "IDEMPOTENCY_KEY_REUSED",
                        "idempotency_key was used for another batch or user",
                    )
                return row, False
            batch = self._batch_row(db, batch_id)
            sent_at = self.now()
            self._check_sending(batch, sent_at)
            if user_id in self.knobs.restricted_users:
                raise SimError("USER_RESTRICTED", "this user may not receive coupons")
            (held,) = db.execute(
                "SELECT count(*) FROM coupons WHERE batch_id = ? AND user_id = ?",
                (batch_id, user_id),
            ).fetchone()
            if held >= batch["per_user_limit"]:
                raise SimError("USER_LIMIT_REACHED", "the user holds the batch's limit")
            if batch["remaining"] <= 0:
                raise SimError("BUDGET_EXHAUSTED", "the batch has no coupons left")
            # A coupon never outlives the batch's window.
            valid_until = min(
                sent_at + timedelta(days=batch["valid_days"]),
                datetime.fromisoformat(batch["ends_at"]),
            )
            coupon_id = self.face.new_coupon_id()
            db.execute(
                "INSERT INTO coupons (coupon_id, idempotency_key, batch_id, user_id, sent_at,"
                " valid_until) VALUES (?, ?, ?, ?, ?, ?)",
                (coupon_id, key, batch_id, user_id, iso(sent_at), iso(valid_until)),
            )
            db.execute(
                "UPDATE batches SET remaining = remaining - 1 WHERE batch_id = ?", (batch_id,)
            )
            row = db.execute("SELECT * FROM coupons WHERE coupon_id = ?", (coupon_id,)).fetchone()
        return row, True

    def _check_sending(self, batch: sqlite3.Row, now: datetime) -> None:
        # Paused may send again (the caller waits); any other non-running batch is a refusal.
        status = self._batch_status(batch, now)
        if status == "paused":
            raise SimError("BATCH_PAUSED", "the batch is paused")
        if status != "running":
            raise SimError("BATCH_NOT_RUNNING", f"the batch is {status}, not running")
        if now < datetime.fromisoformat(batch["starts_at"]):
            raise SimError("BATCH_NOT_STARTED", f"the batch starts at {batch['starts_at']}")

    def lookup(self, coupon_id: str, user_id: str | None) -> dict[str, Any]:
        """The coupon as the platform's lookup shows it: not found while the lag hides a new
        send (or for another user's coupon, when `user_id` is given)."""
        if self.knobs.lookup_error_status:
            self.counters["errors_injected"] += 1
            raise SimError(
                "INJECTED", "lookup fault injected", status=self.knobs.lookup_error_status
            )
        row = self.store.db.execute(
            "SELECT * FROM coupons WHERE coupon_id = ? AND (? IS NULL OR user_id = ?)",
            (coupon_id, user_id, user_id),
        ).fetchone()
        visible_at = (
            datetime.fromisoformat(row["sent_at"]) + timedelta(seconds=self.knobs.lookup_lag_s)
            if row is not None
            else None
        )
        if visible_at is None or self.now() < visible_at:
            self.counters["lookups_not_found"] += 1
            raise SimError("COUPON_NOT_FOUND", f"no coupon {coupon_id} for this user")
        return self._coupon_json(row)

    def use(self, coupon_id: str) -> dict[str, Any]:
        """The shop's till: the coupon is used (once; again is a no-op) and its notification
        recorded in the same transaction."""
        with self.store.tx() as db:
            row = db.execute("SELECT * FROM coupons WHERE coupon_id = ?", (coupon_id,)).fetchone()
            if row is None:
                raise SimError("COUPON_NOT_FOUND", f"no coupon {coupon_id}")
            status = self._coupon_json(row)["status"]
            if status == "expired":
                raise SimError("COUPON_EXPIRED", "the coupon's validity has ended")
            notification_id = None
            if status == "sent":
                now = self.now()
                db.execute(
                    "UPDATE coupons SET used_at = ? WHERE coupon_id = ?", (iso(now), coupon_id)
                )
                row = db.execute(
                    "SELECT * FROM coupons WHERE coupon_id = ?", (coupon_id,)
                ).fetchone()
                notification_id = self.notifier.enqueue(db, self._coupon_json(row), now)
        if notification_id is not None:
            self.notifier.wake()
        return self._coupon_json(row)

    def flow(self, batch_id: str, kind: str) -> FlowFile:
        """Publish the batch's flow file of `kind` (sent or used) for download by its token."""
        if kind not in FLOW_KINDS:
            raise SimError("NOT_FOUND", f"no flow {kind}; one of {', '.join(FLOW_KINDS)}")
        self._batch_row(self.store.db, batch_id)
        records = self._flow_records(batch_id, kind)
        content = _flow_csv(records)
        token = secrets.token_urlsafe(24)
        self._files[token] = content
        while len(self._files) > FLOW_FILES_KEPT:
            self._files.popitem(last=False)
        sha1 = hashlib.sha1(content, usedforsecurity=False).hexdigest()
        return FlowFile(token, sha1, len(records), content)

    def _flow_records(self, batch_id: str, kind: str) -> list[tuple[str, ...]]:
        # `at` is when the platform saw it happen: the send for "sent", the use for "used".
        # The used flow has no idempotency key: a till knows nothing of our requests.
        column = "sent_at" if kind == "sent" else "used_at"
        rows = self.store.db.execute(
            f"SELECT * FROM coupons WHERE batch_id = ? AND {column} IS NOT NULL", (batch_id,)
        ).fetchall()
        records: list[tuple[str, ...]] = [
            (
                row["coupon_id"],
                row["batch_id"],
                row["user_id"],
                row["idempotency_key"] if kind == "sent" else "",
                row[column],
            )
            for row in rows
        ]
        # Parsed, not compared as text: an ISO time without microseconds is shorter.
        records.sort(key=lambda record: (datetime.fromisoformat(record[4]), record[0]))
        return records

    def file(self, token: str) -> bytes:
        content = self._files.get(token)
        if content is None:
            raise SimError("FILE_NOT_FOUND", "no such file (ask for the flow again)")
        return content

    # -- /sim and /health -------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "mode": self.face.name})

    async def get_knobs(self, request: Request) -> Response:
        return JSONResponse(self.knobs.values())

    async def put_knobs(self, request: Request) -> Response:
        changes = await json_object(request)
        self._change_knobs(changes)
        log.info("knobs changed: %s", ", ".join(sorted(changes)))
        return JSONResponse(self.knobs.values())

    async def reset_knobs(self, request: Request) -> Response:
        """Every knob back to what it was when the process started (its SIM_* values)."""
        self._change_knobs(self._start_knobs)
        log.info("knobs reset")
        return JSONResponse(self.knobs.values())

    def _change_knobs(self, changes: Mapping[str, object]) -> None:
        self.knobs.update(changes)
        if "seed" in changes:
            self.rng.seed(self.knobs.seed)
        if "rate_limit_per_s" in changes or "endpoint_limits" in changes:
            # A new limit starts from fresh windows.
            self._window = (0, 0)
            self._endpoint_windows.clear()
        if any(name.startswith("callback_") for name in changes):
            self.notifier.wake()  # e.g. a callback_url set at last: deliver what waits

    async def stats(self, request: Request) -> Response:
        db = self.store.db
        (batches,) = db.execute("SELECT count(*) FROM batches").fetchone()
        (coupons,) = db.execute("SELECT count(*) FROM coupons").fetchone()
        return JSONResponse(
            {
                "batches": batches,
                "coupons": coupons,
                **self.counters,
                "callbacks_pending": self.notifier.pending(),
            }
        )

    async def notifications(self, request: Request) -> Response:
        """The newest notifications (`limit`, default 100), or one coupon's (`coupon_id`), with
        their delivery state: pending, delivered or given_up."""
        try:
            limit = positive_count(request.query_params.get("limit", NOTIFICATIONS_LISTED))
        except ValueError as exc:
            raise SimError("INVALID_REQUEST", f"limit {exc}") from None
        coupon_id = request.query_params.get("coupon_id")
        return JSONResponse({"notifications": self.notifier.listing(min(limit, 10_000), coupon_id)})

    async def put_batch(self, request: Request) -> Response:
        """Change a batch behind the service's back, as the platform's operator can: set its
        `remaining` budget (the total `quantity` follows, always sent + remaining) and/or force
        its `status`. Coupons already sent stay as they are, stopped or expired batch or not."""
        batch_id = request.path_params["batch_id"]
        body = await json_object(request)
        unknown = sorted(set(body) - {"remaining", "status"})
        if unknown:
            raise SimError("INVALID_REQUEST", f"unknown field: {', '.join(unknown)}")
        if not body:
            raise SimError("INVALID_REQUEST", "give remaining and/or status")
        remaining = integer_field(body, "remaining", minimum=0) if "remaining" in body else None
        status = body.get("status")
        if "status" in body and status not in CONTROL_STATUSES:
            raise SimError(
                "INVALID_REQUEST", f"status must be one of {', '.join(CONTROL_STATUSES)}"
            )
        with self.store.tx() as db:
            row = self._batch_row(db, batch_id)
            if status is not None:
                self._force_status(db, row, status)
            if remaining is not None:
                db.execute(
                    "UPDATE batches SET quantity = quantity - remaining + ?, remaining = ?"
                    " WHERE batch_id = ?",
                    (remaining, remaining, batch_id),
                )
            row = self._batch_row(db, batch_id)
        log.info("batch %s changed by the operator: %s", batch_id, body)
        return JSONResponse(self._batch_json(row))

    def _force_status(self, db: sqlite3.Connection, row: sqlite3.Row, status: str) -> None:
        # Nothing brings a finished batch back: its coupons' windows and the caller's view of
        # it as final would no longer hold. Checked before any write, so a refusal changes nothing.
        current = self._batch_status(row)
        if status not in FINISHED and current in FINISHED:
            raise SimError(
                "BATCH_STATE_INVALID", f"{_a(current)} {current} batch cannot be {status}"
            )
        ends_at = datetime.fromisoformat(row["ends_at"])
        if status == "expired":
            ends_at = min(ends_at, self.now())  # its window is over now
        db.execute(
            "UPDATE batches SET status = ?, ends_at = ? WHERE batch_id = ?",
            (status, iso(ends_at), row["batch_id"]),
        )

    async def batches(self, request: Request) -> Response:
        """Every batch the platform holds, with the request key it was created under: what
        fault runs compare with the ledger (no batch at the platform the ledger lacks, none
        created twice for a key)."""
        rows = self.store.db.execute(
            "SELECT batch_id, request_key, name, status, quantity, remaining FROM batches"
            " ORDER BY batch_id"
        ).fetchall()
        return JSONResponse({"batches": [dict(row) for row in rows]})

    async def batch_coupons(self, request: Request) -> Response:
        """Every coupon the platform holds for a batch: what chaos runs and reconciliation
        count duplicates against."""
        rows = self.store.db.execute(
            "SELECT * FROM coupons WHERE batch_id = ? ORDER BY sent_at, coupon_id",
            (request.path_params["batch_id"],),
        ).fetchall()
        return JSONResponse({"coupons": [self._coupon_json(row) for row in rows]})

    async def use_coupon(self, request: Request) -> Response:
        return JSONResponse(self.use(request.path_params["coupon_id"]))
