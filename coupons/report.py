"""A campaign's funnel report: the stages its coupons reached, the exits, conversion
rates, the time users take from claim to task, claims per day, and a PNG chart of it.

Each stage counts the coupons that ever reached it (the ledger's event trail), not the
ones that are there now: a redeemed coupon was also usable and issued.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

from psycopg_pool import AsyncConnectionPool

from coupons import catalog
from coupons.ledger import funnel as ledger
from coupons.ledger.funnel import Bin, TaskTimes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# The stages in order; "claimed" is every claim, the others are lifecycle states.
STAGES = ("claimed", "usable", "issued", "redeemed")
# The ways out before redemption: task deadline, cancel, platform refusal, validity end.
EXITS = ("expired", "cancelled", "failed", "lapsed")
# The claim-to-task histogram's bin edges: fixed human ones (not fitted to the data), so
# reports of different campaigns and days read the same way.
TASK_TIME_EDGES_S = (10, 60, 10 * 60, 3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400)


@dataclass
class Stage:
    name: str
    coupons: int
    # Share of the stage before (None for the first, or when the one before is empty).
    from_previous: float | None
    from_claimed: float | None


@dataclass
class Exit:
    name: str
    coupons: int
    of_claimed: float | None


@dataclass
class DayClaims:
    day: date
    claims: int


@dataclass
class FunnelReport:
    campaign_id: str
    tenant_id: str
    at: datetime
    claimed: int
    stages: list[Stage]
    exits: list[Exit]
    # Coupons in each state now: the ones in flight are received, usable or issued.
    states: dict[str, int]
    task_times: TaskTimes
    # Every UTC day from the first claim to the last, days without claims included.
    claims_per_day: list[DayClaims]

    @property
    def overall(self) -> float | None:
        """Claimed to redeemed."""
        return self.stages[-1].from_claimed

    def conversion(self) -> dict[str, float | None]:
        """Each stage's rate from the one before, and claimed to redeemed."""
        rates = {
            f"{before.name}_to_{stage.name}": stage.from_previous
            for before, stage in pairwise(self.stages)
        }
        rates[f"{STAGES[0]}_to_{STAGES[-1]}"] = self.overall
        return rates


async def funnel_report(
    pool: AsyncConnectionPool, campaign_id: str, tenant_id: str | None = None
) -> FunnelReport:
    """The funnel of `campaign_id` (of `tenant_id`, when given); an unknown campaign, or
    another tenant's, is refused as `unknown_campaign`."""
    campaign = await catalog.campaigns.get_campaign(pool, campaign_id, tenant_id)
    counts = await ledger.funnel(pool, campaign.id, TASK_TIME_BINS)
    exits = {name: counts.reached.get(name, 0) for name in EXITS}
    return FunnelReport(
        campaign_id=campaign.id,
        tenant_id=campaign.tenant_id,
        at=counts.at.astimezone(UTC),
        claimed=counts.claimed,
        stages=_stages(counts),
        exits=[Exit(name, n, _rate(n, counts.claimed)) for name, n in exits.items()],
        states=counts.states,
        task_times=counts.task_times,
        claims_per_day=_every_day(counts.claims_per_day),
    )


def _rate(n: int, whole: int) -> float | None:
    return n / whole if whole else None


def _stages(counts: ledger.FunnelCounts) -> list[Stage]:
    stages: list[Stage] = []
    for name in STAGES:
        n = counts.claimed if name == "claimed" else counts.reached.get(name, 0)
        previous = _rate(n, stages[-1].coupons) if stages else None
        stages.append(Stage(name, n, previous, _rate(n, counts.claimed)))
    return stages


def _bin_label(low: float, high: float | None) -> str:
    if high is None:
        return f"{format_seconds(low)}+"
    if low == 0:
        return f"<{format_seconds(high)}"
    return f"{format_seconds(low)}-{format_seconds(high)}"


def _every_day(days: list[tuple[date, int]]) -> list[DayClaims]:
    if not days:
        return []
    claims = dict(days)
    first, last = days[0][0], days[-1][0]
    return [
        DayClaims(day, claims.get(day, 0))
        for day in (first + timedelta(days=i) for i in range((last - first).days + 1))
    ]


