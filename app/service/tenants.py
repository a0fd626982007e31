"""Operations on tenants and their API keys (`coupons.tenants`)."""

from __future__ import annotations

from app.service.backends import Backends
from coupons import tenants
from coupons.errors import Refused
from coupons.ledger import tenants as tenant_ledger
from coupons.ledger.tenants import ApiKey, Tenant
from coupons.tenants import IssuedKey


async def known_tenant(b: Backends, tenant_id: str) -> str:
    """The tenant's id; refused `unknown_tenant`."""
    if await tenant_ledger.get_tenant(b.pool, tenant_id) is None:
        raise Refused("unknown_tenant", f"no tenant {tenant_id!r}")
    return tenant_id


async def create_tenant(b: Backends, name: str) -> tuple[Tenant, IssuedKey]:
    """A new tenant and its first key (scope admin); the key's secret is in the answer
    only."""
    return await tenants.create_tenant(b.pool, name)


async def list_tenants(b: Backends) -> list[Tenant]:
    return await tenant_ledger.list_tenants(b.pool)


async def create_key(b: Backends, tenant_id: str, scope: str) -> IssuedKey:
    return await tenants.create_key(b.pool, tenant_id, scope)


async def list_keys(b: Backends, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys (never their secrets); refused `unknown_tenant`."""
    return await tenant_ledger.list_keys(b.pool, await known_tenant(b, tenant_id))


async def revoke_key(b: Backends, key_id: str) -> ApiKey:
    return await tenants.revoke_key(b.pool, key_id)


async def authenticate(b: Backends, presented: str) -> ApiKey | None:
    """The key an API request presents, unless it is unknown or revoked."""
    return await tenants.authenticate(b.pool, presented)
