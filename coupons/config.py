"""Configuration: one typed object, built from the environment in one place.

Every default points at the embedded stack that `make run` starts, so the command
line and the worker work against it with no configuration at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from coupons.contract import ISSUE_HEARTBEAT, ISSUE_START_TO_CLOSE, platform_task_queue

N = TypeVar("N", int, float)

# Shorter callback secrets are guessable; the stack generates 32 random bytes.
MIN_CALLBACK_SECRET = 16
# The platform protocols this service speaks (and the simulator's modes).
PLATFORMS = ("generic", "wechat", "alipay")
# Each platform's settings that point at a real merchant's files; with the embedded simulator
# they default to the test merchant it generates (see `platform_keys_dir`).
_WECHAT_FILES = (
    ("WECHAT_PRIVATE_KEY_FILE", "wechat_private_key_file"),
    ("WECHAT_APIV3_KEY_FILE", "wechat_apiv3_key_file"),
    ("WECHAT_PLATFORM_PUBLIC_KEY_FILE", "wechat_platform_public_key_file"),
)
_ALIPAY_FILES = (
    ("ALIPAY_PRIVATE_KEY_FILE", "alipay_private_key_file"),
    ("ALIPAY_PUBLIC_KEY_FILE", "alipay_public_key_file"),
)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".data")
    # The platform protocol: generic (our REST protocol), wechat (WeChat Pay API v3 vouchers)
    # or alipay (Alipay vouchers). With the embedded simulator it is the simulator's mode.
    platform: str = "generic"
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
    # The HTTP API (`python -m coupons.api`), and the secret the platform signs its
    # callbacks with (never logged; callbacks are refused while it is unset).
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # The API's address as the platform reaches it (a TLS proxy's, say); None: `api_url`.
    api_public_url: str | None = None
    platform_callback_secret: str | None = field(default=None, repr=False)
    # WeChat Pay: the merchant (mchid), the app the users' openids belong to, the merchant's
    # API private key (apiclient_key.pem) and certificate serial (None: read from
    # apiclient_cert.pem beside the key), the APIv3 key, the WeChat Pay public key and its id
    # (None: read from pub_key_id beside it). Paths only: no key material in settings.
    wechat_mchid: str | None = None
    wechat_appid: str | None = None
    wechat_private_key_file: Path | None = None
    wechat_merchant_serial: str | None = None
    wechat_apiv3_key_file: Path | None = None
    wechat_platform_public_key_file: Path | None = None
    wechat_platform_public_key_id: str | None = None
    # Alipay: the app id, the app's private key and Alipay's public key.
    alipay_app_id: str | None = None
    alipay_private_key_file: Path | None = None
    alipay_public_key_file: Path | None = None

    @property
    def platform_keys_dir(self) -> Path:
        """Where the embedded simulator keeps its test merchant's keys (made on first start)."""
        return self.data_dir / "platform-keys"

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
    def simulator_url(self) -> str:
        """The embedded simulator: its control plane (/sim/*) answers here in every mode."""
        return f"http://127.0.0.1:{self.simulator_port}"

    @property
    def platform_url(self) -> str:
        """The platform's base URL (for Alipay, its gateway's full URL)."""
        if self.platform_url_override:
            return self.platform_url_override
        simulator = self.simulator_url
        return f"{simulator}/gateway.do" if self.platform == "alipay" else simulator

    @property
    def api_client_host(self) -> str:
        """The address that reaches the API from this machine (a wildcard means loopback)."""
        return "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host

    @property
    def api_url(self) -> str:
        host = self.api_client_host
        return (
            f"http://[{host}]:{self.api_port}" if ":" in host else f"http://{host}:{self.api_port}"
        )

    @property
    def callback_url(self) -> str:
        """Where the platform sends its coupon-used callbacks."""
        base = (self.api_public_url or self.api_url).rstrip("/")
        return f"{base}/callbacks/{self.platform}/coupon-used"

    def with_stack_secrets(self) -> Settings:
        """Fill the platform's key and callback secret from `make run`'s data directory when
        the environment does not give them and the platform is the embedded simulator (the
        stack keeps them there, owner-only)."""
        if self.platform_url_override:
            return self
        api_key = self.platform_api_key or _kept(self.data_dir / "platform-api-key")
        secret = self.platform_callback_secret or _kept(self.data_dir / "platform-callback-secret")
        if (api_key, secret) == (self.platform_api_key, self.platform_callback_secret):
            return self
        return replace(self, platform_api_key=api_key, platform_callback_secret=secret).check()

    def check(self) -> Settings:
        """Refuse settings under which no send could ever complete, or the API not start."""
        if self.platform not in PLATFORMS:
            raise ConfigError(f"PLATFORM={self.platform!r} must be one of {', '.join(PLATFORMS)}")
        if self.platform_url_override:
            # A real platform: nothing defaults to the simulator's test merchant.
            needed = {
                "wechat": (
                    ("WECHAT_MCHID", "wechat_mchid"),
                    ("WECHAT_APPID", "wechat_appid"),
                    *_WECHAT_FILES,
                ),
                "alipay": (("ALIPAY_APP_ID", "alipay_app_id"), *_ALIPAY_FILES),
            }.get(self.platform, ())
            missing = [name for name, attribute in needed if getattr(self, attribute) is None]
            if missing:
                raise ConfigError(
                    f"PLATFORM={self.platform} with PLATFORM_URL needs {', '.join(missing)}"
                )
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
        for name, port in (
            ("PG_PORT", self.pg_port),
            ("TEMPORAL_PORT", self.temporal_port),
            ("TEMPORAL_UI_PORT", self.temporal_ui_port),
            ("SIMULATOR_PORT", self.simulator_port),
            ("API_PORT", self.api_port),
        ):
            if not 0 < port < 65536:
                raise ConfigError(f"{name}={port} must be a TCP port, 1 to 65535")
        public = self.api_public_url
        if public is not None and not public.startswith(("http://", "https://")):
            raise ConfigError(f"API_PUBLIC_URL={public!r} must be an http(s) URL")
        if not self.api_host.strip() or any(c.isspace() for c in self.api_host):
            raise ConfigError(f"API_HOST={self.api_host!r} must be a host name or address")
        secret = self.platform_callback_secret
        if secret is not None and len(secret) < MIN_CALLBACK_SECRET:
            # Never echo the secret itself, not even in this error.
            raise ConfigError(
                f"PLATFORM_CALLBACK_SECRET is {len(secret)} characters long; a callback "
                f"secret must have at least {MIN_CALLBACK_SECRET}"
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
            "API_HOST": self.api_host,
            "API_PORT": str(self.api_port),
            "PLATFORM": self.platform,
        }
        optional = {
            "DATABASE_URL": self.database_url_override,
            "TEMPORAL_ADDRESS": self.temporal_address_override,
            "PLATFORM_URL": self.platform_url_override,
            "API_PUBLIC_URL": self.api_public_url,
            "PLATFORM_API_KEY": self.platform_api_key,
            "PLATFORM_CALLBACK_SECRET": self.platform_callback_secret,
            "WECHAT_MCHID": self.wechat_mchid,
            "WECHAT_APPID": self.wechat_appid,
            "WECHAT_PRIVATE_KEY_FILE": _text(self.wechat_private_key_file),
            "WECHAT_MERCHANT_SERIAL": self.wechat_merchant_serial,
            "WECHAT_APIV3_KEY_FILE": _text(self.wechat_apiv3_key_file),
            "WECHAT_PLATFORM_PUBLIC_KEY_FILE": _text(self.wechat_platform_public_key_file),
            "WECHAT_PLATFORM_PUBLIC_KEY_ID": self.wechat_platform_public_key_id,
            "ALIPAY_APP_ID": self.alipay_app_id,
            "ALIPAY_PRIVATE_KEY_FILE": _text(self.alipay_private_key_file),
            "ALIPAY_PUBLIC_KEY_FILE": _text(self.alipay_public_key_file),
        }
        env.update({name: value for name, value in optional.items() if value})
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        platform = env.get("PLATFORM") or "generic"
        # Each platform's embedded stack keeps its own data (ledger, Temporal, simulator, keys):
        # batch and coupon ids of one platform mean nothing to another, nor the simulator's to
        # the real platform's.
        default_data = ".data" if platform == "generic" else f".data/{platform}"
        if platform != "generic" and env.get("PLATFORM_URL"):
            default_data += "-live"
        return cls(
            data_dir=Path(env.get("DATA_DIR") or default_data),
            platform=platform,
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
            api_host=env.get("API_HOST") or "127.0.0.1",
            api_port=_number(env, "API_PORT", 8000, int),
            api_public_url=env.get("API_PUBLIC_URL") or None,
            platform_callback_secret=env.get("PLATFORM_CALLBACK_SECRET") or None,
            wechat_mchid=env.get("WECHAT_MCHID") or None,
            wechat_appid=env.get("WECHAT_APPID") or None,
            wechat_private_key_file=_path(env, "WECHAT_PRIVATE_KEY_FILE"),
            wechat_merchant_serial=env.get("WECHAT_MERCHANT_SERIAL") or None,
            wechat_apiv3_key_file=_path(env, "WECHAT_APIV3_KEY_FILE"),
            wechat_platform_public_key_file=_path(env, "WECHAT_PLATFORM_PUBLIC_KEY_FILE"),
            wechat_platform_public_key_id=env.get("WECHAT_PLATFORM_PUBLIC_KEY_ID") or None,
            alipay_app_id=env.get("ALIPAY_APP_ID") or None,
            alipay_private_key_file=_path(env, "ALIPAY_PRIVATE_KEY_FILE"),
            alipay_public_key_file=_path(env, "ALIPAY_PUBLIC_KEY_FILE"),
        ).check()


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw).expanduser() if raw else None


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _kept(path: Path) -> str | None:
    """A secret the stack keeps in a file, if it is there."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


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
