"""The API as several processes on one port (API_PROCESSES): what each refuses to start
without. The processes sharing the port, its connections and their metrics are shown on a
running stack (tests/app/test_stack.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from app.embedded import port_open
from coupons.config import PROMETHEUS_MULTIPROC_DIR, Settings

ROOT = Path(__file__).resolve().parents[3]


def test_several_processes_without_a_shared_metrics_directory_are_refused(
    api_settings: Settings, tmp_path: Path
) -> None:
    settings = replace(api_settings, data_dir=tmp_path, api_processes=2)
    env = {
        **{k: v for k, v in os.environ.items() if k != PROMETHEUS_MULTIPROC_DIR},
        **settings.to_env(),
        "COUPONS_STATE_DIR": str(tmp_path / "state"),
    }
    for missing in (None, str(tmp_path / "no-such-directory")):
        if missing is not None:
            env[PROMETHEUS_MULTIPROC_DIR] = missing
        done = subprocess.run(
            [sys.executable, "-m", "app.api"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert (
            f"API_PROCESSES=2 needs {PROMETHEUS_MULTIPROC_DIR}: an existing directory"
            in done.stderr
        )
        assert not port_open(settings.api_client_host, settings.api_port)
