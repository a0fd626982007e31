"""The command line when a part it needs is down: one clear line, exit 1, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from coupons.embedded import EmbeddedPostgres, free_port

ROOT = Path(__file__).resolve().parent.parent


def starter(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "starter.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_postgres_down_is_one_line_and_exit_1() -> None:
    closed = free_port()
    result = starter(
        "stats", "--campaign", "demo", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/x"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: cannot reach PostgreSQL")
    assert "Traceback" not in result.stderr


def test_temporal_down_is_one_line_and_exit_1(postgres: EmbeddedPostgres) -> None:
    closed = free_port()
    result = starter(
        "claim",
        "--campaign",
        "demo",
        "--user",
        "u1",
        DATABASE_URL=postgres.url(),
        TEMPORAL_ADDRESS=f"127.0.0.1:{closed}",
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach Temporal at 127.0.0.1:{closed}")
    assert "Traceback" not in result.stderr


def test_bad_setting_is_named_and_exit_2() -> None:
    result = starter("stats", "--campaign", "demo", PG_PORT="many")
    assert result.returncode == 2
    assert "PG_PORT='many' is not a valid int" in result.stderr
