"""The running stack, as every command line and process on the machine finds it.

`make run` (`app.stack`) records the effective settings of the stack it runs, never a
secret, in two places: `<DATA_DIR>/stack.json`, beside the data, and a per-user registry,
`$COUPONS_STATE_DIR/<pid>.json` (default `$XDG_STATE_HOME/coupons/stacks/`, else
`~/.local/state/coupons/stacks/`), which finds it without knowing its data directory. An
orderly stop removes both. A record counts only while its stack runs: its pid alive with the
start time recorded (so a record of a dead stack, or of a pid handed to another program
since, is ignored, and the registry's copy removed).

`settings_from_env` is how the command line, the worker and the API build their settings.
It looks for a live stack this shell would talk to (the same Temporal address or the same
database as its settings), and then:

- a setting the environment (or the `COUPONS_CONFIG` file) does not set follows the stack:
  its platform, data directory (and so its codec keys and kept secrets), ports, queues...;
- a setting it does set must be the stack's: any difference is a ConfigError naming each
  variable, raised before anything is written (a shell without PLATFORM beside
  `PLATFORM=wechat make run` used to write to the WeChat ledger under the generic key ring);
- what belongs to one process alone (`PROCESS_SETTINGS`: where it listens, how big its
  pools and caches are) is neither followed nor compared: a second worker or API beside
  the stack's listens elsewhere;
- secrets (`SECRET_SETTINGS`) are not recorded: they come from the environment, else from
  the (followed) data directory, as `Settings.with_stack_secrets` has it.

With no live stack found, the settings are `Settings.from_env`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from app.embedded.pids import same_process_alive
from coupons.config import SECRET_SETTINGS, ConfigError, Settings

RECORD_NAME = "stack.json"
RECORD_VERSION = 1

# One process's own: where it listens and how big it is. Neither followed nor compared.
PROCESS_SETTINGS = frozenset(
    {
        "API_HOST",
        "API_PORT",
        "API_PROCESSES",
        "API_PUBLIC_URL",
        "WORKER_METRICS_PORT",
        "METRICS_HOST",
        "DB_POOL_SIZE",
        "WORKER_CACHE_SIZE",
        "WORKER_MAX_CONCURRENT_ACTIVITIES",
        "WORKER_MAX_CONCURRENT_WORKFLOW_TASKS",
        "WORKER_SHUTDOWN_GRACE_S",
    }
)


@dataclass(frozen=True)
class Child:
    """A server the stack started: with its start time, its pid names it and no other."""

    name: str
    pid: int
    start_time: int
    stop_signal: str  # what stops it in order (a signal's name)

    @property
    def alive(self) -> bool:
        return same_process_alive(self.pid, self.start_time)


@dataclass(frozen=True)
class StackRecord:
    path: Path
    pid: int
    start_time: int
    data_dir: Path
    # The stack's settings as the variables that rebuild them (`Settings.to_env`), secrets
    # left out.
    settings: Mapping[str, str]
    children: tuple[Child, ...]

    @property
    def alive(self) -> bool:
        return same_process_alive(self.pid, self.start_time)

    def describe(self) -> str:
        return f"pid {self.pid}, data {self.data_dir}"


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The per-user registry of running stacks: COUPONS_STATE_DIR, else
    $XDG_STATE_HOME/coupons/stacks, else ~/.local/state/coupons/stacks."""
    env = os.environ if environ is None else environ
    if env.get("COUPONS_STATE_DIR"):
        return Path(env["COUPONS_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local/state")
    return Path(base).expanduser() / "coupons" / "stacks"


def without_password(url: str) -> str:
    """`url` with no password in it: what a record may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def record_settings(settings: Settings) -> dict[str, str]:
    """The variables a record keeps: `to_env` without secrets (nor a database password)."""
    env = {k: v for k, v in settings.to_env().items() if k not in SECRET_SETTINGS}
    if "DATABASE_URL" in env:
        env["DATABASE_URL"] = without_password(env["DATABASE_URL"])
    return env


def write_record(
    settings: Settings,
    children: Sequence[Child],
    *,
    pid: int,
    start_time: int,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Record the stack `pid` runs: in its data directory and in the per-user registry."""
    data_dir = settings.data_dir.resolve()
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "pid": pid,
        "start_time": start_time,
        # What an operator asks first; `settings` below is what processes follow.
        "platform": settings.platform,
        "data_dir": str(data_dir),
        "database_url": without_password(settings.database_url),
        "temporal_address": settings.temporal_address,
        "temporal_namespace": settings.temporal_namespace,
        "task_queue": settings.task_queue,
        "platform_url": settings.platform_url,
        "api_url": settings.api_url,
        "temporal_ui_port": settings.temporal_ui_port,
        "worker_metrics_port": settings.worker_metrics_port,
        "codec_keys_file": str(settings.codec_keys_file) if settings.codec_keys_file else None,
        "codec_key_ids": _key_ids(settings.codec_keys_file),
        "settings": record_settings(settings),
        "children": [vars(child) for child in children],
    }
    text = json.dumps(record, indent=2) + "\n"
    _write_atomically(data_dir / RECORD_NAME, text)
    _write_atomically(state_dir(environ) / f"{pid}.json", text)


