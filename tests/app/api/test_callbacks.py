"""The platform's redemption callback: a signed notice moves an issued coupon to `redeemed`
through its workflow, fast; a forged one changes nothing; a duplicate is applied once."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from coupons.ledger import notifications
from coupons.platforms.generic.simulator import (
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from tests.app.api.conftest import (
    CALLBACK_PATH,
    CALLBACK_SECRET,
    Api,
    Tenant,
    claim,
    history_length,
    ledger_counts,
    make_campaign,
    until,
)
from tests.conftest import TASK, handle_of, sim_stats, wait_for_state

pytestmark = pytest.mark.usefixtures("workers")


async def _issued(api: Api, tenant: Tenant, user: str) -> dict[str, Any]:
    """A coupon claimed, its task done, sent: with its receipt's platform coupon id."""
    campaign = await make_campaign(api, tenant)
    coupon = await claim(api, tenant, campaign["id"], user)
    done = await api.http.post(
        f"/v1/coupons/{coupon['coupon_id']}/tasks/{TASK}/complete",
        json={"user_id": user},
        headers=tenant.app,
    )
    assert done.status_code == 200, done.text
    status = await wait_for_state(handle_of(api.client, coupon["workflow_id"]), "issued")
    assert status.receipt is not None
    return {**coupon, "platform_coupon_id": status.receipt.platform_coupon_id}


async def _ledger_state(api: Api, coupon_id: str) -> str:
    async with api.pool.connection() as conn:
        cur = await conn.execute("SELECT state FROM claims WHERE coupon_id = %s", (coupon_id,))
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def _is(api: Api, coupon_id: str, state: str) -> bool:
    return await _ledger_state(api, coupon_id) == state


async def _stats_with(simulator: httpx.AsyncClient, counter: str) -> dict[str, int]:
    """The simulator's counters once `counter` is above 0, else an empty dict."""
    stats = await sim_stats(simulator)
    return stats if stats[counter] >= 1 else {}


def _notice(platform_coupon_id: str, user: str, notification_id: str | None = None) -> bytes:
    return json.dumps(
        {
            "id": notification_id or f"ntf_{uuid.uuid4().hex}",
            "event_type": "COUPON.USED",
            "create_time": datetime.now(UTC).isoformat(),
            "coupon": {
                "coupon_id": platform_coupon_id,
                "batch_id": "any",
                "user_id": user,
                "used_at": datetime.now(UTC).isoformat(),
            },
        }
    ).encode()


def _signed(body: bytes, secret: str = CALLBACK_SECRET) -> dict[str, str]:
    timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: sign(secret, timestamp, nonce, body),
    }


async def test_marked_used_at_the_platform_is_redeemed_through_the_callback(
    api: Api, tenant_a: Tenant, served: str, simulator: httpx.AsyncClient
) -> None:
    coupon = await _issued(api, tenant_a, "rita")
    began = time.monotonic()
    used = await simulator.post(f"/sim/coupons/{coupon['platform_coupon_id']}/use")
    assert used.status_code == 200, used.text
    # The bound; polling alone would take 5 minutes.
    await until(lambda: _is(api, coupon["coupon_id"], "redeemed"), 2)
    took = time.monotonic() - began
    status = await wait_for_state(handle_of(api.client, coupon["workflow_id"]), "redeemed")
    assert status.transitions[-1].cause == "redeemed (callback)"
    assert await notifications.count_applied(api.pool, coupon["platform_coupon_id"]) == 1
    # Counted on the API's answer, which the simulator reads a moment after redeeming.
    await until(lambda: _delivered(simulator), 10)
    shown = await api.http.get(f"/v1/coupons/{coupon['coupon_id']}", headers=tenant_a.app)
    assert shown.json()["events"][-1]["to_state"] == "redeemed"
    print(f"redeemed {took:.2f} s after the platform marked it used")


async def test_duplicated_and_forged_deliveries_from_the_platform(
    api: Api, tenant_a: Tenant, served: str, simulator: httpx.AsyncClient
) -> None:
    knobs = {"callback_duplicate_rate": 1.0, "callback_forged_rate": 1.0}
    (await simulator.put("/sim/knobs", json=knobs)).raise_for_status()
    coupon = await _issued(api, tenant_a, "sam")
    await simulator.post(f"/sim/coupons/{coupon['platform_coupon_id']}/use")
    await wait_for_state(handle_of(api.client, coupon["workflow_id"]), "redeemed")
    stats = await until(lambda: _stats_with(simulator, "callbacks_duplicated"), 5)
    assert stats["callbacks_forged_sent"] >= 1 and stats["callbacks_forged_accepted"] == 0
    assert await notifications.count_applied(api.pool, coupon["platform_coupon_id"]) == 1
    assert await _ledger_state(api, coupon["coupon_id"]) == "redeemed"


