"""The parent of a chaos run: one child process per scenario, results gathered.

Each scenario runs in a child process of its own (`python -m chaos --scenario NAME`), so
a scenario that hangs or crashes cannot take the others with it, and its stack lives
and dies with it. The parent bounds each child: past its hard timeout plus a grace it
gets SIGTERM (it stops its stack on the way out), then SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from chaos import report
from chaos.drive import CHECK_BUDGET_S, OBSERVE_BUDGET_S, RECONCILE_BUDGET_S, VERIFY_BUDGET_S
from chaos.report import ScenarioResult
from chaos.scenarios import SCENARIOS
from chaos.sizes import Size

log = logging.getLogger("chaos.runner")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Beyond a scenario's own hard timeout and its checks' budgets: stack start and stop.
GRACE_S = 45.0
TERM_WAIT_S = 30.0


@dataclass
class Child:
    name: str
    root: Path
    result_path: Path
    process: subprocess.Popen[bytes]
    started: float
    terminated: bool = False


def _spawn(name: str, size: Size, work: Path) -> Child:
    root = work / name
    root.mkdir(parents=True)
    result_path = work / f"{name}.json"
    argv = [sys.executable, "-m", "chaos", "--size", size.name]
    argv += ["--scenario", name, "--result", str(result_path), "--root", str(root)]
    process = subprocess.Popen(argv, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL)
    return Child(name, root, result_path, process, time.monotonic())


def _collect(child: Child) -> ScenarioResult:
    if child.result_path.exists():
        return ScenarioResult.from_json(json.loads(child.result_path.read_text()))
    result = ScenarioResult(
        name=child.name, description=SCENARIOS[child.name].description, size="?"
    )
    why = "was stopped past its hard timeout" if child.terminated else "exited"
    result.error = (
        f"scenario process {why} (rc {child.process.returncode}) without a result; "
        f"see {child.root}/chaos.log"
    )
    result.wall_s = round(time.monotonic() - child.started, 1)
    return result


def run(names: list[str], size: Size, out: Path, *, jobs: int, keep: bool) -> int:
    started_at = datetime.now(UTC)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"chaos-{size.name}-"))
    print(
        f"chaos run, size {size.name}: {', '.join(names)}; {jobs} at a time; stacks under {work}",
        flush=True,
    )
    pending = list(names)
    running: list[Child] = []
    results: dict[str, ScenarioResult] = {}
    limit_s = (
        size.hard_timeout_s
        + VERIFY_BUDGET_S
        + CHECK_BUDGET_S
        + OBSERVE_BUDGET_S
        + RECONCILE_BUDGET_S
        + GRACE_S
    )
    try:
        while pending or running:
            while pending and len(running) < jobs:
                running.append(_spawn(pending.pop(0), size, work))
            time.sleep(0.5)
            for child in list(running):
                age = time.monotonic() - child.started
                if child.process.poll() is None:
                    if age > limit_s and not child.terminated:
                        print(f"[{child.name}] over {limit_s:.0f} s: stopping it", flush=True)
                        child.process.send_signal(signal.SIGTERM)
                        child.terminated = True
                    elif age > limit_s + TERM_WAIT_S:
                        child.process.kill()
                        child.process.wait()
                    continue
                running.remove(child)
                results[child.name] = _collect(child)
    finally:
        for child in running:  # interrupted: each child stops its own stack on SIGTERM
            child.process.send_signal(signal.SIGTERM)
        for child in running:
            try:
                child.process.wait(timeout=TERM_WAIT_S)
            except subprocess.TimeoutExpired:
                child.process.kill()

    ordered = [results[name] for name in names]
    wall_s = time.monotonic() - began
    stem = "chaos" if size.name == "full" else f"{size.name}-chaos"
    platform = os.environ.get("PLATFORM") or "generic"
    if platform != "generic":
        stem = f"{platform}-{stem}"
    suffix = "" if names == list(SCENARIOS) else "-" + "-".join(names)
    json_path = out / f"{stem}-{started_at:%Y-%m-%d}{suffix}.json"
    md_path = report.write(
        ordered,
        json_path,
        size=size.name,
        started=f"{started_at:%Y-%m-%d %H:%M UTC}",
        wall_s=wall_s,
    )
    print("\n" + report.table(ordered), flush=True)
    print(f"\n{wall_s:.0f} s wall time; results in {json_path} and {md_path}", flush=True)
    failed = [r for r in ordered if not r.passed]
    for result in failed:
        print(f"\n{result.name} FAILED: {result.error or ''}", flush=True)
        for name, count in result.checks.items():
            if count:
                print(f"  check {name}: {count}", flush=True)
        for kind, items in result.evidence.items():
            for item in items:
                print(f"  {kind}: {item}", flush=True)
        for note in result.notes:
            print(f"  note: {note}", flush=True)
    if failed or keep:
        print(f"stacks, logs and data kept under {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def clean_environment() -> None:
    """The stacks are embedded and ours alone: no outside database, server, platform or
    simulator knobs from the caller's shell may leak into them."""
    for key in list(os.environ):
        if key.startswith("SIM_") or key in {
            "DATABASE_URL",
            "TEMPORAL_ADDRESS",
            "PLATFORM_URL",
            "PLATFORM_API_KEY",
        }:
            del os.environ[key]
