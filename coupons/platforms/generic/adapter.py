"""`Platform` over our generic REST protocol (the one the simulator speaks), with httpx."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from coupons.platforms.base import (
    BatchAction,
    BatchSpec,
    BatchStatus,
    CallbackRejected,
    CouponUsedNotice,
    FlowKind,
    FlowRecord,
    PlatformBatch,
    PlatformBatchUnavailable,
    PlatformBudgetExhausted,
    PlatformCoupon,
    PlatformCouponStatus,
    PlatformError,
    PlatformKeyReused,
    PlatformRateLimited,
    PlatformRefused,
    PlatformUnavailable,
    SendRequest,
    answer_text,
    exchange,
    on_platform,
    read_answer,
)

log = logging.getLogger(__name__)

# What a non-2xx answer means, by (HTTP status, platform code); a None code stands for any
# code of that status. Only the refusals are definitive: each says something about this
# request that no retry can change. Anything not listed (auth failures after a key rotation,
# an unknown 4xx from a proxy, a known code with an unexpected status, 5xx) is
# PlatformUnavailable and retried, because calling it a refusal would fail coupons for good
# over an operator's slip.
_ERRORS: dict[tuple[int, str | None], type[PlatformError]] = {
    (400, "INVALID_REQUEST"): PlatformRefused,
    (404, "BATCH_NOT_FOUND"): PlatformRefused,
    (403, "USER_RESTRICTED"): PlatformRefused,
    (403, "USER_LIMIT_REACHED"): PlatformRefused,
    (409, "IDEMPOTENCY_KEY_REUSED"): PlatformKeyReused,
    (409, "COUPON_EXPIRED"): PlatformRefused,
    (404, "COUPON_NOT_FOUND"): PlatformRefused,  # get_coupon answers None: not visible (yet)
    # Created (never started), stopped or expired: this batch will not send.
    (409, "BATCH_NOT_RUNNING"): PlatformRefused,
    (409, "BATCH_STATE_INVALID"): PlatformRefused,  # e.g. pausing a stopped batch
    # The batch may send again (resumed, budget raised): the coupon waits, it does not fail.
    (409, "BATCH_PAUSED"): PlatformBatchUnavailable,
    (409, "BATCH_NOT_STARTED"): PlatformBatchUnavailable,  # running, its window not open yet
    (409, "BUDGET_EXHAUSTED"): PlatformBudgetExhausted,
    (429, None): PlatformRateLimited,
}


def _error_for(status: int, code: str, message: str) -> PlatformError:
    kind = _ERRORS.get((status, code)) or _ERRORS.get((status, None))
    if kind is None:
        if status in (401, 403):
            # Not the coupon's fault: our key or the platform's configuration is wrong.
            log.error("platform refused our credentials (%s %s): %s", status, code, message)
        kind = PlatformUnavailable
    return kind(code, message)


def _error_of(response: httpx.Response) -> PlatformError:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("code"), str):
        code, message = payload["code"], str(payload.get("message", ""))
    else:
        code, message = f"HTTP_{response.status_code}", response.text[:200]
    return _error_for(response.status_code, code, message)


def _time(value: Any) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _batch(raw: dict[str, Any]) -> PlatformBatch:
    return PlatformBatch(
        batch_id=raw["batch_id"],
        name=raw["name"],
        status=BatchStatus(raw["status"]),  # a status we do not know is an unreadable answer
        quantity=int(raw["quantity"]),
        remaining=int(raw["remaining"]),
        valid_days=int(raw["valid_days"]),
        face_value_cents=int(raw["face_value_cents"]),
        min_spend_cents=int(raw["min_spend_cents"]),
        per_user_limit=int(raw["per_user_limit"]),
        starts_at=_time(raw["starts_at"]),
        ends_at=_time(raw["ends_at"]),
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


@dataclass(frozen=True)
class _FlowFile:
    """Where a flow file is and what it must hash to."""

    url: str
    sha1: str
    records: int


def _flow_file(raw: dict[str, Any]) -> _FlowFile:
    if raw["hash_type"] != "SHA1":
        raise ValueError(f"hash_type {raw['hash_type']!r}, not SHA1")
    return _FlowFile(
        url=str(raw["url"]), sha1=str(raw["hash_value"]).lower(), records=int(raw["records"])
    )


_FLOW_COLUMNS = ["coupon_id", "batch_id", "user_id", "idempotency_key", "at"]


def _flow_records(text: str) -> list[FlowRecord]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    if reader.fieldnames != _FLOW_COLUMNS:
        raise ValueError(f"columns {reader.fieldnames}, not {_FLOW_COLUMNS}")
    return [
        FlowRecord(
            coupon_id=row["coupon_id"],
            batch_id=row["batch_id"],
            user_id=row["user_id"],
            idempotency_key=row["idempotency_key"] or None,  # the used flow has none
            at=_time(row["at"]),
        )
        for row in reader
    ]


def _verified_flow(file: _FlowFile, content: bytes) -> list[FlowRecord]:
    """The records of a downloaded flow file, once its bytes are the ones the platform hashed."""
    if hashlib.sha1(content, usedforsecurity=False).hexdigest() != file.sha1:
        raise PlatformUnavailable("BAD_FLOW_FILE", "the flow file does not match its SHA1")
    try:
        records = _flow_records(content.decode("utf-8"))
    except (csv.Error, KeyError, TypeError, ValueError) as exc:
        raise PlatformUnavailable("BAD_FLOW_FILE", f"unreadable flow file: {exc!r}") from exc
    if len(records) != file.records:
        raise PlatformUnavailable(
            "BAD_FLOW_FILE", f"{len(records)} records in the file, {file.records} announced"
        )
    return records


# The redemption notification: headers that sign it, and the one event type it carries.
_TIMESTAMP_HEADER = "x-platform-timestamp"
_NONCE_HEADER = "x-platform-nonce"
_SIGNATURE_HEADER = "x-platform-signature"
_COUPON_USED = "COUPON.USED"
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# Printable ASCII without whitespace: a newline in the nonce could shift bytes between the
# signed fields, so the framing of the signed message stays unambiguous.
_NONCE = re.compile(r"[!-~]{1,128}")
_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")


def _callback_signature(secret: str, timestamp: str, nonce: str, body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 over "{timestamp}\n{nonce}\n{body}\n", body as sent."""
    message = b"%s\n%s\n%s\n" % (timestamp.encode(), nonce.encode(), body)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _notice(raw: Any) -> CouponUsedNotice:
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    coupon = raw.get("coupon")
    if not isinstance(coupon, dict):
        raise ValueError("coupon is not an object")
    used_at = datetime.fromisoformat(answer_text(coupon, "used_at"))
    if used_at.tzinfo is None:
        raise ValueError("used_at has no timezone")
    return CouponUsedNotice(
        notification_id=answer_text(raw, "id"),
        platform_coupon_id=answer_text(coupon, "coupon_id"),
        batch_id=answer_text(coupon, "batch_id"),
        user_id=answer_text(coupon, "user_id"),
        used_at=used_at,
        raw=raw,
    )


