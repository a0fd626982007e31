"""The coupon command line: `python starter.py --help`."""

import contextlib
import os
import sys

from app.cli import main

if __name__ == "__main__":
    code = main()
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
        sys.stderr.flush()
    # The Temporal SDK's native runtime can abort (SIGABRT, exit 134) while the interpreter
    # finalizes, after the work is done; scripts must get the real answer's exit code.
    os._exit(code)
