"""The two ways the benchmark claims a coupon, behind one shape (`Claimer`), and the
campaigns it claims from.

In process, claims go straight to `ClaimService` on a warm pool of DB_POOL_SIZE
connections (the service's own setting), as an app server's code would call it. Through
the HTTP API, a claim is `POST /v1/campaigns/{id}/claims` with a tenant's app key from
one aiohttp session of CLAIM_POOL connections to the API's processes (each with a warm
pool of DB_POOL_SIZE): the key check, the tenant's campaign, the JSON in and out and uvicorn
come on top.

Either way a claim comes back as one word: GRANTED, "already_held", a refusal code, or
"error: <what>" (an unexpected failure is counted, not raised: one failed claim must not
end a run of thousands).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import aiohttp
from temporalio.client import Client

from app.claims import ClaimRefused, ClaimService
from bench.end_to_end import TASK
from coupons import catalog
from coupons.catalog.campaigns import ensure_campaign
from coupons.config import Settings
from coupons.ledger import db
from coupons.ledger.campaigns import CampaignSpec, Task
from coupons.platforms.configured import make_platform
from coupons.tenants import create_key, create_tenant

log = logging.getLogger(__name__)

# Claims in flight beyond a pool queue for a connection, as they would behind an app
# server's pool. The HTTP path has this many clients: many app servers at once.
CLAIM_POOL = 100
# A 503 from the API ("the claim is recorded but its workflow could not be started yet")
# asks the client to repeat the claim: the bench's client does, this many times in all.
API_ATTEMPTS = 5
GRANTED = "granted"
FAILED = "error: "
TASK_DEADLINE = timedelta(days=7)


class Claimer(Protocol):
    """One path to the claim: a context manager whose `claim` never raises."""

    path: str

    async def __aenter__(self) -> Claimer: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def claim(self, campaign: str, user: str) -> str: ...

    def figures(self) -> dict[str, Any]:
        """What the path was (connections) and did (repeats) since it was opened."""
        ...


def _failed(path: str, err: Exception) -> str:
    log.warning("claim through %s failed: %r", path, err)
    return f"{FAILED}{type(err).__name__}"


def tally(outcomes: Counter[str]) -> dict[str, Any]:
    """Answers counted: granted, refused (by code), failed (by error)."""
    return {
        "granted": outcomes.get(GRANTED, 0),
        "refused": {k: n for k, n in outcomes.items() if k != GRANTED and not k.startswith(FAILED)},
        "failed": {k[len(FAILED) :]: n for k, n in outcomes.items() if k.startswith(FAILED)},
    }


class InProcess:
    """`ClaimService.claim` on a warm pool of DB_POOL_SIZE connections. A pool of 100
    on this 2-core PostgreSQL answered a burst at half the rate of one of 20: backends
    past the cores only take turns (measured, tests run alongside: 1,393 against 3,004
    claims/s)."""

    path = "in process"

    def __init__(self, url: str, client: Client, settings: Settings) -> None:
        size = settings.db_pool_size
        self._pool = db.pool(url, max_size=size, min_size=size, timeout_s=120)
        self._service = ClaimService(self._pool, client, settings)

    async def __aenter__(self) -> InProcess:
        await self._pool.open(wait=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pool.close()

    async def claim(self, campaign: str, user: str) -> str:
        try:
            result = await self._service.claim(campaign, user)
        except ClaimRefused as err:
            return err.code
        except Exception as err:
            return _failed(self.path, err)
        return GRANTED if result.created else "already_held"

    def figures(self) -> dict[str, Any]:
        return {"pool_connections": self._pool.max_size}


class ThroughApi:
    """The HTTP API with a tenant's app key, from one aiohttp session of CLAIM_POOL kept-alive
    connections, every claim taking the next free one, as that many app servers would.
    aiohttp, not httpx: on the machine the API shares with its load generator, httpx (its
    pool and h11, pure Python) spent 0.9 to 1.0 ms of CPU per claim, aiohttp 0.25 ms."""

    path = "HTTP API"

    def __init__(self, settings: Settings, api_key: str) -> None:
        self._settings = settings
        self._api_key = api_key
        self._http: aiohttp.ClientSession | None = None
        self.retried: Counter[str] = Counter()

    async def __aenter__(self) -> ThroughApi:
        self._http = aiohttp.ClientSession(
            base_url=self._settings.api_url,
            headers={"Authorization": f"Bearer {self._api_key}"},
            connector=aiohttp.TCPConnector(limit=CLAIM_POOL),
            timeout=aiohttp.ClientTimeout(total=120),
            trust_env=False,  # a proxy from the environment must not carry our calls
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def _post(self, path: str, user: str) -> _Answer | Exception:
        """The answer, or the error of a claim that got none (a timeout, a dropped
        connection)."""
        assert self._http is not None, "used outside `async with`"
        try:
            async with self._http.post(path, json={"user_id": user}) as response:
                return _Answer(response.status, response.headers, await response.read())
        except (aiohttp.ClientError, TimeoutError) as err:
            return err

    async def claim(self, campaign: str, user: str) -> str:
        """A claim as an app makes it: repeated on a 503 (the API asks for it) or when no
        answer came back (a claim is idempotent per user: a repeat returns the coupon the
        first one made, 200)."""
        try:
            return await self._claim(f"/v1/campaigns/{campaign}/claims", user)
        except Exception as err:
            return _failed(self.path, err)

    async def _claim(self, path: str, user: str) -> str:
        for attempt in range(1, API_ATTEMPTS + 1):
            last = attempt == API_ATTEMPTS
            response = await self._post(path, user)
            if isinstance(response, Exception):
                if last:
                    return type(response).__name__
                self.retried[type(response).__name__] += 1
                continue
            status = response.status
            if status == 201 or (status == 200 and attempt > 1):
                return GRANTED
            if status == 503 and not last:
                self.retried["503"] += 1
                await asyncio.sleep(_retry_after(response.headers))
                continue
            if status == 200:
                return "already_held"
            try:
                return str(json.loads(response.body)["code"])
            except (ValueError, KeyError, TypeError):
                return f"http_{status}"
        raise AssertionError("unreachable: the last attempt returns")

    def figures(self) -> dict[str, Any]:
        return {
            "http_connections": CLAIM_POOL,
            "api_pool_connections": self._settings.db_pool_size,
            "retried": dict(self.retried),
        }


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def _retry_after(headers: Mapping[str, str]) -> float:
    try:
        return min(max(float(headers.get("Retry-After", "1")), 0.0), 1.0)
    except ValueError:
        return 1.0


# ----- campaigns ------------------------------------------------------------------------


async def service_campaign(settings: Settings, campaign_id: str, quota: int) -> None:
    """A campaign of `quota` on a batch of its own id, as `starter.py` makes one."""
    platform_client = make_platform(settings)
    try:
        async with db.pool(settings.database_url, max_size=2) as pool:
            await ensure_campaign(
                pool,
                platform_client,
                campaign_id,
                required_tasks=[TASK],
                quota=quota,
                task_deadline=TASK_DEADLINE,
            )
    finally:
        await platform_client.aclose()


async def api_tenant(settings: Settings, name: str) -> tuple[str, str]:
    """A tenant with an app key: its id and the key."""
    async with db.pool(settings.database_url, max_size=2) as pool:
        tenant, _ = await create_tenant(pool, name)
        key = await create_key(pool, tenant.id, "app")
    return tenant.id, key.api_key


async def api_campaign(settings: Settings, tenant_id: str, campaign_id: str, quota: int) -> None:
    """A campaign of the tenant's, sized to `quota`, on a batch of its own."""
    platform = make_platform(settings)
    try:
        async with db.pool(settings.database_url, max_size=2) as pool:
            await catalog.batches.create_batch(
                pool, platform, campaign_id, quantity=quota, tenant_id=tenant_id
            )
            await catalog.campaigns.create_campaign(
                pool,
                CampaignSpec(
                    id=campaign_id,
                    batch_id=campaign_id,
                    quota=quota,
                    tasks=[Task(TASK, TASK)],
                    task_deadline=TASK_DEADLINE,
                    tenant_id=tenant_id,
                ),
            )
    finally:
        await platform.aclose()
