"""Tenants and API keys: issuing a key (shown once), and checking one on a request.

A key reads `ck_<key id>_<secret>`: the id finds the row, the secret is compared by its
SHA-256 digest in constant time. Secrets are 32 random bytes, so a slow password hash
would add nothing but latency to every request.

A process looks a key's row up at most once per KEY_FRESH_S (`KeyLookups`), not once per
request: a key revoked by this process is refused at once, one revoked by another process
(the command line beside a running API) within KEY_FRESH_S.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from coupons.errors import InvalidField, Refused
from coupons.ledger import tenants as ledger
from coupons.ledger.tenants import DEFAULT_TENANT, ApiKey, Tenant

SCOPES = ("app", "admin")
_PREFIX = "ck_"
_KEY = re.compile(r"ck_(k[0-9a-f]{16})_([A-Za-z0-9_-]{20,100})")

# How long a key's row, once read, is trusted without reading it again: the bound on
# honouring a key revoked by another process. One read per key per second is nothing to the
# ledger; one per request was a round trip of each API request's own.
KEY_FRESH_S = 1.0
# Keys remembered at most (found ones only: an unknown id is never kept).
MAX_KEYS = 10_000

__all__ = [
    "DEFAULT_TENANT",
    "KEY_FRESH_S",
    "SCOPES",
    "ApiKey",
    "IssuedKey",
    "KeyLookups",
    "Tenant",
    "authenticate",
]


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
    LOOKUPS.forget(key_id)
    if key is None:
        raise Refused("unknown_key", f"no key {key_id!r}")
    return key


@dataclass(frozen=True)
class _Lookup:
    pool: weakref.ref[AsyncConnectionPool]  # not kept alive by a key read through it
    began: float  # on KeyLookups' clock
    row: asyncio.Future[ApiKey | None]


class KeyLookups:
    """Key rows as the ledger holds them, each read at most once per `fresh_s` by this
    process; requests arriving together for a key share one read. A revocation made through
    `revoke_key` here is seen at once (`forget`), one made elsewhere within `fresh_s`."""

    def __init__(
        self, fresh_s: float = KEY_FRESH_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fresh_s = fresh_s
        self._clock = clock
        self._known: dict[str, _Lookup] = {}

    async def get(self, pool: AsyncConnectionPool, key_id: str) -> ApiKey | None:
        now = self._clock()
        lookup = self._known.get(key_id)
        if lookup is None or lookup.pool() is not pool or now - lookup.began >= self._fresh_s:
            lookup = self._read(pool, key_id, now)
        # Shielded: one caller cancelled (its client went away) must not cancel the read
        # that the others wait for.
        return await asyncio.shield(lookup.row)

    def forget(self, key_id: str) -> None:
        """Read the key again on its next use (it was revoked in this process)."""
        self._known.pop(key_id, None)

    def _read(self, pool: AsyncConnectionPool, key_id: str, now: float) -> _Lookup:
        if len(self._known) >= MAX_KEYS:
            fresh = {k: v for k, v in self._known.items() if now - v.began < self._fresh_s}
            self._known = fresh if len(fresh) < MAX_KEYS else {}
        row = asyncio.ensure_future(ledger.get_key(pool, key_id))
        lookup = _Lookup(weakref.ref(pool), now, row)
        self._known[key_id] = lookup

        def settled(read: asyncio.Future[ApiKey | None]) -> None:
            # Only a found key's row is kept (a revoked one stays revoked): an unknown id (a
            # typo, a guess, a key made a moment later) and a failed read are read again.
            failed = read.cancelled() or read.exception() is not None
            if (failed or read.result() is None) and self._known.get(key_id) is lookup:
                del self._known[key_id]

        lookup.row.add_done_callback(settled)
        return lookup


# This process's: the API's requests, and `revoke_key` forgetting what it revoked.
LOOKUPS = KeyLookups()


async def authenticate(
    pool: AsyncConnectionPool, presented: str, lookups: KeyLookups = LOOKUPS
) -> ApiKey | None:
    """The live key `presented` stands for, or None (unknown, wrong secret, revoked)."""
    # The form is checked before any query: nothing a caller sends reaches SQL unchecked.
    match = _KEY.fullmatch(presented)
    if match is None:
        return None
    key_id, secret = match.groups()
    key = await lookups.get(pool, key_id)
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.secret_sha256, _digest(secret)):
        return None
    return key
