"""A real HTTP coupon platform: one protocol-neutral core, spoken through a "face" per
platform protocol: generic (our own small REST protocol, `sim_generic.py`), WeChat Pay API v3
vouchers (`sim_wechat.py`) or Alipay vouchers (`sim_alipay.py`), chosen with `--mode`.

Tests, the demo, chaos runs and benchmarks talk to it over the network exactly as they
would to a third-party platform. State lives in SQLite so it survives restarts, and the
`/sim/*` control plane (the same in every mode) turns the knobs that make a platform hard to
live with: latency, errors, ambiguous timeouts, lookup lag, rate limits, restricted users, and
changes batches behind the service's back (budget raised or cut, a batch paused or stopped by
an operator). `POST /sim/coupons/{id}/use` is the shop's till.

Batches live like WeChat Pay stocks: created, then started; paused and resumed; stopped for
good, or expired once their window is over. Coupons are sent only by a running batch inside
its window. Each batch publishes flow files (every coupon sent, every coupon used) that a
caller downloads and verifies by their SHA1, the platform's own record to reconcile against.

When a coupon is used, the platform notifies the merchant: a POST to the `callback_url` knob,
signed the face's way, kept in SQLite until the receiver takes it, retried with exponential
backoff, given up after `callback_max_attempts` (see `Notifier`).

Run: python -m coupons.platforms.simulator --mode generic --port 8600 --data PATH.sqlite3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import random
import secrets
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

log = logging.getLogger("coupons.platforms.simulator")

DEFAULT_DATA = Path(".data/simulator.sqlite3")
AMBIGUOUS_MODES = ("hang", "5xx")

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
MODES = ("generic", "wechat", "alipay")
FLOW_KINDS = ("sent", "used")
FLOW_COLUMNS = ("coupon_id", "batch_id", "user_id", "idempotency_key", "at")
# How redemption notifications are delivered (what they say and how they are signed is the
# face's business).
CALLBACK_RETRY_CAP_S = 60.0
CALLBACKS_IN_FLIGHT = 64  # deliveries under way at once; the rest wait their turn
NOTIFICATIONS_LISTED = 100  # GET /sim/notifications answers this many unless asked for more
# Flow files are kept in memory; a caller downloads one right after asking for it, so only the
# newest few are kept and an old token answers FILE_NOT_FOUND (ask for the flow again).
FLOW_FILES_KEPT = 256

Handler = Callable[[Request], Awaitable[Response]]


class SimError(Exception):
    """What a core operation raises: a protocol-neutral `code` each face maps to its own
    answer (status, error code, body). `status` is set only for an injected fault, whose HTTP
    status the knob chose."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


# The generic protocol's HTTP status for each neutral code; the control plane answers in the
# generic protocol whatever the mode.
GENERIC_STATUS: dict[str, int] = {
    "INVALID_REQUEST": 400,
    "UNAUTHORIZED": 401,
    "USER_RESTRICTED": 403,
    "USER_LIMIT_REACHED": 403,
    "NOT_FOUND": 404,
    "BATCH_NOT_FOUND": 404,
    "COUPON_NOT_FOUND": 404,
    "FILE_NOT_FOUND": 404,
    "BATCH_STATE_INVALID": 409,
    "BATCH_PAUSED": 409,
    "BATCH_NOT_RUNNING": 409,
    "BATCH_NOT_STARTED": 409,
    "BUDGET_EXHAUSTED": 409,
    "IDEMPOTENCY_KEY_REUSED": 409,
    "COUPON_EXPIRED": 409,
    "RATE_LIMITED": 429,
    "SYSTEM_ERROR": 500,
}


def generic_error(error: SimError) -> JSONResponse:
    status = error.status or GENERIC_STATUS.get(error.code, 500)
    return JSONResponse({"code": error.code, "message": error.message}, status)


# ---------------------------------------------------------------- knobs


def _number(value: object, *, lo: float = 0.0, hi: float | None = None) -> float:
    # bool is an int in Python; `true` as a latency is a caller bug, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number")
    number = float(value)
    if number < lo or (hi is not None and number > hi):
        raise ValueError(f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}")
    return number


def _rate(value: object) -> float:
    return _number(value, hi=1.0)


def _count(value: object) -> int:
    number = _number(value)
    if number != int(number):
        raise ValueError("must be a whole number")
    return int(number)


