"""The API as several processes on one port (API_PROCESSES): what each refuses to start
with. The processes sharing the port, its connections and their metrics are shown on a
running stack (tests/app/test_stack.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from app.embedded import LOCALHOST, free_port
from coupons.config import PROMETHEUS_MULTIPROC_DIR, Settings

ROOT = Path(__file__).resolve().parents[3]


def _api(tmp_path: Path, port: int, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m app.api` as the second of two processes on `port`, with `env` on top."""
    settings = Settings(data_dir=tmp_path, api_port=port, api_processes=2)
    return subprocess.run(
        [sys.executable, "-m", "app.api"],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if k != PROMETHEUS_MULTIPROC_DIR},
            **settings.to_env(),
            # A stack registered on this machine must not lend this process its settings.
            "COUPONS_STATE_DIR": str(tmp_path / "state"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_several_processes_without_a_shared_metrics_directory_are_refused(
    tmp_path: Path,
) -> None:
    for env in ({}, {PROMETHEUS_MULTIPROC_DIR: str(tmp_path / "no-such-directory")}):
        done = _api(tmp_path, free_port(), **env)
        assert done.returncode == 2, done.stderr
        assert f"API_PROCESSES=2 needs {PROMETHEUS_MULTIPROC_DIR}: an existing directory" in (
            done.stderr
        )


def test_a_port_taken_by_a_process_that_does_not_share_it_is_refused(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind((LOCALHOST, port))
        taken.listen()
        done = _api(tmp_path, port, **{PROMETHEUS_MULTIPROC_DIR: str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert f"API_PORT {port} on {LOCALHOST}: [Errno 98] Address already in use" in done.stderr
