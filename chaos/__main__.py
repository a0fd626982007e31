"""`python -m chaos --size quick|full [--only NAME]`: run the chaos scenarios.

Without `--scenario` this is the parent: it runs each scenario in a child process,
prints the table and writes `bench/results/[<size>-]chaos-<date>.json` and `.md`.
With `--scenario` (used by the parent) it runs that one scenario and writes its result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from chaos.drive import execute
from chaos.runner import PROJECT_ROOT, clean_environment, run
from chaos.scenarios import SCENARIOS
from chaos.sizes import SIZES
from coupons.config import PLATFORMS


class Stopped(Exception):
    """SIGTERM from the parent: unwind, so the stack is stopped on the way out."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stopped(f"{signal.Signals(signum).name} received")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable)",
    )
    p.add_argument("--jobs", type=int, help="scenarios at once (default: by size)")
    p.add_argument(
        "--platform",
        choices=PLATFORMS,
        default=os.environ.get("PLATFORM") or "generic",
        help="the platform protocol the simulator speaks (default: PLATFORM, else generic)",
    )
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results")
    p.add_argument("--keep", action="store_true", help="keep the stacks' data and logs")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    clean_environment()
    # The scenarios' processes read it from the environment, as `make run` does.
    os.environ["PLATFORM"] = args.platform
    size = SIZES[args.size]

    if args.scenario is None:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        names = [name for name in SCENARIOS if not args.only or name in args.only]
        return run(names, size, args.out, jobs=max(1, args.jobs or size.jobs), keep=args.keep)

    assert args.result is not None and args.root is not None
    args.root.mkdir(parents=True, exist_ok=True)
    # The scenario's story goes to its log; only the progress lines go to the terminal.
    logging.basicConfig(
        level=logging.INFO,
        filename=args.root / "chaos.log",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop)
    try:
        result = execute(SCENARIOS[args.scenario], size, args.root / "data")
    except Stopped as err:
        print(f"[{args.scenario}] {err}: stopped", flush=True)
        return 1
    args.result.write_text(json.dumps(result.to_json(), indent=2))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
