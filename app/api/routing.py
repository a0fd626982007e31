"""What every authenticated endpoint goes through before its own code: the API key, its
scope, the media type and, for mutating requests, the `Idempotency-Key`.

It runs ahead of FastAPI's own body parsing and validation, so a request without a good
key is answered 401 (and one with the wrong scope 403) whatever its body holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from app import service
from app.api.problems import ApiProblem, problem_for
from app.service import ApiKey, Backends
from coupons import validation as rules

log = logging.getLogger(__name__)

# The `openapi_extra` entry that names the scope an endpoint needs (`app` or `admin`).
SCOPE = "x-required-scope"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# A key whose first request is still "in flight" after this is taken to be abandoned (its
# process died); the longest request waits UPDATE_WAIT for a worker.
IDEMPOTENCY_STALE_AFTER = timedelta(minutes=2)
IDEMPOTENCY_KEEP = timedelta(hours=24)
MAX_IDEMPOTENCY_KEY = 255

# The bearer key as the OpenAPI document names it (and the /docs "Authorize" button uses
# it); the check itself is ApiRoute's. Written into the document (`scoped_router`,
# app.openapi) rather than declared as a FastAPI security dependency, which would parse the
# header again on every request for nothing but the document.
BEARER = "HTTPBearer"
BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API key: `ck_<key id>_<secret>`",
}

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def backends(request: Request) -> Backends:
    return cast(Backends, request.app.state.backends)


# The dependencies below are coroutines: FastAPI runs a plain function dependency in a
# worker thread, two thread hand-offs per request for reading an attribute.


async def principal(request: Request) -> ApiKey:
    """The API key of the request (checked by ApiRoute before the endpoint runs)."""
    return cast(ApiKey, request.state.principal)


async def parts(request: Request) -> Backends:
    """`backends(request)`, as a dependency."""
    return backends(request)


# What the /v1 endpoints take besides their body: an id of ours (batch, campaign, user,
# task) or a coupon's in the path, the request's API key, the service's backends.
IdPath = Annotated[str, Path(pattern=rules.ID_PATTERN)]
CouponIdPath = Annotated[str, Path(pattern=rules.COUPON_ID_PATTERN)]
Key = Annotated[ApiKey, Depends(principal)]
Parts = Annotated[Backends, Depends(parts)]


class ApiRoute(APIRoute):
    """A route that checks the key, its scope and the media type, and answers repeats of
    an `Idempotency-Key` with the first answer; routes without a scope are public."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        needs = (self.openapi_extra or {}).get(SCOPE)
        if needs is None:
            return handler

        async def guarded(request: Request) -> Response:
            key = await _authenticate(request, needs)
            request.state.principal = key
            await _check_media_type(request)
            idempotency_key = request.headers.get("idempotency-key")
            if idempotency_key is None or request.method not in MUTATING:
                return await handler(request)
            return await _idempotent(request, key, idempotency_key, handler)

        return guarded


def scoped_router(scope: str, tag: str) -> APIRouter:
    """A router of /v1 endpoints that all need a key of `scope`: set once here, so an
    endpoint added later cannot be public by leaving it out."""

    class Scoped(ApiRoute):
        def __init__(
            self, path: str, endpoint: Callable[..., Any], *, openapi_extra: Any = None, **more: Any
        ) -> None:
            extra = {**(openapi_extra or {}), SCOPE: scope, "security": [{BEARER: []}]}
            super().__init__(path, endpoint, openapi_extra=extra, **more)

    return APIRouter(prefix="/v1", tags=[tag], route_class=Scoped)


async def _authenticate(request: Request, needs: str) -> ApiKey:
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiProblem(
            "unauthorized",
            "this endpoint needs an API key: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = await service.authenticate(backends(request), presented.strip())
    if key is None:
        raise ApiProblem(
            "unauthorized",
            "the API key is unknown or revoked",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if needs == "admin" and key.scope != "admin":
        raise ApiProblem(
            "forbidden",
            f"this key's scope is {key.scope}; managing batches and campaigns needs an admin key",
        )
    return key


async def _check_media_type(request: Request) -> None:
    if request.method not in MUTATING or not await request.body():
        return
    media = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiProblem(
            "unsupported_media_type", f"the body must be application/json, not {media!r}"
        )


def fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """What makes two requests the same: method, path, query and the body's JSON (key
    order and spacing aside)."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256()
    for part in (method, path, query):
        digest.update(part.encode() + b"\n")
    digest.update(canonical)
    return digest.hexdigest()


def derived_id(prefix: str, request: Request, key: ApiKey) -> str:
    """A new resource id, `<prefix>_<16 hex>`: random, or derived from the tenant and the
    Idempotency-Key, so a create retried after its first attempt died midway finds what
    that attempt made (its platform batch, say) instead of making a second."""
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is None:
        return f"{prefix}_{secrets.token_hex(8)}"
    seed = f"{key.tenant_id}\n{prefix}\n{idempotency_key}".encode()
    return f"{prefix}_{hashlib.sha256(seed).hexdigest()[:16]}"


async def _idempotent(
    request: Request, key: ApiKey, idempotency_key: str, handler: Handler
) -> Response:
    if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable():
        raise ApiProblem(
            "invalid_request",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
            errors=[{"field": "Idempotency-Key", "location": "header", "message": "invalid key"}],
        )
    parts = backends(request)
    this = fingerprint(request.method, request.url.path, request.url.query, await request.body())
    kept = await service.take_answer(
        parts, key.tenant_id, idempotency_key, this, IDEMPOTENCY_STALE_AFTER
    )
    if kept is not None:
        if kept.fingerprint != this:
            raise ApiProblem(
                "idempotency_key_reused",
                "this Idempotency-Key was used for another request (a different method, "
                "path or body); use a new key for a new request",
            )
        if kept.status is None:
            raise ApiProblem(
                "idempotency_in_flight",
                "the first request with this Idempotency-Key is still being answered; "
                "repeat it in a moment",
                headers={"Retry-After": "1"},
            )
        return JSONResponse(
            kept.response["body"],
            status_code=kept.status,
            media_type=kept.response["media_type"],
            headers={"Idempotent-Replayed": "true"},
        )
    try:
        try:
            response = await handler(request)
        except Exception as exc:
            answer = problem_for(request, exc)
            if answer is None:
                raise
            response = answer
    except BaseException:
        await service.release_answer(parts, key.tenant_id, idempotency_key)
        raise
    if response.status_code >= 500:
        # Our failure, not an answer: the client's repeat runs the request again.
        await service.release_answer(parts, key.tenant_id, idempotency_key)
        return response
    kept_body = json.loads(bytes(response.body)) if response.body else None
    media_type = response.headers.get("content-type", "application/json").split(";")[0]
    await service.keep_answer(
        parts,
        key.tenant_id,
        idempotency_key,
        response.status_code,
        {"media_type": media_type, "body": kept_body},
    )
    return response