async def test_a_forged_callback_changes_nothing(api: Api, tenant_a: Tenant) -> None:
    coupon = await _issued(api, tenant_a, "tom")
    body = _notice(coupon["platform_coupon_id"], "tom")
    genuine = _signed(body)
    forged = [
        ("no headers", body, {"Content-Type": "application/json"}),
        ("wrong key", body, _signed(body, secret="not-the-platform-secret-at-all")),
        ("tampered body", body.replace(b"tom", b"eve"), genuine),
        ("stale", body, {**genuine, TIMESTAMP_HEADER: str(int(time.time()) - 3600)}),
        ("garbled signature", body, {**genuine, SIGNATURE_HEADER: "zz"}),
    ]
    before = (
        await ledger_counts(api.pool),
        await history_length(api.client, coupon["workflow_id"]),
    )
    for why, content, headers in forged:
        answer = await api.http.post(CALLBACK_PATH, content=content, headers=headers)
        assert answer.status_code == 401, (why, answer.text)
        assert answer.json()["code"] == "unauthorized"
        assert CALLBACK_SECRET not in answer.text
    after = (
        await ledger_counts(api.pool),
        await history_length(api.client, coupon["workflow_id"]),
    )
    assert after == before
    assert await _ledger_state(api, coupon["coupon_id"]) == "issued"


async def test_another_platforms_path_takes_nothing(api: Api, tenant_a: Tenant) -> None:
    """A genuine generic notification sent to the WeChat or Alipay path is not even read:
    this service speaks one platform's protocol."""
    coupon = await _issued(api, tenant_a, "una")
    body = _notice(coupon["platform_coupon_id"], "una")
    for other in ("wechat", "alipay"):
        path = CALLBACK_PATH.replace("/generic/", f"/{other}/")
        answer = await api.http.post(path, content=body, headers=_signed(body))
        assert answer.status_code == 404, answer.text
        assert "takes generic notifications, at /callbacks/generic/coupon-used" in answer.text
    unknown = await api.http.post(CALLBACK_PATH.replace("/generic/", "/paypal/"), content=body)
    assert unknown.status_code in (404, 422), unknown.text
    assert await _ledger_state(api, coupon["coupon_id"]) == "issued"


async def test_a_genuine_notification_of_another_event_is_acknowledged_and_ignored(
    api: Api, tenant_a: Tenant
) -> None:
    """Signed, about something else (the platform sends every event to one address): 200,
    nothing applied, and no verification failure counted."""
    coupon = await _issued(api, tenant_a, "vic")
    body = _notice(coupon["platform_coupon_id"], "vic").replace(b"COUPON.USED", b"COUPON.EXPIRED")
    before = await history_length(api.client, coupon["workflow_id"])

    answer = await api.http.post(CALLBACK_PATH, content=body, headers=_signed(body))

    assert (answer.status_code, answer.json()) == (200, {"status": "ignored"})
    assert await _ledger_state(api, coupon["coupon_id"]) == "issued"
    assert await history_length(api.client, coupon["workflow_id"]) == before


async def test_a_duplicate_is_acknowledged_and_applied_once(api: Api, tenant_a: Tenant) -> None:
    coupon = await _issued(api, tenant_a, "uma")
    body = _notice(coupon["platform_coupon_id"], "uma")
    first = await api.http.post(CALLBACK_PATH, content=body, headers=_signed(body))
    assert (first.status_code, first.json()) == (200, {"status": "applied"})
    final = await handle_of(api.client, coupon["workflow_id"]).result()
    assert final.state == "redeemed"
    length = await history_length(api.client, coupon["workflow_id"])
    twice = await asyncio.gather(
        *(api.http.post(CALLBACK_PATH, content=body, headers=_signed(body)) for _ in range(3))
    )
    assert [(t.status_code, t.json()["status"]) for t in twice] == [(200, "duplicate")] * 3
    assert await history_length(api.client, coupon["workflow_id"]) == length
    history = await api.client.get_workflow_handle(coupon["workflow_id"]).fetch_history()
    signals = [
        e
        for e in history.events
        if e.workflow_execution_signaled_event_attributes.signal_name == "report_redemption"
    ]
    assert len(signals) == 1

    # Another notification about the same, now finished coupon: acknowledged, nothing to do.
    late = _notice(coupon["platform_coupon_id"], "uma")
    answer = await api.http.post(CALLBACK_PATH, content=late, headers=_signed(late))
    assert (answer.status_code, answer.json()["status"]) == (200, "finished")


async def test_a_notice_that_overtakes_our_receipt_is_asked_again(
    api: Api, tenant_a: Tenant
) -> None:
    body = _notice("pcp_not_recorded_yet", "vic")
    before = await ledger_counts(api.pool)
    answer = await api.http.post(CALLBACK_PATH, content=body, headers=_signed(body))
    assert answer.status_code == 409 and answer.json()["code"] == "unknown_platform_coupon"
    assert await ledger_counts(api.pool) == before


async def _delivered(simulator: httpx.AsyncClient) -> bool:
    return (await sim_stats(simulator))["callbacks_delivered"] >= 1
