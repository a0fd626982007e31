"""The reference the claim rate is printed beside, measured in the same run on the same
PostgreSQL: the single-row commit rate, many clients each running
`UPDATE one_row SET n = n + 1` in autocommit. Every such commit waits for the row lock the
previous one holds until its WAL is flushed, so this is the physical limit of any design
that commits one hot row per claim; a claim path that spreads its hot row over slots, or
commits many claims at once, may pass it.

The clients are `pgbench` (shipped with the embedded PostgreSQL): a C client, so the rate
is the server's and not this process's. For context, the plain `SELECT 1` round-trip rate
by pgbench (the server's limit with nothing to write) and by asyncio psycopg from this
process, the one the in-process claims run in (the ceiling of anything this one Python
process drives).

It runs in a database of its own (REFERENCE_DB), so the ledger's tables, and the
statement counts taken there, see none of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from app.embedded.postgres import _postgres_install_dir
from bench.load import progress
from bench.probes import MARK
from bench.proc import CpuSplit
from bench.stats import summary_ms

log = logging.getLogger(__name__)

REFERENCE_DB = "bench_reference"
UPDATE = "UPDATE one_row SET n = n + 1 WHERE id = 1;"
SELECT = "SELECT 1;"
# The single-row commit rate at each of these client counts; the best is the reference
# (a row lock queue of 100 commits a little slower than one of 10).
UPDATE_CLIENTS = (10, 100)
# This process's own SELECT 1 clients: the first moments (statements being prepared) are
# left out.
WARMUP_S = 0.5
PGBENCH_GRACE_S = 30.0
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)


async def _prepare(url: str) -> str:
    """The reference database with its one row (created if missing); its URL."""
    async with await psycopg.AsyncConnection.connect(
        make_conninfo(url, dbname="postgres"), autocommit=True
    ) as admin:
        cur = await admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (REFERENCE_DB,))
        if await cur.fetchone() is None:
            await admin.execute(f"CREATE DATABASE {REFERENCE_DB}")
    target = make_conninfo(url, dbname=REFERENCE_DB)
    async with await psycopg.AsyncConnection.connect(target, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS one_row (id integer PRIMARY KEY, n bigint NOT NULL)"
        )
        await conn.execute("INSERT INTO one_row VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
    return target


async def _pgbench(target: str, script: Path, clients: int, seconds: float) -> dict[str, Any]:
    """`script` run back to back by `clients` pgbench clients for `seconds`: transactions
    per second (connections excluded) and their mean latency."""
    where = conninfo_to_dict(target)
    argv = [
        str(_postgres_install_dir() / "bin" / "pgbench"),
        *("-n", "-M", "prepared", "-c", str(clients), "-j", str(min(os.cpu_count() or 1, clients))),
        *("-T", str(max(round(seconds), 1)), "-f", str(script)),
        *("-h", str(where["host"]), "-p", str(where["port"]), "-U", str(where["user"])),
        str(where["dbname"]),
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds + PGBENCH_GRACE_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = out.decode()
    tps, latency = _TPS.search(text), _LATENCY.search(text)
    if process.returncode != 0 or tps is None or latency is None:
        raise RuntimeError(f"pgbench failed ({process.returncode}): {err.decode()[-500:]}")
    return {
        "clients": clients,
        "per_s": round(float(tps.group(1)), 1),
        "latency_mean_ms": float(latency.group(1)),
    }


async def _python_select1(target: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` asyncio psycopg connections of this process running SELECT 1 back to back
    for WARMUP_S + `seconds`: the rate and latency of those finished inside `seconds`."""
    connections = await asyncio.gather(
        *(psycopg.AsyncConnection.connect(target, autocommit=True) for _ in range(clients))
    )
    began = time.monotonic()
    start, stop = began + WARMUP_S, began + WARMUP_S + seconds
    latencies: list[float] = []

    async def client(conn: psycopg.AsyncConnection[Any]) -> None:
        while (sent := time.monotonic()) < stop:
            await conn.execute(f"{MARK} SELECT 1")
            done = time.monotonic()
            if start <= done <= stop:
                latencies.append(done - sent)

    try:
        await asyncio.gather(*(client(conn) for conn in connections))
    finally:
        for conn in connections:
            await conn.close()
    return {
        "clients": clients,
        "per_s": round(len(latencies) / seconds, 1),
        "latency_ms": summary_ms(latencies),
    }


async def measure_reference(
    url: str, work_dir: Path, *, clients: int, seconds: float, processes: dict[str, int]
) -> dict[str, Any]:
    """The single-row commit rate (the best of UPDATE_CLIENTS), the SELECT 1 rate of
    `clients` pgbench clients and of `clients` connections from this process, each
    measured for `seconds`. A pgbench that cannot run leaves its figures None and says
    why: the claims are still measured."""
    target = await _prepare(url)
    update, select1 = work_dir / "pgbench-update.sql", work_dir / "pgbench-select1.sql"
    update.write_text(UPDATE + "\n")
    select1.write_text(SELECT + "\n")
    result: dict[str, Any] = {"seconds": seconds}
    try:
        cpu = CpuSplit(processes)
        cpu.start()
        began = time.monotonic()
        updates = [await _pgbench(target, update, n, seconds) for n in UPDATE_CLIENTS]
        result["commit_cpu_by_process"] = cpu.stop(time.monotonic() - began)
        best = max(updates, key=lambda run: run["per_s"])
        select = await _pgbench(target, select1, clients, seconds)
        result |= {
            "single_row_commits_per_s": best["per_s"],
            "clients": best["clients"],
            "commits_by_clients": updates,
            "select1_per_s": select["per_s"],
            "select1": select,
        }
    except (OSError, RuntimeError, TimeoutError) as err:
        log.exception("pgbench could not measure the reference")
        result |= {"single_row_commits_per_s": None, "select1_per_s": None, "error": str(err)}
    python = await _python_select1(target, clients, seconds)
    result |= {
        "select1_per_s_from_this_process": python["per_s"],
        "select1_from_this_process": python,
        "measure": "pgbench (-M prepared, as many threads as cores) against the ledger's "
        "PostgreSQL, in a database of its own: `UPDATE one_row SET n = n + 1` in autocommit "
        f"by {' and '.join(map(str, UPDATE_CLIENTS))} clients (the best is the reference), "
        f"then `SELECT 1` by {clients}; each for {seconds:g} s, transactions per second "
        "without connection time. fsync and synchronous_commit on, as for the ledger. "
        f"From this process: {clients} asyncio psycopg connections running SELECT 1, "
        f"finished within {seconds:g} s after a {WARMUP_S:g} s warm-up",
    }
    progress(
        "reference",
        f"single-row commits {result['single_row_commits_per_s']}/s, SELECT 1 "
        f"{result['select1_per_s']}/s (pgbench), SELECT 1 from this process {python['per_s']}/s",
    )
    return result