def _mode(value: object) -> str:
    if value not in AMBIGUOUS_MODES:
        raise ValueError(f"must be one of {', '.join(AMBIGUOUS_MODES)}")
    return str(value)


def _users(value: object) -> list[str]:
    if isinstance(value, str):  # the env var form: "u1,u2"
        return [user.strip() for user in value.split(",") if user.strip()]
    if isinstance(value, list) and all(isinstance(user, str) for user in value):
        return list(value)
    raise ValueError("must be a list of user ids")


def _status(value: object) -> int:
    status = _count(value)
    if status != 0 and not 400 <= status <= 599:
        raise ValueError("must be 0 (off) or an HTTP error status, 400 to 599")
    return status


def _seed(value: object) -> int | None:
    return None if value is None or value == "" else _count(value)


def _positive_count(value: object) -> int:
    count = _count(value)
    if count < 1:
        raise ValueError("must be at least 1")
    return count


def _url(value: object) -> str:
    """An http(s) URL, or "" for off."""
    if isinstance(value, str):
        url = value.strip()
        parts = urlsplit(url)
        if not url or (parts.scheme in ("http", "https") and parts.hostname):
            return url
    raise ValueError("must be an http(s) URL, or empty for off")


_KNOB_PARSERS: dict[str, Callable[[object], object]] = {
    "latency_ms": _number,
    "error_rate": _rate,
    "ambiguous_rate": _rate,
    "ambiguous_hang_s": _number,
    "ambiguous_mode": _mode,
    "lookup_lag_s": _number,
    "rate_limit_per_s": _count,
    "restricted_users": _users,
    "seed": _seed,
    "clock_offset_s": lambda value: _number(value, lo=float("-inf")),
    "lookup_error_status": _status,
    "callback_url": _url,
    "callback_retry_s": lambda value: _number(value, lo=0.01, hi=CALLBACK_RETRY_CAP_S),
    "callback_max_attempts": _positive_count,
    "callback_timeout_s": lambda value: _number(value, lo=0.05, hi=60.0),
    "callback_duplicate_rate": _rate,
    "callback_forged_rate": _rate,
    "callback_delay_ms": _number,
}


@dataclass
class Knobs:
    """Operator knobs; each one is read from `SIM_<NAME>` at start and set via PUT /sim/knobs."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    ambiguous_rate: float = 0.0
    ambiguous_hang_s: float = 10.0
    ambiguous_mode: str = "hang"
    lookup_lag_s: float = 0.0
    rate_limit_per_s: int = 0  # 0 means unlimited
    restricted_users: list[str] = field(default_factory=list)
    seed: int | None = None
    # Shifts the simulator's clock, so validity windows can run out without waiting days.
    clock_offset_s: float = 0.0
    # Coupon lookups answer this HTTP status (0: off), to prove a failing lookup after a
    # successful send is never taken for a refusal of the send.
    lookup_error_status: int = 0
    # Where redemption notifications go ("": nowhere, none is recorded). Clearing it later
    # holds the ones still pending until it is set again.
    callback_url: str = ""
    # The wait after a failed delivery: this, doubling with each failure, capped at 60 s.
    callback_retry_s: float = 1.0
    callback_max_attempts: int = 10  # then the notification is given up
    callback_timeout_s: float = 5.0  # a receiver slower than this is a failed attempt
    # Faults for chaos runs: after a delivery, deliver the identical notification again; before
    # a notification's first delivery, send a forged probe (alternately: the body signed with
    # a wrong key, or the genuine signature over a tampered body); hold each new notification
    # this long before its first delivery.
    callback_duplicate_rate: float = 0.0
    callback_forged_rate: float = 0.0
    callback_delay_ms: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Knobs:
        env = os.environ if env is None else env
        names = {f"SIM_{name.upper()}": name for name in _KNOB_PARSERS}
        knobs = cls()
        knobs.update({name: env[var] for var, name in names.items() if var in env})
        return knobs

    def update(self, changes: Mapping[str, object]) -> None:
        """Validate every change first, so a bad request changes nothing."""
        parsed: dict[str, object] = {}
        for name, value in changes.items():
            parser = _KNOB_PARSERS.get(name)
            if parser is None:
                raise SimError("INVALID_REQUEST", f"unknown knob: {name}")
            try:
                parsed[name] = parser(value)
            except ValueError as exc:
                raise SimError("INVALID_REQUEST", f"{name} {exc}") from None
        for name, value in parsed.items():
            setattr(self, name, value)


# ---------------------------------------------------------------- storage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    request_key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    face_value_cents INTEGER NOT NULL,
    min_spend_cents INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    remaining INTEGER NOT NULL CHECK (remaining >= 0),
    valid_days INTEGER NOT NULL,
    per_user_limit INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    ends_at TEXT NOT NULL,
    -- The create request as asked (JSON): a retry is compared with it, not with the batch as
    -- it is now (its budget may have been changed since, its default window was computed).
    request TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS coupons (
    coupon_id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    batch_id TEXT NOT NULL REFERENCES batches (batch_id),
    user_id TEXT NOT NULL,
    sent_at TEXT NOT NULL,
    valid_until TEXT NOT NULL,
    used_at TEXT
);
CREATE INDEX IF NOT EXISTS coupons_by_batch_user ON coupons (batch_id, user_id);
-- Redemption notifications, kept until a receiver takes them, so a restart loses none.
CREATE TABLE IF NOT EXISTS notifications (
    id TEXT PRIMARY KEY,
    coupon_id TEXT NOT NULL REFERENCES coupons (coupon_id),
    body BLOB NOT NULL,           -- the exact bytes every delivery sends and signs
    created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,         -- unix seconds; NULL once delivered or given up
    delivered_at TEXT,
    given_up_at TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
"""


