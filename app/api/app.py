"""The FastAPI application: its parts, its error answers and its OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from app import service
from app.api import callbacks, catalog, codec, coupons, metrics
from app.api.limits import MAX_BODY_BYTES, BodyLimit
from app.api.models import Health
from app.api.problems import PROBLEM_JSON, TITLES, ApiProblem, Problem, handle
from app.api.routing import BEARER, BEARER_SCHEME, IDEMPOTENCY_KEEP
from app.heap import freeze_startup_heap
from app.service import Backends, Unavailable
from coupons.config import Settings
from coupons.errors import Refused
from coupons.platforms.base import PlatformError
from coupons.platforms.configured import make_platform

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 600.0

DESCRIPTION = f"""\
Coupons whose benefit waits for a task: claim, report tasks, read state and receipts;
batches and campaigns for operators.

- **Auth**: `Authorization: Bearer <key>` (`starter.py tenant create` prints the first key).
  Scope `app` claims, reads, completes and cancels; `admin` also manages batches and
  campaigns. A key sees only its tenant's: anything else is `404 not_found`.
- **Errors**: `application/problem+json` (RFC 9457) with a stable `code` (`sold_out`,
  `unknown_task`, `wrong_state`, `not_found`, `invalid_request`, ...) and, for invalid
  requests, `errors` naming each field.
- **Idempotency**: POST and PATCH take an `Idempotency-Key` header: a repeat with the same
  key and body gets the first answer; another body under the same key is
  `422 idempotency_key_reused`; a repeat while the first is still running
  `409 idempotency_in_flight`.
- Bodies over {MAX_BODY_BYTES // 1024} KiB are refused (413).
"""


async def _prune_forever(backends: Backends) -> None:
    while True:
        try:
            pruned = await service.prune_answers(backends, IDEMPOTENCY_KEEP)
            if pruned:
                log.info("forgot %d idempotent answers older than %s", pruned, IDEMPOTENCY_KEEP)
        except (PoolTimeout, psycopg.OperationalError) as err:
            log.warning("pruning idempotency keys failed: %s", err)
        await asyncio.sleep(PRUNE_EVERY_S)


@contextlib.asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[Backends]:
    """Open what the API works with, for the life of the process. Temporal is reached on
    first use, not here: claims are answered by the ledger alone, so the API serves them
    while Temporal is down or restarting."""
    await service.migrate(settings)
    platform = make_platform(settings)
    # Warm: a campaign's opening burst finds every connection open.
    async with service.opened(
        settings, pool_size=settings.db_pool_size, platform=platform, warm=True
    ) as opened:
        yield opened


def create_app(settings: Settings, backends: Backends | None = None) -> FastAPI:
    """The API; with `backends`, it works with those (tests) instead of opening its own
    when it starts."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if backends is not None:
            yield
            return
        if settings.platform_callback_secret is None:
            log.warning(
                "no PLATFORM_CALLBACK_SECRET: every platform callback will be refused "
                "(coupons are still found redeemed by polling)"
            )
        async with _running(settings) as opened:
            app.state.backends = opened
            pruning = asyncio.create_task(_prune_forever(opened))
            freeze_startup_heap()
            log.info("API serving on %s (docs %s/docs)", settings.api_url, settings.api_url)
            try:
                yield
            finally:
                pruning.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pruning

    app = FastAPI(
        title="Coupon lifecycle service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url=None,  # served below, from files shipped in a wheel: no CDN, works offline
        redoc_url=None,
        # Operation ids are the endpoint functions' names: claim, get_coupon, ...
        generate_unique_id_function=lambda route: route.name,
        # The API's metrics are Prometheus' (/metrics). FastAPI's own OpenTelemetry hooks,
        # with no provider configured, still asked for one on every request: 5% of the
        # API's CPU in a claim burst (py-spy, 2026-12-06).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.backends = backends
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    for kind in (
        ApiProblem,
        Refused,
        RequestValidationError,
        Unavailable,
        StarletteHTTPException,
        PoolTimeout,
        psycopg.OperationalError,
        PlatformError,
        Exception,  # a bug: a problem+json 500, logged with its traceback
    ):
        app.add_exception_handler(kind, handle)

    @app.get(
        "/health",
        tags=["service"],
        summary="Whether the API and its ledger answer",
        responses={503: {"model": Problem, "description": TITLES[503]}},
    )
    async def health() -> Health:
        parts: Backends = app.state.backends
        async with parts.pool.connection() as conn:
            await conn.execute("SELECT 1")
        return Health(status="ok")

    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title}: API docs",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    app.include_router(coupons.router)
    app.include_router(catalog.router)
    app.include_router(callbacks.router)
    app.include_router(codec.router)
    app.include_router(metrics.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _bearer_scheme(
                _problem_responses(
                    get_openapi(
                        title=app.title,
                        version=app.version,
                        description=app.description,
                        routes=app.routes,
                    )
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _bearer_scheme(schema: dict[str, Any]) -> dict[str, Any]:
    """The bearer key's scheme, which the /v1 operations name (app.api.routing.BEARER)."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER] = BEARER_SCHEME
    return schema


def _problem_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Every error response is `application/problem+json` with the Problem schema
    (FastAPI would call them application/json, and 422 its own validation shape)."""
    problem = {"$ref": "#/components/schemas/Problem"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {PROBLEM_JSON: {"schema": problem}}
                    response.setdefault("description", "Error")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
