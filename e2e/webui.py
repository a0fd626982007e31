"""What an operator sees in the Temporal Web UI, checked in Debian's headless Chromium.

Driven by Playwright against the UI the dev server ships (2.54 with temporal CLI 1.9.1),
through its own URLs (`/namespaces/<ns>/workflows?query=...`) and what a person reads:
link and tab names, button labels, the headings of the metadata panels. The markdown of
summaries and current details renders in iframes (`#user-metadata-summary`,
`#user-metadata-current-details`, the UI's own ids), so those are read inside them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, ViewportSize, expect, sync_playwright

from e2e.seed import Coupon, Seeded

# Headless as root, nothing fetched from the network, no proxy between it and our servers.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
VIEWPORT: ViewportSize = {"width": 1600, "height": 1000}
# The UI polls Temporal every few seconds; a page that shows nothing after this never will.
TIMEOUT_MS = 20_000
# Once something on a page is missing, the rest of that page has had its chance.
AFTER_MISS_MS = 2_000
ISSUED_QUERY = "CouponState='issued'"
SEARCH_ATTRIBUTE_COLUMNS = ("CouponState", "CampaignId", "UserId", "PlatformCouponId")
# Default columns that say nothing about a coupon: dropped so the search attributes fit.
DROPPED_COLUMNS = ("Run ID", "Type", "End")
# What the workflow names its activity and timers (workflows/user_coupon.py).
ACTIVITY_SUMMARIES = ("send to the platform and record the receipt",)
# Every issued coupon starts this timer; the task deadline's is skipped when the task is
# reported before the workflow's first task runs, as happens here.
TIMER_SUMMARIES = ("first redemption poll",)

SCREENSHOTS = {
    "list": "webui-issued-list.png",
    "timeline": "webui-coupon-timeline.png",
    "metadata": "webui-coupon-metadata.png",
    "search_attributes": "webui-coupon-search-attributes.png",
}


@dataclass
class UiCheck:
    chromium: Path
    ui_url: str
    namespace: str
    seeded: Seeded
    screenshots: Path
    missing: list[str] = field(default_factory=list)
    wait_ms: int = TIMEOUT_MS

    def miss(self, problem: str) -> None:
        self.missing.append(problem)
        self.wait_ms = AFTER_MISS_MS

    @property
    def opened(self) -> Coupon:
        """The coupon whose page is opened."""
        return self.seeded.issued[0]


def list_url(ui_url: str, namespace: str, query: str) -> str:
    return f"{ui_url}/namespaces/{quote(namespace, safe='')}/workflows?query={quote(query)}"


@dataclass(frozen=True)
class Text:
    """Text a page must show, matched by `pattern`, named in messages as `reads`."""

    pattern: re.Pattern[str]
    reads: str


def json_field(name: str, value: str) -> Text:
    """`"name": "value"` as the UI's JSON views print it, whatever the spacing."""
    return Text(re.compile(rf'"{re.escape(name)}":\s*"{re.escape(value)}"'), f'"{name}": "{value}"')


def check_web_ui(check: UiCheck, progress: Callable[[str], None]) -> list[str]:
    """Run every check; return what was missing (empty: all shown). Screenshots are
    written to `check.screenshots` whatever the outcome, to show what the page held."""
    check.screenshots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(check.chromium), args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(TIMEOUT_MS)
            progress(f"Chromium {browser.version}: opening {check.ui_url}")
            steps: list[tuple[str, Callable[[Page, UiCheck], None]]] = [
                (f"workflow list filtered by {ISSUED_QUERY}", _issued_list),
                (f"coupon {check.opened.workflow_id}: timeline", _timeline),
                (f"coupon {check.opened.workflow_id}: user metadata", _metadata),
                (f"coupon {check.opened.workflow_id}: search attributes", _search_attributes),
                (f"coupon {check.opened.workflow_id}: event history", _history),
            ]
            for name, step in steps:
                before = len(check.missing)
                check.wait_ms = TIMEOUT_MS
                try:
                    step(page, check)
                except PlaywrightError as err:
                    # A page that never came: the steps after it cannot run.
                    check.miss(f"{name}: {_first_line(err)}")
                    with contextlib.suppress(PlaywrightError):
                        page.screenshot(path=check.screenshots / "failed-step.png", full_page=True)
                    progress(f"{name}: FAILED")
                    break
                progress(f"{name}: {'ok' if len(check.missing) == before else 'FAILED'}")
        finally:
            browser.close()
    return check.missing


