"""Operators' endpoints: batches and campaigns, with server-made ids, for admin keys only."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.app.api.conftest import Api, Tenant, claim, ledger_counts, make_campaign
from tests.conftest import TASK, handle_of, wait_for_state


async def test_batches(api: Api, tenant_a: Tenant, simulator: httpx.AsyncClient) -> None:
    created = await api.http.post(
        "/v1/batches",
        json={"quantity": 30, "face_value_cents": 1000, "valid_days": 7, "name": "spring"},
        headers=tenant_a.admin,
    )
    assert created.status_code == 201, created.text
    batch = created.json()
    assert batch["id"].startswith("bat_") and len(batch["id"]) == 20
    assert (batch["status"], batch["quantity"], batch["remaining"]) == ("running", 30, 30)
    assert batch["name"] == "spring" and "tenant_id" not in batch

    path = f"/v1/batches/{batch['id']}"
    for action, status in (("pause", "paused"), ("pause", "paused"), ("resume", "running")):
        changed = await api.http.post(f"{path}/{action}", headers=tenant_a.admin)
        assert (changed.status_code, changed.json()["status"]) == (200, status), changed.text
    campaign = await api.http.post(
        "/v1/campaigns", json={"batch_id": batch["id"], "quota": 5}, headers=tenant_a.admin
    )
    shown = await api.http.get(path, headers=tenant_a.admin)
    assert shown.status_code == 200
    assert shown.json()["campaigns"] == [
        {"id": campaign.json()["id"], "status": "active", "quota": 5, "claimed": 0}
    ]
    listed = await api.http.get("/v1/batches", headers=tenant_a.admin)
    assert [b["id"] for b in listed.json()["batches"]] == [batch["id"]]

    stopped = await api.http.post(f"{path}/stop", headers=tenant_a.admin)
    assert stopped.json()["status"] == "stopped"
    restart = await api.http.post(f"{path}/start", headers=tenant_a.admin)
    assert restart.status_code == 409 and restart.json()["code"] == "wrong_state"

    unstarted = await api.http.post(
        "/v1/batches", json={"quantity": 1, "start": False}, headers=tenant_a.admin
    )
    assert unstarted.json()["status"] == "created"
    at_platform = await simulator.get(f"/v1/batches/{unstarted.json()['platform_batch_id']}")
    assert at_platform.json()["status"] == "created"


async def test_campaigns(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a, name="spring sale", task_deadline_s=3600)
    assert campaign["id"].startswith("cmp_") and campaign["created"] is True
    assert campaign["tasks"] == [{"key": TASK, "name": TASK}]
    assert (campaign["quota"], campaign["remaining"], campaign["task_deadline_s"]) == (10, 10, 3600)
    path = f"/v1/campaigns/{campaign['id']}"

    patched = await api.http.patch(
        path,
        json={
            "quota": 12,
            "tasks": [{"key": "survey", "name": "Tell us"}],
            "task_deadline_s": None,
        },
        headers=tenant_a.admin,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["quota"] == 12 and patched.json()["task_deadline_s"] is None
    assert patched.json()["tasks"] == [{"key": "survey", "name": "Tell us"}]
    assert patched.json()["name"] == "spring sale"  # not given: unchanged

    for body, field in (
        ({}, None),
        ({"quota": None}, "quota"),
        ({"quota": 1000}, "quota"),  # more than the batch holds
        ({"batch_id": "bat_0000000000000000"}, "batch"),
    ):
        refused = await api.http.patch(path, json=body, headers=tenant_a.admin)
        assert refused.status_code == 422, (body, refused.text)
        if field is not None:
            assert field in refused.json()["detail"], refused.text

    await claim(api, tenant_a, campaign["id"], "ann")
    shown = await api.http.get(path, headers=tenant_a.admin)
    assert shown.json()["states"] == {"received": 1} and shown.json()["claimed"] == 1

    listed = await api.http.get(
        "/v1/campaigns",
        params={"status": "active", "batch_id": campaign["batch_id"]},
        headers=tenant_a.admin,
    )
    assert [c["id"] for c in listed.json()["campaigns"]] == [campaign["id"]]
    bad_filter = await api.http.get("/v1/campaigns", params={"status": "x"}, headers=tenant_a.admin)
    assert bad_filter.status_code == 422 and bad_filter.json()["errors"][0]["field"] == "status"

    resumed = await api.http.post(f"{path}/resume", headers=tenant_a.admin)
    assert resumed.status_code == 200 and resumed.json()["status"] == "active"  # a no-op
    refused_create = await api.http.post(
        "/v1/campaigns",
        json={"batch_id": campaign["batch_id"], "quota": 1, "tasks": [{"key": "a"}, {"key": "a"}]},
        headers=tenant_a.admin,
    )
    assert refused_create.status_code == 422
    assert refused_create.json()["errors"][0]["field"] == "tasks"


@pytest.mark.usefixtures("workers")
async def test_end_with_expire_pending(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a)
    coupons = [await claim(api, tenant_a, campaign["id"], f"e{i}") for i in range(2)]
    path = f"/v1/campaigns/{campaign['id']}/end"
    bad = await api.http.post(path, json={"reason": "over"}, headers=tenant_a.admin)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "reason"
    ended = await api.http.post(
        path, json={"expire_pending": True, "reason": "season over"}, headers=tenant_a.admin
    )
    assert ended.status_code == 200, ended.text
    assert ended.json()["status"] == "ended"
    assert ended.json()["expiry"] == {"workflow_id": f"end-campaign:{campaign['id']}"}
    for c in coupons:
        status = await wait_for_state(handle_of(api.client, c["workflow_id"]), "expired")
        assert status.transitions[-1].cause == "season over"
    pause = await api.http.post(f"/v1/campaigns/{campaign['id']}/pause", headers=tenant_a.admin)
    assert pause.status_code == 409 and pause.json()["code"] == "wrong_state"


async def test_app_keys_cannot_manage_the_catalog(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a)
    before = await ledger_counts(api.pool)
    calls = [
        ("POST", "/v1/batches", {"quantity": 5}),
        ("GET", "/v1/batches", None),
        ("GET", f"/v1/batches/{campaign['batch_id']}", None),
        ("POST", f"/v1/batches/{campaign['batch_id']}/pause", None),
        ("POST", "/v1/campaigns", {"batch_id": campaign["batch_id"], "quota": 1}),
        ("GET", "/v1/campaigns", None),
        ("GET", f"/v1/campaigns/{campaign['id']}", None),
        ("PATCH", f"/v1/campaigns/{campaign['id']}", {"quota": 3}),
        ("POST", f"/v1/campaigns/{campaign['id']}/end", None),
    ]
    answers = await asyncio.gather(
        *(api.http.request(m, p, json=b, headers=tenant_a.app) for m, p, b in calls)
    )
    for (method, path, _), answer in zip(calls, answers, strict=True):
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["code"] == "forbidden"
    assert await ledger_counts(api.pool) == before
