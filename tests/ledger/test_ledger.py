"""The ledger's own guarantees, straight against PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from app.embedded import EmbeddedPostgres
from coupons.ledger import batches, claims, db
from coupons.ledger.campaigns import get_campaign
from coupons.model import Receipt, Transition
from coupons.platforms.base import BatchSpec
from coupons.platforms.generic.adapter import RestPlatform
from tests.conftest import new_campaign, scalar

AT = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


async def test_migrations_build_an_empty_database_once(postgres: EmbeddedPostgres) -> None:
    async with await AsyncConnection.connect(postgres.url(), autocommit=True) as conn:
        await conn.execute("DROP DATABASE IF EXISTS migrate_check")
        await conn.execute("CREATE DATABASE migrate_check")
    url = postgres.url("migrate_check")
    assert await db.migrate_url(url) == [v for v, _, _ in db.migrations()]
    assert await db.migrate_url(url) == []
    async with await AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        assert await cur.fetchall() == [
            (1, "initial"),
            (2, "catalog"),
            (3, "tenants"),
            (4, "batch_intents"),
            (5, "claim_starts"),
            (6, "claim_slots"),
            (7, "platform_permits"),
        ]


async def test_a_url_naming_a_schema_is_migrated_in_that_schema(
    postgres: EmbeddedPostgres, schema: str
) -> None:
    """DATABASE_URL may name the schema (`options=-csearch_path=...`): the migrations go
    there, where the pools of the same URL look, not into `public`."""
    named = f"{schema}_by_url"
    async with await AsyncConnection.connect(postgres.url(), autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(named)))
        try:
            url = f"{postgres.url()}?options=-csearch_path%3D{named}"
            assert await db.migrate_url(url) == [v for v, _, _ in db.migrations()]
            cur = await conn.execute(
                "SELECT count(*) FROM information_schema.tables"
                " WHERE table_schema = %s AND table_name = 'campaign_slots'",
                (named,),
            )
            assert await cur.fetchone() == (1,)
        finally:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(named)))


@asynccontextmanager
async def ledger_at(
    postgres: EmbeddedPostgres, schema: str, version: int
) -> AsyncIterator[AsyncConnection[Any]]:
    """A ledger of its own as migration `version` left it (a connection on it, autocommit),
    dropped at the end."""
    assert await db.migrate_url(postgres.url(), schema=schema, upto=version) == list(
        range(1, version + 1)
    )
    try:
        async with await AsyncConnection.connect(
            postgres.url(), options=f"-c search_path={schema}", autocommit=True
        ) as conn:
            yield conn
    finally:
        async with await AsyncConnection.connect(postgres.url(), autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def test_the_catalog_migration_keeps_existing_batches_and_campaigns(
    postgres: EmbeddedPostgres, schema: str
) -> None:
    """A ledger from before the catalog (batch ids were the platform's) upgrades in place."""
    async with ledger_at(postgres, f"{schema}_upgrade", 1) as conn:
        await conn.execute(
            "INSERT INTO batches (id, name, quantity, valid_days, status, remaining, raw)"
            " VALUES ('bat_1', 'old', 10, 30, 'active', 10, '{}')"
        )
        await conn.execute(
            "INSERT INTO campaigns (id, batch_id, required_tasks, per_user_limit, quota)"
            " VALUES ('old', 'bat_1', '{first-order}', 1, 10)"
        )
        assert await db.migrate(conn, upto=5) == [2, 3, 4, 5]
        cur = await conn.execute("SELECT id, platform_batch_id, drift, tenant_id FROM batches")
        assert await cur.fetchall() == [("bat_1", "bat_1", [], "default")]
        cur = await conn.execute(
            "SELECT required_tasks, task_names, status, tenant_id FROM campaigns"
        )
        assert await cur.fetchall() == [(["first-order"], ["first-order"], "active", "default")]


async def test_the_slots_migration_keeps_each_campaigns_count_and_quota(
    postgres: EmbeddedPostgres, schema: str
) -> None:
    """A ledger whose quota was one counter per campaign upgrades to slots in place: the
    same count, the same quota, and claims go on up to it and no further."""
    upgraded = f"{schema}_slots"
    async with ledger_at(postgres, upgraded, 5) as conn:
        await conn.execute(
            "INSERT INTO batches (id, platform_batch_id, name, quantity, valid_days, status,"
            " remaining, raw) VALUES ('b1', 'pb1', 'old', 100, 30, 'running', 100, '{}')"
        )
        for campaign, quota, taken in (("full", 3, 3), ("part", 37, 5), ("none", 0, 0)):
            await conn.execute(
                "INSERT INTO campaigns (id, batch_id, task_names, per_user_limit, quota, claimed,"
                " starts_at, ends_at) VALUES (%s, 'b1', '{}', 1, %s, %s, now() - interval '1 day',"
                " now() + interval '1 day')",
                (campaign, quota, taken),
            )
        assert await db.migrate(conn, upto=6) == [6]
        cur = await conn.execute(
            "SELECT campaign_id, count(*), sum(quota), sum(claimed), min(quota), max(quota)"
            " FROM campaign_slots GROUP BY campaign_id ORDER BY campaign_id"
        )
        # Shared evenly past what was claimed: 32 free coupons over 16 slots, 2 each.
        assert await cur.fetchall() == [
            ("full", 16, 3, 3, 0, 3),
            ("none", 16, 0, 0, 0, 0),
            ("part", 16, 37, 5, 2, 7),
        ]
        async with db.pool(postgres.url(), schema=upgraded, max_size=4) as pool:
            granted = [await claims.claim(pool, "part", f"u{i}") for i in range(32)]
            assert all(created for _, created in granted)
            with pytest.raises(claims.ClaimRefused, match="no coupons left"):
                await claims.claim(pool, "part", "one-more")
            stored = await get_campaign(pool, "part")
            assert stored is not None and (stored.claimed, stored.quota) == (37, 37)


async def claimed(pool: AsyncConnectionPool, platform: RestPlatform) -> str:
    campaign = await new_campaign(pool, platform)
    claim, created = await claims.claim(pool, campaign.id, "u1")
    assert created
    return claim.coupon_id


async def test_a_transition_is_recorded_once_however_often_it_is_written(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    coupon_id = await claimed(pool, platform)
    usable = Transition("received", "usable", "tasks done: first-order", AT)
    assert await claims.record(pool, coupon_id, usable) is True
    assert await claims.record(pool, coupon_id, usable) is False
    view = await claims.coupon_view(pool, coupon_id)
    assert view is not None
    assert [e["to_state"] for e in view["events"]] == ["received", "usable"]
    assert view["claim"].state == "usable"


async def test_receipt_and_issued_are_written_together_and_once(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    coupon_id = await claimed(pool, platform)
    await claims.record(pool, coupon_id, Transition("received", "usable", "tasks done", AT))
    receipt = Receipt("cpn_1", "key-1", AT, AT, AT, {"coupon_id": "cpn_1"})
    issued = Transition("usable", "issued", "platform confirmed the send", AT)
    assert await claims.record_receipt(pool, coupon_id, receipt, issued) == receipt
    # A retry confirms later: the first receipt stays, and is the one answered.
    later = replace(receipt, confirmed_at=AT + timedelta(seconds=5))
    assert await claims.record_receipt(pool, coupon_id, later, issued) == receipt
    view = await claims.coupon_view(pool, coupon_id)
    assert view is not None
    assert view["receipt"]["confirmed_at"] == AT
    assert view["claim"].state == "issued"
    assert [e["to_state"] for e in view["events"]] == ["received", "usable", "issued"]
    assert await scalar(pool, "SELECT count(*) FROM receipts WHERE coupon_id = %s", coupon_id) == 1


async def test_a_receipt_another_attempt_commits_meanwhile_is_the_one_answered(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    """Two attempts of one send at once (the first outlived its heartbeat): the second's
    write waits on the receipt the first has written but not committed, then answers it,
    although its own statement's snapshot was taken before that receipt was committed."""
    coupon_id = await claimed(pool, platform)
    await claims.record(pool, coupon_id, Transition("received", "usable", "tasks done", AT))
    issued = Transition("usable", "issued", "platform confirmed the send", AT)
    first = Receipt("cpn_1", "key-1", AT, AT, AT, {})
    second = replace(first, confirmed_at=AT + timedelta(seconds=1))
    async with pool.connection() as other:
        async with other.transaction():
            await other.execute(
                "INSERT INTO receipts (coupon_id, platform_coupon_id, idempotency_key,"
                " sent_at, valid_until, confirmed_at, raw) VALUES (%s, %s, %s, %s, %s, %s, '{}')",
                (coupon_id, "cpn_1", "key-1", AT, AT, AT),
            )
            waiting = asyncio.create_task(claims.record_receipt(pool, coupon_id, second, issued))
            # Blocked on this transaction: only then is its commit "meanwhile".
            async with asyncio.timeout(10):
                while not await scalar(
                    pool,
                    "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                    other.info.backend_pid,
                ):
                    assert not waiting.done(), "the second attempt did not wait on the first"
                    await asyncio.sleep(0.01)
    assert await waiting == first
    state = await scalar(pool, "SELECT state FROM claims WHERE coupon_id = %s", coupon_id)
    assert state == "issued"


async def test_a_receipt_that_cannot_be_stored_leaves_the_coupon_usable(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    """The receipt and `issued` are one statement: when the receipt is refused (here its
    platform coupon id is another coupon's), no `issued` is recorded either."""
    usable = Transition("received", "usable", "tasks done", AT)
    issued = Transition("usable", "issued", "platform confirmed the send", AT)
    taken = await claimed(pool, platform)
    await claims.record(pool, taken, usable)
    await claims.record_receipt(pool, taken, Receipt("cpn_1", "key-1", AT, AT, AT, {}), issued)
    coupon_id = await claimed(pool, platform)
    await claims.record(pool, coupon_id, usable)
    with pytest.raises(psycopg.errors.UniqueViolation):
        await claims.record_receipt(
            pool, coupon_id, Receipt("cpn_1", "key-2", AT, AT, AT, {}), issued
        )
    view = await claims.coupon_view(pool, coupon_id)
    assert view is not None
    assert view["receipt"] is None
    assert view["claim"].state == "usable"
    assert [e["to_state"] for e in view["events"]] == ["received", "usable"]


@pytest.mark.parametrize(
    "statement",
    ["UPDATE coupon_events SET cause = 'rewritten'", "DELETE FROM coupon_events"],
)
async def test_the_event_table_is_append_only(
    pool: AsyncConnectionPool, platform: RestPlatform, statement: str
) -> None:
    await claimed(pool, platform)
    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute(statement)


async def test_a_new_claim_reads_as_the_ledger_holds_it_and_a_filter_finds_it(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    campaign = await new_campaign(pool, platform, per_user_limit=2)
    first, _ = await claims.claim(pool, campaign.id, "u1")
    assert first == await claims.get_claim(pool, first.coupon_id)
    second, _ = await claims.claim(pool, campaign.id, "u1")
    await claims.claim(pool, campaign.id, "u2")
    of_u1 = claims.ClaimFilter(campaign_id=campaign.id, user_id="u1")
    assert await claims.find_claims(pool, of_u1) == [first, second]
    newest = replace(of_u1, newest_first=True, limit=1)
    assert await claims.find_claims(pool, newest) == [second]


async def test_the_quota_holds_even_against_direct_sql(
    pool: AsyncConnectionPool, platform: RestPlatform
) -> None:
    campaign = await new_campaign(pool, platform, quota=1)
    await claims.claim(pool, campaign.id, "u1")
    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="slot_claimed_within_quota"):
            await conn.execute(
                "UPDATE campaign_slots SET claimed = claimed + 1 WHERE campaign_id = %s",
                (campaign.id,),
            )


async def test_a_create_intent_keeps_the_whole_request_and_gives_it_back_the_same(
    pool: AsyncConnectionPool,
) -> None:
    """What is resent is what was kept: every field, times to the microsecond with their
    offset (a platform that takes the whole request as the key's content compares them)."""
    spec = BatchSpec(
        request_key="batch-kept",
        name="kept",
        face_value_cents=500,
        min_spend_cents=100,
        quantity=7,
        valid_days=3,
        per_user_limit=2,
        starts_at=datetime(2026, 12, 1, 8, 0, 0, 123456, tzinfo=timezone(timedelta(hours=8))),
        ends_at=None,
    )
    intent = await batches.begin_create(pool, "kept", "default", spec)
    assert intent is not None and intent.request_key == "batch-kept"
    (pending,) = await batches.pending_intents(pool, "kept")
    kept = batches.spec_of(pending)
    assert kept == spec and kept.starts_at is not None
    assert kept.starts_at.utcoffset() == timedelta(hours=8)
    # The id is taken by the pending batch: a second create meets it.
    assert await batches.begin_create(pool, "kept", "default", spec) is None
    with pytest.raises(psycopg.errors.CheckViolation, match="pending_has_no_platform_id"):
        await pool_execute(pool, "UPDATE batches SET status = 'running' WHERE id = 'kept'")


async def pool_execute(pool: AsyncConnectionPool, statement: LiteralString) -> None:
    async with pool.connection() as conn:
        await conn.execute(statement)
