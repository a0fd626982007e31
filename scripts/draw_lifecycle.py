"""Redraws docs/lifecycle.png from the state machine: `.venv/bin/python scripts/draw_lifecycle.py`.

Needs Graphviz's `dot` (Debian: `apt-get install graphviz`); the picture is committed, so
only a change to coupons/lifecycle.py calls for running this again.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from statemachine.contrib.diagram import DotGraphMachine

from coupons.lifecycle import CouponLifecycle

OUT = Path(__file__).resolve().parent.parent / "docs" / "lifecycle.png"


def main() -> int:
    if shutil.which("dot") is None:
        print("error: Graphviz's `dot` is missing (apt-get install graphviz)", file=sys.stderr)
        return 2
    DotGraphMachine(CouponLifecycle)().write_png(str(OUT))  # type: ignore[no-untyped-call]
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
