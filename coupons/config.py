"""Configuration: one typed object, built from the environment in one place.

Every default points at the embedded stack that `make run` starts, so the command
line and the worker work against it with no configuration at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from coupons.contract import ISSUE_HEARTBEAT, ISSUE_START_TO_CLOSE, platform_task_queue

N = TypeVar("N", int, float)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".data")
    database_url_override: str | None = None
    pg_port: int = 55432
    temporal_address_override: str | None = None
    temporal_port: int = 7233
    temporal_ui_port: int = 8233
    temporal_namespace: str = "default"
    task_queue: str = "coupons"
    platform_url_override: str | None = None
    simulator_port: int = 8600
    platform_api_key: str | None = field(default=None, repr=False)
    platform_timeout_s: float = 5.0
    platform_rate_limit: float = 500.0
    lag_window_s: float = 30.0
    db_pool_size: int = 20
    claim_repair_after_s: float = 30.0
    # Workflows kept in the worker's memory; the rest are rebuilt from history on demand.
    worker_cache_size: int = 1000
    # The catalog sync schedule's interval, and the hour (UTC) of the daily reconciliation.
    sync_interval_s: float = 300.0
    reconcile_hour_utc: int = 3

    @property
    def database_url(self) -> str:
        return (
            self.database_url_override or f"postgresql://postgres@127.0.0.1:{self.pg_port}/coupons"
        )

    @property
    def temporal_address(self) -> str:
        return self.temporal_address_override or f"127.0.0.1:{self.temporal_port}"

    @property
    def platform_task_queue(self) -> str:
        return platform_task_queue(self.task_queue)

    @property
    def platform_url(self) -> str:
        return self.platform_url_override or f"http://127.0.0.1:{self.simulator_port}"

    def check(self) -> Settings:
        """Refuse settings under which no send could ever complete."""
        heartbeat = ISSUE_HEARTBEAT.total_seconds()
        if self.platform_timeout_s >= heartbeat / 2:
            raise ConfigError(
                f"PLATFORM_TIMEOUT_S={self.platform_timeout_s:g} must stay under "
                f"{heartbeat / 2:g}: a platform call has to answer well within the issue "
                f"activity's {heartbeat:g} s heartbeat timeout"
            )
        budget = ISSUE_START_TO_CLOSE.total_seconds() - 3 * self.platform_timeout_s
        if self.lag_window_s > budget:
            raise ConfigError(
                f"LAG_WINDOW_S={self.lag_window_s:g} must be at most {budget:g}: the send and "
                f"the lag window must fit in the issue activity's "
                f"{ISSUE_START_TO_CLOSE.total_seconds():g} s"
            )
        return self

    def to_env(self) -> dict[str, str]:
        """The environment that makes `from_env` rebuild these settings in a child process."""
        env = {
            "DATA_DIR": str(self.data_dir),
            "PG_PORT": str(self.pg_port),
            "TEMPORAL_PORT": str(self.temporal_port),
            "TEMPORAL_UI_PORT": str(self.temporal_ui_port),
            "TEMPORAL_NAMESPACE": self.temporal_namespace,
            "TASK_QUEUE": self.task_queue,
            "SIMULATOR_PORT": str(self.simulator_port),
            "PLATFORM_TIMEOUT_S": str(self.platform_timeout_s),
            "PLATFORM_RATE_LIMIT": str(self.platform_rate_limit),
            "LAG_WINDOW_S": str(self.lag_window_s),
            "DB_POOL_SIZE": str(self.db_pool_size),
            "CLAIM_REPAIR_AFTER_S": str(self.claim_repair_after_s),
            "WORKER_CACHE_SIZE": str(self.worker_cache_size),
            "SYNC_INTERVAL_S": str(self.sync_interval_s),
            "RECONCILE_HOUR_UTC": str(self.reconcile_hour_utc),
        }
        optional = {
            "DATABASE_URL": self.database_url_override,
            "TEMPORAL_ADDRESS": self.temporal_address_override,
            "PLATFORM_URL": self.platform_url_override,
            "PLATFORM_API_KEY": self.platform_api_key,
        }
        env.update({name: value for name, value in optional.items() if value})
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            data_dir=Path(env.get("DATA_DIR", ".data")),
            database_url_override=env.get("DATABASE_URL") or None,
            pg_port=_number(env, "PG_PORT", 55432, int),
            temporal_address_override=env.get("TEMPORAL_ADDRESS") or None,
            temporal_port=_number(env, "TEMPORAL_PORT", 7233, int),
            temporal_ui_port=_number(env, "TEMPORAL_UI_PORT", 8233, int),
            temporal_namespace=env.get("TEMPORAL_NAMESPACE", "default"),
            task_queue=env.get("TASK_QUEUE", "coupons"),
            platform_url_override=env.get("PLATFORM_URL") or None,
            simulator_port=_number(env, "SIMULATOR_PORT", 8600, int),
            platform_api_key=env.get("PLATFORM_API_KEY") or None,
            platform_timeout_s=_number(env, "PLATFORM_TIMEOUT_S", 5.0, float),
            platform_rate_limit=_number(env, "PLATFORM_RATE_LIMIT", 500.0, float),
            lag_window_s=_number(env, "LAG_WINDOW_S", 30.0, float),
            db_pool_size=_number(env, "DB_POOL_SIZE", 20, int),
            claim_repair_after_s=_number(env, "CLAIM_REPAIR_AFTER_S", 30.0, float),
            worker_cache_size=_number(env, "WORKER_CACHE_SIZE", 1000, int),
            sync_interval_s=_number(env, "SYNC_INTERVAL_S", 300.0, float),
            reconcile_hour_utc=_hour(env, "RECONCILE_HOUR_UTC", 3),
        ).check()


def _number(env: Mapping[str, str], name: str, default: N, kind: type[N]) -> N:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be greater than zero")
    return value


def _hour(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 0 <= int(raw) <= 23:
        raise ConfigError(f"{name}={raw!r} must be an hour of the day, 0 to 23")
    return int(raw)
