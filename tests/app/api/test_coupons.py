"""The app's endpoints end to end: claim, list, read, complete (update and signal), cancel."""

from __future__ import annotations

from typing import Any

import pytest

from tests.app.api.conftest import (
    Api,
    Tenant,
    claim,
    history_length,
    ledger_counts,
    make_campaign,
    until,
)
from tests.conftest import TASK, handle_of, wait_for_state

pytestmark = pytest.mark.usefixtures("workers")


async def _coupon(api: Api, tenant: Tenant, coupon_id: str) -> dict[str, Any]:
    response = await api.http.get(f"/v1/coupons/{coupon_id}", headers=tenant.app)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _coupon_in(api: Api, tenant: Tenant, coupon_id: str, state: str) -> dict[str, Any]:
    """The coupon once the ledger shows it in `state`, else an empty dict."""
    shown = await _coupon(api, tenant, coupon_id)
    return shown if shown["state"] == state else {}


async def _workflow_started(api: Api, tenant: Tenant, coupon_id: str) -> dict[str, Any]:
    """The coupon once its workflow answers, else an empty dict."""
    shown = await _coupon(api, tenant, coupon_id)
    return shown if shown["workflow_state"] is not None else {}


async def test_claim_read_complete_and_issue(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a)
    first = await api.http.post(
        f"/v1/campaigns/{campaign['id']}/claims", json={"user_id": "alice"}, headers=tenant_a.app
    )
    assert first.status_code == 201, first.text
    coupon = first.json()
    assert coupon["created"] is True and coupon["state"] == "received"
    again = await api.http.post(
        f"/v1/campaigns/{campaign['id']}/claims", json={"user_id": "alice"}, headers=tenant_a.app
    )
    assert again.status_code == 200
    assert again.json()["coupon_id"] == coupon["coupon_id"] and again.json()["created"] is False

    # Answered by the ledger: the ledger's view at once, the workflow's once the worker's
    # starter has started it.
    shown = await _coupon(api, tenant_a, coupon["coupon_id"])
    assert shown["state"] == "received"
    shown = await until(lambda: _workflow_started(api, tenant_a, coupon["coupon_id"]), 10)
    assert shown["state"] == "received" and shown["workflow_state"] == "received"
    assert shown["tasks"]["required"] == [TASK] and shown["tasks"]["done"] == []
    assert shown["waiting_for"].startswith("task completion")
    assert shown["receipt"] is None
    assert [e["to_state"] for e in shown["events"]] == ["received"]

    done = await api.http.post(
        f"/v1/coupons/{coupon['coupon_id']}/tasks/{TASK}/complete",
        json={"user_id": "alice"},
        headers=tenant_a.app,
    )
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "usable" and done.json()["tasks_done"] == [TASK]

    await wait_for_state(handle_of(api.client, coupon["workflow_id"]), "issued")
    shown = await until(lambda: _coupon_in(api, tenant_a, coupon["coupon_id"], "issued"), 10)
    assert shown["receipt"]["platform_coupon_id"]
    assert [e["to_state"] for e in shown["events"]] == ["received", "usable", "issued"]

    # Done twice: answered with the state, not refused.
    twice = await api.http.post(
        f"/v1/coupons/{coupon['coupon_id']}/tasks/{TASK}/complete",
        json={"user_id": "alice"},
        headers=tenant_a.app,
    )
    assert twice.status_code == 200 and twice.json()["state"] == "issued", twice.text

    listed = await api.http.get("/v1/users/alice/coupons", headers=tenant_a.app)
    assert listed.status_code == 200
    assert [c["coupon_id"] for c in listed.json()["coupons"]] == [coupon["coupon_id"]]
    by_state = await api.http.get(
        "/v1/users/alice/coupons",
        params={"state": "received", "campaign_id": campaign["id"]},
        headers=tenant_a.app,
    )
    assert by_state.json()["coupons"] == []


