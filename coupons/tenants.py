"""Tenants and API keys: issuing a key (shown once), and checking one on a request.

A key reads `ck_<key id>_<secret>`: the id finds the row, the secret is compared by its
SHA-256 digest in constant time. Secrets are 32 random bytes, so a slow password hash
would add nothing but latency to every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from coupons.errors import InvalidField, Refused
from coupons.ledger import tenants as ledger
from coupons.ledger.tenants import DEFAULT_TENANT, ApiKey, Tenant

SCOPES = ("app", "admin")
_PREFIX = "ck_"
_KEY = re.compile(r"ck_(k[0-9a-f]{16})_([A-Za-z0-9_-]{20,100})")

__all__ = ["DEFAULT_TENANT", "SCOPES", "ApiKey", "IssuedKey", "Tenant", "authenticate"]


@dataclass
class IssuedKey:
    """A new key: `api_key` is the only time the secret is ever shown."""

    tenant_id: str
    key_id: str
    scope: str
    api_key: str


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def create_tenant(pool: AsyncConnectionPool, name: str) -> tuple[Tenant, IssuedKey]:
    """A new tenant with its first key, scoped `admin`."""
    name = name.strip()
    if not 1 <= len(name) <= 100 or not name.isprintable():
        raise InvalidField("name", "must be 1 to 100 printable characters")
    key_id, secret = _new_secret()
    created = await ledger.create_tenant(
        pool, f"tnt_{secrets.token_hex(8)}", name, key_id, "admin", _digest(secret)
    )
    if created is None:
        raise Refused("tenant_exists", f"a tenant named {name!r} exists")
    tenant, key = created
    return tenant, IssuedKey(tenant.id, key.id, key.scope, _key_text(key.id, secret))


def _new_secret() -> tuple[str, str]:
    return f"k{secrets.token_hex(8)}", secrets.token_urlsafe(32)


def _key_text(key_id: str, secret: str) -> str:
    return f"{_PREFIX}{key_id}_{secret}"


async def create_key(pool: AsyncConnectionPool, tenant_id: str, scope: str) -> IssuedKey:
    if scope not in SCOPES:
        raise InvalidField("scope", f"{scope!r} is not one of {', '.join(SCOPES)}")
    if await ledger.get_tenant(pool, tenant_id) is None:
        raise Refused("unknown_tenant", f"no tenant {tenant_id!r}")
    key_id, secret = _new_secret()
    await ledger.add_key(pool, key_id, tenant_id, scope, _digest(secret))
    return IssuedKey(tenant_id, key_id, scope, _key_text(key_id, secret))


async def revoke_key(pool: AsyncConnectionPool, key_id: str) -> ApiKey:
    key = await ledger.revoke_key(pool, key_id)
    if key is None:
        raise Refused("unknown_key", f"no key {key_id!r}")
    return key


async def authenticate(pool: AsyncConnectionPool, presented: str) -> ApiKey | None:
    """The live key `presented` stands for, or None (unknown, wrong secret, revoked)."""
    # The form is checked before any query: nothing a caller sends reaches SQL unchecked.
    match = _KEY.fullmatch(presented)
    if match is None:
        return None
    key_id, secret = match.groups()
    key = await ledger.get_key(pool, key_id)
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.secret_sha256, _digest(secret)):
        return None
    return key
