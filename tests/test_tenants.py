"""Tenants and API keys (`coupons/tenants.py`) on the real PostgreSQL, and the catalog's
tenant filters: a key is shown once and only its digest is stored; a tenant never sees
another tenant's batch, campaign or coupon, which is as unknown to it as none.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any

import httpx
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from coupons import catalog, tenants
from coupons.errors import InvalidField, Refused
from coupons.ledger import batches, campaigns
from coupons.ledger import claims as ledger
from coupons.ledger import tenants as tenant_ledger
from coupons.ledger.batches import Batch
from coupons.ledger.campaigns import Campaign, CampaignFilter, CampaignSpec
from coupons.ledger.tenants import DEFAULT_TENANT, ApiKey, Tenant, list_keys, list_tenants
from coupons.platforms.base import BatchAction
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import new_batch, new_id, row_count, sim_stats


def secret_of(api_key: str) -> str:
    """The secret part of `ck_<key id>_<secret>`."""
    prefix, key_id, secret = api_key.split("_", 2)
    assert (prefix, key_id) != ("", "")
    return secret


async def new_tenant(pool: AsyncConnectionPool) -> tuple[Tenant, tenants.IssuedKey]:
    return await tenants.create_tenant(pool, new_id("tenant"))


async def tenant_campaign(
    pool: AsyncConnectionPool, platform: RestPlatform, tenant_id: str
) -> tuple[Batch, Campaign]:
    """A running batch of `tenant_id` and a campaign of the same tenant on it."""
    batch = await new_batch(pool, platform, tenant_id=tenant_id)
    spec = CampaignSpec(id=new_id("c"), batch_id=batch.id, quota=10, tenant_id=tenant_id)
    campaign, created = await catalog.campaigns.create_campaign(pool, spec)
    assert created
    return batch, campaign


# ----------------------------------------------------------------- tenants and keys


async def test_a_new_tenant_gets_an_admin_key_that_authenticates(
    pool: AsyncConnectionPool,
) -> None:
    tenant, key = await tenants.create_tenant(pool, "  Acme shop  ")
    assert tenant.name == "Acme shop"  # trimmed
    assert tenant.id != DEFAULT_TENANT
    assert (key.tenant_id, key.scope) == (tenant.id, "admin")
    assert key.api_key.startswith(f"ck_{key.key_id}_")
    assert len(secret_of(key.api_key)) >= 40

    found = await tenants.authenticate(pool, key.api_key)
    assert found is not None
    assert (found.id, found.tenant_id, found.scope, found.revoked_at) == (
        key.key_id,
        tenant.id,
        "admin",
        None,
    )
    assert [t.id for t in await list_tenants(pool)] == [DEFAULT_TENANT, tenant.id]

    app = await tenants.create_key(pool, tenant.id, "app")
    assert app.key_id != key.key_id and secret_of(app.api_key) != secret_of(key.api_key)
    found_app = await tenants.authenticate(pool, app.api_key)
    assert found_app is not None
    assert (found_app.id, found_app.tenant_id, found_app.scope) == (app.key_id, tenant.id, "app")


async def test_authenticate_refuses_a_wrong_secret_an_unknown_id_and_malformed_keys(
    pool: AsyncConnectionPool,
) -> None:
    _, key = await new_tenant(pool)
    _, other = await new_tenant(pool)
    secret = secret_of(key.api_key)
    wrong_secret = ("A" if secret[0] != "A" else "B") + secret[1:]
    refused = [
        f"ck_{key.key_id}_{wrong_secret}",  # one character off
        f"ck_{key.key_id}_{secret_of(other.api_key)}",  # another key's secret
        f"ck_{other.key_id}_{secret}",  # another key's id
        f"ck_{key.key_id}_{secret[:-1]}",  # cut short
        f"ck_{key.key_id}_{secret}x",  # too long
        f"ck_k0123456789abcdef_{secret}",  # no such key id
        "",
        "ck_",
        "ck__",
        f"ck__{secret}",  # no key id
        f"ck_{key.key_id}_",  # no secret
        f"ck_{key.key_id}",
        f"{key.key_id}_{secret}",  # no prefix
        key.api_key.replace("ck_", "CK_", 1),
        f"Bearer {key.api_key}",
        f" {key.api_key}",
        f"{key.api_key} ",
        key.api_key + "a" * 200,  # far too long to be a key
        "ck_' OR '1'='1_x",
        "ck_k\u00e9_x",
    ]
    for presented in refused:
        assert await tenants.authenticate(pool, presented) is None, presented
    assert await tenants.authenticate(pool, key.api_key) is not None


async def test_authenticate_refuses_a_nul_byte_rather_than_failing(
    pool: AsyncConnectionPool,
) -> None:
    # PostgreSQL text cannot hold NUL: a key id with one must be refused before the query.
    _, key = await new_tenant(pool)
    for presented in ("ck_k\x00_x", f"ck_{key.key_id}\x00_{secret_of(key.api_key)}"):
        assert await tenants.authenticate(pool, presented) is None, presented


async def test_a_revoked_key_no_longer_authenticates_and_others_still_do(
    pool: AsyncConnectionPool,
) -> None:
    tenant, admin = await new_tenant(pool)
    app = await tenants.create_key(pool, tenant.id, "app")
    revoked = await tenants.revoke_key(pool, app.key_id)
    assert (revoked.id, revoked.tenant_id, revoked.scope) == (app.key_id, tenant.id, "app")
    assert revoked.revoked_at is not None

    assert await tenants.authenticate(pool, app.api_key) is None
    assert await tenants.authenticate(pool, admin.api_key) is not None
    # Revoking again changes nothing: the first revocation time stays.
    again = await tenants.revoke_key(pool, app.key_id)
    assert again.revoked_at == revoked.revoked_at
    assert await tenants.authenticate(pool, app.api_key) is None
    keys = {k.id: k.revoked_at for k in await list_keys(pool, tenant.id)}
    assert keys == {admin.key_id: None, app.key_id: revoked.revoked_at}

    with pytest.raises(Refused) as unknown:
        await tenants.revoke_key(pool, "k0123456789abcdef")
    assert unknown.value.code == "unknown_key"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_revoked_by_another_process_is_refused_within_key_fresh_s(
    pool: AsyncConnectionPool,
) -> None:
    # The command line revoking a key beside a running API: the API learns it only from the
    # ledger, which it reads again once the row it holds is KEY_FRESH_S old.
    clock = Clock()
    lookups = tenants.KeyLookups(clock=clock)
    _, key = await new_tenant(pool)
    assert await tenants.authenticate(pool, key.api_key, lookups) is not None
    await tenant_ledger.revoke_key(pool, key.key_id)  # not through this process's revoke_key

    clock.now = tenants.KEY_FRESH_S / 2
    assert await tenants.authenticate(pool, key.api_key, lookups) is not None
    clock.now = tenants.KEY_FRESH_S
    assert await tenants.authenticate(pool, key.api_key, lookups) is None
    clock.now = 10 * tenants.KEY_FRESH_S  # and for good
    assert await tenants.authenticate(pool, key.api_key, lookups) is None


async def test_a_key_revoked_by_this_process_is_refused_at_once(
    pool: AsyncConnectionPool,
) -> None:
    _, admin = await new_tenant(pool)
    app = await tenants.create_key(pool, admin.tenant_id, "app")
    assert await tenants.authenticate(pool, app.api_key) is not None  # now remembered
    await tenants.revoke_key(pool, app.key_id)
    assert await tenants.authenticate(pool, app.api_key) is None
    assert await tenants.authenticate(pool, admin.api_key) is not None


async def test_keys_are_read_once_for_requests_together_and_unknown_ids_every_time(
    pool: AsyncConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    get_key = tenant_ledger.get_key

    async def counted(source: AsyncConnectionPool, key_id: str) -> ApiKey | None:
        reads.append(key_id)
        return await get_key(source, key_id)

    monkeypatch.setattr(tenant_ledger, "get_key", counted)
    lookups = tenants.KeyLookups(clock=Clock())
    _, key = await new_tenant(pool)
    found = await asyncio.gather(
        *(tenants.authenticate(pool, key.api_key, lookups) for _ in range(50))
    )
    assert all(k is not None and k.id == key.key_id for k in found)
    assert reads == [key.key_id]
    # A wrong secret is still refused, from the row it holds.
    wrong = f"ck_{key.key_id}_{'x' * 43}"
    assert await tenants.authenticate(pool, wrong, lookups) is None
    assert reads == [key.key_id]

    # An id not (yet) in the ledger is not remembered: the key made a moment later works.
    key_id = f"k{uuid.uuid4().hex[:16]}"
    secret = "s" * 43
    assert await tenants.authenticate(pool, f"ck_{key_id}_{secret}", lookups) is None
    digest = hashlib.sha256(secret.encode()).digest()
    await tenant_ledger.add_key(pool, key_id, key.tenant_id, "app", digest)
    assert await tenants.authenticate(pool, f"ck_{key_id}_{secret}", lookups) is not None
    assert reads == [key.key_id, key_id, key_id]


async def test_a_caller_that_goes_away_does_not_cancel_the_read_others_wait_for(
    pool: AsyncConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    get_key = tenant_ledger.get_key

    async def slow(source: AsyncConnectionPool, key_id: str) -> ApiKey | None:
        await release.wait()
        return await get_key(source, key_id)

    monkeypatch.setattr(tenant_ledger, "get_key", slow)
    lookups = tenants.KeyLookups(clock=Clock())
    _, key = await new_tenant(pool)
    gone = asyncio.ensure_future(tenants.authenticate(pool, key.api_key, lookups))
    staying = asyncio.ensure_future(tenants.authenticate(pool, key.api_key, lookups))
    await asyncio.sleep(0)
    gone.cancel()
    release.set()
    found = await staying
    assert found is not None and found.id == key.key_id
    assert gone.cancelled()


async def test_the_secret_is_never_stored_only_its_digest(pool: AsyncConnectionPool) -> None:
    tenant, admin = await new_tenant(pool)
    app = await tenants.create_key(pool, tenant.id, "app")
    for key in (admin, app):
        secret = secret_of(key.api_key)
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, tenant_id, scope, secret_sha256 FROM api_keys WHERE id = %s",
                (key.key_id,),
            )
            row = await cur.fetchone()
        assert row is not None
        assert row[:3] == (key.key_id, tenant.id, key.scope)
        assert bytes(row[3]) == hashlib.sha256(secret.encode()).digest()

    # Nowhere in the ledger: every row of every table, as text.
    secrets = [secret_of(k.api_key) for k in (admin, app)]
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
        tables = [name for (name,) in await cur.fetchall()]
        assert "api_keys" in tables
        for table in tables:
            cur = await conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))
            )
            for (text,) in await cur.fetchall():
                assert not any(s in text for s in secrets), (table, text)


async def test_tenant_names_are_unique_and_a_refused_name_issues_no_key(
    pool: AsyncConnectionPool,
) -> None:
    name = new_id("acme")
    await tenants.create_tenant(pool, name)
    keys_before = await row_count(pool, "api_keys")
    for taken in (name, f" {name} ", DEFAULT_TENANT):
        with pytest.raises(Refused) as refused:
            await tenants.create_tenant(pool, taken)
        assert refused.value.code == "tenant_exists", taken
    assert [t.name for t in await list_tenants(pool)] == [DEFAULT_TENANT, name]
    assert await row_count(pool, "api_keys") == keys_before


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "a\x00b"])
async def test_a_bad_tenant_name_is_refused_naming_the_field(
    pool: AsyncConnectionPool, name: str
) -> None:
    with pytest.raises(InvalidField) as refused:
        await tenants.create_tenant(pool, name)
    assert (refused.value.code, refused.value.field) == ("invalid_request", "name")
    assert await row_count(pool, "tenants") == 1  # the default tenant only
    assert await row_count(pool, "api_keys") == 0


async def test_a_bad_scope_or_an_unknown_tenant_is_refused_and_writes_nothing(
    pool: AsyncConnectionPool,
) -> None:
    tenant, _ = await new_tenant(pool)
    keys_before = await row_count(pool, "api_keys")
    for scope in ("root", "Admin", "", "app "):
        with pytest.raises(InvalidField) as bad_scope:
            await tenants.create_key(pool, tenant.id, scope)
        assert (bad_scope.value.code, bad_scope.value.field) == ("invalid_request", "scope")
        assert str(bad_scope.value).startswith("invalid_request: scope: ")
    with pytest.raises(Refused) as unknown:
        await tenants.create_key(pool, "tnt_nope", "app")
    assert unknown.value.code == "unknown_tenant"
    assert await row_count(pool, "api_keys") == keys_before


# ----------------------------------------------------------------- the catalog per tenant


async def test_a_campaign_on_another_tenants_batch_is_refused_as_an_unknown_batch(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    a, _ = await new_tenant(pool)
    b, _ = await new_tenant(pool)
    batch = await new_batch(pool, platform, tenant_id=a.id)
    assert batch.tenant_id == a.id
    for tenant_id in (b.id, DEFAULT_TENANT):
        spec = CampaignSpec(id=new_id("c"), batch_id=batch.id, quota=5, tenant_id=tenant_id)
        with pytest.raises(InvalidField) as refused:
            await catalog.campaigns.create_campaign(pool, spec)
        assert refused.value.field == "batch"
        assert f"unknown batch {batch.id!r}" in str(refused.value)
    assert await campaigns.list_campaigns(pool) == []

    # Its owner can, and a default campaign (the operator's) is the default tenant's.
    spec = CampaignSpec(id=new_id("c"), batch_id=batch.id, quota=5, tenant_id=a.id)
    campaign, _ = await catalog.campaigns.create_campaign(pool, spec)
    assert campaign.tenant_id == a.id
    assert CampaignSpec(id="x", batch_id="y", quota=1).tenant_id == DEFAULT_TENANT


async def test_another_tenants_batch_and_campaign_are_unknown(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    a, _ = await new_tenant(pool)
    b, _ = await new_tenant(pool)
    batch, campaign = await tenant_campaign(pool, platform, a.id)

    assert (await catalog.batches.get_batch(pool, batch.id, a.id)).id == batch.id
    assert (await catalog.batches.get_batch(pool, batch.id)).id == batch.id  # operator-wide
    assert (await catalog.campaigns.get_campaign(pool, campaign.id, a.id)).id == campaign.id
    assert (await catalog.campaigns.get_campaign(pool, campaign.id)).id == campaign.id
    for tenant_id in (b.id, DEFAULT_TENANT):
        with pytest.raises(Refused) as no_batch:
            await catalog.batches.get_batch(pool, batch.id, tenant_id)
        assert no_batch.value.code == "unknown_batch"
        with pytest.raises(Refused) as no_campaign:
            await catalog.campaigns.get_campaign(pool, campaign.id, tenant_id)
        assert no_campaign.value.code == "unknown_campaign"
        with pytest.raises(Refused) as not_paused:
            await catalog.campaigns.change_campaign_status(pool, campaign.id, "pause", tenant_id)
        assert not_paused.value.code == "unknown_campaign"
        with pytest.raises(Refused) as not_stopped:
            await catalog.batches.change_batch(
                pool, platform, batch.id, BatchAction.STOP, tenant_id
            )
        assert not_stopped.value.code == "unknown_batch"
    assert (await catalog.campaigns.get_campaign(pool, campaign.id)).status == "active"
    assert (await catalog.batches.get_batch(pool, batch.id)).status == "running"

    assert [
        c.id for c in await campaigns.list_campaigns(pool, CampaignFilter(tenant_id=b.id))
    ] == []
    assert [c.id for c in await campaigns.list_campaigns(pool, CampaignFilter(tenant_id=a.id))] == [
        campaign.id
    ]
    assert [x.id for x in await batches.list_batches(pool, tenant_id=b.id)] == []
    assert [x.id for x in await batches.list_batches(pool, tenant_id=a.id)] == [batch.id]


async def test_ids_taken_by_another_tenant_are_refused_and_left_as_they_are(
    pool: AsyncConnectionPool, platform: RestPlatform, simulator: httpx.AsyncClient
) -> None:
    a, _ = await new_tenant(pool)
    b, _ = await new_tenant(pool)
    batch, campaign = await tenant_campaign(pool, platform, a.id)
    their_batch = await new_batch(pool, platform, tenant_id=b.id)
    before = await sim_stats(simulator)

    with pytest.raises(Refused) as batch_taken:
        await catalog.batches.create_batch(pool, platform, batch.id, quantity=20, tenant_id=b.id)
    assert batch_taken.value.code == "batch_exists"
    assert (await sim_stats(simulator))["batches"] == before["batches"]  # nothing at the platform

    spec = CampaignSpec(id=campaign.id, batch_id=their_batch.id, quota=10, tenant_id=b.id)
    with pytest.raises(Refused) as campaign_taken:
        await catalog.campaigns.create_campaign(pool, spec)
    assert campaign_taken.value.code == "campaign_exists"
    kept = await catalog.campaigns.get_campaign(pool, campaign.id)
    assert (kept.tenant_id, kept.batch_id) == (a.id, batch.id)
    assert (await catalog.batches.get_batch(pool, batch.id)).tenant_id == a.id


async def test_a_users_coupons_and_a_coupons_record_are_seen_only_by_its_tenant(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    a, _ = await new_tenant(pool)
    b, _ = await new_tenant(pool)
    _, campaign_a = await tenant_campaign(pool, platform, a.id)
    _, campaign_b = await tenant_campaign(pool, platform, b.id)
    # The ledger's claims alone: no workflow is needed to read them back.
    claim_a, _ = await ledger.claim(pool, campaign_a.id, "u1")
    claim_b, _ = await ledger.claim(pool, campaign_b.id, "u1")

    def coupon_ids(claims: list[Any]) -> list[str]:
        return [c.coupon_id for c in claims]

    def of_user(tenant_id: str, user_id: str, campaign_id: str | None = None) -> Any:
        return ledger.ClaimFilter(
            tenant_id=tenant_id, user_id=user_id, campaign_id=campaign_id, newest_first=True
        )

    assert coupon_ids(await ledger.find_claims(pool, of_user(a.id, "u1"))) == [claim_a.coupon_id]
    assert coupon_ids(await ledger.find_claims(pool, of_user(b.id, "u1"))) == [claim_b.coupon_id]
    assert await ledger.find_claims(pool, of_user(DEFAULT_TENANT, "u1")) == []
    assert await ledger.find_claims(pool, of_user(a.id, "u2")) == []
    # Naming the other tenant's campaign finds nothing either.
    assert await ledger.find_claims(pool, of_user(a.id, "u1", campaign_id=campaign_b.id)) == []

    view = await ledger.coupon_view(pool, claim_a.coupon_id, a.id)
    assert view is not None and view["claim"].coupon_id == claim_a.coupon_id
    assert await ledger.coupon_view(pool, claim_a.coupon_id, b.id) is None
    assert await ledger.coupon_view(pool, claim_a.coupon_id, DEFAULT_TENANT) is None
    assert await ledger.coupon_view(pool, claim_a.coupon_id) is not None  # operator-wide
    assert await ledger.get_claim(pool, claim_b.coupon_id, a.id) is None
    found = await ledger.get_claim(pool, claim_b.coupon_id, b.id)
    assert found is not None and found.coupon_id == claim_b.coupon_id