class Store:
    """One SQLite connection, used only from the event loop thread: by request handlers and
    by the notification deliveries alike.

    Every read-check-write runs synchronously inside one transaction with no `await` in
    between, so concurrent requests (and deliveries) cannot interleave within it; the UNIQUE
    constraints are the second line of defence.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the app may be built in one thread and served in another.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL loses nothing when the process is killed, only on an OS crash.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        _upgrade(self.db)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


def _upgrade(db: sqlite3.Connection) -> None:
    """Bring a data file written before batch windows up to date, so its batches keep working:
    their window becomes the default one, and the old `active` reads `running`."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(batches)")}
    if "request" in columns:
        return
    spec = ("name", "face_value_cents", "min_spend_cents", "quantity", "valid_days")
    db.execute("BEGIN IMMEDIATE")
    for column in ("starts_at", "ends_at", "request"):
        db.execute(f"ALTER TABLE batches ADD COLUMN {column} TEXT")
    for row in db.execute("SELECT * FROM batches").fetchall():
        created = datetime.fromisoformat(row["created_at"])
        asked = {name: row[name] for name in (*spec, "per_user_limit")}
        db.execute(
            "UPDATE batches SET starts_at = ?, ends_at = ?, request = ?,"
            " status = CASE status WHEN 'active' THEN 'running' ELSE status END"
            " WHERE batch_id = ?",
            (
                iso(created),
                iso(created + timedelta(days=row["valid_days"])),
                json.dumps(asked, sort_keys=True),
                row["batch_id"],
            ),
        )
    db.execute("COMMIT")
    log.info("data file upgraded: batches have windows")


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


def iso(moment: datetime) -> str:
    return moment.isoformat()


