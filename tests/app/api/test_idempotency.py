"""`Idempotency-Key`: a repeat gets the first answer; another request under the same key is
refused; a repeat while the first is running is told to wait."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from app.api.routing import fingerprint
from coupons.ledger import idempotency
from tests.app.api.conftest import Api, Tenant, ledger_counts, make_campaign
from tests.conftest import execute, row_count

pytestmark = pytest.mark.usefixtures("workers")


async def test_a_repeat_gets_the_first_answer(api: Api, tenant_a: Tenant, tenant_b: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a, quota=1)
    path = f"/v1/campaigns/{campaign['id']}/claims"
    headers = {**tenant_a.app, "Idempotency-Key": "order-1"}
    first = await api.http.post(path, json={"user_id": "ida"}, headers=headers)
    assert first.status_code == 201
    # The same body, spelled differently, is the same request.
    again = await api.http.post(
        path,
        content=b'{ "user_id" :"ida" }',
        headers={**headers, "Content-Type": "application/json"},
    )
    assert (again.status_code, again.json()) == (201, first.json())
    assert again.headers["idempotent-replayed"] == "true"

    counts = await ledger_counts(api.pool)
    other_body = await api.http.post(path, json={"user_id": "ivy"}, headers=headers)
    other_path = await api.http.post(
        f"/v1/coupons/{first.json()['coupon_id']}/cancel", json={"reason": "x"}, headers=headers
    )
    for refused in (other_body, other_path):
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "idempotency_key_reused"
    assert await ledger_counts(api.pool) == counts

    # Refusals are answers too: a repeat of a sold-out claim is still sold out.
    sold_out_headers = {**tenant_a.app, "Idempotency-Key": "order-2"}
    sold_out = await api.http.post(path, json={"user_id": "ivy"}, headers=sold_out_headers)
    assert sold_out.status_code == 409 and sold_out.json()["code"] == "sold_out"
    replay = await api.http.post(path, json={"user_id": "ivy"}, headers=sold_out_headers)
    assert (replay.status_code, replay.json()) == (409, sold_out.json())
    assert replay.headers["content-type"] == "application/problem+json"

    # Keys are the tenant's own: the same key elsewhere is another request.
    campaign_b = await make_campaign(api, tenant_b)
    theirs = await api.http.post(
        f"/v1/campaigns/{campaign_b['id']}/claims",
        json={"user_id": "ida"},
        headers={**tenant_b.app, "Idempotency-Key": "order-1"},
    )
    assert theirs.status_code == 201 and theirs.json()["campaign_id"] == campaign_b["id"]


async def test_creates_with_a_key_make_one_thing(api: Api, tenant_a: Tenant) -> None:
    headers = {**tenant_a.admin, "Idempotency-Key": "batch-spring"}
    answers = [
        await api.http.post("/v1/batches", json={"quantity": 5}, headers=headers) for _ in range(3)
    ]
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert await row_count(api.pool, "batches") == 1

    # A create whose first attempt died midway (its key released, nothing answered) gets
    # the same id again, so the platform's idempotent create finds the first batch.
    batch_id = answers[0].json()["id"]
    await execute(api.pool, "DELETE FROM idempotency_keys")
    retried = await api.http.post("/v1/batches", json={"quantity": 5}, headers=headers)
    assert retried.status_code == 201 and retried.json()["id"] == batch_id
    assert retried.json()["platform_batch_id"] == answers[0].json()["platform_batch_id"]
    assert await row_count(api.pool, "batches") == 1

    body = {"batch_id": batch_id, "quota": 2}
    campaign_headers = {**tenant_a.admin, "Idempotency-Key": "campaign-spring"}
    made = await api.http.post("/v1/campaigns", json=body, headers=campaign_headers)
    await execute(api.pool, "DELETE FROM idempotency_keys")
    remade = await api.http.post("/v1/campaigns", json=body, headers=campaign_headers)
    assert (made.status_code, remade.status_code) == (201, 200)
    assert made.json()["id"] == remade.json()["id"] and remade.json()["created"] is False


async def test_a_repeat_while_the_first_runs(api: Api, tenant_a: Tenant) -> None:
    campaign = await make_campaign(api, tenant_a)
    path = f"/v1/campaigns/{campaign['id']}/claims"
    body = json.dumps({"user_id": "ina"}).encode()
    # The first request took the key and is still running.
    taken = await idempotency.take(
        api.pool,
        tenant_a.id,
        "slow-1",
        fingerprint("POST", path, "", body),
        stale_after=timedelta(minutes=2),
    )
    assert taken is None
    headers = {**tenant_a.app, "Idempotency-Key": "slow-1", "Content-Type": "application/json"}
    busy = await api.http.post(path, content=body, headers=headers)
    assert busy.status_code == 409 and busy.json()["code"] == "idempotency_in_flight"
    assert busy.headers["retry-after"] == "1"
    assert await row_count(api.pool, "claims") == 0

    # Its process died: after a while the key is taken over by the repeat.
    await execute(
        api.pool, "UPDATE idempotency_keys SET created_at = now() - interval '10 minutes'"
    )
    taken_over = await api.http.post(path, content=body, headers=headers)
    assert taken_over.status_code == 201, taken_over.text

    # Two at once: one runs, the other is told to wait or gets its answer.
    twins = await asyncio.gather(
        *(
            api.http.post(
                path, json={"user_id": "twin"}, headers={**tenant_a.app, "Idempotency-Key": "twin"}
            )
            for _ in range(2)
        )
    )
    assert sorted(t.status_code for t in twins) in ([201, 201], [201, 409])
    assert await row_count(api.pool, "claims") == 2
