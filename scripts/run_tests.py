"""Runs the test suite and judges it by its results, not by pytest's exit code.

The Temporal Python SDK can abort with SIGABRT (exit 134) at interpreter exit after
every test has passed; the JUnit reports written before that are the verdict.

With no arguments, in two parts: every test not marked `alone` on one pytest-xdist
process per core (at most MAX_PROCESSES; most tests wait on servers, not the CPU), then
the `alone` ones, whose figures a test running beside them would skew, by themselves.
With arguments (`make test ARGS="-k lapse"`), one pytest run with just those.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPORTS = Path(".test-results")
# Each xdist process starts its own servers (PostgreSQL, two Temporal, the simulator).
MAX_PROCESSES = 4


@dataclass(frozen=True)
class Part:
    name: str
    args: list[str]


@dataclass(frozen=True)
class Counts:
    total: int
    failed: int
    skipped: int


def parts(argv: list[str]) -> list[Part]:
    if argv:
        return [Part("tests", argv)]
    processes = max(1, min(os.cpu_count() or 1, MAX_PROCESSES))
    return [
        Part("parallel", ["-n", str(processes), "--dist", "worksteal", "-m", "not alone"]),
        Part("alone", ["-m", "alone"]),
    ]


def run(part: Part) -> tuple[int, Counts | None]:
    report = REPORTS / f"junit-{part.name}.xml"
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", f"--junitxml={report}", *part.args]
    print(f"tests ({part.name}): {' '.join(command[1:])}", flush=True)
    rc = subprocess.call(command)
    if not report.exists():
        return rc, None
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return rc, Counts(int(suite.get("tests", 0)), failed, int(suite.get("skipped", 0)))


def main() -> int:
    REPORTS.mkdir(exist_ok=True)
    started = time.monotonic()
    ok = True
    total = failed = skipped = 0
    for part in parts(sys.argv[1:]):
        rc, counts = run(part)
        if counts is None:
            print(f"tests ({part.name}): no report written (pytest exited {rc})")
            ok = False
            continue
        if rc not in (0, 134):
            print(f"note: pytest exited {rc} ({part.name})")
            ok = False
        if counts.total == 0:
            print(f"tests ({part.name}): no test ran")
            ok = False
        total += counts.total
        failed += counts.failed
        skipped += counts.skipped
    passed = total - failed - skipped
    wall = time.monotonic() - started
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped (wall {wall:.0f} s)")
    if skipped:
        print("tests: a skipped test is a test that proves nothing; fix or remove it")
    return 0 if ok and failed == 0 and skipped == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
