"""The bad-input table: each refusal answered clearly, as a problem with a stable code, and
nothing written anywhere (no row, no workflow, no signal, nothing at the platform)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from coupons import validation as rules
from coupons.tenants import create_key, revoke_key
from tests.app.api.conftest import Api, Tenant, claim, history_length, ledger_counts, make_campaign
from tests.conftest import TASK, handle_of, sim_stats, wait_for_state

pytestmark = pytest.mark.usefixtures("workers")

BIG = 64 * 1024 + 1


@dataclass
class Bad:
    why: str
    method: str
    path: str  # {campaign} and {coupon} are filled in
    status: int
    code: str
    body: Any = None  # JSON, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    key: str | None = "app"  # app, admin, bad, revoked or None (no Authorization)
    field: str | None = None  # the field `errors` must name


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 4096 + 1):
        yield b"x" * 4096


CLAIM = "/v1/campaigns/{campaign}/claims"
COMPLETE = "/v1/coupons/{coupon}/tasks/first-order/complete"
JSON = {"Content-Type": "application/json"}
TABLE = [
    Bad("malformed JSON", "POST", CLAIM, 400, "malformed_json", b'{"user_id": ', JSON),
    Bad("not an object", "POST", CLAIM, 422, "invalid_request", ["dora"], field="body"),
    Bad(
        "unknown field",
        "POST",
        CLAIM,
        422,
        "invalid_request",
        {"user_id": "dora", "x": 1},
        field="x",
    ),
    Bad("wrong type", "POST", CLAIM, 422, "invalid_request", {"user_id": 5}, field="user_id"),
    Bad("missing field", "POST", CLAIM, 422, "invalid_request", {}, field="user_id"),
    Bad(
        "invalid id",
        "POST",
        CLAIM,
        422,
        "invalid_request",
        {"user_id": "dora dora"},
        field="user_id",
    ),
    Bad("empty body", "POST", CLAIM, 422, "invalid_request", b"", JSON),
    Bad(
        "not JSON at all",
        "POST",
        CLAIM,
        415,
        "unsupported_media_type",
        b"user_id=dora",
        {"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Bad("over 64 KiB", "POST", CLAIM, 413, "payload_too_large", {"user_id": "d" * BIG}),
    Bad("over 64 KiB, chunked", "POST", CLAIM, 413, "payload_too_large", _chunks, JSON),
    Bad("no key", "POST", CLAIM, 401, "unauthorized", {"user_id": "dora"}, key=None),
    Bad("no key, bad body", "POST", CLAIM, 401, "unauthorized", b"{", JSON, key=None),
    Bad("bad key", "POST", CLAIM, 401, "unauthorized", {"user_id": "dora"}, key="bad"),
    Bad("revoked key", "POST", CLAIM, 401, "unauthorized", {"user_id": "dora"}, key="revoked"),
    Bad(
        "basic auth",
        "POST",
        CLAIM,
        401,
        "unauthorized",
        {"user_id": "dora"},
        {"Authorization": "Basic ZG9yYTpkb3Jh"},
        key=None,
    ),
    Bad("app key, admin path", "POST", "/v1/batches", 403, "forbidden", {"quantity": 5}),
    Bad("app key, admin path, bad body", "POST", "/v1/batches", 403, "forbidden", b"{", JSON),
    Bad(
        "unknown campaign",
        "POST",
        "/v1/campaigns/nope/claims",
        404,
        "not_found",
        {"user_id": "dora"},
    ),
    Bad(
        "unknown task",
        "POST",
        "/v1/coupons/{coupon}/tasks/survey/complete",
        422,
        "unknown_task",
        {"user_id": "holder"},
    ),
    Bad("not the holder", "POST", COMPLETE, 404, "not_found", {"user_id": "dora"}),
    Bad(
        "complete, unknown field",
        "POST",
        COMPLETE,
        422,
        "invalid_request",
        {"user_id": "holder", "when": "now"},
        field="when",
    ),
    Bad(
        "task events, one bad event",
        "POST",
        "/v1/task-events",
        422,
        "invalid_request",
        {
            "events": [
                {"coupon_id": "{coupon}", "user_id": "holder", "task": TASK},
                {"coupon_id": "{coupon}", "user_id": "holder"},
            ]
        },
        field="events[1].task",
    ),
    Bad(
        "task events, none",
        "POST",
        "/v1/task-events",
        422,
        "invalid_request",
        {"events": []},
        field="events",
    ),
    Bad(
        "cancel, no reason",
        "POST",
        "/v1/coupons/{coupon}/cancel",
        422,
        "invalid_request",
        {"user_id": "holder"},
        field="reason",
    ),
    Bad(
        "batch, quantity 0",
        "POST",
        "/v1/batches",
        422,
        "invalid_request",
        {"quantity": 0},
        key="admin",
        field="quantity",
    ),
    Bad(
        "batch, quantity as text",
        "POST",
        "/v1/batches",
        422,
        "invalid_request",
        {"quantity": "5"},
        key="admin",
        field="quantity",
    ),
    Bad(
        "batch, time without zone",
        "POST",
        "/v1/batches",
        422,
        "invalid_request",
        {"quantity": 5, "starts_at": "2030-01-01T00:00:00"},
        key="admin",
        field="starts_at",
    ),
    Bad(
        "batch, year 9999",
        "POST",
        "/v1/batches",
        422,
        "invalid_request",
        {"quantity": 5, "ends_at": "9999-12-31T23:59:59Z"},
        key="admin",
        field="ends_at",
    ),
    Bad(
        "batch, window backwards",
        "POST",
        "/v1/batches",
        422,
        "invalid_request",
        {"quantity": 5, "starts_at": "2031-01-01T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z"},
        key="admin",
        field="ends_at",
    ),
    # One row per range of coupons.validation (README "Bad input"): just outside it.
    *(
        Bad(
            f"batch, {field} out of range",
            "POST",
            "/v1/batches",
            422,
            "invalid_request",
            {"quantity": 5, field: value},
            key="admin",
            field=field,
        )
        for field, value in (
            ("quantity", rules.QUANTITY.high + 1),
            ("face_value_cents", rules.FACE_VALUE_CENTS.low - 1),
            ("min_spend_cents", rules.MIN_SPEND_CENTS.high + 1),
            ("valid_days", rules.VALID_DAYS.high + 1),
            ("per_user_limit", rules.PER_USER_LIMIT.high + 1),
            ("name", "n" * (rules.NAME.high + 1)),
        )
    ),
    *(
        Bad(
            f"campaign, {field} out of range",
            "POST",
            "/v1/campaigns",
            422,
            "invalid_request",
            {"batch_id": "b", "quota": 1, field: value},
            key="admin",
            field=field,
        )
        for field, value in (
            ("quota", rules.QUOTA.high + 1),
            ("task_deadline_s", rules.TASK_DEADLINE_S.high + 1),
            ("tasks", [{"key": f"t{n}"} for n in range(rules.TASKS.high + 1)]),
        )
    ),
    Bad(
        "cancel, reason with a control character",
        "POST",
        "/v1/coupons/{coupon}/cancel",
        422,
        "invalid_request",
        {"user_id": "holder", "reason": "gone\x00"},
        field="reason",
    ),
    Bad(
        "list, limit out of range",
        "GET",
        f"/v1/users/holder/coupons?limit={rules.LIST_LIMIT.high + 1}",
        422,
        "invalid_request",
        field="limit",
    ),
    Bad(
        "campaign, unknown batch",
        "POST",
        "/v1/campaigns",
        422,
        "invalid_request",
        {"batch_id": "nope", "quota": 1},
        key="admin",
        field="batch_id",
    ),
    Bad(
        "idempotency key too long",
        "POST",
        CLAIM,
        422,
        "invalid_request",
        {"user_id": "dora"},
        {"Idempotency-Key": "k" * 256},
        field="Idempotency-Key",
    ),
    Bad("no such path", "GET", "/v1/nothing", 404, "not_found"),
    Bad("wrong method", "DELETE", "/v1/coupons/{coupon}", 405, "method_not_allowed"),
]


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


async def test_every_refusal_is_clear_and_writes_nothing(
    api: Api, tenant_a: Tenant, simulator: httpx.AsyncClient
) -> None:
    campaign = await make_campaign(api, tenant_a)
    coupon = await claim(api, tenant_a, campaign["id"], "holder")
    await wait_for_state(handle_of(api.client, coupon["workflow_id"]), "received")
    revoked = await create_key(api.pool, tenant_a.id, "app")
    await revoke_key(api.pool, revoked.key_id)
    keys = {
        "app": tenant_a.app,
        "admin": tenant_a.admin,
        "bad": {"Authorization": "Bearer ck_kdeadbeef_not-the-secret"},
        "revoked": {"Authorization": f"Bearer {revoked.api_key}"},
        None: {},
    }
    names = {"campaign": campaign["id"], "coupon": coupon["coupon_id"]}
    before = await _world(api, simulator, coupon["workflow_id"])
    for bad in TABLE:
        headers = {**keys[bad.key], **bad.headers}
        path = _fill(bad.path, names)
        if callable(bad.body):
            content: Any = bad.body(BIG)
        elif isinstance(bad.body, bytes):
            content = bad.body
        elif bad.body is None:
            content = None
        else:
            content = json.dumps(_fill(bad.body, names)).encode()
            headers.setdefault("Content-Type", "application/json")
        answer = await api.http.request(bad.method, path, content=content, headers=headers)
        assert answer.status_code == bad.status, (bad.why, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json", bad.why
        problem = answer.json()
        assert problem["code"] == bad.code, (bad.why, problem)
        assert problem["status"] == bad.status, bad.why
        assert problem["instance"] == path.partition("?")[0], bad.why
        assert problem["type"].endswith(bad.code) and problem["title"] and problem["detail"]
        if bad.field is not None:
            fields = [e["field"] for e in problem.get("errors", [])]
            assert bad.field in fields, (bad.why, problem)
        if bad.status == 401:
            assert answer.headers["www-authenticate"].startswith("Bearer"), bad.why
    await asyncio.sleep(0.5)  # anything started by mistake would show by now
    assert await _world(api, simulator, coupon["workflow_id"]) == before


async def _world(api: Api, simulator: httpx.AsyncClient, workflow_id: str) -> dict[str, Any]:
    """Everything a request could have written: ledger rows, workflows on the test's task
    queue, the coupon's history, the platform's batches and sends."""
    workflows = await api.client.count_workflows(f"TaskQueue = '{api.settings.task_queue}'")
    stats = await sim_stats(simulator)
    return {
        **await ledger_counts(api.pool),
        "workflows": workflows.count,
        "history": await history_length(api.client, workflow_id),
        "sends": stats["sends_applied"],
    }


async def test_a_key_the_api_has_checked_is_refused_once_revoked_here(
    api: Api, tenant_a: Tenant
) -> None:
    # The API remembers a key it has checked (coupons.tenants.KeyLookups): a revocation made
    # in its own process must still end the key at once (another process's, within
    # KEY_FRESH_S: tests/test_tenants.py).
    campaign = await make_campaign(api, tenant_a)
    key = await create_key(api.pool, tenant_a.id, "app")
    headers = {"Authorization": f"Bearer {key.api_key}"}
    path = f"/v1/campaigns/{campaign['id']}/claims"
    accepted = await api.http.post(path, json={"user_id": "before"}, headers=headers)
    assert accepted.status_code == 201, accepted.text
    await revoke_key(api.pool, key.key_id)
    refused = await api.http.post(path, json={"user_id": "after"}, headers=headers)
    assert refused.status_code == 401, refused.text
    assert refused.json()["code"] == "unauthorized"