def remove_record(data_dir: Path, pid: int, environ: Mapping[str, str] | None = None) -> None:
    """Forget the stack `pid` ran on `data_dir` (its record there only if it is that stack's)."""
    (state_dir(environ) / f"{pid}.json").unlink(missing_ok=True)
    path = data_dir.resolve() / RECORD_NAME
    record = read_record(path)
    if record is not None and record.pid == pid:
        path.unlink(missing_ok=True)


def read_record(path: Path) -> StackRecord | None:
    """The record in `path`; None if there is none, or it cannot be read."""
    try:
        raw = json.loads(path.read_text())
        return StackRecord(
            path=path,
            pid=int(raw["pid"]),
            start_time=int(raw["start_time"]),
            data_dir=Path(raw["data_dir"]),
            settings={str(k): str(v) for k, v in raw["settings"].items()},
            children=tuple(
                Child(str(c["name"]), int(c["pid"]), int(c["start_time"]), str(c["stop_signal"]))
                for c in raw["children"]
            ),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def live_stacks(environ: Mapping[str, str] | None = None) -> list[StackRecord]:
    """The stacks of this user that run now; the registry's records of dead ones removed."""
    directory = state_dir(environ)
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    live = []
    for path in paths:
        record = read_record(path)
        if record is not None and record.alive:
            live.append(record)
        elif record is not None:
            with contextlib.suppress(OSError):
                path.unlink()
    return live


def stack_for(settings: Settings, environ: Mapping[str, str] | None = None) -> StackRecord | None:
    """The live stack `settings` would talk to: the same Temporal or the same database."""
    database = without_password(settings.database_url)
    found = [
        record
        for record in live_stacks(environ)
        if stack_settings(record).temporal_address == settings.temporal_address
        or without_password(stack_settings(record).database_url) == database
    ]
    if len(found) > 1:
        raise ConfigError(
            "these settings reach more than one running stack ("
            + "; ".join(record.describe() for record in found)
            + "): set DATABASE_URL and TEMPORAL_ADDRESS (or PG_PORT and TEMPORAL_PORT) "
            "for the one to use"
        )
    return found[0] if found else None


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of a command line, worker or API: the environment's, the running stack's
    where the environment says nothing, and refused where the two differ (module doc)."""
    env = os.environ if environ is None else environ
    own = Settings.from_env(env)
    stack = stack_for(own, env)
    if stack is None:
        return own
    theirs = stack_settings(stack)
    given = Settings.given(env)
    compared = (set(own.to_env()) | set(theirs.to_env()) | set(_COMPARED_AS)) - (
        SECRET_SETTINGS | PROCESS_SETTINGS
    )
    differences = [
        f"{name}: this shell says {_value(own, name)}, the stack runs {_value(theirs, name)}"
        for name in sorted(given)
        if name in compared and _value(own, name) != _value(theirs, name)
    ]
    if differences:
        raise ConfigError(
            f"the running stack ({stack.describe()}) runs other settings than this shell "
            f"gives: {'; '.join(differences)}. Unset "
            f"{'it' if len(differences) == 1 else 'them'} to follow the stack, or stop that "
            "stack first"
        )
    followed = {
        name: value
        for name, value in stack.settings.items()
        if name not in given and name not in PROCESS_SETTINGS
    }
    return Settings.from_env({**env, **followed})


def stack_settings(record: StackRecord) -> Settings:
    try:
        return Settings.from_env(record.settings)
    except ConfigError as err:
        raise ConfigError(f"the running stack's record {record.path}: {err}") from None


# How a variable's value is compared: as the setting it makes (a relative path from this
# directory, a number however written, an address however given).
_COMPARED_AS: Mapping[str, Callable[[Settings], object]] = {
    "DATA_DIR": lambda s: s.data_dir.resolve(),
    "DATABASE_URL": lambda s: without_password(s.database_url),
    "PG_PORT": lambda s: without_password(s.database_url),
    "TEMPORAL_ADDRESS": lambda s: s.temporal_address,
    "TEMPORAL_PORT": lambda s: s.temporal_address,
    "PLATFORM_URL": lambda s: s.platform_url,
    "SIMULATOR_PORT": lambda s: s.platform_url,
}


def _value(settings: Settings, name: str) -> object:
    if name in _COMPARED_AS:
        return _COMPARED_AS[name](settings)
    value = settings.to_env().get(name)
    if value is None:
        return "(unset)"
    if name.endswith("_FILE"):
        return Path(value).resolve()
    return value


def _key_ids(path: Path | None) -> list[str]:
    """The ids of the payload keys (never a key): which ring a stack's payloads need."""
    if path is None:
        return []
    from coupons.codec import load_keys

    try:
        ring = load_keys(path)
    except ConfigError:
        return []
    return sorted(ring.keys)


def _write_atomically(path: Path, text: str) -> None:
    # Readers never see half a record: written beside it, then renamed over it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
