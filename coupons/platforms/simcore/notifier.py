"""Redemption notifications, delivered at least once to the `callback_url` knob."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from coupons.platforms.simcore.knobs import CALLBACK_RETRY_CAP_S, Knobs
from coupons.platforms.simcore.store import Store, iso

log = logging.getLogger("coupons.platforms.simulator")

CALLBACKS_IN_FLIGHT = 64  # deliveries under way at once; the rest wait their turn


class Herald(Protocol):
    """What a face says in a notification and how it signs it (the part of `Face` the
    notifier uses)."""

    @property
    def callbacks_on(self) -> bool:
        """False when the face cannot sign a notification (generic mode without a secret):
        then none is recorded."""
        ...

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
        self, store: Store, knobs: Knobs, rng: random.Random, counters: dict[str, int], face: Herald
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
