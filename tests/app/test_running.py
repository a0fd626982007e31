"""`app.running`: what a shell, a worker or an API makes of the running stack's record.

The "stack" here is a real process (a `sleep` we start) with a record written the way
`make run` writes it; `tests/app/test_stack.py` runs the real `make run`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.embedded import free_port, process_start_time
from app.running import (
    RECORD_NAME,
    live_stacks,
    remove_record,
    settings_from_env,
    state_dir,
    write_record,
)
from coupons.codec import ensure_keys, load_keys
from coupons.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]


class FakeStack:
    """A live process recorded as a stack on free ports, with its data in `tmp_path`."""

    def __init__(self, tmp_path: Path) -> None:
        self.process = subprocess.Popen(["sleep", "120"])
        start_time = process_start_time(self.process.pid)
        assert start_time is not None
        self.start_time = start_time
        self.state = {"COUPONS_STATE_DIR": str(tmp_path / "state")}
        self.data = tmp_path / "wechat"
        self.data.mkdir()
        self.keys = self.data / "codec-keys.json"
        ensure_keys(self.keys)
        self.temporal_port, self.pg_port = str(free_port()), str(free_port())
        self.settings = Settings.from_env(
            {
                "PLATFORM": "wechat",
                "DATA_DIR": str(self.data),
                "TEMPORAL_PORT": self.temporal_port,
                "PG_PORT": self.pg_port,
                "SIMULATOR_PORT": str(free_port()),
                "TEMPORAL_UI_PORT": str(free_port()),
                "API_PORT": str(free_port()),
                "WORKER_METRICS_PORT": "off",
                "CODEC_KEYS_FILE": str(self.keys),
                "LAG_WINDOW_S": "12",
                "DB_POOL_SIZE": "7",
            }
        )
        self.record(self.process.pid, self.start_time)

    def record(self, pid: int, start_time: int) -> None:
        write_record(self.settings, [], pid=pid, start_time=start_time, environ=self.state)

    def env(self, **given: str) -> dict[str, str]:
        """A shell that reaches this stack's Temporal and says `given`."""
        return {**self.state, "TEMPORAL_PORT": self.temporal_port, **given}

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[FakeStack]:
    running = FakeStack(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_a_shell_that_says_nothing_follows_the_running_stack(stack: FakeStack) -> None:
    s = settings_from_env(stack.env())
    assert s.platform == "wechat"
    assert s.data_dir == stack.data.resolve()
    assert s.codec_keys_file == stack.keys.resolve()
    assert s.database_url == stack.settings.database_url
    assert s.platform_url == stack.settings.platform_url
    assert s.temporal_ui_port == stack.settings.temporal_ui_port
    assert s.lag_window_s == 12
    # One process's own size and ports are its own: never the stack's.
    assert (s.db_pool_size, s.worker_metrics_port, s.api_port) == (20, 9464, 8000)
    # The database alone finds the stack too, and what the shell gives that agrees is fine.
    by_db = settings_from_env({**stack.state, "PG_PORT": stack.pg_port, "PLATFORM": "wechat"})
    assert (by_db.temporal_address, by_db.data_dir) == (s.temporal_address, s.data_dir)
    # The secrets come from the stack's data directory, as ever.
    (stack.data / "platform-api-key").write_text("the-stacks-key\n")
    assert s.with_stack_secrets().platform_api_key == "the-stacks-key"


def test_a_shell_that_says_otherwise_is_refused_naming_each_difference(
    stack: FakeStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_keys = tmp_path / "other-keys.json"
    with pytest.raises(ConfigError) as refused:
        settings_from_env(
            stack.env(PLATFORM="alipay", CODEC_KEYS_FILE=str(other_keys), LAG_WINDOW_S="12.0")
        )
    message = str(refused.value)
    assert f"the running stack (pid {stack.process.pid}, data {stack.data.resolve()})" in message
    assert "PLATFORM: this shell says alipay, the stack runs wechat" in message
    assert f"CODEC_KEYS_FILE: this shell says {other_keys}, the stack runs {stack.keys}" in message
    assert "LAG_WINDOW_S" not in message  # 12.0 is 12
    assert "TEMPORAL_PORT" not in message
    assert "Unset them to follow the stack, or stop that stack first" in message

    # A relative DATA_DIR means this directory's: the generic default is not the stack's.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"DATA_DIR: this shell says /\S+/\.data, the stack"):
        settings_from_env(stack.env(DATA_DIR=".data"))
    # What the COUPONS_CONFIG file says counts as said.
    config = tmp_path / "coupons.toml"
    config.write_text('PLATFORM = "alipay"\n')
    with pytest.raises(ConfigError, match="PLATFORM: this shell says alipay"):
        settings_from_env(stack.env(COUPONS_CONFIG=str(config)))
    # One process's own settings may differ.
    own = settings_from_env(stack.env(WORKER_METRICS_PORT="off", API_PORT="9001"))
    assert (own.worker_metrics_port, own.api_port, own.platform) == (None, 9001, "wechat")


def test_a_dead_stacks_record_is_ignored_and_removed(stack: FakeStack, tmp_path: Path) -> None:
    shell = stack.env(PLATFORM="alipay")
    # The pid lives, but it is another process than the stack that started then.
    stack.record(stack.process.pid, stack.start_time - 1)
    assert settings_from_env(shell) == Settings.from_env(shell)
    # The stack's pid is gone.
    stack.stop()
    stack.record(stack.process.pid, stack.start_time)
    registered = state_dir(stack.state) / f"{stack.process.pid}.json"
    assert registered.exists()
    assert live_stacks(stack.state) == []
    assert not registered.exists()
    assert settings_from_env(shell) == Settings.from_env(shell)


def test_without_a_running_stack_the_settings_are_the_environments(tmp_path: Path) -> None:
    for env in (
        {"COUPONS_STATE_DIR": str(tmp_path / "none")},
        {"COUPONS_STATE_DIR": str(tmp_path / "none"), "PLATFORM": "alipay", "LAG_WINDOW_S": "3"},
    ):
        assert settings_from_env(env) == Settings.from_env(env)


def test_a_stack_on_other_ports_is_not_this_shells(stack: FakeStack) -> None:
    shell = {**stack.state, "PLATFORM": "alipay"}  # the default ports: not the stack's
    assert settings_from_env(shell) == Settings.from_env(shell)


def test_the_record_names_the_stack_and_keeps_no_secret(stack: FakeStack, tmp_path: Path) -> None:
    secrets = {
        "PLATFORM_API_KEY": "api-key-sekrit",
        "PLATFORM_CALLBACK_SECRET": "callback-sekrit-0123456789",
        "CODEC_TOKEN": "codec-token-sekrit-0123",
        "TEMPORAL_API_KEY": "temporal-sekrit",
        "DATABASE_URL": "postgresql://u:db-sekrit@127.0.0.1:5/x",
    }
    settings = Settings.from_env({**stack.settings.to_env(), **secrets})
    pid = stack.process.pid
    write_record(settings, [], pid=pid, start_time=stack.start_time, environ=stack.state)
    text = (stack.data / RECORD_NAME).read_text()
    assert text == (state_dir(stack.state) / f"{pid}.json").read_text()
    assert "sekrit" not in text
    record = json.loads(text)
    assert record["database_url"] == "postgresql://u@127.0.0.1:5/x"
    assert record["codec_key_ids"] == [load_keys(stack.keys).current]
    assert (record["platform"], record["data_dir"]) == ("wechat", str(stack.data.resolve()))
    remove_record(stack.data, pid, stack.state)
    assert not (stack.data / RECORD_NAME).exists()
    assert list(state_dir(stack.state).iterdir()) == []


@pytest.mark.parametrize("argv", [["worker.py"], ["-m", "app.api"]])
def test_a_worker_or_api_started_by_hand_in_another_shell_refuses(
    stack: FakeStack, argv: list[str]
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PLATFORM", "DATA_DIR")},
        **stack.env(PLATFORM="generic"),
    }
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "PLATFORM: this shell says generic, the stack runs wechat" in done.stderr
