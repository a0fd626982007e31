"""The simulator's generic face: our own small REST protocol under /v1, the one `RestPlatform`
speaks. A bearer API key (if set) guards every path; notifications are COUPON.USED JSON signed
with HMAC-SHA256 over "{timestamp}\\n{nonce}\\n{body}\\n" with the shared callback secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from coupons.platforms.simcore.core import (
    BATCH_TERMS,
    Simulator,
    integer_field,
    json_object,
    moment_field,
    text_field,
)
from coupons.platforms.simcore.errors import SimError, generic_error
from coupons.platforms.simcore.store import iso

COUPON_USED = "COUPON.USED"
TIMESTAMP_HEADER = "X-Platform-Timestamp"
NONCE_HEADER = "X-Platform-Nonce"
SIGNATURE_HEADER = "X-Platform-Signature"
# The least each term may be; the rest of a batch's request is checked by the core.
_MINIMUM = {
    "face_value_cents": 1,
    "min_spend_cents": 0,
    "quantity": 1,
    "valid_days": 1,
    "per_user_limit": 1,
}


def sign(secret: str, timestamp: str, nonce: str, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 over "{timestamp}\\n{nonce}\\n{body}\\n", body as sent."""
    message = b"%s\n%s\n%s\n" % (timestamp.encode(), nonce.encode(), body)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes) -> dict[str, str]:
    # The real clock, not the simulator's: `clock_offset_s` moves coupon validity, and a
    # receiver's freshness check must see when the request was actually signed.
    timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: sign(secret, timestamp, nonce, body),
    }


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in batch.items() if name != "extra"}


class GenericFace:
    name = "generic"

    def __init__(self, api_key: str | None, callback_secret: str | None) -> None:
        self._api_key = api_key
        self._secret = callback_secret

    @property
    def callbacks_on(self) -> bool:
        return self._secret is not None

    # -- the protocol -----------------------------------------------------------

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        def v1(handler: Any) -> Any:
            async def guarded(request: Request) -> Response:
                self._check_auth(request)
                response: Response = await handler(sim, request)
                return response

            return sim.protocol(self, guarded)

        return [
            Route("/v1/batches", v1(_create_batch), methods=["POST"]),
            Route("/v1/batches/{batch_id}", v1(_get_batch), methods=["GET"]),
            Route("/v1/batches/{batch_id}/coupons", v1(_send_coupon), methods=["POST"]),
            Route("/v1/batches/{batch_id}/flows/{kind}", v1(_batch_flow), methods=["GET"]),
            Route("/v1/batches/{batch_id}/{action}", v1(_change_batch), methods=["POST"]),
            Route("/v1/files/{token}", v1(_flow_file), methods=["GET"], name="flow_file"),
            Route("/v1/users/{user_id}/coupons/{coupon_id}", v1(_get_coupon), methods=["GET"]),
            Route("/v1/coupons/{coupon_id}/use", v1(_use_coupon), methods=["POST"]),
        ]

    def _check_auth(self, request: Request) -> None:
        if self._api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._api_key}".encode()):
            raise SimError("UNAUTHORIZED", "missing or wrong API key")

    def error_response(self, error: SimError) -> Response:
        return generic_error(error)

    def new_batch_id(self) -> str:
        return f"bat_{uuid.uuid4().hex[:20]}"

    def new_coupon_id(self) -> str:
        return f"cpn_{uuid.uuid4().hex[:20]}"

    # -- notifications ----------------------------------------------------------

    def notification(self, notification_id: str, coupon: Mapping[str, Any], now: datetime) -> bytes:
        return json.dumps(
            {
                "id": notification_id,
                "event_type": COUPON_USED,
                "create_time": iso(now),
                "coupon": {
                    "coupon_id": coupon["coupon_id"],
                    "batch_id": coupon["batch_id"],
                    "user_id": coupon["user_id"],
                    "used_at": coupon["used_at"],
                },
            },
            separators=(",", ":"),
        ).encode()

    def delivery_body(self, body: bytes) -> bytes:
        return body  # signed in the headers: every attempt sends the stored bytes

    def delivery_headers(self, body: bytes) -> dict[str, str]:
        assert self._secret is not None  # the notifier runs only with callbacks on
        return signed_headers(self._secret, body)

    def forged(self, body: bytes, n: int) -> tuple[bytes, dict[str, str]]:
        """The genuine body signed with a wrong key, or the genuine headers over a tampered body
        (a new notification id, so a receiver cannot hide an acceptance behind its duplicate
        check)."""
        if n % 2 == 0:
            return body, signed_headers(secrets.token_hex(32), body)
        tampered = {**json.loads(body), "id": f"ntf_{uuid.uuid4().hex}"}
        content = json.dumps(tampered, separators=(",", ":")).encode()
        return content, self.delivery_headers(body)

    def acknowledged(self, response: httpx.Response) -> bool:
        return response.is_success


# ---------------------------------------------------------------- /v1 handlers


async def _create_batch(sim: Simulator, request: Request) -> Response:
    body = await json_object(request)
    terms: dict[str, Any] = {"name": text_field(body, "name")}
    for name in BATCH_TERMS[1:]:
        terms[name] = integer_field(body, name, minimum=_MINIMUM[name])
    request_key = text_field(body, "request_key")
    batch, created = sim.create_batch(
        request_key, terms, moment_field(body, "starts_at"), moment_field(body, "ends_at")
    )
    return JSONResponse(_public(batch), 201 if created else 200)


async def _get_batch(sim: Simulator, request: Request) -> Response:
    return JSONResponse(_public(sim.batch(request.path_params["batch_id"])))


async def _change_batch(sim: Simulator, request: Request) -> Response:
    batch_id, action = request.path_params["batch_id"], request.path_params["action"]
    return JSONResponse(_public(sim.change_batch(batch_id, action)))


async def _send_coupon(sim: Simulator, request: Request) -> Response:
    body = await json_object(request)
    user_id, key = text_field(body, "user_id"), text_field(body, "idempotency_key")
    coupon, created = await sim.send(request.path_params["batch_id"], user_id, key)
    coupon.pop("idempotency_key")
    return JSONResponse(coupon, 201 if created else 200)


async def _get_coupon(sim: Simulator, request: Request) -> Response:
    coupon = sim.lookup(request.path_params["coupon_id"], request.path_params["user_id"])
    coupon.pop("idempotency_key")
    return JSONResponse(coupon)


async def _use_coupon(sim: Simulator, request: Request) -> Response:
    coupon = sim.use(request.path_params["coupon_id"])
    coupon.pop("idempotency_key")
    return JSONResponse(coupon)


async def _batch_flow(sim: Simulator, request: Request) -> Response:
    """Publish the batch's flow file and answer where to download it and its SHA1, as WeChat
    Pay's use-flow endpoint does."""
    flow = sim.flow(request.path_params["batch_id"], request.path_params["kind"])
    return JSONResponse(
        {
            "url": str(request.url_for("flow_file", token=flow.token)),
            "hash_type": "SHA1",
            "hash_value": flow.sha1,
            "records": flow.records,
        }
    )


async def _flow_file(sim: Simulator, request: Request) -> Response:
    return Response(sim.file(request.path_params["token"]), media_type="text/csv")