def _issued_list(page: Page, check: UiCheck) -> None:
    where = f"list {ISSUED_QUERY}"
    page.goto(list_url(check.ui_url, check.namespace, ISSUED_QUERY))
    for coupon in check.seeded.issued:
        _shown(check, where, _workflow_link(page, coupon), f"issued coupon {coupon.workflow_id}")
    for coupon in check.seeded.others:
        # Asked only once the issued ones are listed, so the list has loaded.
        try:
            expect(_workflow_link(page, coupon)).to_have_count(0, timeout=1000)
        except AssertionError:
            check.miss(
                f"{where}: {coupon.state} coupon {coupon.workflow_id} listed under the filter"
            )

    # Columns as an operator sets them: the drawer's own buttons (the UI keeps the choice).
    page.get_by_role("button", name="Configure Columns").click()
    for column in SEARCH_ATTRIBUTE_COLUMNS:
        page.get_by_role("button", name=f"Add {column} column").click()
    for column in DROPPED_COLUMNS:
        page.get_by_role("button", name=f"Remove {column} column").click()
    page.get_by_role("button", name="Close Workflows Table configuration").click()
    for column in SEARCH_ATTRIBUTE_COLUMNS:
        _shown(check, where, page.get_by_role("columnheader", name=column), f"column {column}")
    for coupon in check.seeded.issued:
        row = page.get_by_role("row").filter(has=_workflow_link(page, coupon))
        for value in (
            "issued",
            check.seeded.campaign_id,
            coupon.user_id,
            coupon.platform_coupon_id or "?",
        ):
            _contains(check, where, row, value, f"row of {coupon.workflow_id}")
    _screenshot(page, check, "list")


def _timeline(page: Page, check: UiCheck) -> None:
    coupon = check.opened
    where = f"coupon {coupon.workflow_id}"
    _workflow_link(page, coupon).click()
    page.wait_for_url(re.compile(r"/timeline"))
    _contains(check, where, page.get_by_test_id("workflow-id-heading"), coupon.workflow_id)
    # Encrypted in history (see e2e.encryption): readable here only through the codec server.
    io = page.get_by_test_id("input-and-result")
    _contains(check, where, io, json_field("user_id", coupon.user_id), "input, decoded")
    _contains(check, where, io, json_field("coupon_id", coupon.coupon_id), "input, decoded")
    codec_error = page.get_by_text("Codec Server could not connect")
    if codec_error.count():
        check.miss(f"{where}: the UI says 'Codec Server could not connect'")
    timeline = page.locator("main")
    for summary in (*ACTIVITY_SUMMARIES, *TIMER_SUMMARIES):
        _contains(check, where, timeline, summary, "timeline summary")
    _screenshot(page, check, "timeline")


def _metadata(page: Page, check: UiCheck) -> None:
    coupon = check.opened
    where = f"coupon {coupon.workflow_id}, User Metadata"
    page.get_by_role("tab", name="User Metadata").click()
    page.wait_for_url(re.compile(r"/user-metadata"))
    summary = page.frame_locator("#user-metadata-summary").locator("body")
    _contains(
        check,
        where,
        summary,
        f"coupon {coupon.coupon_id}: campaign {check.seeded.campaign_id}, user {coupon.user_id}",
        "summary",
    )
    details = page.frame_locator("#user-metadata-current-details").locator("body")
    for value in (
        f"issued · campaign {check.seeded.campaign_id} · user {coupon.user_id}",
        # The markdown renderer turns 1/1 into a fraction.
        Text(re.compile(r"tasks 1\W1 done \(pending: none\)"), "tasks 1/1 done (pending: none)"),
        "waiting for: redemption",
        f"platform coupon {coupon.platform_coupon_id}",
    ):
        _contains(check, where, details, value, "current details")
    _screenshot(page, check, "metadata")


def _search_attributes(page: Page, check: UiCheck) -> None:
    coupon = check.opened
    where = f"coupon {coupon.workflow_id}, Search Attributes"
    page.get_by_role("tab", name="Search Attributes").click()
    page.wait_for_url(re.compile(r"/search-attributes"))
    main = page.locator("main")
    for name, value in (
        ("CouponState", "issued"),
        ("CampaignId", check.seeded.campaign_id),
        ("UserId", coupon.user_id),
        ("PlatformCouponId", coupon.platform_coupon_id or "?"),
    ):
        _contains(check, where, main, json_field(name, value))
    _screenshot(page, check, "search_attributes")


def _history(page: Page, check: UiCheck) -> None:
    coupon = check.opened
    where = f"coupon {coupon.workflow_id}, Event History"
    page.get_by_role("tab", name="Event History").click()
    page.wait_for_url(re.compile(r"/history"))
    main = page.locator("main")
    for summary in ACTIVITY_SUMMARIES:
        _contains(check, where, main, summary, "activity summary")
    _contains(check, where, main, f"campaign {check.seeded.campaign_id}, user {coupon.user_id}")


def _workflow_link(page: Page, coupon: Coupon) -> Locator:
    return page.get_by_role("link", name=coupon.workflow_id, exact=True)


def _shown(check: UiCheck, where: str, locator: Locator, what: str) -> None:
    try:
        expect(locator.first).to_be_visible(timeout=check.wait_ms)
    except AssertionError:
        check.miss(f"{where}: {what} not shown")


def _contains(
    check: UiCheck, where: str, locator: Locator, text: str | Text, what: str = "page"
) -> None:
    try:
        expected = text if isinstance(text, str) else text.pattern
        expect(locator.first).to_contain_text(expected, timeout=check.wait_ms)
    except AssertionError:
        reads = text if isinstance(text, str) else text.reads
        check.miss(f"{where}: {what} does not show {reads!r}")


def _screenshot(page: Page, check: UiCheck, name: str) -> None:
    page.screenshot(path=check.screenshots / SCREENSHOTS[name], full_page=True)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]
