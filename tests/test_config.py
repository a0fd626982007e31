"""Settings: built from the environment in one place, refused when they cannot work."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest
from temporalio.client import TLSConfig

from coupons.config import SECRET_SETTINGS, ConfigError, Settings
from coupons.temporal import api_key, tls_config


def test_defaults_point_at_the_embedded_stack() -> None:
    s = Settings.from_env({})
    assert s.database_url == "postgresql://postgres@127.0.0.1:55432/coupons"
    assert s.temporal_address == "127.0.0.1:7233"
    assert s.platform_url == "http://127.0.0.1:8600"
    assert s.platform_task_queue == "coupons-platform"
    assert s.api_url == "http://127.0.0.1:8000"
    assert s.callback_url == "http://127.0.0.1:8000/callbacks/generic/coupon-used"
    assert s.platform_callback_secret is None


def test_an_api_on_every_address_is_reached_on_loopback() -> None:
    s = Settings.from_env({"API_HOST": "0.0.0.0", "API_PORT": "9000"})
    assert (s.api_host, s.api_url) == ("0.0.0.0", "http://127.0.0.1:9000")
    assert Settings.from_env({"API_HOST": "::1"}).api_url == "http://[::1]:8000"


def test_a_child_process_rebuilds_the_same_settings_from_to_env() -> None:
    s = replace(
        Settings(),
        database_url_override="postgresql://u@db:5432/x",
        task_queue="tq",
        platform_api_key="k",
        lag_window_s=12.5,
        api_host="0.0.0.0",
        api_port=9001,
        platform_callback_secret="c" * 32,
    )
    assert Settings.from_env(s.to_env()) == s


def test_the_secrets_never_show_in_repr() -> None:
    secret = "callback-sekrit-0123456789"
    s = Settings.from_env({"PLATFORM_API_KEY": "sekrit", "PLATFORM_CALLBACK_SECRET": secret})
    assert "sekrit" not in repr(s)


def test_a_short_callback_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="PLATFORM_CALLBACK_SECRET is 6 characters") as refused:
        Settings.from_env({"PLATFORM_CALLBACK_SECRET": "abc123"})
    assert "abc123" not in str(refused.value)


def test_the_stack_secrets_come_from_the_data_directory(tmp_path: Path) -> None:
    (tmp_path / "platform-api-key").write_text("key-from-file\n")
    (tmp_path / "platform-callback-secret").write_text("secret-from-the-file-0123456789")
    s = Settings.from_env({"DATA_DIR": str(tmp_path)}).with_stack_secrets()
    assert s.platform_api_key == "key-from-file"
    assert s.platform_callback_secret == "secret-from-the-file-0123456789"
    given = Settings.from_env(
        {"DATA_DIR": str(tmp_path), "PLATFORM_CALLBACK_SECRET": "from-the-environment-000"}
    ).with_stack_secrets()
    assert given.platform_callback_secret == "from-the-environment-000"
    external = Settings.from_env({"DATA_DIR": str(tmp_path), "PLATFORM_URL": "http://p"})
    assert external.with_stack_secrets() == external
    assert Settings.from_env({"DATA_DIR": str(tmp_path / "none")}).with_stack_secrets() == (
        Settings.from_env({"DATA_DIR": str(tmp_path / "none")})
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PG_PORT": "x"}, "PG_PORT='x' is not a valid int"),
        ({"LAG_WINDOW_S": "-1"}, "LAG_WINDOW_S='-1' must be greater than zero"),
        ({"PLATFORM_TIMEOUT_S": "10"}, "PLATFORM_TIMEOUT_S=10 must stay under 7.5"),
        ({"LAG_WINDOW_S": "290"}, "LAG_WINDOW_S=290 must be at most 285"),
        ({"API_PORT": "http"}, "API_PORT='http' is not a valid int"),
        ({"API_PORT": "0"}, "API_PORT='0' must be greater than zero"),
        ({"API_PORT": "70000"}, "API_PORT=70000 must be a TCP port, 1 to 65535"),
        ({"SIMULATOR_PORT": "65536"}, "SIMULATOR_PORT=65536 must be a TCP port"),
        ({"API_PROCESSES": "0"}, "API_PROCESSES='0' must be greater than zero"),
        ({"API_PROCESSES": "9"}, "API_PROCESSES=9 must be 1 to 8"),
        ({"API_PROCESSES": "two"}, "API_PROCESSES='two' is not a valid int"),
        ({"API_HOST": "local host"}, "API_HOST='local host' must be a host name or address"),
        ({"WORKER_SHUTDOWN_GRACE_S": "0"}, "WORKER_SHUTDOWN_GRACE_S='0' must be greater than"),
        ({"WORKER_SHUTDOWN_GRACE_S": "20s"}, "WORKER_SHUTDOWN_GRACE_S='20s' is not a valid"),
    ],
)
def test_unusable_settings_are_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_the_shutdown_grace_stays_under_kubernetes_wait_before_it_kills() -> None:
    # A send and its receipt take seconds; Kubernetes kills 30 s after its SIGTERM.
    assert Settings.from_env({}).worker_shutdown_grace_s == 20.0
    s = Settings.from_env({"WORKER_SHUTDOWN_GRACE_S": "45.5"})
    assert s.worker_shutdown_grace_s == 45.5
    assert Settings.from_env(s.to_env()) == s


def test_each_platform_has_its_own_embedded_data_and_simulator_address() -> None:
    wechat = Settings.from_env({"PLATFORM": "wechat"})
    assert (wechat.platform, wechat.data_dir) == ("wechat", Path(".data/wechat"))
    assert wechat.platform_url == "http://127.0.0.1:8600"
    assert wechat.platform_keys_dir == Path(".data/wechat/platform-keys")
    assert wechat.callback_url == "http://127.0.0.1:8000/callbacks/wechat/coupon-used"
    alipay = Settings.from_env({"PLATFORM": "alipay", "DATA_DIR": "/srv/c"})
    assert alipay.data_dir == Path("/srv/c")
    # Alipay is one gateway URL; the simulator's control plane stays at its root.
    assert alipay.platform_url == "http://127.0.0.1:8600/gateway.do"
    assert alipay.simulator_url == "http://127.0.0.1:8600"


def test_an_unknown_platform_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="PLATFORM='paypal' must be one of generic, wechat"):
        Settings.from_env({"PLATFORM": "paypal"})


@pytest.mark.parametrize(
    ("platform", "missing"),
    [
        (
            "wechat",
            "WECHAT_MCHID, WECHAT_APPID, WECHAT_PRIVATE_KEY_FILE, WECHAT_APIV3_KEY_FILE, "
            "WECHAT_PLATFORM_PUBLIC_KEY_FILE",
        ),
        ("alipay", "ALIPAY_APP_ID, ALIPAY_PRIVATE_KEY_FILE, ALIPAY_PUBLIC_KEY_FILE"),
    ],
)
def test_a_real_platform_needs_its_merchant_settings(platform: str, missing: str) -> None:
    env = {"PLATFORM": platform, "PLATFORM_URL": "https://platform.example"}
    with pytest.raises(ConfigError, match=f"needs {missing}$"):
        Settings.from_env(env)


def test_merchant_settings_travel_to_child_processes() -> None:
    env = {
        "PLATFORM": "wechat",
        "PLATFORM_URL": "https://api.mch.weixin.qq.com",
        "WECHAT_MCHID": "1900000109",
        "WECHAT_APPID": "wxd678efh567hg6787",
        "WECHAT_PRIVATE_KEY_FILE": "/etc/coupons/apiclient_key.pem",
        "WECHAT_APIV3_KEY_FILE": "/etc/coupons/apiv3_key",
        "WECHAT_PLATFORM_PUBLIC_KEY_FILE": "/etc/coupons/pub_key.pem",
        "WECHAT_PLATFORM_PUBLIC_KEY_ID": "PUB_KEY_ID_0119000001092025",
    }
    s = Settings.from_env({**env, "API_PUBLIC_URL": "https://coupons.example.com/"})
    # A real platform's data never mixes with the simulator's (its ids mean nothing there).
    assert s.data_dir == Path(".data/wechat-live")
    assert Settings.from_env(s.to_env()) == s
    assert s.wechat_private_key_file == Path("/etc/coupons/apiclient_key.pem")
    assert s.callback_url == "https://coupons.example.com/callbacks/wechat/coupon-used"
    with pytest.raises(ConfigError, match=r"API_PUBLIC_URL='coupons\.example\.com'"):
        Settings.from_env({"API_PUBLIC_URL": "coupons.example.com"})


def test_a_config_file_under_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "coupons.toml"
    config.write_text(
        'TEMPORAL_ADDRESS = "temporal.internal:7233"\n'
        'TEMPORAL_NAMESPACE = "coupons-prod"\n'
        "TEMPORAL_TLS = true\n"
        "DB_POOL_SIZE = 40\n"
        "WORKER_MAX_CONCURRENT_ACTIVITIES = 200\n"
        'CODEC_CORS_ORIGINS = ["https://temporal.example.com"]\n'
    )
    s = Settings.from_env({"COUPONS_CONFIG": str(config), "DB_POOL_SIZE": "10"})
    assert (s.temporal_address, s.temporal_namespace) == ("temporal.internal:7233", "coupons-prod")
    assert s.temporal_tls is True and s.worker_max_concurrent_activities == 200
    assert s.db_pool_size == 10, "the environment wins over the file"
    assert s.codec_cors_origins == ("https://temporal.example.com",)


def test_a_misspelt_or_malformed_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "coupons.toml"
    config.write_text('TEMPORAL_ADRESS = "x:7233"\n')
    with pytest.raises(ConfigError, match="unknown setting TEMPORAL_ADRESS"):
        Settings.from_env({"COUPONS_CONFIG": str(config)})
    config.write_text("TEMPORAL_ADDRESS = \n")
    with pytest.raises(ConfigError, match="not TOML"):
        Settings.from_env({"COUPONS_CONFIG": str(config)})
    with pytest.raises(ConfigError, match="no such file"):
        Settings.from_env({"COUPONS_CONFIG": str(tmp_path / "missing.toml")})


def test_temporal_tls_and_api_key_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="go together"):
        Settings.from_env({"TEMPORAL_TLS_CERT_FILE": "/etc/c.pem"})
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env({"TEMPORAL_API_KEY": "k", "TEMPORAL_API_KEY_FILE": "/etc/k"})
    with pytest.raises(ConfigError, match="TEMPORAL_TLS='maybe' must be true or false"):
        Settings.from_env({"TEMPORAL_TLS": "maybe"})
    assert Settings.from_env({"WORKER_METRICS_PORT": "off"}).worker_metrics_port is None
    key = tmp_path / "api-key"
    key.write_text("secret-api-key\n")
    cert, private = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(b"CERT")
    private.write_bytes(b"KEY")
    s = Settings.from_env(
        {
            "TEMPORAL_API_KEY_FILE": str(key),
            "TEMPORAL_TLS_CERT_FILE": str(cert),
            "TEMPORAL_TLS_KEY_FILE": str(private),
            "TEMPORAL_TLS_SERVER_NAME": "ns.tmprl.cloud",
        }
    )
    assert "secret-api-key" not in repr(s)
    assert api_key(s) == "secret-api-key"
    tls = tls_config(s)
    assert isinstance(tls, TLSConfig)
    assert (tls.client_cert, tls.client_private_key, tls.domain) == (
        b"CERT",
        b"KEY",
        "ns.tmprl.cloud",
    )
    # Nothing asked: the SDK decides, which means TLS whenever an API key is sent.
    assert tls_config(Settings()) is None
    with pytest.raises(ConfigError, match="TEMPORAL_TLS_CA_FILE=/nope: no such file"):
        tls_config(replace(s, temporal_tls_ca_file=Path("/nope")))


def test_the_codec_server_allows_the_embedded_web_uis_origin_wherever_it_moved() -> None:
    assert Settings.from_env({"TEMPORAL_UI_PORT": "9233"}).codec_cors_origins == (
        "http://127.0.0.1:9233",
        "http://localhost:9233",
    )
    given = Settings.from_env({"CODEC_CORS_ORIGINS": "https://ui.example.com/, https://b.io"})
    assert given.codec_cors_origins == ("https://ui.example.com", "https://b.io")


def test_what_the_environment_and_config_file_say(tmp_path: Path) -> None:
    config = tmp_path / "coupons.toml"
    config.write_text('PLATFORM = "alipay"\nLAG_WINDOW_S = 3\nTEMPORAL_TLS = true\n')
    given = Settings.given({"COUPONS_CONFIG": str(config), "LAG_WINDOW_S": "4", "DATA_DIR": ""})
    assert given == {
        "COUPONS_CONFIG": str(config),
        "PLATFORM": "alipay",
        "LAG_WINDOW_S": "4",
        "TEMPORAL_TLS": "true",
    }


def test_every_secret_setting_is_named_a_secret() -> None:
    secrets = {
        "PLATFORM_API_KEY": "api-key",
        "PLATFORM_CALLBACK_SECRET": "callback-secret-0123456789",
        "CODEC_TOKEN": "codec-token-0123456789",
        "TEMPORAL_API_KEY": "temporal-api-key",
    }
    settings = Settings.from_env(secrets)
    # What repr hides is what the running stack's record leaves out.
    hidden = {f.name.upper() for f in fields(Settings) if not f.repr}
    assert hidden == set(secrets) == SECRET_SETTINGS
    assert {k for k, v in settings.to_env().items() if v in secrets.values()} == SECRET_SETTINGS
