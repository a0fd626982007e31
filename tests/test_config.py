"""Settings: built from the environment in one place, refused when they cannot work."""

from __future__ import annotations

from dataclasses import replace

import pytest

from coupons.config import ConfigError, Settings


def test_defaults_point_at_the_embedded_stack() -> None:
    s = Settings.from_env({})
    assert s.database_url == "postgresql://postgres@127.0.0.1:55432/coupons"
    assert s.temporal_address == "127.0.0.1:7233"
    assert s.platform_url == "http://127.0.0.1:8600"
    assert s.platform_task_queue == "coupons-platform"


def test_a_child_process_rebuilds_the_same_settings_from_to_env() -> None:
    s = replace(
        Settings(),
        database_url_override="postgresql://u@db:5432/x",
        task_queue="tq",
        platform_api_key="k",
        lag_window_s=12.5,
    )
    assert Settings.from_env(s.to_env()) == s


def test_the_api_key_never_shows_in_repr() -> None:
    assert "sekrit" not in repr(Settings.from_env({"PLATFORM_API_KEY": "sekrit"}))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PG_PORT": "x"}, "PG_PORT='x' is not a valid int"),
        ({"LAG_WINDOW_S": "-1"}, "LAG_WINDOW_S='-1' must be greater than zero"),
        ({"PLATFORM_TIMEOUT_S": "10"}, "PLATFORM_TIMEOUT_S=10 must stay under 7.5"),
        ({"LAG_WINDOW_S": "290"}, "LAG_WINDOW_S=290 must be at most 285"),
    ],
)
def test_unusable_settings_are_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)
