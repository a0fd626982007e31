"""The codec server: what the Temporal Web UI and CLI call to read encrypted payloads.

Temporal's remote codec protocol: `POST <endpoint>/decode` (and `/encode`) with a JSON body
`{"payloads": [...]}`, each payload in proto-JSON form (metadata values and data in
base64), an `X-Namespace` header, and the same shape back. Two endpoints:

- `/codec/encode`, `/codec/decode` with `Authorization: Bearer <token>`: the configured
  CODEC_TOKEN or an admin API key (`temporal ... --codec-endpoint <api>/codec
  --codec-auth "Bearer <key>"`).
- `/codec/<CODEC_TOKEN>/encode`, `/decode`: the token in the path, for the dev server's
  Web UI (`--ui-codec-endpoint`), which cannot send headers of ours. A wrong token is a
  path that does not exist (404).

Browsers get CORS answers for the origins in CODEC_CORS_ORIGINS only (the Web UI's), with
credentials allowed, on errors too, so the UI can tell what went wrong. Outside the
OpenAPI document: these are operators' tools, not the apps' API; README documents them.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from app import service
from app.api.problems import ApiProblem, handle, problem
from app.api.routing import backends
from coupons.codec import CodecError, EncryptionCodec
from coupons.config import ConfigError

log = logging.getLogger(__name__)

ALLOWED_HEADERS = "content-type, x-namespace, authorization"
PREFLIGHT_MAX_AGE_S = 600
# Whatever follows /codec/ but the header-authenticated routes' own names is a token, with
# or without an /encode or /decode after it.
_PATH_TOKEN = re.compile(r"(/codec/)(?!(?:en|de)code(?:[/?\s]|$))[^/\s?]+")

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class BadPayloads(Exception):
    """A body the codec cannot work with: 400, as the protocol says."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class CodecRoute(APIRoute):
    """Every answer of the codec server, errors included, carries the CORS headers of an
    allowed origin (a browser hides an answer without them, even a 401, from the page),
    and no error names the path's token (problems name the request's path)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def with_cors(request: Request) -> Response:
            try:
                response = await handler(request)
            except BadPayloads as exc:
                response = problem(_redacted(request), exc.code, exc.detail, status=400)
            except Exception as exc:
                response = await handle(_redacted(request), exc)
            response.headers.update(_cors_headers(request))
            return response

        return with_cors


router = APIRouter(tags=["codec"], route_class=CodecRoute, include_in_schema=False)


def _redacted(request: Request) -> Request:
    """The request as problems and error logs name it: `/codec/***/decode`."""
    return Request({**request.scope, "path": _PATH_TOKEN.sub(r"\1***", request.url.path)})


def _cors_headers(request: Request) -> dict[str, str]:
    headers = {"Vary": "Origin"}
    origin = request.headers.get("origin")
    if origin is not None and origin in backends(request).settings.codec_cors_origins:
        headers["Access-Control-Allow-Origin"] = origin
        # The Web UI sends credentials when its `includeCredentials` codec setting is on.
        headers["Access-Control-Allow-Credentials"] = "true"
    return headers


# ------------------------------------------------------------------ the endpoints


@router.post("/codec/encode")
async def encode(request: Request) -> Response:
    await _check_bearer(request)
    return await _apply(request, "encode")


@router.post("/codec/decode")
async def decode(request: Request) -> Response:
    await _check_bearer(request)
    return await _apply(request, "decode")


@router.post("/codec/{token}/encode")
async def encode_with_path_token(request: Request, token: str) -> Response:
    _check_path_token(request, token)
    return await _apply(request, "encode")


@router.post("/codec/{token}/decode")
async def decode_with_path_token(request: Request, token: str) -> Response:
    _check_path_token(request, token)
    return await _apply(request, "decode")


@router.options("/codec/encode")
@router.options("/codec/decode")
@router.options("/codec/{token}/encode")
@router.options("/codec/{token}/decode")
async def preflight(request: Request) -> Response:
    """A browser's CORS preflight: it carries no credentials, so it is answered alike for
    any token, and tells nothing but whether the origin may call."""
    origin = request.headers.get("origin")
    if origin is None or origin not in backends(request).settings.codec_cors_origins:
        raise ApiProblem(
            "forbidden",
            f"the origin {origin or '(none)'} may not call the codec server; "
            "CODEC_CORS_ORIGINS lists the browser origins that may (the Temporal Web UI's)",
        )
    headers = {
        "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
        "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
    }
    if request.headers.get("access-control-request-private-network") == "true":
        # Chrome asks before a page of a public origin calls a private address.
        headers["Access-Control-Allow-Private-Network"] = "true"
    return Response(status_code=204, headers=headers)


# ------------------------------------------------------------------ who may call


async def _check_bearer(request: Request) -> None:
    """The codec token or an admin API key of any tenant: decoding reads every tenant's
    payloads, an operator's power."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        _refused(request, "no bearer token")
        raise ApiProblem(
            "unauthorized",
            "the codec server needs Authorization: Bearer <CODEC_TOKEN or an admin API key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if _is_codec_token(request, presented):
        return
    key = await service.authenticate(backends(request), presented)
    if key is None:
        _refused(request, "unknown token")
        raise ApiProblem(
            "unauthorized",
            "the token is neither the codec token nor a live API key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if key.scope != "admin":
        _refused(request, f"key {key.id} has scope {key.scope}")
        raise ApiProblem(
            "forbidden",
            f"this key's scope is {key.scope}; the codec server needs an admin key or the "
            "codec token",
        )


def _check_path_token(request: Request, token: str) -> None:
    if not _is_codec_token(request, token):
        _refused(request, "wrong path token")
        # The same answer as a path that does not exist, without echoing the path.
        raise ApiProblem("not_found", "no codec server at this path")


def _is_codec_token(request: Request, presented: str) -> bool:
    expected = backends(request).settings.codec_token
    return expected is not None and hmac.compare_digest(presented.encode(), expected.encode())


def _refused(request: Request, why: str) -> None:
    peer = request.client.host if request.client else "unknown"
    log.warning("codec request from %s refused: %s", peer, why)


# ------------------------------------------------------------------ the work


async def _apply(request: Request, action: str) -> Response:
    codec = _codec(request)
    namespace = backends(request).settings.temporal_namespace
    asked = request.headers.get("x-namespace")
    if action == "encode" and asked is not None and asked != namespace:
        # Our key would seal payloads that namespace's workers cannot open.
        raise BadPayloads(
            "wrong_namespace",
            f"this codec server encrypts for namespace {namespace!r}, not {asked!r}",
        )
    try:
        given = json_format.Parse(await request.body(), Payloads(), ignore_unknown_fields=True)
    except json_format.ParseError as err:
        raise BadPayloads("malformed_payloads", f"not Temporal payloads JSON: {err}") from None
    try:
        if action == "encode":
            done = await codec.encode(given.payloads)
        else:
            done = await codec.decode(given.payloads)
    except CodecError as err:
        raise BadPayloads("undecodable_payload", str(err)) from None
    body = {"payloads": [json_format.MessageToDict(payload) for payload in done]}
    return JSONResponse(body)


def _codec(request: Request) -> EncryptionCodec:
    """The process's codec for the configured key ring, read once (it rereads the file
    itself when it meets a key it does not know)."""
    path = backends(request).settings.codec_keys_file
    if path is None:
        raise ApiProblem(
            "not_found",
            "payloads are not encrypted here (no CODEC_KEYS_FILE): there is nothing to decode",
        )
    codecs: dict[Path, EncryptionCodec] | None = getattr(request.app.state, "codecs", None)
    if codecs is None:
        codecs = request.app.state.codecs = {}
    codec = codecs.get(path)
    if codec is None:
        try:
            codec = codecs[path] = EncryptionCodec(path)
        except ConfigError as err:
            log.error("the codec server cannot read its keys: %s", err)
            raise ApiProblem(
                "unavailable", f"the codec server cannot read its keys: {err}"
            ) from None
    return codec


# ------------------------------------------------------------------ the access log


class RedactPathToken(logging.Filter):
    """Shows `/codec/<token>/decode` as `/codec/***/decode` in uvicorn's access log, which
    logs every request's path: the token must not land in a log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _PATH_TOKEN.sub(r"\1***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True
