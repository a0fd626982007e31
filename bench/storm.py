"""The claim storm: many concurrent claims against a small quota, by two paths.

In process, claims go straight to `ClaimService` on a pool of STORM_POOL connections, as
the worker's own code would call it. Through the HTTP API, the same storm is
`POST /v1/campaigns/{id}/claims` with a tenant's app key from STORM_POOL clients of one
HTTP connection each to the API process (whose own pool is DB_POOL_SIZE): the key check,
the tenant's campaign, the JSON in and out and uvicorn come on top. Each path has its own
campaign and quota.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
from temporalio.client import Client

from app.claims import ClaimRefused, ClaimService
from bench.end_to_end import TASK
from bench.load import progress
from bench.proc import CpuSplit
from bench.stats import summary_ms
from coupons import catalog
from coupons.config import Settings
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.ledger.campaigns import CampaignSpec, Task
from coupons.platforms.configured import make_platform
from coupons.tenants import create_key, create_tenant

# The pool bounds the connections, not the claims: all claims are in flight at once and
# queue for a connection, as they would behind an API server's pool. The API path gets as
# many HTTP connections.
STORM_POOL = 100
# A 503 from the API ("the claim is recorded but its workflow could not be started yet")
# asks the client to repeat the claim: the storm's client does, this many times in all.
API_ATTEMPTS = 5
GRANTED = "granted"

ClaimOnce = Callable[[str], Awaitable[str]]


async def _storm(claims: int, one: ClaimOnce) -> tuple[Counter[str], list[float], float]:
    """Every claim at once, each by its own user; what each came to (GRANTED or a refusal
    code), its latency, and the wall time of the whole storm."""
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []

    async def timed(i: int) -> None:
        began = time.monotonic()
        outcomes[await one(f"storm-{i}")] += 1
        latencies.append(time.monotonic() - began)

    began = time.monotonic()
    await asyncio.gather(*(timed(i) for i in range(claims)))
    return outcomes, latencies, time.monotonic() - began


async def _summary(
    path: str,
    url: str,
    campaign: str,
    *,
    quota: int,
    outcomes: Counter[str],
    latencies: list[float],
    wall_s: float,
    cpu: dict[str, dict[str, float]],
) -> dict[str, Any]:
    async with db.pool(url, max_size=1) as pool:
        in_ledger = sum((await ledger.count_by_state(pool, campaign)).values())
    granted = outcomes.pop(GRANTED, 0)
    claims = len(latencies)
    progress(
        f"claim storm ({path})",
        f"{claims} claims in {wall_s:.1f} s: {granted} granted of {quota}",
    )
    return {
        "path": path,
        "claims": claims,
        "quota": quota,
        "granted": granted,
        "claims_in_ledger": in_ledger,
        "refused": dict(outcomes),
        "wall_s": round(wall_s, 2),
        "throughput_per_s": round(claims / wall_s, 1) if wall_s > 0 else 0.0,
        "claim_latency_ms": summary_ms(latencies),
        "cpu_by_process": cpu,
    }


async def measure_storm(
    url: str,
    client: Client,
    settings: Settings,
    campaign: str,
    *,
    claims: int,
    quota: int,
    processes: dict[str, int],
) -> dict[str, Any]:
    """The storm in process, through `ClaimService`."""
    async with db.pool(url, max_size=STORM_POOL, timeout_s=120) as pool:
        service = ClaimService(pool, client, settings)

        async def one(user: str) -> str:
            try:
                result = await service.claim(campaign, user)
            except ClaimRefused as err:
                return err.code
            return GRANTED if result.created else "already_held"

        cpu = CpuSplit(processes)
        cpu.start()
        outcomes, latencies, wall_s = await _storm(claims, one)
        split = cpu.stop(wall_s)
    summary = await _summary(
        "in process",
        url,
        campaign,
        quota=quota,
        outcomes=outcomes,
        latencies=latencies,
        wall_s=wall_s,
        cpu=split,
    )
    return {**summary, "pool_connections": STORM_POOL}


async def api_campaign(settings: Settings, campaign_id: str, quota: int) -> str:
    """A tenant with an app key, and a campaign of its own sized to `quota` on a batch of
    its own; the key."""
    platform = make_platform(settings)
    try:
        async with db.pool(settings.database_url, max_size=2) as pool:
            tenant, _ = await create_tenant(pool, f"{campaign_id} tenant")
            key = await create_key(pool, tenant.id, "app")
            await catalog.batches.create_batch(
                pool, platform, campaign_id, quantity=quota, tenant_id=tenant.id
            )
            await catalog.campaigns.create_campaign(
                pool,
                CampaignSpec(
                    id=campaign_id,
                    batch_id=campaign_id,
                    quota=quota,
                    tasks=[Task(TASK, TASK)],
                    task_deadline=timedelta(days=7),
                    tenant_id=tenant.id,
                ),
            )
    finally:
        await platform.aclose()
    return key.api_key


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("Retry-After", "1")), 0.0), 1.0)
    except ValueError:
        return 1.0


async def measure_storm_api(
    settings: Settings,
    campaign: str,
    api_key: str,
    *,
    claims: int,
    quota: int,
    processes: dict[str, int],
) -> dict[str, Any]:
    """The storm through the HTTP API, with the tenant's app key.

    STORM_POOL clients of one connection each, every claim taking the next free one, as
    that many app servers would: one httpx client with that many connections spends
    several milliseconds of CPU per request in its own pool (measured: 6.4 ms with 100
    connections, 0.7 ms with 100 clients of one), enough to make the load generator the
    bottleneck of the storm.
    """
    retried: Counter[str] = Counter()
    idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
    # One TLS context for them all (unused over plain HTTP): each client would otherwise
    # load the certificate store again, 20 ms apiece.
    tls = ssl.create_default_context()
    for _ in range(STORM_POOL):
        idle.put_nowait(
            httpx.AsyncClient(
                base_url=settings.api_url,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=120,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                verify=tls,
                trust_env=False,  # a proxy from the environment must not carry our calls
            )
        )

    async def post(path: str, user: str) -> httpx.Response | httpx.TransportError:
        http = await idle.get()
        try:
            return await http.post(path, json={"user_id": user})
        except httpx.TransportError as err:
            return err
        finally:
            idle.put_nowait(http)

    async def one(user: str) -> str:
        """A claim as an app makes it: repeated on a 503 (the API asks for it) or when no
        answer came back (a claim is idempotent per user: a repeat returns the coupon the
        first one made, 200)."""
        path = f"/v1/campaigns/{campaign}/claims"
        for attempt in range(1, API_ATTEMPTS + 1):
            last = attempt == API_ATTEMPTS
            response = await post(path, user)
            if isinstance(response, httpx.TransportError):
                if last:
                    return type(response).__name__
                retried[type(response).__name__] += 1
                continue
            status = response.status_code
            if status == 201 or (status == 200 and attempt > 1):
                return GRANTED
            if status == 503 and not last:
                retried["503"] += 1
                await asyncio.sleep(_retry_after(response))
                continue
            if status == 200:
                return "already_held"
            try:
                return str(response.json()["code"])
            except (ValueError, KeyError, TypeError):
                return f"http_{status}"
        raise AssertionError("unreachable: the last attempt returns")

    try:
        cpu = CpuSplit(processes)
        cpu.start()
        outcomes, latencies, wall_s = await _storm(claims, one)
        split = cpu.stop(wall_s)
    finally:
        while not idle.empty():
            await idle.get_nowait().aclose()
    summary = await _summary(
        "HTTP API",
        settings.database_url,
        campaign,
        quota=quota,
        outcomes=outcomes,
        latencies=latencies,
        wall_s=wall_s,
        cpu=split,
    )
    return {
        **summary,
        "http_connections": STORM_POOL,
        "api_pool_connections": settings.db_pool_size,
        "retried": dict(retried),
    }
