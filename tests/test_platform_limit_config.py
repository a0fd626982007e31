"""The platform call limits' settings (coupons/config.py): per kind, and in all; checked,
and carried to child processes."""

from __future__ import annotations

import pytest

from coupons.config import ConfigError, Settings


def test_the_defaults_are_wechat_pays_published_limits() -> None:
    settings = Settings.from_env({})
    assert settings.platform_send_rate_limit == 500
    assert settings.platform_query_rate_limit == 500
    # No limit of its own on all calls: the two kinds added up.
    assert settings.platform_rate_limit == 1000


def test_the_limit_on_all_calls_can_be_set_alone() -> None:
    settings = Settings.from_env({"PLATFORM_RATE_LIMIT": "300"})
    assert settings.platform_rate_limit == 300
    assert Settings.from_env(settings.to_env()).platform_rate_limit == 300
    assert "PLATFORM_RATE_LIMIT" not in Settings.from_env({}).to_env()


def test_the_limits_travel_to_child_processes() -> None:
    env = {"PLATFORM_SEND_RATE_LIMIT": "40", "PLATFORM_QUERY_RATE_LIMIT": "60"}
    child = Settings.from_env(Settings.from_env(env).to_env())
    assert (child.platform_send_rate_limit, child.platform_query_rate_limit) == (40, 60)
    assert child.platform_rate_limit == 100


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PLATFORM_SEND_RATE_LIMIT": "fast"}, "PLATFORM_SEND_RATE_LIMIT='fast' is not a valid"),
        ({"PLATFORM_QUERY_RATE_LIMIT": "0"}, "PLATFORM_QUERY_RATE_LIMIT='0' must be greater"),
        ({"PLATFORM_RATE_LIMIT": "-5"}, "PLATFORM_RATE_LIMIT='-5' must be greater than zero"),
        (
            {"PLATFORM_SEND_RATE_LIMIT": "0.5"},
            "PLATFORM_SEND_RATE_LIMIT=0.5 must be at least 1 call per second",
        ),
        ({"PLATFORM_RATE_LIMIT": "nan"}, "PLATFORM_RATE_LIMIT=nan must be at least 1"),
        ({"PLATFORM_QUERY_RATE_LIMIT": "inf"}, "PLATFORM_QUERY_RATE_LIMIT=inf must be at least"),
    ],
)
def test_a_limit_that_cannot_be_held_is_refused_naming_it(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)
