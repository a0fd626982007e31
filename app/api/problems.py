"""Every error the API answers, as `application/problem+json` (RFC 9457) with a stable `code`.

`REFUSALS` is the one table from a refusal's code (`coupons.errors.Refused`) to the HTTP
status and the code a client sees; the service's `unknown_coupon`, `unknown_campaign` and
`unknown_batch` all read `not_found`, whoever owns the thing.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.service import Unavailable
from coupons.errors import InvalidField, Refused
from coupons.platforms.base import PlatformError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

# code -> (HTTP status, the code the client sees)
REFUSALS: dict[str, tuple[int, str]] = {
    # the request itself
    "malformed_json": (400, "malformed_json"),
    "invalid_request": (422, "invalid_request"),
    "unknown_task": (422, "unknown_task"),
    "platform_refused": (422, "platform_refused"),
    "unsupported_media_type": (415, "unsupported_media_type"),
    "payload_too_large": (413, "payload_too_large"),
    # who asks
    "unauthorized": (401, "unauthorized"),
    "forbidden": (403, "forbidden"),
    # what it names: unknown, or another tenant's (the same answer)
    "not_found": (404, "not_found"),
    "unknown_coupon": (404, "not_found"),
    "unknown_campaign": (404, "not_found"),
    "unknown_batch": (404, "not_found"),
    "method_not_allowed": (405, "method_not_allowed"),
    # the state of the world, which a later request may not meet
    "sold_out": (409, "sold_out"),
    "limit_reached": (409, "limit_reached"),
    "campaign_paused": (409, "campaign_paused"),
    "campaign_ended": (409, "campaign_ended"),
    "campaign_not_open": (409, "campaign_not_open"),
    "campaign_closed": (409, "campaign_closed"),
    "batch_finished": (409, "batch_finished"),
    "wrong_state": (409, "wrong_state"),
    "campaign_exists": (409, "campaign_exists"),
    "batch_exists": (409, "batch_exists"),
    # idempotency
    "idempotency_key_reused": (422, "idempotency_key_reused"),
    "idempotency_in_flight": (409, "idempotency_in_flight"),
    # callbacks: a notice that overtook our receipt is delivered again by the platform
    "unknown_platform_coupon": (409, "unknown_platform_coupon"),
    # a part that did not answer; trying again later may work
    "unavailable": (503, "unavailable"),
}

TITLES = {
    400: "Malformed request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable request",
    500: "Internal error",
    503: "Service unavailable",
}


class FieldError(BaseModel):
    """One invalid part of a request."""

    field: str = Field(description="the field, e.g. `events[0].task`")
    location: str = Field(description="body, query, path or header")
    message: str


class Problem(BaseModel):
    """An error (RFC 9457 problem details), with a stable machine-readable `code`."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="a URI naming the kind of problem")
    title: str
    status: int
    detail: str
    instance: str = Field(description="the request path")
    code: str = Field(description="stable: act on it (sold_out, not_found, ...)")
    errors: list[FieldError] | None = Field(
        default=None, description="for invalid requests: each invalid field"
    )


class ApiProblem(Exception):
    """Answer with a problem of `code` (a key of REFUSALS)."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.errors = errors
        self.headers = headers


def problem(
    request: Request,
    code: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    status: int | None = None,
) -> JSONResponse:
    known_status, public = REFUSALS.get(code, (422, code))
    status = status or known_status
    body: dict[str, Any] = {
        "type": f"urn:coupons:problem:{public}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": public,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


def validation_problem(request: Request, exc: RequestValidationError) -> JSONResponse:
    raw = exc.errors()
    malformed = [e for e in raw if e.get("type") == "json_invalid"]
    if malformed:
        why = malformed[0].get("ctx", {}).get("error", "not JSON")
        at = malformed[0]["loc"][-1]
        return problem(request, "malformed_json", f"the body is not valid JSON: {why} at {at}")
    errors = []
    for e in raw:
        loc = tuple(e.get("loc", ()))
        where = str(loc[0]) if loc else "body"
        errors.append({"field": _field(loc[1:]), "location": where, "message": str(e["msg"])})
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(request, "invalid_request", f"invalid request: {summary}", errors=errors)


# The service names some fields as the command line's flags do; the API's bodies call them so.
_BODY_FIELDS = {
    "batch": "batch_id",
    "value": "face_value_cents",
    "min_spend": "min_spend_cents",
    "task_deadline": "task_deadline_s",
    "user": "user_id",
    "campaign": "campaign_id",
    "task": "task",
}


def refusal_problem(request: Request, exc: Refused) -> JSONResponse:
    if exc.code not in REFUSALS:
        log.warning("refusal code %r has no HTTP status in REFUSALS; answering 422", exc.code)
    if not isinstance(exc, InvalidField):
        return problem(request, exc.code, exc.message)
    name = _BODY_FIELDS.get(exc.field, exc.field)
    message = exc.message.removeprefix(f"{exc.field}: ")
    errors = [{"field": name, "location": "body", "message": message}]
    return problem(request, exc.code, f"{name}: {message}", errors=errors)


def problem_for(request: Request, exc: Exception) -> JSONResponse | None:
    """The answer an exception means, or None for one the API does not expect (a bug)."""
    if isinstance(exc, ApiProblem):
        return problem(request, exc.code, exc.detail, errors=exc.errors, headers=exc.headers)
    if isinstance(exc, Refused):
        return refusal_problem(request, exc)
    if isinstance(exc, RequestValidationError):
        return validation_problem(request, exc)
    if isinstance(exc, Unavailable):
        return problem(request, "unavailable", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, PlatformError):
        # Refusals were turned into ours by the catalog; this is an outage or a rate limit.
        log.warning("the platform failed: %s", exc)
        return problem(
            request, "unavailable", f"the platform failed: {exc}", headers={"Retry-After": "5"}
        )
    if isinstance(exc, (PoolTimeout, psycopg.OperationalError)):
        log.warning("PostgreSQL unavailable: %s", exc)
        return problem(
            request, "unavailable", "the ledger cannot be reached", headers={"Retry-After": "2"}
        )
    if isinstance(exc, StarletteHTTPException):
        # Starlette's own answers: no route, a method the path does not take, ...
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "unavailable"
        )
        detail = {
            404: f"no such path: {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed(request))
        return problem(request, code, detail, headers=headers or None, status=exc.status_code)
    return None


def _allowed(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] != Match.NONE:
            methods.update(route_methods)
    return sorted(methods)


async def handle(request: Request, exc: Exception) -> JSONResponse:
    """The app's exception handler for every error it expects."""
    answer = problem_for(request, exc)
    if answer is None:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {
                "type": "urn:coupons:problem:internal",
                "title": TITLES[500],
                "status": 500,
                "detail": "an unexpected error; it was logged",
                "instance": request.url.path,
                "code": "internal",
            },
            status_code=500,
            media_type=PROBLEM_JSON,
        )
    return answer


# Answered by any authenticated endpoint: before it runs (key, scope, body) or by it.
_ALWAYS = (400, 401, 403, 413, 415, 422, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of the problems an endpoint may answer, `statuses` besides
    those every authenticated endpoint may."""
    return {
        status: {"model": Problem, "description": TITLES[status]}
        for status in sorted({*_ALWAYS, *statuses})
    }
