"""The operator's knobs: each read from `SIM_<NAME>` at start and set with PUT /sim/knobs.

The core's knobs are `Knobs`' fields; a face adds knobs of its own protocol (`FaceKnob`), read
and set the same way, so a platform's particulars never become fields of the core."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from coupons.platforms.simcore.errors import SimError

AMBIGUOUS_MODES = ("hang", "5xx")
# The longest wait between two deliveries of a notification.
CALLBACK_RETRY_CAP_S = 60.0

# ---------------------------------------------------------------- knobs


def _number(value: object, *, lo: float = 0.0, hi: float | None = None) -> float:
    # bool is an int in Python; `true` as a latency is a caller bug, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number")
    number = float(value)
    if not math.isfinite(number):  # inf and nan would break the clock and the JSON answers
        raise ValueError("must be a finite number")
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


def number(value: object, *, lo: float = 0.0, hi: float | None = None) -> float:
    """A knob's number, for a face's knob parsers."""
    return _number(value, lo=lo, hi=hi)


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


def positive_count(value: object) -> int:
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
    "callback_max_attempts": positive_count,
    "callback_timeout_s": lambda value: _number(value, lo=0.05, hi=60.0),
    "callback_duplicate_rate": _rate,
    "callback_forged_rate": _rate,
    "callback_delay_ms": _number,
    "endpoint_limits": lambda value: _boolean(value),
}


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "on", "false", "0", "off"):
        return value.lower() in ("true", "1", "on")
    raise ValueError("must be true or false")


@dataclass(frozen=True)
class FaceKnob:
    """A knob a face declares: its value when nothing sets it, and how a value is read (a
    ValueError says what is wrong with it)."""

    default: object
    parse: Callable[[object], object]


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
    # Each endpoint's own published frequency limit, as the face declares them (WeChat Pay:
    # 500 sends a second, 60 stock creations a minute, ...); off leaves only rate_limit_per_s.
    endpoint_limits: bool = True
    # The face's own knobs, by name; `face_knobs` says how each is read.
    face: dict[str, object] = field(default_factory=dict)
    face_knobs: dict[str, FaceKnob] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        face_knobs: Mapping[str, FaceKnob] | None = None,
    ) -> Knobs:
        env = os.environ if env is None else env
        declared = dict(face_knobs or {})
        knobs = cls(
            face={name: knob.parse(knob.default) for name, knob in declared.items()},
            face_knobs=declared,
        )
        names = {f"SIM_{name.upper()}": name for name in (*_KNOB_PARSERS, *declared)}
        knobs.update({name: env[var] for var, name in names.items() if var in env})
        return knobs

    def values(self) -> dict[str, object]:
        """Every knob by name, the face's beside the core's (what GET /sim/knobs shows)."""
        core = asdict(self)
        del core["face"], core["face_knobs"]
        return {**core, **self.face}

    def update(self, changes: Mapping[str, object]) -> None:
        """Validate every change first, so a bad request changes nothing."""
        parsed: dict[str, object] = {}
        for name, value in changes.items():
            face_knob = self.face_knobs.get(name)
            parser = face_knob.parse if face_knob is not None else _KNOB_PARSERS.get(name)
            if parser is None:
                raise SimError("INVALID_REQUEST", f"unknown knob: {name}")
            try:
                parsed[name] = parser(value)
            except ValueError as exc:
                raise SimError("INVALID_REQUEST", f"{name} {exc}") from None
        for name, value in parsed.items():
            if name in self.face_knobs:
                self.face[name] = value
            else:
                setattr(self, name, value)
