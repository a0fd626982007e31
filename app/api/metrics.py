"""GET /metrics: the API's Prometheus metrics (`coupons.metrics.api_registry`).

Unauthenticated like /health, as scrapers expect; it holds counts, never an id or a secret.
Left out of the OpenAPI document: it is for Prometheus, not for apps (and schemathesis
then leaves it alone).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import choose_encoder

from coupons.metrics import api_registry

router = APIRouter(tags=["service"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    # The text format, or OpenMetrics when the scraper asks for it.
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(api_registry()), media_type=content_type)