def _flow_csv(records: list[tuple[str, ...]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(FLOW_COLUMNS)
    writer.writerows(records)
    return buffer.getvalue().encode()


# ---------------------------------------------------------------- notifications


def retry_delay(failures: int, base_s: float) -> float:
    """The wait after the `failures`-th failed delivery: base, doubling, capped at 60 s."""
    return float(min(base_s * 2 ** min(failures - 1, 32), CALLBACK_RETRY_CAP_S))


def _shown(body: bytes) -> Any:
    """A stored notification body for the control plane: JSON as JSON, a form as text."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def _utc(unix_s: float | None) -> str | None:
    return None if unix_s is None else iso(datetime.fromtimestamp(unix_s, UTC))


class Notifier:
    """Delivers COUPON.USED notifications to `callback_url`, at least once.

    A notification is written in the same transaction that marks its coupon used, and stays
    due (`next_attempt_at`) until a receiver answers 2xx or `callback_max_attempts` fail. The
    delivery loop runs in the app's event loop: it reads what is due, posts each in its own
    task (at most CALLBACKS_IN_FLIGHT at once, so a slow receiver never holds up requests),
    and records each outcome in one transaction with no `await` inside, as every Store user
    does. A notification in flight when the process stops is sent again after the restart.
    """

    def __init__(
        self, store: Store, knobs: Knobs, rng: random.Random, counters: dict[str, int], face: Face
    ) -> None:
        self.store = store
        self.knobs = knobs
        self.rng = rng
        self.counters = counters
        self.face = face
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        for name in (
            "callbacks_delivered",
            "callback_attempts_failed",
            "callbacks_given_up",
            "callbacks_duplicated",
            "callbacks_forged_sent",
            "callbacks_forged_accepted",
        ):
            counters[name] = 0

    @property
    def on(self) -> bool:
        return self.face.callbacks_on

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def enqueue(
        self, db: sqlite3.Connection, coupon: Mapping[str, Any], now: datetime
    ) -> str | None:
        """Record the notification of `coupon`'s use, inside the caller's transaction; None
        when callbacks are off (the face cannot sign, or no `callback_url`)."""
        if not self.on or not self.knobs.callback_url:
            return None
        notification_id = f"ntf_{uuid.uuid4().hex}"
        body = self.face.notification(notification_id, coupon, now)
        db.execute(
            "INSERT INTO notifications (id, coupon_id, body, created_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                notification_id,
                coupon["coupon_id"],
                body,
                iso(datetime.now(UTC)),
                time.time() + self.knobs.callback_delay_ms / 1000,
            ),
        )
        return notification_id

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled; cancelling stops the deliveries under way too."""
        # trust_env=False: a proxy from the environment must not carry our callbacks.
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
            try:
                while True:
                    self._wake.clear()
                    wait_s = self._dispatch(client)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait_s)
            finally:
                tasks = list(self._in_flight.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def _dispatch(self, client: httpx.AsyncClient) -> float | None:
        """Start a delivery for each notification now due; answer how long to sleep (None:
        until woken by a new notification, a knob change or a finished delivery)."""
        url = self.knobs.callback_url
        if not url:
            return None
        now = time.time()
        room = CALLBACKS_IN_FLIGHT - len(self._in_flight)
        if room > 0:
            busy = tuple(self._in_flight)
            rows = self.store.db.execute(
                "SELECT id, body, attempts FROM notifications WHERE next_attempt_at <= ?"
                f" AND id NOT IN ({', '.join('?' * len(busy))})"
                " ORDER BY next_attempt_at LIMIT ?",
                (now, *busy, room),
            ).fetchall()
            for row in rows:
                task = asyncio.create_task(
                    self._deliver(client, url, row["id"], row["body"], row["attempts"])
                )
                self._in_flight[row["id"]] = task
        (next_at,) = self.store.db.execute(
            "SELECT min(next_attempt_at) FROM notifications WHERE next_attempt_at > ?", (now,)
        ).fetchone()
        return None if next_at is None else max(0.0, next_at - time.time())

    async def _deliver(
        self, client: httpx.AsyncClient, url: str, notification_id: str, body: bytes, attempts: int
    ) -> None:
        try:
            if attempts == 0 and self._roll(self.knobs.callback_forged_rate):
                await self._forge(client, url, body)
            error = await self._attempt(client, url, body)
            self._record(notification_id, attempts + 1, error)
            if error is None and self._roll(self.knobs.callback_duplicate_rate):
                self.counters["callbacks_duplicated"] += 1
                again = await self._attempt(client, url, body)
                log.info("notification %s delivered again: %s", notification_id, again or "2xx")
        finally:
            del self._in_flight[notification_id]
            self._wake.set()

    async def _attempt(self, client: httpx.AsyncClient, url: str, stored: bytes) -> str | None:
        body = self.face.delivery_body(stored)
        return await self._post(client, url, body, self.face.delivery_headers(body))

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
    ) -> str | None:
        """None when the receiver took the notification, else what went wrong."""
        try:
            response = await client.post(
                url, content=body, headers=headers, timeout=self.knobs.callback_timeout_s
            )
        except httpx.TimeoutException:
            return "timeout"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        if self.face.acknowledged(response):
            return None
        return f"HTTP {response.status_code}" if not response.is_success else "not acknowledged"

    async def _forge(self, client: httpx.AsyncClient, url: str, body: bytes) -> None:
        """A probe no receiver may accept (the face alternates its kinds: a wrong key, a
        tampered body)."""
        sent = self.counters["callbacks_forged_sent"]
        content, headers = self.face.forged(body, sent)
        self.counters["callbacks_forged_sent"] = sent + 1
        error = await self._post(client, url, content, headers)
        if error is None:
            self.counters["callbacks_forged_accepted"] += 1
            log.warning("forged notification (probe %d) accepted by %s", sent, url)

    def _record(self, notification_id: str, attempts: int, error: str | None) -> None:
        now = datetime.now(UTC)
        with self.store.tx() as db:
            if error is None:
                db.execute(
                    "UPDATE notifications SET attempts = ?, delivered_at = ?,"
                    " next_attempt_at = NULL, last_error = NULL WHERE id = ?",
                    (attempts, iso(now), notification_id),
                )
            elif attempts >= self.knobs.callback_max_attempts:
                db.execute(
                    "UPDATE notifications SET attempts = ?, given_up_at = ?,"
                    " next_attempt_at = NULL, last_error = ? WHERE id = ?",
                    (attempts, iso(now), error, notification_id),
                )
            else:
                wait_s = retry_delay(attempts, self.knobs.callback_retry_s)
                retry_at = time.time() + wait_s
                log.info(
                    "notification %s attempt %d failed (%s), next in %.2f s",
                    notification_id,
                    attempts,
                    error,
                    wait_s,
                )
                db.execute(
                    "UPDATE notifications SET attempts = ?, next_attempt_at = ?, last_error = ?"
                    " WHERE id = ?",
                    (attempts, retry_at, error, notification_id),
                )
        if error is None:
            self.counters["callbacks_delivered"] += 1
        else:
            self.counters["callback_attempts_failed"] += 1
            if attempts >= self.knobs.callback_max_attempts:
                self.counters["callbacks_given_up"] += 1
                log.warning(
                    "notification %s given up after %d attempts: %s",
                    notification_id,
                    attempts,
                    error,
                )

    def pending(self) -> int:
        (count,) = self.store.db.execute(
            "SELECT count(*) FROM notifications WHERE next_attempt_at IS NOT NULL"
        ).fetchone()
        return int(count)

    def listing(self, limit: int, coupon_id: str | None) -> list[dict[str, Any]]:
        rows = self.store.db.execute(
            "SELECT * FROM notifications WHERE ? IS NULL OR coupon_id = ?"
            " ORDER BY rowid DESC LIMIT ?",
            (coupon_id, coupon_id, limit),
        ).fetchall()
        return [
            {
                "id": row["id"],
                "coupon_id": row["coupon_id"],
                "state": (
                    "delivered"
                    if row["delivered_at"] is not None
                    else "given_up"
                    if row["given_up_at"] is not None
                    else "pending"
                ),
                "attempts": row["attempts"],
                "created_at": row["created_at"],
                "next_attempt_at": _utc(row["next_attempt_at"]),
                "delivered_at": row["delivered_at"],
                "given_up_at": row["given_up_at"],
                "last_error": row["last_error"],
                "body": _shown(row["body"]),
            }
            for row in rows
        ]


# ---------------------------------------------------------------- faces


class Face(Protocol):
    """One platform protocol spoken over the core: its routes, ids, errors and notifications.

    The core decides what happens (a batch's life, sends, budgets, lag, faults); a face only
    says it in its platform's words and checks its platform's signatures.
    """

    name: str

    @property
    def callbacks_on(self) -> bool:
        """False when the face cannot sign a notification (generic mode without a secret):
        then none is recorded."""
        ...

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        """The protocol's routes, each handler wrapped with `sim.protocol(self, handler)`."""
        ...

    def error_response(self, error: SimError) -> Response: ...

    def new_batch_id(self) -> str: ...

    def new_coupon_id(self) -> str: ...

    def notification(self, notification_id: str, coupon: Mapping[str, Any], now: datetime) -> bytes:
        """The exact body of a coupon-used notification, stored and sent as-is every time."""
        ...

    def delivery_body(self, body: bytes) -> bytes:
        """The body of one delivery attempt: the stored one, or (where the platform signs
        inside the body, as Alipay does) the same notification stamped and signed anew, so
        a late retry is not stale."""
        ...

    def delivery_headers(self, body: bytes) -> dict[str, str]:
        """The headers of one delivery attempt (a fresh timestamp, nonce and signature)."""
        ...

    def forged(self, body: bytes, n: int) -> tuple[bytes, dict[str, str]]:
        """A probe no correct receiver accepts; `n` (the probes sent so far) picks its kind."""
        ...

    def acknowledged(self, response: httpx.Response) -> bool:
        """Whether the receiver's answer takes the notification (no more retries)."""
        ...


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

    def protocol(self, face: Face, handler: Handler) -> Handler:
        """A protocol endpoint: the rate limit, the face's error answers, the latency knob."""

        async def endpoint(request: Request) -> Response:
            try:
                self._check_rate()
                response: Response = await handler(request)
            except SimError as exc:
                response = face.error_response(exc)
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
        return JSONResponse(asdict(self.knobs))

    async def put_knobs(self, request: Request) -> Response:
        changes = await json_object(request)
        self.knobs.update(changes)
        if "seed" in changes:
            self.rng.seed(self.knobs.seed)
        if "rate_limit_per_s" in changes:
            self._window = (0, 0)  # a new limit starts from a fresh window
        if any(name.startswith("callback_") for name in changes):
            self.notifier.wake()  # e.g. a callback_url set at last: deliver what waits
        log.info("knobs changed: %s", ", ".join(sorted(changes)))
        return JSONResponse(asdict(self.knobs))

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
            limit = _positive_count(request.query_params.get("limit", NOTIFICATIONS_LISTED))
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


def _report_stop(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("notification delivery stopped", exc_info=task.exception())


def make_face(mode: str, keys_dir: Path) -> Face:
    """The face of `mode`; each platform's face is imported only when asked for."""
    if mode == "generic":
        from coupons.platforms.sim_generic import GenericFace

        return GenericFace(
            api_key=os.environ.get("PLATFORM_API_KEY") or None,
            callback_secret=os.environ.get("PLATFORM_CALLBACK_SECRET") or None,
        )
    if mode == "wechat":
        from coupons.platforms.sim_wechat import WechatFace

        return WechatFace(keys_dir)
    if mode == "alipay":
        from coupons.platforms.sim_alipay import AlipayFace

        return AlipayFace(keys_dir)
    raise ValueError(f"unknown simulator mode {mode!r}; one of {', '.join(MODES)}")


def create_app(
    data_path: Path,
    knobs: Knobs | None = None,
    mode: str = "generic",
    keys_dir: Path | None = None,
) -> Starlette:
    """The simulator as an ASGI app speaking `mode`'s protocol. Generic mode reads
    `PLATFORM_API_KEY` (if set, it guards every /v1 path) and `PLATFORM_CALLBACK_SECRET` (if
    set, it signs redemption notifications; none is sent without) now; the wechat and alipay
    modes keep their key material under `keys_dir` (made on first start)."""
    keys = keys_dir if keys_dir is not None else data_path.parent / "platform-keys"
    face = make_face(mode, keys)
    sim = Simulator(data_path, knobs if knobs is not None else Knobs.from_env(), face, keys)
    log.info("simulator (%s) data at %s", mode, data_path)
    if not face.callbacks_on:
        log.info("callbacks off: PLATFORM_CALLBACK_SECRET is not set, no notification is sent")
    else:
        log.info("callbacks on, to %s", sim.knobs.callback_url or "nowhere yet (callback_url)")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        delivery = asyncio.create_task(sim.notifier.run()) if sim.notifier.on else None
        if delivery is not None:
            delivery.add_done_callback(_report_stop)
        try:
            yield
        finally:
            if delivery is not None:
                delivery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await delivery
            sim.store.close()

    control = sim.control
    routes = [
        Route("/health", sim.health, methods=["GET"]),
        *face.routes(sim),
        Route("/sim/knobs", control(sim.get_knobs), methods=["GET"]),
        Route("/sim/knobs", control(sim.put_knobs), methods=["PUT"]),
        Route("/sim/stats", control(sim.stats), methods=["GET"]),
        Route("/sim/notifications", control(sim.notifications), methods=["GET"]),
        Route("/sim/batches/{batch_id}", control(sim.put_batch), methods=["PUT"]),
        Route("/sim/batches/{batch_id}/coupons", control(sim.batch_coupons), methods=["GET"]),
        Route("/sim/coupons/{coupon_id}/use", control(sim.use_coupon), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.simulator = sim
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Coupon platform simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQLite file")
    parser.add_argument(
        "--mode", choices=MODES, default="generic", help="the platform protocol to speak"
    )
    parser.add_argument(
        "--keys", type=Path, default=None, help="key material (default: beside --data)"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Not a line per callback sent; failures and give-ups are logged by the Notifier.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(args.data, mode=args.mode, keys_dir=args.keys)
    # A hanging ambiguous answer must not hold up shutdown for its whole hang.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=args.access_log,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    # Run the imported module, not `__main__`: the faces import `coupons.platforms.simulator`,
    # and its SimError must be the class the core catches.
    from coupons.platforms import simulator

    simulator.main()