def format_seconds(seconds: float | None) -> str:
    """A duration for people: 0.4s, 12s, 3m20s, 1h5m, 2d3h (two units at most)."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s".replace(".0s", "s")
    whole = round(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    # The two largest units; a zero second one is left out (1h, not 1h0m).
    return "".join(p for p in parts[:2] if not p.startswith("0")) or "0s"


# The histogram's bins, from the edges: below the first, between each two, from the last.
TASK_TIME_BINS = tuple(
    Bin(_bin_label(low, high), low, high)
    for low, high in zip((0, *TASK_TIME_EDGES_S), (*TASK_TIME_EDGES_S, None), strict=True)
)


def default_chart_path(data_dir: Path, report: FunnelReport) -> Path:
    """`<data dir>/reports/<campaign>-<UTC date>.png`: a later report that day replaces it."""
    return data_dir / "reports" / f"{report.campaign_id}-{report.at.date().isoformat()}.png"


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


# ------------------------------------------------------------------ the chart

_STAGE_COLOURS = ("#9ecae1", "#6baed6", "#3182bd", "#08519c")
_EXIT_COLOURS = ("#fdae6b", "#bdbdbd", "#e6550d", "#9e9ac8")


def draw(report: FunnelReport, path: Path) -> Path:
    """Write the report's chart to `path` (a PNG; its folder is made) and return it."""
    # Imported here: matplotlib takes a while to load and only this command needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A figure of our own on the Agg canvas: no pyplot, no global state, no display.
    fig = Figure(figsize=(14, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    at = report.at.strftime("%Y-%m-%d %H:%M UTC")
    fig.suptitle(
        f"Campaign {report.campaign_id} (tenant {report.tenant_id}): funnel at {at}",
        fontsize=15,
        fontweight="bold",
    )
    if not report.claimed:
        fig.text(0.5, 0.5, "no claims yet", ha="center", va="center", fontsize=22, color="#555")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path

    funnel_ax, exits_ax, times_ax, days_ax = fig.subplots(2, 2).flat

    names = [s.name for s in report.stages]
    bars = funnel_ax.barh(names, [s.coupons for s in report.stages], color=_STAGE_COLOURS)
    funnel_ax.invert_yaxis()
    funnel_ax.bar_label(
        bars,
        labels=[
            f"{s.coupons}"
            if s.from_previous is None
            else f"{s.coupons}  ({percent(s.from_previous)})"
            for s in report.stages
        ],
        padding=4,
        fontsize=11,
    )
    funnel_ax.set_title(
        "Funnel: coupons that reached each stage (share of the stage before)\n"
        f"claimed → redeemed: {percent(report.overall)}",
        fontsize=11,
    )
    _room_for_labels(funnel_ax, report.claimed)

    exits = report.exits
    bars = exits_ax.barh([e.name for e in exits], [e.coupons for e in exits], color=_EXIT_COLOURS)
    exits_ax.invert_yaxis()
    exits_ax.bar_label(
        bars,
        labels=[f"{e.coupons}  ({percent(e.of_claimed)})" for e in exits],
        padding=4,
        fontsize=11,
    )
    in_flight = ", ".join(
        f"{report.states.get(state, 0)} {state}" for state in ("received", "usable", "issued")
    )
    exits_ax.set_title(
        f"Exits before redemption (share of claimed)\nnow in flight: {in_flight}", fontsize=11
    )
    _room_for_labels(exits_ax, max((e.coupons for e in exits), default=0))

    times = report.task_times
    labels = [b.label for b in times.bins]
    bars = times_ax.bar(labels, [b.coupons for b in times.bins], color="#3182bd")
    times_ax.bar_label(bars, labels=[str(b.coupons) if b.coupons else "" for b in times.bins])
    times_ax.set_title(
        f"Claim to task (claimed → usable), {times.coupons} coupons\n"
        f"p50 {format_seconds(times.p50_s)}   p90 {format_seconds(times.p90_s)}   "
        f"p99 {format_seconds(times.p99_s)}   max {format_seconds(times.max_s)}",
        fontsize=11,
    )
    times_ax.set_ylabel("coupons")
    times_ax.tick_params(axis="x", labelsize=9)
    times_ax.margins(y=0.15)

    days = report.claims_per_day
    # One bar per day by position, not on a time axis: a single day would get hour ticks.
    bars = days_ax.bar(range(len(days)), [d.claims for d in days], color="#6baed6", width=0.8)
    if len(days) <= 31:  # beyond a month the numbers would overlap
        days_ax.bar_label(bars, labels=[str(d.claims) if d.claims else "" for d in days])
    days_ax.set_xlim(-0.6, max(len(days), 7) - 0.4)  # a bar or two stay bar-wide
    step = -(-len(days) // 10)  # at most ten day labels
    days_ax.set_xticks(
        range(0, len(days), step), [d.day.strftime("%b %d") for d in days[::step]], fontsize=9
    )
    span = f"{days[0].day} to {days[-1].day}" if len(days) > 1 else str(days[0].day)
    days_ax.set_title(f"Claims per day (UTC), {span}", fontsize=11)
    days_ax.set_ylabel("claims")
    days_ax.margins(y=0.15)

    for ax in (funnel_ax, exits_ax, times_ax, days_ax):
        ax.spines[["top", "right"]].set_visible(False)
    for axis in (funnel_ax.xaxis, exits_ax.xaxis, times_ax.yaxis, days_ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _room_for_labels(ax: Axes, largest: int) -> None:
    """Leave room right of the longest bar for its label."""
    ax.set_xlim(0, max(largest, 1) * 1.45)
