"""What every entry point needs from Temporal: a client built from the settings."""

from __future__ import annotations

from temporalio.client import Client

from coupons.config import Settings


async def connect(settings: Settings) -> Client:
    return await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
