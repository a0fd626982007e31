"""Every value the service takes, as it takes it: one table for the command line, the HTTP
API and the catalog, checked before anything is written or sent to the platform.

The command line parses with `Whole.parse`, `parse_time` and `parse_duration`; the API's
request models take their bounds from the same rules (app/api/models.py), so OpenAPI
shows them; the catalog checks them again for Python callers. The README's bad-input table
lists each rule, and a test holds it to this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from coupons.errors import InvalidField

ID_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
# `<campaign>:<user>:<n>`.
COUPON_ID_PATTERN = r"^[A-Za-z0-9._@:-]{1,200}$"
# Printable text, not blank: a control character (NUL above all, which PostgreSQL's text
# cannot hold) is refused with the field named, not failed on in the ledger. No lookahead:
# pydantic's regex engine has none.
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*$"
_ID = re.compile(ID_PATTERN)
_COUPON_ID = re.compile(COUPON_ID_PATTERN)
_PRINTABLE = re.compile(PRINTABLE_PATTERN)

# Times outside these years are typos, and would overflow date arithmetic downstream.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
# How much of a refused value an error message quotes: a 64 KiB value would bury the reason.
SHOWN_CHARS = 40


def shown(value: object) -> str:
    """`value` as an error message quotes it: its repr, cut after SHOWN_CHARS characters."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(str(value))} characters)"


@dataclass(frozen=True)
class _Bounded:
    """A rule bounded by `low` and `high` (inclusive); each kind says its `range` in words."""

    name: str
    low: int
    high: int


@dataclass(frozen=True)
class Whole(_Bounded):
    """A whole number between `low` and `high` (inclusive), counted in `unit`."""

    unit: str

    @property
    def range(self) -> str:
        return f"{self.low:,} to {self.high:,} {self.unit}"

    def check(self, field: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidField(field, f"{shown(value)} is not a whole number ({self.range})")
        if not self.low <= value <= self.high:
            raise InvalidField(field, f"{shown(value)} is out of range: {self.range}")
        return value

    def parse(self, field: str, text: str) -> int:
        """From the command line: digits only (`1e20`, `5.0` and `0x10` are refused)."""
        if not re.fullmatch(r"[+-]?[0-9]{1,30}", text.strip()):
            raise InvalidField(field, f"{shown(text)} is not a whole number ({self.range})")
        return self.check(field, int(text))


@dataclass(frozen=True)
class Text(_Bounded):
    """Printable text of `low` to `high` characters."""

    @property
    def range(self) -> str:
        return f"{self.low} to {self.high} printable characters, not all spaces"

    def check(self, field: str, value: object) -> str:
        if not isinstance(value, str):
            raise InvalidField(field, f"{shown(value)} is not text ({self.range})")
        if not self.low <= len(value) <= self.high or not _PRINTABLE.fullmatch(value):
            raise InvalidField(field, f"{shown(value)} is not valid: {self.range}")
        return value


@dataclass(frozen=True)
class Seconds:
    """A number of seconds above zero and at most `high` (the command line's waits)."""

    name: str
    high: float

    @property
    def range(self) -> str:
        return f"more than 0 and at most {self.high:g} seconds"

    def parse(self, field: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise InvalidField(field, f"{shown(text)} is not a number ({self.range})") from None
        if not 0 < value <= self.high:  # NaN fails this too
            raise InvalidField(field, f"{shown(text)} is out of range: {self.range}")
        return value


# Coupons in a batch, and a campaign's quota: within PostgreSQL's integer, and more than any
# platform holds in one batch (WeChat Pay's stocks stop at 10,000,000, docs/platforms/wechat.md).
QUANTITY = Whole("quantity", 1, 100_000_000, "coupons")
QUOTA = Whole("quota", 1, 100_000_000, "coupons")
PER_USER_LIMIT = Whole("per-user limit", 1, 1000, "coupons per user")
# Money is in cents (分) everywhere, as both platforms count it; 1,000,000 yuan at most.
FACE_VALUE_CENTS = Whole("face value", 1, 100_000_000, "cents")
MIN_SPEND_CENTS = Whole("minimum spend", 0, 100_000_000, "cents")
VALID_DAYS = Whole("valid days", 1, 3650, "days")
MAX_TASK_DEADLINE = timedelta(days=366)
TASK_DEADLINE_S = Whole("task deadline", 1, int(MAX_TASK_DEADLINE.total_seconds()), "seconds")
TASKS = Whole("tasks", 0, 20, "tasks")
LIST_LIMIT = Whole("list limit", 1, 1000, "coupons")
TASK_EVENTS = Whole("task events", 1, 200, "events")
NAME = Text("name", 1, 100)
REASON = Text("reason", 1, 200)
TIMEOUT = Seconds("timeout", 3600)


# The rules that are patterns rather than ranges, by the names the README's table gives them.
ID = "id"
COUPON_ID = "coupon id"
TIME = "time"
DURATION = "duration"
TASK = "task"


def validate_id(kind: str, value: object) -> str:
    """`value` if it is a valid `kind` id (campaign, user, batch, task, ...), else refused."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidField(
            kind, f"{shown(value)} is not valid: use 1 to 64 letters, digits, '.', '_', '@' or '-'"
        )
    return value


def validate_coupon_id(value: object) -> str:
    if not isinstance(value, str) or not _COUPON_ID.fullmatch(value):
        raise InvalidField(
            "coupon",
            f"{shown(value)} is not a coupon id: <campaign>:<user>:<n>, up to 200 characters",
        )
    return value


def plausible(field: str, moment: datetime) -> datetime:
    if not EARLIEST <= moment < LATEST:
        raise InvalidField(field, f"{moment.isoformat()} must be between the years 2000 and 2099")
    return moment


def parse_time(field: str, text: str) -> datetime:
    """An ISO 8601 time that names its timezone (`Z` or an offset), in 2000 to 2099."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidField(
            field, f"{shown(text)} is not an ISO 8601 time such as 2026-06-01T00:00:00+08:00"
        ) from None
    if value.utcoffset() is None:
        raise InvalidField(field, f"{shown(text)} has no timezone; add Z or an offset like +08:00")
    return plausible(field, value)


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
DURATION_FORMS = "7d, 12h, 30m, 90s or 1d12h"


def parse_duration(field: str, text: str) -> timedelta:
    """`7d`, `12h`, `30m`, `90s` or a sequence such as `1d12h`, up to MAX_TASK_DEADLINE."""
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise InvalidField(
            field, f"{shown(text)} is not a duration; use a form like {DURATION_FORMS}"
        )
    try:
        days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
        value = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except (OverflowError, ValueError):
        value = MAX_TASK_DEADLINE + timedelta(days=1)  # refused just below, with the range
    if value <= timedelta(0):
        raise InvalidField(field, f"{shown(text)} must be longer than zero")
    if value > MAX_TASK_DEADLINE:
        raise InvalidField(
            field, f"{shown(text)} is out of range: at most {MAX_TASK_DEADLINE.days} days"
        )
    return value
