"""Tenant isolation, both ways: another tenant's campaign, batch or coupon is answered
exactly like one that does not exist, on every endpoint, in lists and in messages."""

from __future__ import annotations

from typing import Any

import pytest

from tests.app.api.conftest import Api, Tenant, claim, history_length, ledger_counts, make_campaign
from tests.conftest import TASK, handle_of, wait_for_state

pytestmark = pytest.mark.usefixtures("workers")


def _calls(campaign: dict[str, Any], coupon: dict[str, Any]) -> list[tuple[str, str, Any, str]]:
    """Every endpoint that names a campaign, batch or coupon: (method, path, body, scope)."""
    coupon_id, user = coupon["coupon_id"], coupon["user_id"]
    c, b = campaign["id"], campaign["batch_id"]
    return [
        ("POST", f"/v1/campaigns/{c}/claims", {"user_id": "intruder"}, "app"),
        ("GET", f"/v1/coupons/{coupon_id}", None, "app"),
        ("POST", f"/v1/coupons/{coupon_id}/tasks/{TASK}/complete", {"user_id": user}, "app"),
        ("POST", f"/v1/coupons/{coupon_id}/cancel", {"reason": "mine now"}, "app"),
        ("GET", f"/v1/batches/{b}", None, "admin"),
        ("POST", f"/v1/batches/{b}/pause", None, "admin"),
        ("POST", f"/v1/batches/{b}/stop", None, "admin"),
        ("GET", f"/v1/campaigns/{c}", None, "admin"),
        ("PATCH", f"/v1/campaigns/{c}", {"quota": 1}, "admin"),
        ("POST", f"/v1/campaigns/{c}/pause", None, "admin"),
        ("POST", f"/v1/campaigns/{c}/end", {"expire_pending": True}, "admin"),
    ]


def _masked(detail: str, *ids: str) -> str:
    for value in ids:
        detail = detail.replace(value, "<id>")
    return detail


async def _assert_invisible(api: Api, owner: Tenant, other: Tenant) -> None:
    campaign = await make_campaign(api, owner)
    coupon = await claim(api, owner, campaign["id"], "shared-user")
    await wait_for_state(handle_of(api.client, coupon["workflow_id"]), "received")
    before = (
        await ledger_counts(api.pool),
        await history_length(api.client, coupon["workflow_id"]),
    )
    ghost = {
        "id": "cmp_0123456789abcdef",
        "batch_id": "bat_0123456789abcdef",
    }
    ghost_coupon = {"coupon_id": "cmp_0123456789abcdef:shared-user:1", "user_id": "shared-user"}
    for (method, path, body, scope), (_, ghost_path, _, _) in zip(
        _calls(campaign, coupon), _calls(ghost, ghost_coupon), strict=True
    ):
        headers = other.app if scope == "app" else other.admin
        seen = await api.http.request(method, path, json=body, headers=headers)
        unknown = await api.http.request(method, ghost_path, json=body, headers=headers)
        assert seen.status_code == 404, (method, path, seen.text)
        assert seen.json()["code"] == "not_found"
        assert unknown.status_code == 404, (method, ghost_path, unknown.text)
        ids = (campaign["id"], campaign["batch_id"], coupon["coupon_id"], *ghost.values())
        assert _masked(seen.json()["detail"], *ids) == _masked(unknown.json()["detail"], *ids)
        assert owner.id not in seen.text
    assert (
        await ledger_counts(api.pool),
        await history_length(api.client, coupon["workflow_id"]),
    ) == before

    # Lists show only the key's tenant.
    for path, field in (("/v1/batches", "batches"), ("/v1/campaigns", "campaigns")):
        listed = await api.http.get(path, headers=other.admin)
        assert campaign["id"] not in listed.text and campaign["batch_id"] not in listed.text
        assert all(
            item["id"] not in (campaign["id"], campaign["batch_id"])
            for item in listed.json()[field]
        )
    coupons = await api.http.get("/v1/users/shared-user/coupons", headers=other.app)
    assert coupons.status_code == 200 and coupon["coupon_id"] not in coupons.text
    filtered = await api.http.get(
        "/v1/users/shared-user/coupons", params={"campaign_id": campaign["id"]}, headers=other.app
    )
    assert filtered.json()["coupons"] == []
    # Another tenant's batch cannot be handed out: unknown, as a batch that never was.
    borrowed = await api.http.post(
        "/v1/campaigns",
        json={"batch_id": campaign["batch_id"], "quota": 1},
        headers=other.admin,
    )
    never = await api.http.post(
        "/v1/campaigns", json={"batch_id": "bat_0123456789abcdef", "quota": 1}, headers=other.admin
    )
    assert borrowed.status_code == never.status_code == 422
    assert _masked(borrowed.json()["detail"], campaign["batch_id"], "bat_0123456789abcdef") == (
        _masked(never.json()["detail"], campaign["batch_id"], "bat_0123456789abcdef")
    )
    assert await ledger_counts(api.pool) == before[0]


async def test_tenant_b_cannot_see_or_touch_tenant_a(
    api: Api, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    await _assert_invisible(api, tenant_a, tenant_b)


async def test_tenant_a_cannot_see_or_touch_tenant_b(
    api: Api, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    await _assert_invisible(api, tenant_b, tenant_a)