class RestPlatform:
    """Adapter for the generic REST protocol; raises only `PlatformError` subclasses."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        client: httpx.AsyncClient | None = None,
        callback_secret: str | None = None,
        callback_max_skew_s: float = 300,
    ) -> None:
        """`callback_secret` is the key the platform signs its notifications with (None: every
        notification is rejected); `callback_max_skew_s` how far a notification's timestamp
        may be from our clock, either way, before it is taken for a replay."""
        self._base_url = base_url.rstrip("/")
        self._origin = httpx.URL(self._base_url + "/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._callback_secret = callback_secret or None
        self._callback_max_skew_s = callback_max_skew_s

    callback_success = None  # any 2xx takes a notification

    def __repr__(self) -> str:  # never show the key
        return f"RestPlatform({self._base_url!r})"

    async def _request(
        self, method: str, url: str | httpx.URL, what: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        """One HTTP exchange; any answer but 2xx raises the `PlatformError` it means."""
        response = await exchange(
            self._client, what, method, url, json=body, headers=self._headers, timeout=self._timeout
        )
        if not response.is_success:
            raise _error_of(response)
        return response

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        what = f"{method} {path}"
        response = await self._request(method, self._base_url + path, what, body)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise PlatformUnavailable("BAD_RESPONSE", f"{what}: not a JSON object")
        return payload

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
                **{
                    name: moment.isoformat()
                    for name, moment in (("starts_at", spec.starts_at), ("ends_at", spec.ends_at))
                    if moment is not None
                },
            },
        )
        return read_answer(_batch, raw)

    async def get_batch(self, batch_id: str) -> PlatformBatch:
        return read_answer(
            _batch, await self._call("GET", f"/v1/batches/{quote(batch_id, safe='')}")
        )

    async def change_batch(self, batch_id: str, action: BatchAction) -> PlatformBatch:
        path = f"/v1/batches/{quote(batch_id, safe='')}/{BatchAction(action).value}"
        return read_answer(_batch, await self._call("POST", path))

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[FlowRecord]:
        name = FlowKind(kind).value
        what = f"{name} flow of {batch_id}"
        path = f"/v1/batches/{quote(batch_id, safe='')}/flows/{name}"
        file = read_answer(_flow_file, await self._call("GET", path))
        response = await self._request(
            "GET", on_platform(self._origin, file.url), f"download {what}"
        )
        return _verified_flow(file, response.content)

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon:
        raw = await self._call(
            "POST",
            f"/v1/batches/{quote(request.batch_id, safe='')}/coupons",
            {"user_id": request.user_id, "idempotency_key": request.idempotency_key},
        )
        return read_answer(_coupon, raw)

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        path = f"/v1/users/{quote(user_id, safe='')}/coupons/{quote(coupon_id, safe='')}"
        try:
            raw = await self._call("GET", path)
        except PlatformRefused as exc:
            if exc.code == "COUPON_NOT_FOUND":
                return None
            raise
        return read_answer(_coupon, raw)

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CouponUsedNotice | None:
        if self._callback_secret is None:
            raise CallbackRejected("no callback secret configured: nothing can be verified")
        named = {name.lower(): value for name, value in headers.items()}
        timestamp, nonce, signature = (
            named.get(name) for name in (_TIMESTAMP_HEADER, _NONCE_HEADER, _SIGNATURE_HEADER)
        )
        if timestamp is None or nonce is None or signature is None:
            missing = [
                name
                for name, value in (
                    (_TIMESTAMP_HEADER, timestamp),
                    (_NONCE_HEADER, nonce),
                    (_SIGNATURE_HEADER, signature),
                )
                if value is None
            ]
            raise CallbackRejected(f"missing header {', '.join(missing)}")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise CallbackRejected("garbled timestamp header")
        if not _NONCE.fullmatch(nonce):
            raise CallbackRejected("garbled nonce header")
        if not _SIGNATURE.fullmatch(signature):
            raise CallbackRejected("garbled signature header")
        expected = _callback_signature(self._callback_secret, timestamp, nonce, body)
        if not hmac.compare_digest(signature.lower().encode(), expected.encode()):
            raise CallbackRejected("bad signature")
        # Checked once the signature holds: a stale notification is then a replay of a genuine
        # one (or a platform clock far off), which is what the log should say.
        skew = time.time() - int(timestamp)
        if skew > self._callback_max_skew_s:
            raise CallbackRejected(f"stale: signed {skew:.0f} s ago")
        if -skew > self._callback_max_skew_s:
            raise CallbackRejected(f"from the future: signed {-skew:.0f} s ahead of our clock")
        try:
            raw = json.loads(body)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise CallbackRejected(f"unparseable body: {exc}") from None
        if not isinstance(raw, dict):
            raise CallbackRejected("unparseable body: not a JSON object")
        if raw.get("event_type") != _COUPON_USED:
            return None  # genuine (signed), and not a coupon's use
        try:
            return _notice(raw)
        except (TypeError, ValueError) as exc:
            raise CallbackRejected(f"unreadable notification: {exc}") from None

    async def refresh_keys(self) -> bool:
        return False  # the callback secret is configured, never fetched

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
