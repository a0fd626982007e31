"""The lines between layers that are never crossed (README "Architecture"), read from the
code's own imports: a new import across one fails here, not in review."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> Iterator[str]:
    """Every module `path` imports, at any depth (imports inside functions count too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _crossings(folders: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for folder in folders:
        place = ROOT / folder
        for path in [place] if place.is_file() else sorted(place.rglob("*.py")):
            for module in _imports(path):
                if any(module == f or module.startswith(f"{f}.") for f in forbidden):
                    found.append(f"{path.relative_to(ROOT)} imports {module}")
    return sorted(set(found))


@pytest.mark.parametrize(
    ("folders", "forbidden"),
    [
        # The floor below the application never reaches up to it.
        (("coupons", "activities", "workflows"), ("app",)),
        # Workflows are deterministic: no I/O libraries, no platform adapter.
        (
            ("workflows",),
            (
                "psycopg",
                "psycopg_pool",
                "httpx",
                "coupons.platforms.generic",
                "coupons.platforms.wechat",
                "coupons.platforms.alipay",
                "coupons.platforms.simcore",
            ),
        ),
        (("activities",), ("workflows",)),
        # The entry points read and write through the service layer (app/service), each
        # operation once: neither reaches the ledger, the catalog, the tenants or the claims.
        (
            ("app/api", "app/cli"),
            (
                "coupons.ledger",
                "coupons.catalog",
                "coupons.tenants",
                "app.claims",
            ),
        ),
        # The state machine is pure: no Temporal, no database, no network.
        (("coupons/lifecycle.py",), ("temporalio", "psycopg", "psycopg_pool", "httpx")),
    ],
)
def test_no_import_crosses_a_line(folders: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    assert _crossings(folders, forbidden) == []


def test_the_check_sees_a_crossing() -> None:
    """The application does import the workflows: the walk finds imports at all."""
    assert _crossings(("app",), ("workflows",))


def _aliased(path: Path) -> Iterator[str]:
    """`from coupons[.ledger] import batches|campaigns|catalog as <another name>` in `path`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module in ("coupons", "coupons.ledger"):
            for alias in node.names:
                if alias.name in ("batches", "campaigns", "catalog") and alias.asname:
                    yield f"{path.relative_to(ROOT)}: {alias.name} as {alias.asname}"


def test_the_catalog_and_its_ledger_go_by_one_name_each() -> None:
    """`batches`, `campaigns` and `catalog` are imported under their own names, so a call
    shows its layer: `catalog.batches.get_batch` the domain, `batches.get_batch` the ledger."""
    folders = ("app", "coupons", "activities", "workflows", "bench", "chaos", "e2e", "tests")
    found = [
        line
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line in _aliased(path)
    ]
    assert found == []


# What a workflow module may bind at its top level besides functions, classes and imports:
# values no run can change. The worker's sandbox passes every module through
# (app/workers.py `workflow_runner`), so runs share these modules instead of each importing
# its own copy: a list or dict there would carry one coupon's state into another's run.
_CONSTANT_CALLS = {"timedelta", "RetryPolicy", "frozenset"}


def _shared_state(source: str, name: str) -> list[str]:
    found = []
    tree = ast.parse(source, name)
    for node in tree.body:
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if value is None:
            continue
        constant = isinstance(value, ast.Constant | ast.Tuple) or (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id in _CONSTANT_CALLS
        )
        if not constant:
            found.append(f"{name}:{node.lineno} binds {ast.unparse(value)[:60]}")
    for inner in ast.walk(tree):
        if isinstance(inner, ast.Global | ast.Nonlocal):
            found.append(f"{name}:{inner.lineno} rebinds {', '.join(inner.names)}")
    return found


def test_workflow_modules_hold_only_values_no_run_can_change() -> None:
    found = [
        problem
        for path in sorted((ROOT / "workflows").rglob("*.py"))
        for problem in _shared_state(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []


def test_the_shared_state_check_sees_a_list_and_a_global() -> None:
    source = "SEEN = []\nLIMIT = 3\n\ndef f():\n    global LIMIT\n    LIMIT = 4\n"
    assert _shared_state(source, "w.py") == ["w.py:1 binds []", "w.py:5 rebinds LIMIT"]
