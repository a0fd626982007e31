"""The simulator's SQLite store: batches, coupons and notifications, kept across restarts."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

log = logging.getLogger("coupons.platforms.simulator")


def iso(moment: datetime) -> str:
    return moment.isoformat()


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
