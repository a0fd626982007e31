"""Configuration: one typed object, built from the environment in one place.

Every default points at the embedded stack that `make run` starts, so the command
line and the worker work against it with no configuration at all.

Over 500 lines on purpose: each setting is a field, its check and the variable that rebuilds
it, and they are read together; split, a setting would live in three files.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from coupons.contract import ISSUE_HEARTBEAT, ISSUE_START_TO_CLOSE, platform_task_queue

N = TypeVar("N", int, float)

# Shorter callback secrets are guessable; the stack generates 32 random bytes.
MIN_CALLBACK_SECRET = 16
# Each opens DB_POOL_SIZE connections of PostgreSQL's (the embedded one's max_connections
# is 200).
MAX_API_PROCESSES = 8
# prometheus_client's switch to its multiprocess mode, read when it is imported: each
# counter then records into a file of its process's in that directory. Several API
# processes need it (coupons.metrics.api_registry).
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# The platform protocols this service speaks (and the simulator's modes).
PLATFORMS = ("generic", "wechat", "alipay")
# Each platform's settings that point at a real merchant's files; with the embedded simulator
# they default to the test merchant it generates (see `platform_keys_dir`).
_WECHAT_FILES = (
    ("WECHAT_PRIVATE_KEY_FILE", "wechat_private_key_file"),
    ("WECHAT_APIV3_KEY_FILE", "wechat_apiv3_key_file"),
)
# How WeChat Pay signs its answers and notifications for the merchant: with the WeChat Pay
# public key; with platform certificates (merchants from before the public key: they are
# downloaded with the APIv3 key); or either, while the merchant switches from one to the other.
WECHAT_PLATFORM_KEYS = ("public_key", "certificates", "switching")
_ALIPAY_FILES = (
    ("ALIPAY_PRIVATE_KEY_FILE", "alipay_private_key_file"),
    ("ALIPAY_PUBLIC_KEY_FILE", "alipay_public_key_file"),
)
# How an Alipay app names its users in voucher calls (ALIPAY_USER_ID_TYPE): open_id, the
# per-app id Alipay gives new apps ("支付宝未来推出的新产品将只支持 openid"), or the older user_id.
ALIPAY_USER_ID_TYPES = ("open_id", "user_id")
# How a new worker version becomes current (WORKER_VERSION_ROLLOUT): when its first worker
# starts, unless it was current before ("auto"), or by an operator's command ("manual").
VERSION_ROLLOUTS = ("auto", "manual")
# A merchant's PID: 2088 and at least 12 more digits (Alipay widens its ids, "升位扩展").
_ALIPAY_PID = re.compile(r"2088[0-9]{12,}")


# The variables that hold secrets: never written where others may read them (the running
# stack's record, `app.running`).
SECRET_SETTINGS = frozenset(
    {"PLATFORM_API_KEY", "PLATFORM_CALLBACK_SECRET", "CODEC_TOKEN", "TEMPORAL_API_KEY"}
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
    # Platform calls per second across all workers (coupons/platforms/limited.py): sends,
    # every other call (queries), and all of them together (None: the two added up).
    # WeChat Pay publishes sends 500/s and coupon queries 500/s from one IP (1,000/s in all).
    platform_send_rate_limit: float = 500.0
    platform_query_rate_limit: float = 500.0
    platform_rate_limit_override: float | None = None
    lag_window_s: float = 30.0
    db_pool_size: int = 20
    claim_repair_after_s: float = 30.0
    # Workflows kept in the worker's memory; the rest are rebuilt from history on demand.
    worker_cache_size: int = 1000
    # The catalog sync schedule's interval, and the hour (UTC) of the daily reconciliation.
    sync_interval_s: float = 300.0
    reconcile_hour_utc: int = 3
    # The HTTP API (`python -m app.api`), and the secret the platform signs its
    # callbacks with (never logged; callbacks are refused while it is unset).
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # API processes serving API_PORT together (SO_REUSEPORT: the kernel spreads the
    # connections); one process runs on one core.
    api_processes: int = 1
    # The API's address as the platform reaches it (a TLS proxy's, say); None: `api_url`.
    api_public_url: str | None = None
    # A secured Temporal (Temporal Cloud, a cluster behind TLS): TLS, with a client
    # certificate and key for mTLS, and/or an API key (from a file or the environment).
    temporal_tls: bool = False
    temporal_tls_ca_file: Path | None = None  # the server's CA; None: the system's roots
    temporal_tls_cert_file: Path | None = None
    temporal_tls_key_file: Path | None = None
    temporal_tls_server_name: str | None = None
    temporal_api_key: str | None = field(default=None, repr=False)
    temporal_api_key_file: Path | None = None
    # The worker's slots; the SDK's defaults.
    worker_max_concurrent_activities: int = 100
    worker_max_concurrent_workflow_tasks: int = 100
    # How long a stopping worker (SIGTERM, as a rolling deploy sends) lets the activities in
    # flight finish before it cancels them: a send and its receipt take a few seconds. Under
    # the orchestrator's own wait before it kills (Kubernetes: 30 s unless told otherwise).
    worker_shutdown_grace_s: float = 20.0
    # Worker versioning (app/versioning.py): the worker deployment the workers join, their
    # build id (None: derived from the workflow code), and how a new version becomes
    # current: "auto" when its first worker starts, "manual" by an operator. Always on: the
    # short workflows are PINNED, which Temporal refuses from an unversioned worker.
    temporal_deployment_name: str = "coupon-lifecycle"
    temporal_build_id_override: str | None = None
    worker_version_rollout: str = "auto"
    # Prometheus: the worker's endpoint (the SDK's runtime metrics and ours; None: off) and
    # the address both it and the API's /metrics are meant for.
    worker_metrics_port: int | None = 9464
    metrics_host: str = "127.0.0.1"
    # Payload encryption (AES-GCM): the key ring file; None: payloads in clear. `make run`
    # generates one into its data directory.
    codec_keys_file: Path | None = None
    # The codec server's own bearer token (besides admin API keys): what the Web UI's codec
    # endpoint carries, as `/codec/<token>` (it cannot send our keys). Never logged.
    codec_token: str | None = field(default=None, repr=False)
    # Browser origins allowed to call the codec server (the Temporal Web UI's).
    codec_cors_origins: tuple[str, ...] = ("http://127.0.0.1:8233", "http://localhost:8233")
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
    # One of WECHAT_PLATFORM_KEYS; with the embedded simulator, how it signs too.
    wechat_platform_keys: str = "public_key"
    # Alipay: the app id, the app's private key and Alipay's public key.
    alipay_app_id: str | None = None
    alipay_private_key_file: Path | None = None
    alipay_public_key_file: Path | None = None
    # The merchant's PID (2088...), which owns the voucher activities and redeems them; with
    # the embedded simulator, its test merchant's.
    alipay_pid: str | None = None
    # One of ALIPAY_USER_ID_TYPES: which field names our users in sends and lookups. None:
    # open_id with the embedded simulator; a real app must say (`user_id_type`).
    alipay_user_id_type: str | None = None

    @property
    def user_id_type(self) -> str:
        """How Alipay voucher calls name our users (ALIPAY_USER_ID_TYPE, else open_id)."""
        return self.alipay_user_id_type or "open_id"

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
    def platform_rate_limit(self) -> float:
        """All platform calls per second across all workers (PLATFORM_RATE_LIMIT)."""
        if self.platform_rate_limit_override is not None:
            return self.platform_rate_limit_override
        return self.platform_send_rate_limit + self.platform_query_rate_limit

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
    def worker_metrics_url(self) -> str | None:
        """Where the worker serves its Prometheus metrics, or None with WORKER_METRICS_PORT off."""
        if self.worker_metrics_port is None:
            return None
        return f"http://{self.metrics_host}:{self.worker_metrics_port}/metrics"

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

    @property
    def stack_codec_keys_file(self) -> Path:
        """Where `make run` keeps the payload encryption keys it generates."""
        return self.data_dir / "codec-keys.json"

    def with_stack_secrets(self) -> Settings:
        """Fill what `make run` keeps in its data directory (owner-only) and the environment
        does not give: the payload keys, and with the embedded simulator its key and
        callback secret."""
        if self.codec_keys_file is None and self.stack_codec_keys_file.is_file():
            self = replace(self, codec_keys_file=self.stack_codec_keys_file)
        if self.codec_token is None:
            self = replace(self, codec_token=_kept(self.data_dir / "codec-token"))
        if self.platform_url_override:
            return self
        api_key = self.platform_api_key or _kept(self.data_dir / "platform-api-key")
        secret = self.platform_callback_secret or _kept(self.data_dir / "platform-callback-secret")
        if (api_key, secret) == (self.platform_api_key, self.platform_callback_secret):
            return self
        return replace(self, platform_api_key=api_key, platform_callback_secret=secret).check()

    def _wechat_public_key(self) -> tuple[tuple[str, str], ...]:
        """The public key's setting, unless the merchant is on platform certificates alone."""
        if self.wechat_platform_keys == "certificates":
            return ()
        return (("WECHAT_PLATFORM_PUBLIC_KEY_FILE", "wechat_platform_public_key_file"),)

    def check(self) -> Settings:
        """Refuse settings under which no send could ever complete, or the API not start."""
        if self.platform not in PLATFORMS:
            raise ConfigError(f"PLATFORM={self.platform!r} must be one of {', '.join(PLATFORMS)}")
        if self.wechat_platform_keys not in WECHAT_PLATFORM_KEYS:
            raise ConfigError(
                f"WECHAT_PLATFORM_KEYS={self.wechat_platform_keys!r} must be one of "
                f"{', '.join(WECHAT_PLATFORM_KEYS)}"
            )
        if self.platform_url_override:
            # A real platform: nothing defaults to the simulator's test merchant.
            needed = {
                "wechat": (
                    ("WECHAT_MCHID", "wechat_mchid"),
                    ("WECHAT_APPID", "wechat_appid"),
                    *_WECHAT_FILES,
                    *self._wechat_public_key(),
                ),
                "alipay": (("ALIPAY_APP_ID", "alipay_app_id"), *_ALIPAY_FILES),
            }.get(self.platform, ())
            missing = [name for name, attribute in needed if getattr(self, attribute) is None]
            if missing:
                raise ConfigError(
                    f"PLATFORM={self.platform} with PLATFORM_URL needs {', '.join(missing)}"
                )
            if self.platform == "alipay" and self.alipay_pid is None:
                raise ConfigError(
                    "PLATFORM=alipay with PLATFORM_URL needs ALIPAY_PID (the merchant's PID, "
                    "2088...: it owns the voucher activities and redeems their vouchers)"
                )
            if self.platform == "alipay" and self.alipay_user_id_type is None:
                # Never a default for a real app: the wrong field makes Alipay refuse every
                # user for good (an app on user_id sent open_ids gets openid-error).
                raise ConfigError(
                    "PLATFORM=alipay with PLATFORM_URL needs ALIPAY_USER_ID_TYPE: open_id (apps "
                    "Alipay gives open_ids, all new ones) or user_id (apps on the 2088... ids)"
                )
        if self.user_id_type not in ALIPAY_USER_ID_TYPES:
            raise ConfigError(
                f"ALIPAY_USER_ID_TYPE={self.user_id_type!r} must be one of "
                f"{', '.join(ALIPAY_USER_ID_TYPES)}"
            )
        if self.alipay_pid is not None and not _ALIPAY_PID.fullmatch(self.alipay_pid):
            raise ConfigError(
                f"ALIPAY_PID={self.alipay_pid!r} is not a PID (2088 and at least 12 more digits)"
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
        for name, rate in (
            ("PLATFORM_SEND_RATE_LIMIT", self.platform_send_rate_limit),
            ("PLATFORM_QUERY_RATE_LIMIT", self.platform_query_rate_limit),
            ("PLATFORM_RATE_LIMIT", self.platform_rate_limit),
        ):
            # Permits are whole calls, counted per second (nan and inf refused too).
            if not 1 <= rate < float("inf"):
                raise ConfigError(f"{name}={rate:g} must be at least 1 call per second")
        for name, port in (
            ("PG_PORT", self.pg_port),
            ("TEMPORAL_PORT", self.temporal_port),
            ("TEMPORAL_UI_PORT", self.temporal_ui_port),
            ("SIMULATOR_PORT", self.simulator_port),
            ("API_PORT", self.api_port),
        ):
            if not 0 < port < 65536:
                raise ConfigError(f"{name}={port} must be a TCP port, 1 to 65535")
        if not 1 <= self.api_processes <= MAX_API_PROCESSES:
            raise ConfigError(
                f"API_PROCESSES={self.api_processes} must be 1 to {MAX_API_PROCESSES}"
            )
        if (self.temporal_tls_cert_file is None) != (self.temporal_tls_key_file is None):
            raise ConfigError(
                "TEMPORAL_TLS_CERT_FILE and TEMPORAL_TLS_KEY_FILE go together (mTLS needs both)"
            )
        if self.temporal_api_key is not None and self.temporal_api_key_file is not None:
            raise ConfigError("give TEMPORAL_API_KEY or TEMPORAL_API_KEY_FILE, not both")
        deployment = self.temporal_deployment_name
        if not deployment.strip() or "." in deployment:
            # Temporal names a version `<deployment>.<build id>`: the first dot splits them.
            raise ConfigError(f"TEMPORAL_DEPLOYMENT_NAME={deployment!r} must be a name with no dot")
        if (
            self.temporal_build_id_override is not None
            and not self.temporal_build_id_override.strip()
        ):
            raise ConfigError("TEMPORAL_BUILD_ID must not be blank")
        if self.worker_version_rollout not in VERSION_ROLLOUTS:
            raise ConfigError(
                f"WORKER_VERSION_ROLLOUT={self.worker_version_rollout!r} must be one of "
                f"{', '.join(VERSION_ROLLOUTS)}"
            )
        if self.worker_metrics_port is not None and not 0 < self.worker_metrics_port < 65536:
            raise ConfigError(
                f"WORKER_METRICS_PORT={self.worker_metrics_port} must be a TCP port, or off"
            )
        for origin in self.codec_cors_origins:
            if not origin.startswith(("http://", "https://")):
                raise ConfigError(f"CODEC_CORS_ORIGINS: {origin!r} is not an http(s) origin")
        public = self.api_public_url
        if public is not None and not public.startswith(("http://", "https://")):
            raise ConfigError(f"API_PUBLIC_URL={public!r} must be an http(s) URL")
        if not self.api_host.strip() or any(c.isspace() for c in self.api_host):
            raise ConfigError(f"API_HOST={self.api_host!r} must be a host name or address")
        token = self.codec_token
        if token is not None and len(token) < MIN_CALLBACK_SECRET:
            raise ConfigError(
                f"CODEC_TOKEN is {len(token)} characters long; it must have at least "
                f"{MIN_CALLBACK_SECRET} (it opens every payload to whoever holds it)"
            )
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
            "PLATFORM_SEND_RATE_LIMIT": str(self.platform_send_rate_limit),
            "PLATFORM_QUERY_RATE_LIMIT": str(self.platform_query_rate_limit),
            "LAG_WINDOW_S": str(self.lag_window_s),
            "DB_POOL_SIZE": str(self.db_pool_size),
            "CLAIM_REPAIR_AFTER_S": str(self.claim_repair_after_s),
            "WORKER_CACHE_SIZE": str(self.worker_cache_size),
            "SYNC_INTERVAL_S": str(self.sync_interval_s),
            "RECONCILE_HOUR_UTC": str(self.reconcile_hour_utc),
            "API_HOST": self.api_host,
            "API_PORT": str(self.api_port),
            "API_PROCESSES": str(self.api_processes),
            "PLATFORM": self.platform,
            "TEMPORAL_TLS": "true" if self.temporal_tls else "false",
            "WORKER_MAX_CONCURRENT_ACTIVITIES": str(self.worker_max_concurrent_activities),
            "WORKER_MAX_CONCURRENT_WORKFLOW_TASKS": str(self.worker_max_concurrent_workflow_tasks),
            "WORKER_SHUTDOWN_GRACE_S": str(self.worker_shutdown_grace_s),
            "TEMPORAL_DEPLOYMENT_NAME": self.temporal_deployment_name,
            "WORKER_VERSION_ROLLOUT": self.worker_version_rollout,
            "WORKER_METRICS_PORT": str(self.worker_metrics_port or "off"),
            "METRICS_HOST": self.metrics_host,
            "CODEC_CORS_ORIGINS": ",".join(self.codec_cors_origins),
        }
        optional = {
            "DATABASE_URL": self.database_url_override,
            "TEMPORAL_ADDRESS": self.temporal_address_override,
            "PLATFORM_URL": self.platform_url_override,
            "PLATFORM_RATE_LIMIT": _text(self.platform_rate_limit_override),
            "API_PUBLIC_URL": self.api_public_url,
            "TEMPORAL_TLS_CA_FILE": _text(self.temporal_tls_ca_file),
            "TEMPORAL_TLS_CERT_FILE": _text(self.temporal_tls_cert_file),
            "TEMPORAL_TLS_KEY_FILE": _text(self.temporal_tls_key_file),
            "TEMPORAL_TLS_SERVER_NAME": self.temporal_tls_server_name,
            "TEMPORAL_API_KEY": self.temporal_api_key,
            "TEMPORAL_API_KEY_FILE": _text(self.temporal_api_key_file),
            "TEMPORAL_BUILD_ID": self.temporal_build_id_override,
            "CODEC_KEYS_FILE": _text(self.codec_keys_file),
            "CODEC_TOKEN": self.codec_token,
            "PLATFORM_API_KEY": self.platform_api_key,
            "PLATFORM_CALLBACK_SECRET": self.platform_callback_secret,
            "WECHAT_MCHID": self.wechat_mchid,
            "WECHAT_APPID": self.wechat_appid,
            "WECHAT_PRIVATE_KEY_FILE": _text(self.wechat_private_key_file),
            "WECHAT_MERCHANT_SERIAL": self.wechat_merchant_serial,
            "WECHAT_APIV3_KEY_FILE": _text(self.wechat_apiv3_key_file),
            "WECHAT_PLATFORM_PUBLIC_KEY_FILE": _text(self.wechat_platform_public_key_file),
            "WECHAT_PLATFORM_PUBLIC_KEY_ID": self.wechat_platform_public_key_id,
            "WECHAT_PLATFORM_KEYS": self.wechat_platform_keys,
            "ALIPAY_APP_ID": self.alipay_app_id,
            "ALIPAY_PRIVATE_KEY_FILE": _text(self.alipay_private_key_file),
            "ALIPAY_PUBLIC_KEY_FILE": _text(self.alipay_public_key_file),
            "ALIPAY_PID": self.alipay_pid,
            "ALIPAY_USER_ID_TYPE": self.alipay_user_id_type,
        }
        env.update({name: value for name, value in optional.items() if value})
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from the environment, over the TOML file `COUPONS_CONFIG` names (its
        keys are these same variable names; the environment wins; an unknown key is refused,
        so a misspelt setting is never silently ignored)."""
        given = os.environ if env is None else env
        from_file = _config_file(given.get("COUPONS_CONFIG"))
        reading = _Reading({**from_file, **given})
        settings = cls._read(reading)
        unknown = sorted(set(from_file) - reading.seen)
        if unknown:
            raise ConfigError(
                f"COUPONS_CONFIG={given['COUPONS_CONFIG']}: unknown setting {', '.join(unknown)}"
            )
        return settings

    @staticmethod
    def given(env: Mapping[str, str] | None = None) -> dict[str, str]:
        """What the environment and the `COUPONS_CONFIG` file say, the environment over the
        file, by variable; an empty variable says nothing (`from_env` reads it as unset)."""
        given = os.environ if env is None else env
        values = {**_config_file(given.get("COUPONS_CONFIG")), **given}
        return {name: value for name, value in values.items() if value != ""}

    @classmethod
    def _read(cls, env: Mapping[str, str]) -> Settings:
        platform = env.get("PLATFORM") or "generic"
        # Each platform's embedded stack keeps its own data (ledger, Temporal, simulator, keys):
        # batch and coupon ids of one platform mean nothing to another, nor the simulator's to
        # the real platform's.
        default_data = ".data" if platform == "generic" else f".data/{platform}"
        if platform != "generic" and env.get("PLATFORM_URL"):
            default_data += "-live"
        ui_port = _number(env, "TEMPORAL_UI_PORT", 8233, int)
        return cls(
            data_dir=Path(env.get("DATA_DIR") or default_data),
            platform=platform,
            database_url_override=env.get("DATABASE_URL") or None,
            pg_port=_number(env, "PG_PORT", 55432, int),
            temporal_address_override=env.get("TEMPORAL_ADDRESS") or None,
            temporal_port=_number(env, "TEMPORAL_PORT", 7233, int),
            temporal_ui_port=ui_port,
            temporal_namespace=env.get("TEMPORAL_NAMESPACE", "default"),
            task_queue=env.get("TASK_QUEUE", "coupons"),
            platform_url_override=env.get("PLATFORM_URL") or None,
            simulator_port=_number(env, "SIMULATOR_PORT", 8600, int),
            platform_api_key=env.get("PLATFORM_API_KEY") or None,
            platform_timeout_s=_number(env, "PLATFORM_TIMEOUT_S", 5.0, float),
            platform_send_rate_limit=_number(env, "PLATFORM_SEND_RATE_LIMIT", 500.0, float),
            platform_query_rate_limit=_number(env, "PLATFORM_QUERY_RATE_LIMIT", 500.0, float),
            platform_rate_limit_override=_optional_number(env, "PLATFORM_RATE_LIMIT"),
            lag_window_s=_number(env, "LAG_WINDOW_S", 30.0, float),
            db_pool_size=_number(env, "DB_POOL_SIZE", 20, int),
            claim_repair_after_s=_number(env, "CLAIM_REPAIR_AFTER_S", 30.0, float),
            worker_cache_size=_number(env, "WORKER_CACHE_SIZE", 1000, int),
            sync_interval_s=_number(env, "SYNC_INTERVAL_S", 300.0, float),
            reconcile_hour_utc=_hour(env, "RECONCILE_HOUR_UTC", 3),
            api_host=env.get("API_HOST") or "127.0.0.1",
            api_port=_number(env, "API_PORT", 8000, int),
            api_processes=_number(env, "API_PROCESSES", 1, int),
            api_public_url=env.get("API_PUBLIC_URL") or None,
            temporal_tls=_flag(env, "TEMPORAL_TLS"),
            temporal_tls_ca_file=_path(env, "TEMPORAL_TLS_CA_FILE"),
            temporal_tls_cert_file=_path(env, "TEMPORAL_TLS_CERT_FILE"),
            temporal_tls_key_file=_path(env, "TEMPORAL_TLS_KEY_FILE"),
            temporal_tls_server_name=env.get("TEMPORAL_TLS_SERVER_NAME") or None,
            temporal_api_key=env.get("TEMPORAL_API_KEY") or None,
            temporal_api_key_file=_path(env, "TEMPORAL_API_KEY_FILE"),
            worker_max_concurrent_activities=_number(
                env, "WORKER_MAX_CONCURRENT_ACTIVITIES", 100, int
            ),
            worker_max_concurrent_workflow_tasks=_number(
                env, "WORKER_MAX_CONCURRENT_WORKFLOW_TASKS", 100, int
            ),
            worker_shutdown_grace_s=_number(env, "WORKER_SHUTDOWN_GRACE_S", 20.0, float),
            temporal_deployment_name=env.get("TEMPORAL_DEPLOYMENT_NAME") or "coupon-lifecycle",
            temporal_build_id_override=env.get("TEMPORAL_BUILD_ID") or None,
            worker_version_rollout=env.get("WORKER_VERSION_ROLLOUT") or "auto",
            worker_metrics_port=_port_or_off(env, "WORKER_METRICS_PORT", 9464),
            metrics_host=env.get("METRICS_HOST") or "127.0.0.1",
            codec_keys_file=_path(env, "CODEC_KEYS_FILE"),
            codec_token=env.get("CODEC_TOKEN") or None,
            codec_cors_origins=tuple(
                origin.strip().rstrip("/")
                for origin in (
                    # The embedded Web UI's own origin, wherever its port was moved.
                    env.get("CODEC_CORS_ORIGINS")
                    or f"http://127.0.0.1:{ui_port},http://localhost:{ui_port}"
                ).split(",")
                if origin.strip()
            ),
            platform_callback_secret=env.get("PLATFORM_CALLBACK_SECRET") or None,
            wechat_mchid=env.get("WECHAT_MCHID") or None,
            wechat_appid=env.get("WECHAT_APPID") or None,
            wechat_private_key_file=_path(env, "WECHAT_PRIVATE_KEY_FILE"),
            wechat_merchant_serial=env.get("WECHAT_MERCHANT_SERIAL") or None,
            wechat_apiv3_key_file=_path(env, "WECHAT_APIV3_KEY_FILE"),
            wechat_platform_public_key_file=_path(env, "WECHAT_PLATFORM_PUBLIC_KEY_FILE"),
            wechat_platform_public_key_id=env.get("WECHAT_PLATFORM_PUBLIC_KEY_ID") or None,
            wechat_platform_keys=env.get("WECHAT_PLATFORM_KEYS") or "public_key",
            alipay_app_id=env.get("ALIPAY_APP_ID") or None,
            alipay_private_key_file=_path(env, "ALIPAY_PRIVATE_KEY_FILE"),
            alipay_public_key_file=_path(env, "ALIPAY_PUBLIC_KEY_FILE"),
            alipay_pid=env.get("ALIPAY_PID") or None,
            alipay_user_id_type=env.get("ALIPAY_USER_ID_TYPE") or None,
        ).check()


class _Reading(Mapping[str, str]):
    """A mapping that remembers which names were read: what the config file may hold."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values
        self.seen: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.seen.add(name)
        return self._values[name]

    def get(self, name: str, default: Any = None) -> Any:
        self.seen.add(name)
        return self._values.get(name, default)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self.seen.add(name)
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _config_file(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"COUPONS_CONFIG={path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"COUPONS_CONFIG={path}: not TOML ({err})") from None
    values: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, bool):
            values[name] = "true" if value else "false"
        elif isinstance(value, int | float | str):
            values[name] = str(value)
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            values[name] = ",".join(value)
        else:
            raise ConfigError(f"COUPONS_CONFIG={path}: {name} must be a string, number or list")
    return values


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r} must be true or false")


def _port_or_off(env: Mapping[str, str], name: str, default: int) -> int | None:
    raw = (env.get(name) or "").strip()
    if raw.lower() in ("off", "none", "0"):
        return None
    return _number(env, name, default, int)


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw).expanduser() if raw else None


def _text(value: Path | float | None) -> str | None:
    return None if value is None else str(value)


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


def _optional_number(env: Mapping[str, str], name: str) -> float | None:
    """A number that may be unset (None), checked like `_number`'s."""
    raw = env.get(name)
    return None if raw is None or raw == "" else _number(env, name, 0.0, float)


def _hour(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 0 <= int(raw) <= 23:
        raise ConfigError(f"{name}={raw!r} must be an hour of the day, 0 to 23")
    return int(raw)
