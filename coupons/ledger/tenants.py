"""Tenants and their API keys (only a digest of each secret is stored)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from coupons.ledger import db

DEFAULT_TENANT = "default"


@dataclass
class Tenant:
    id: str
    name: str
    created_at: datetime


@dataclass
class ApiKey:
    id: str
    tenant_id: str
    scope: str
    secret_sha256: bytes
    created_at: datetime
    revoked_at: datetime | None


_KEY_COLUMNS = "id, tenant_id, scope, secret_sha256, created_at, revoked_at"


async def create_tenant(
    pool: AsyncConnectionPool,
    tenant_id: str,
    name: str,
    key_id: str,
    scope: str,
    secret_sha256: bytes,
) -> tuple[Tenant, ApiKey] | None:
    """The new tenant with its first key, written together; None when the name is taken."""
    async with pool.connection() as conn, conn.transaction():
        tenant = await db.fetch_one(
            conn,
            Tenant,
            "INSERT INTO tenants (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING"
            " RETURNING id, name, created_at",
            (tenant_id, name),
        )
        if tenant is None:
            return None
        return tenant, await add_key(conn, key_id, tenant_id, scope, secret_sha256)


async def get_tenant(pool: AsyncConnectionPool, tenant_id: str) -> Tenant | None:
    return await db.fetch_one(
        pool, Tenant, "SELECT id, name, created_at FROM tenants WHERE id = %s", (tenant_id,)
    )


async def list_tenants(pool: AsyncConnectionPool) -> list[Tenant]:
    return await db.fetch_all(
        pool, Tenant, "SELECT id, name, created_at FROM tenants ORDER BY created_at, id"
    )


async def add_key(
    source: db.Source, key_id: str, tenant_id: str, scope: str, secret_sha256: bytes
) -> ApiKey:
    return await db.fetch_written(
        source,
        ApiKey,
        "INSERT INTO api_keys (id, tenant_id, scope, secret_sha256) VALUES (%s, %s, %s, %s)"
        f" RETURNING {_KEY_COLUMNS}",
        (key_id, tenant_id, scope, secret_sha256),
    )


async def get_key(pool: AsyncConnectionPool, key_id: str) -> ApiKey | None:
    return await db.fetch_one(
        pool, ApiKey, f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = %s", (key_id,)
    )


async def list_keys(pool: AsyncConnectionPool, tenant_id: str) -> list[ApiKey]:
    return await db.fetch_all(
        pool,
        ApiKey,
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant_id = %s ORDER BY created_at, id",
        (tenant_id,),
    )


async def revoke_key(pool: AsyncConnectionPool, key_id: str) -> ApiKey | None:
    """Revoke the key (a no-op when it already is); None when there is no such key."""
    return await db.fetch_one(
        pool,
        ApiKey,
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = %s"
        f" RETURNING {_KEY_COLUMNS}",
        (key_id,),
    )
