"""Scenario results: the record each scenario hands back, the table, JSON and markdown."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The counts a passing scenario holds at zero (a reconciliation that never ran, None,
# is not zero either).
MUST_BE_ZERO = (
    "lost",
    "duplicate_sends",
    "wrong_state",
    "disagreeing",
    "stuck",
    "reconcile_mismatches",
)


@dataclass
class ScenarioResult:
    name: str
    description: str
    size: str
    # Claims whose claim call was acknowledged: the coupons the checks are about.
    coupons: int = 0
    # Acknowledged, but no ledger row, no workflow, no receipt or no coupon at the
    # platform, or never issued (the stuck ones are counted here too).
    lost: int = 0
    # Our coupons with more than one coupon at the platform.
    duplicate_sends: int = 0
    # Ended in a final state other than `issued` (failed, cancelled, expired, ...).
    wrong_state: int = 0
    # Ledger claim state, last ledger event and workflow state not all the same.
    disagreeing: int = 0
    # Still short of the scenario's final state (`issued`; `redeemed` for the callbacks
    # scenario) when the convergence bound ran out.
    stuck: int = 0
    # Seconds from the end of the faults to every coupon issued; None: never.
    converge_s: float | None = None
    # Mismatches the reconciliation (ReconcileWorkflow over the campaign's batch, check
    # only) found between the platform's flow files and the ledger at the end; None: it
    # could not run.
    reconcile_mismatches: int | None = None
    # Claims the driver gave up on (never acknowledged) and completions it never got in.
    claims_unacknowledged: int = 0
    completions_failed: int = 0
    completions_sent: int = 0
    faults: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # A few coupon ids per non-zero count, with what was seen: the evidence.
    evidence: dict[str, list[str]] = field(default_factory=dict)
    platform_stats: dict[str, int] = field(default_factory=dict)
    # The scenario's own figures (the budget scenario's backlog, wake-ups, ...).
    figures: dict[str, float | int] = field(default_factory=dict)
    # The scenario's own counts that must be 0 too (the callbacks scenario's coupons not
    # redeemed through the callback, forged probes accepted, ...).
    checks: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and self.coupons > 0
            and self.converge_s is not None
            and all(getattr(self, name) == 0 for name in MUST_BE_ZERO)
            and all(count == 0 for count in self.checks.values())
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScenarioResult:
        known = {key: value for key, value in data.items() if key != "passed"}
        return cls(**known)


COLUMNS = (
    ("scenario", 22),
    ("coupons", 7),
    ("lost", 4),
    ("dup sends", 9),
    ("wrong", 5),
    ("disagree", 8),
    ("stuck", 5),
    ("converge s", 10),
    ("reconcile", 9),
    ("wall s", 6),
    ("verdict", 7),
)


def _row(result: ScenarioResult) -> list[str]:
    converge = f"{result.converge_s:.1f}" if result.converge_s is not None else "never"
    return [
        result.name,
        str(result.coupons),
        str(result.lost),
        str(result.duplicate_sends),
        str(result.wrong_state),
        str(result.disagreeing),
        str(result.stuck),
        converge,
        "n/a" if result.reconcile_mismatches is None else str(result.reconcile_mismatches),
        f"{result.wall_s:.0f}",
        "ok" if result.passed else "FAIL",
    ]


def table(results: list[ScenarioResult]) -> str:
    header = "  ".join(name.ljust(width) for name, width in COLUMNS)
    lines = [header, "-" * len(header)]
    for result in results:
        cells = _row(result)
        lines.append(
            "  ".join(cell.ljust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True))
        )
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPUs, Python " + (
        platform.python_version()
    )


def markdown(results: list[ScenarioResult], *, size: str, started: str, wall_s: float) -> str:
    out = [
        f"# Chaos run, size {size}",
        "",
        f"Started {started}, {wall_s:.0f} s wall time, on {machine()}.",
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    out += ["| " + " | ".join(_row(result)) + " |" for result in results]
    out += [
        "",
        "Every count but the times is expected at 0. `reconcile`: the mismatches the "
        "reconciliation (ReconcileWorkflow over the scenario's batch, check only) found "
        "between the platform's flow files and the ledger once the scenario was over.",
        "",
    ]
    for result in results:
        out += [f"## {result.name}", "", result.description, ""]
        if result.error:
            out += [f"**Error:** {result.error}", ""]
        out.append(
            f"Claims unacknowledged: {result.claims_unacknowledged}; completion reports "
            f"sent: {result.completions_sent}, never acknowledged: {result.completions_failed}."
        )
        out.append("")
        if result.checks:
            checks = ", ".join(f"{key} {value}" for key, value in result.checks.items())
            out += [f"Checks of its own (each expected at 0): {checks}.", ""]
        if result.figures:
            figures = ", ".join(f"{key} {value}" for key, value in result.figures.items())
            out += [f"Figures: {figures}.", ""]
        if result.faults:
            out += ["Faults:", ""] + [f"- {fault}" for fault in result.faults] + [""]
        if result.notes:
            out += ["Notes:", ""] + [f"- {note}" for note in result.notes] + [""]
        for kind, items in result.evidence.items():
            out += [f"Evidence, {kind}:", ""] + [f"- `{item}`" for item in items] + [""]
        if result.platform_stats:
            stats = ", ".join(f"{key} {value}" for key, value in result.platform_stats.items())
            out += [f"Platform counters: {stats}.", ""]
    return "\n".join(out)


def write(
    results: list[ScenarioResult], json_path: Path, *, size: str, started: str, wall_s: float
) -> Path:
    """Write the JSON list of scenarios and the markdown beside it; returns the markdown."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(results, size=size, started=started, wall_s=wall_s))
    return md_path
