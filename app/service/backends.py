"""What every operation works with, `Backends` (the settings, the ledger's pool, Temporal's
client and the platform), how an entry point opens it, and the workflows an operation runs
to their end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHandle

from coupons.config import Settings
from coupons.ledger import db
from coupons.platforms.base import Platform
from coupons.platforms.configured import make_platform
from coupons.temporal import connect

R = TypeVar("R")


class Unavailable(Exception):
    """A part the operation needs did not answer (Temporal, a worker; for the command line
    also PostgreSQL or the platform); trying again later may succeed."""


class Backends:
    """What every operation works with, one per process (the API) or per command (the
    command line): the settings, the ledger's pool, Temporal's client and the platform.

    Temporal's client and the platform are the ones given, or reached on first use: the
    command line reaches them only for the commands that need them (pausing a runaway
    batch must not wait for Temporal)."""

    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool,
        client: Client | None = None,
        platform: Platform | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self._client = client
        self._platform = platform
        # Requests arriving together wait for one connection rather than each making its own.
        self._connecting = asyncio.Lock()

    async def client(self) -> Client:
        async with self._connecting:
            if self._client is None:
                try:
                    self._client = await connect(self.settings.with_stack_secrets())
                except RuntimeError as err:
                    raise Unavailable(
                        f"cannot reach Temporal at {self.settings.temporal_address} ({err}); "
                        "is `make run` up, with the same environment as this shell?"
                    ) from None
            return self._client

    @property
    def platform(self) -> Platform:
        if self._platform is None:
            self._platform = make_platform(self.settings.with_stack_secrets())
        return self._platform

    async def aclose(self) -> None:
        """Close the platform's client (the pool and Temporal's client are the opener's)."""
        if self._platform is not None:
            await self._platform.aclose()


async def migrate(settings: Settings) -> None:
    """Bring the ledger's schema up to date (the API does at start)."""
    await db.migrate_url(settings.database_url)


@contextlib.asynccontextmanager
async def opened(
    settings: Settings,
    *,
    pool_size: int,
    timeout_s: float = 30.0,
    client: Client | None = None,
    platform: Platform | None = None,
    warm: bool = False,
) -> AsyncIterator[Backends]:
    """The backends over a new pool for the life of the block; the platform's client is
    closed at its end (`timeout_s` bounds the wait for a connection). A `warm` pool opens
    all its connections at once, for a server whose first burst must not wait for them."""
    made: Backends | None = None
    try:
        async with db.pool(
            settings.database_url,
            max_size=pool_size,
            min_size=pool_size if warm else 1,
            timeout_s=timeout_s,
        ) as pool:
            made = Backends(settings, pool, client, platform)
            yield made
    finally:
        if made is not None:
            await made.aclose()
        elif platform is not None:
            await platform.aclose()


async def run_workflow(
    b: Backends,
    workflow: str,
    arg: object,
    workflow_id: str,
    result: type[R],
    timeout_s: float,
    *,
    run_timeout: timedelta,
) -> R:
    """Start a workflow and wait for its result, `Unavailable` after `timeout_s`. The run
    itself ends after `run_timeout` whatever happens (see app/schedules.py: a pinned run
    whose workers are gone would otherwise wait for ever)."""
    handle: WorkflowHandle[Any, R] = await (await b.client()).start_workflow(
        workflow,
        arg,
        id=workflow_id,
        task_queue=b.settings.task_queue,
        result_type=result,
        execution_timeout=run_timeout,
    )
    try:
        async with asyncio.timeout(timeout_s):
            return await handle.result()
    except TimeoutError:
        raise Unavailable(
            f"workflow {workflow_id} did not finish within {timeout_s:g} s (is the worker "
            f"polling task queue {b.settings.task_queue!r}?); it stays queued and runs then"
        ) from None
