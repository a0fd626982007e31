"""`python -m e2e`: what `make e2e` runs, the Web UI browser check.

Starts a fresh embedded stack with the HTTP API (temporary DATA_DIR, free ports: never the
user's `.data` or default ports; the dev server's Web UI decodes payloads through the API's
codec endpoint), makes coupons in several states, checks what the Web UI shows of them in
Debian's headless Chromium and saves screenshots to docs/screenshots/ when every check
passed. Exits 1 naming each thing missing, and stops everything it started, also on error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from app.embedded import free_port
from app.stack import PROJECT_ROOT, Stack
from coupons.config import Settings
from e2e.encryption import stored_input
from e2e.seed import seed

# Debian's Chromium: Playwright drives it, it never downloads a browser of its own.
CHROMIUM = Path("/usr/bin/chromium")
log = logging.getLogger("e2e")

SCREENSHOTS = PROJECT_ROOT / "docs" / "screenshots"
# Variables that would point the run at someone's real services or fault knobs.
FOREIGN_ENV = ("DATABASE_URL", "TEMPORAL_ADDRESS", "PLATFORM_URL", "PLATFORM_API_KEY")


def progress(message: str) -> None:
    """One line for the person watching the run."""
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def e2e_settings(data_dir: Path) -> Settings:
    ui_port = free_port()
    return Settings(
        data_dir=data_dir,
        pg_port=free_port(),
        temporal_port=free_port(),
        temporal_ui_port=ui_port,
        simulator_port=free_port(),
        api_port=free_port(),
        worker_metrics_port=free_port(),
        # The browser calls the codec server from the Web UI's page, on this port.
        codec_cors_origins=(f"http://127.0.0.1:{ui_port}", f"http://localhost:{ui_port}"),
    ).check()


def missing_tools() -> list[str]:
    missing: list[str] = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} not found: apt-get install chromium (Debian's package)")
    if importlib.util.find_spec("playwright") is None:
        missing.append(f"playwright not installed: {sys.executable} -m pip install playwright")
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--screenshots", type=Path, default=SCREENSHOTS, help="where passing screenshots go"
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the stack's data and logs")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    missing = missing_tools()
    if missing:
        for line in missing:
            print(f"e2e: {line}", file=sys.stderr)
        return 2
    for key in list(os.environ):
        if key in FOREIGN_ENV or key.startswith("SIM_"):
            del os.environ[key]
    # Only now: it imports playwright.
    from e2e.webui import ISSUED_QUERY, UiCheck, check_web_ui

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    began = time.monotonic()
    data_dir = Path(tempfile.mkdtemp(prefix="coupons-e2e-"))
    staged = data_dir / "screenshots"
    stack = Stack(e2e_settings(data_dir), api=True)
    problems: list[str] = []
    issued = 0
    try:
        progress(f"stack: starting in {data_dir}")
        stack.start()
        settings = stack.settings
        ui_url = f"http://127.0.0.1:{settings.temporal_ui_port}"
        progress(f"stack: up; Web UI {ui_url}, API {settings.api_url}")
        seeded = asyncio.run(seed(settings, progress))
        issued = len(seeded.issued)
        stored = asyncio.run(stored_input(settings, seeded.issued[0]))
        if stored.problem is None:
            progress(
                f"{stored.workflow_id}: input stored encrypted in Temporal's history "
                f"(encoding {', '.join(stored.encodings)})"
            )
        else:
            problems.append(stored.problem)
        check = UiCheck(CHROMIUM, ui_url, settings.temporal_namespace, seeded, staged)
        problems += check_web_ui(check, progress)
    except KeyboardInterrupt:
        progress("interrupted: stopping everything it started")
        return 130
    except Exception as err:
        log.exception("the check could not run to its end")
        problems.append(f"{type(err).__name__}: {err}")
    finally:
        progress("stack: stopping")
        stack.stop()

    if problems:
        print(f"\ne2e: FAILED, the Web UI check found {len(problems)} problem(s):", flush=True)
        for problem in problems:
            print(f"  - {problem}", flush=True)
        print(f"screenshots taken and the stack's logs are in {data_dir}", flush=True)
        return 1
    args.screenshots.mkdir(parents=True, exist_ok=True)
    for shot in sorted(staged.glob("*.png")):
        shutil.copy2(shot, args.screenshots / shot.name)
        progress(f"screenshot {args.screenshots / shot.name}")
    if args.keep_data:
        progress(f"data and logs kept in {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(
        f"e2e: passed in {time.monotonic() - began:.0f} s: {issued} coupons under "
        f"{ISSUED_QUERY} in the Web UI, one opened with its search attributes, summary, "
        "current details, activity summaries and its encrypted input decoded",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