async def test_completion_refusals_leave_nothing_behind(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a)
    coupon = await claim(api, tenant_a, campaign["id"], "bob")
    coupon_id, workflow_id = coupon["coupon_id"], coupon["workflow_id"]
    await wait_for_state(handle_of(api.client, workflow_id), "received")
    before = (await ledger_counts(api.pool), await history_length(api.client, workflow_id))

    unknown = await api.http.post(
        f"/v1/coupons/{coupon_id}/tasks/survey/complete",
        json={"user_id": "bob"},
        headers=tenant_a.app,
    )
    assert unknown.status_code == 422
    assert unknown.headers["content-type"] == "application/problem+json"
    assert unknown.json()["code"] == "unknown_task"
    assert "first-order" in unknown.json()["detail"]

    # Someone else's coupon is as unknown as none.
    other_user = await api.http.post(
        f"/v1/coupons/{coupon_id}/tasks/{TASK}/complete",
        json={"user_id": "mallory"},
        headers=tenant_a.app,
    )
    nobody = await api.http.post(
        f"/v1/coupons/{campaign['id']}:nobody:1/tasks/{TASK}/complete",
        json={"user_id": "nobody"},
        headers=tenant_a.app,
    )
    for answer in (other_user, nobody):
        assert answer.status_code == 404 and answer.json()["code"] == "not_found", answer.text
    assert (await ledger_counts(api.pool), await history_length(api.client, workflow_id)) == before


async def test_task_events_in_bulk(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a)
    coupons = [await claim(api, tenant_a, campaign["id"], f"u{i}") for i in range(3)]
    events = [{"coupon_id": c["coupon_id"], "user_id": c["user_id"], "task": TASK} for c in coupons]
    events += [
        {"coupon_id": coupons[0]["coupon_id"], "user_id": "someone-else", "task": TASK},
        {"coupon_id": coupons[1]["coupon_id"], "user_id": "u1", "task": "survey"},
        {"coupon_id": "nope:nope:1", "user_id": "u1", "task": TASK},
    ]
    response = await api.http.post("/v1/task-events", json={"events": events}, headers=tenant_a.app)
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["refused"]) == (3, 3)
    assert [r["code"] for r in body["results"]] == [
        None,
        None,
        None,
        "not_found",
        "unknown_task",
        "not_found",
    ]
    for c in coupons:
        await wait_for_state(handle_of(api.client, c["workflow_id"]), "issued")

    limit = await api.http.post(
        "/v1/task-events", json={"events": events[:1] * 201}, headers=tenant_a.app
    )
    assert limit.status_code == 422 and limit.json()["errors"][0]["field"] == "events"


async def test_cancel(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a)
    coupon = await claim(api, tenant_a, campaign["id"], "carol")
    path = f"/v1/coupons/{coupon['coupon_id']}/cancel"
    wrong_user = await api.http.post(
        path, json={"user_id": "dave", "reason": "changed mind"}, headers=tenant_a.app
    )
    assert wrong_user.status_code == 404
    cancelled = await api.http.post(
        path, json={"user_id": "carol", "reason": "changed mind"}, headers=tenant_a.app
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    await wait_for_state(handle_of(api.client, coupon["workflow_id"]), "cancelled")
    await until(lambda: _coupon_in(api, tenant_a, coupon["coupon_id"], "cancelled"), 10)
    again = await api.http.post(path, json={"reason": "again"}, headers=tenant_a.app)
    assert again.status_code == 409 and again.json()["code"] == "wrong_state", again.text
    assert "cancelled" in again.json()["detail"]
    # A cancelled coupon still counts against the per-user limit: claiming returns it.
    back = await claim(api, tenant_a, campaign["id"], "carol")
    assert back["coupon_id"] == coupon["coupon_id"] and back["state"] == "cancelled"


async def test_campaign_rules_refuse_claims(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a, quota=1)
    path = f"/v1/campaigns/{campaign['id']}/claims"
    assert (
        await api.http.post(path, json={"user_id": "x1"}, headers=tenant_a.app)
    ).status_code == 201
    sold_out = await api.http.post(path, json={"user_id": "x2"}, headers=tenant_a.app)
    assert sold_out.status_code == 409 and sold_out.json()["code"] == "sold_out"

    other = await make_campaign(api, tenant_a)
    other_path = f"/v1/campaigns/{other['id']}/claims"
    paused = await api.http.post(f"/v1/campaigns/{other['id']}/pause", headers=tenant_a.admin)
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    refused = await api.http.post(other_path, json={"user_id": "y"}, headers=tenant_a.app)
    assert refused.status_code == 409 and refused.json()["code"] == "campaign_paused"
    await api.http.post(f"/v1/campaigns/{other['id']}/end", headers=tenant_a.admin)
    ended = await api.http.post(other_path, json={"user_id": "y"}, headers=tenant_a.app)
    assert ended.status_code == 409 and ended.json()["code"] == "campaign_ended"
