"""The platform simulator (`python -m coupons.platforms.simulator`) as our child: its
command line and environment, and its health check."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from app.embedded.ports import LOCALHOST, answers_health, require_free_port
from app.embedded.process import ManagedProcess, Server

# The checkout whose `coupons` the simulator imports.
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SimulatorProcess(Server):
    """The platform simulator (`python -m coupons.platforms.simulator`) as our child."""

    title = "the platform simulator"
    label = "platform simulator"

    def __init__(
        self,
        data_file: Path,
        port: int,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        *,
        startup_timeout_s: float = 15.0,
        inherit_knobs: bool = True,
        mode: str = "generic",
        keys_dir: Path | None = None,
        host: str = LOCALHOST,
        die_with_parent: bool = False,
    ) -> None:
        """`env` is added to this process's environment (the simulator's knobs); `mode` is the
        platform protocol it speaks, `keys_dir` where that protocol's key material lives
        (default: beside `data_file`, made on first start); `host` the address it listens on
        (another loopback address lets a client that only speaks to port 80 reach it).

        `die_with_parent`: see ManagedProcess. `inherit_knobs=False` drops `SIM_*` and
        `PLATFORM_API_KEY` from our own environment first, so tests start from known knobs
        whatever the developer's shell exports.
        """
        self.data_file = data_file.expanduser().absolute()
        self.host = host
        self.port = port
        self.extra_env = dict(env or {})
        self.log_path = log_path or self.data_file.with_name(self.data_file.name + ".log")
        child_env = {
            key: value
            for key, value in os.environ.items()
            if inherit_knobs
            or not (
                key.startswith("SIM_") or key in ("PLATFORM_API_KEY", "PLATFORM_CALLBACK_SECRET")
            )
        }
        # The child must import this checkout's `coupons`, installed or not.
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PROJECT_ROOT), child_env.get("PYTHONPATH", "")) if p
        )
        # Flush each log line to the file as it happens, not when the buffer fills.
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(self.extra_env)
        self.mode = mode
        self.keys_dir = (keys_dir or self.data_file.parent / "platform-keys").absolute()
        argv: list[str | os.PathLike[str]] = [
            sys.executable,
            "-m",
            "coupons.platforms.simulator",
            "--host",
            host,
            "--port",
            str(port),
            "--data",
            self.data_file,
            "--mode",
            mode,
            "--keys",
            self.keys_dir,
        ]
        simulator = ManagedProcess(
            "platform simulator",
            argv,
            self.log_path,
            env=child_env,
            cwd=_PROJECT_ROOT,
            die_with_parent=die_with_parent,
        )
        super().__init__(simulator, startup_timeout_s, where=self.url)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _prepare(self) -> None:
        require_free_port(self.title, self.port, self.host)
        self.data_file.parent.mkdir(parents=True, exist_ok=True)

    def _ready(self) -> bool:
        return answers_health(f"{self.url}/health")
