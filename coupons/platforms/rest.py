"""`Platform` over our generic REST protocol (the one the simulator speaks), with httpx."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from coupons.platforms.base import (
    BatchSpec,
    PlatformBatch,
    PlatformBudgetExhausted,
    PlatformCoupon,
    PlatformCouponStatus,
    PlatformError,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
)

log = logging.getLogger(__name__)

# What a non-2xx answer means. Only the codes listed as refusals are definitive: each
# says something about this request that no retry can change. Everything else (auth
# failures after a key rotation, an unknown 4xx from a proxy, 5xx) is retried, because
# calling it a refusal would fail coupons for good over an operator's slip.
_REFUSALS = frozenset(
    {
        "INVALID_REQUEST",
        "BATCH_NOT_FOUND",
        "USER_RESTRICTED",
        "USER_LIMIT_REACHED",
        "IDEMPOTENCY_KEY_REUSED",
        "COUPON_EXPIRED",
        "COUPON_NOT_FOUND",  # get_coupon answers None: not visible (yet)
    }
)
_RETRIED: dict[tuple[int, str | None], type[PlatformError]] = {
    (409, "BUDGET_EXHAUSTED"): PlatformBudgetExhausted,
    (429, None): PlatformRateLimited,
}


def _error_for(status: int, code: str, message: str) -> PlatformError:
    if 400 <= status < 500 and code in _REFUSALS:
        return PlatformRefused(code, message)
    kind = _RETRIED.get((status, code)) or _RETRIED.get((status, None))
    if kind is None:
        if status in (401, 403):
            # Not the coupon's fault: our key or the platform's configuration is wrong.
            log.error("platform refused our credentials (%s %s): %s", status, code, message)
        kind = PlatformUnavailable
    return kind(code, message)


def _time(value: Any) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _batch(raw: dict[str, Any]) -> PlatformBatch:
    return PlatformBatch(
        batch_id=raw["batch_id"],
        name=raw["name"],
        status=raw["status"],
        quantity=int(raw["quantity"]),
        remaining=int(raw["remaining"]),
        valid_days=int(raw["valid_days"]),
        raw=raw,
    )


def _coupon(raw: dict[str, Any]) -> PlatformCoupon:
    return PlatformCoupon(
        coupon_id=raw["coupon_id"],
        batch_id=raw["batch_id"],
        user_id=raw["user_id"],
        status=PlatformCouponStatus(raw["status"]),
        sent_at=_time(raw["sent_at"]),
        valid_until=_time(raw["valid_until"]),
        used_at=_time(raw["used_at"]) if raw.get("used_at") is not None else None,
        raw=raw,
    )


T = TypeVar("T")


def _read(parse: Callable[[dict[str, Any]], T], raw: dict[str, Any]) -> T:
    # A 2xx we cannot read may still have been applied: ambiguous, not a refusal.
    try:
        return parse(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlatformUnavailable("BAD_RESPONSE", f"unreadable answer: {exc!r}") from exc


class RestPlatform:
    """Adapter for the generic REST protocol; raises only `PlatformError` subclasses."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()

    def __repr__(self) -> str:  # never show the key
        return f"RestPlatform({self._base_url!r})"

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            response = await self._client.request(
                method,
                self._base_url + path,
                json=body,
                headers=self._headers,
                timeout=self._timeout,
            )
        except httpx.TimeoutException as exc:
            raise PlatformUnavailable("TIMEOUT", f"{method} {path}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise PlatformUnavailable("TRANSPORT_ERROR", f"{method} {path}: {exc!r}") from exc
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.is_success:
            if not isinstance(payload, dict):
                raise PlatformUnavailable("BAD_RESPONSE", f"{method} {path}: not a JSON object")
            return payload
        if isinstance(payload, dict) and isinstance(payload.get("code"), str):
            code, message = payload["code"], str(payload.get("message", ""))
        else:
            code, message = f"HTTP_{response.status_code}", response.text[:200]
        raise _error_for(response.status_code, code, message)

    async def create_batch(self, spec: BatchSpec) -> PlatformBatch:
        raw = await self._call(
            "POST",
            "/v1/batches",
            {
                "request_key": spec.request_key,
                "name": spec.name,
                "face_value_cents": spec.face_value_cents,
                "min_spend_cents": spec.min_spend_cents,
                "quantity": spec.quantity,
                "valid_days": spec.valid_days,
                "per_user_limit": spec.per_user_limit,
            },
        )
        return _read(_batch, raw)

    async def get_batch(self, batch_id: str) -> PlatformBatch:
        return _read(_batch, await self._call("GET", f"/v1/batches/{quote(batch_id, safe='')}"))

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        raw = await self._call(
            "POST",
            f"/v1/batches/{quote(request.batch_id, safe='')}/coupons",
            {"user_id": request.user_id, "idempotency_key": request.idempotency_key},
        )
        return _read(_coupon, raw)

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        path = f"/v1/users/{quote(user_id, safe='')}/coupons/{quote(coupon_id, safe='')}"
        try:
            raw = await self._call("GET", path)
        except PlatformRefused as exc:
            if exc.code == "COUPON_NOT_FOUND":
                return None
            raise
        return _read(_coupon, raw)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
