"""The one small interface every coupon platform adapter implements.

Adapters translate between these types and a platform's own paths, field names and
error codes; nothing outside an adapter knows a platform field name. Adapters know
nothing of Temporal or the ledger: the activities decide what an error means for the
coupon's lifecycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, TypeVar, runtime_checkable

import httpx


class PlatformCouponStatus(StrEnum):
    SENT = "sent"
    USED = "used"
    EXPIRED = "expired"


class BatchStatus(StrEnum):
    """A batch's life at the platform: created, then started; paused and resumed; stopped
    (by us) or expired (its window over) for good."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    EXPIRED = "expired"


# Batches in these states never send again.
FINISHED_BATCH = frozenset({BatchStatus.STOPPED, BatchStatus.EXPIRED})


class BatchAction(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"


class FlowKind(StrEnum):
    """The platform's own record of a batch, published as downloadable flow files."""

    SENT = "sent"
    USED = "used"


@dataclass(frozen=True)
class BatchSpec:
    """What we ask the platform to create. `request_key` makes creation idempotent."""

    request_key: str
    name: str
    face_value_cents: int
    min_spend_cents: int
    quantity: int
    # A coupon is valid this many days after it lands in a wallet, and never after `ends_at`.
    valid_days: int
    per_user_limit: int = 1
    # The batch's window: coupons are sent and used only inside it. None: the platform's
    # defaults (from creation, for `valid_days` days).
    starts_at: datetime | None = None
    ends_at: datetime | None = None


@dataclass(frozen=True)
class PlatformBatch:
    batch_id: str
    name: str
    status: BatchStatus
    quantity: int
    remaining: int
    valid_days: int
    face_value_cents: int
    min_spend_cents: int
    per_user_limit: int
    starts_at: datetime
    ends_at: datetime
    raw: dict[str, Any]


@dataclass(frozen=True)
class SendRequest:
    batch_id: str
    user_id: str
    # Derived from our coupon id (WeChat `out_request_no`, Alipay `out_biz_no`): resending
    # the same key after an ambiguous answer can never put a second coupon in the wallet.
    idempotency_key: str


@dataclass(frozen=True)
class PlatformCoupon:
    coupon_id: str
    batch_id: str
    user_id: str
    status: PlatformCouponStatus
    sent_at: datetime
    valid_until: datetime
    used_at: datetime | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class FlowRecord:
    """One line of a flow file: a coupon the platform sent, or one it saw used."""

    coupon_id: str
    batch_id: str
    user_id: str
    # The send's idempotency key (sent flow only): ties a platform coupon to our claim
    # even when we never saw its receipt.
    idempotency_key: str | None
    at: datetime


@dataclass(frozen=True)
class CouponUsedNotice:
    """The platform's notification that a coupon it sent was used, once its signature held.

    `notification_id` is the platform's id of the notification: a platform delivers at least
    once (it retries until answered 2xx, and may repeat itself), so receivers apply each id once.
    """

    notification_id: str
    platform_coupon_id: str
    batch_id: str
    user_id: str
    used_at: datetime
    raw: dict[str, Any]


class CallbackRejected(Exception):
    """A notification that must not be believed: its headers are missing or garbled, its
    signature is wrong, it is stale or from the future, or its body is unreadable.

    `reason` is for logs: it names what failed, never a secret or an expected signature.
    `key_unknown`: signed with a key the adapter does not hold yet; once `refresh_keys` found
    a new one, the same notification may verify.
    """

    def __init__(self, reason: str, *, key_unknown: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_unknown = key_unknown


class PlatformError(Exception):
    """Base of every error an adapter raises; `code` is the platform's own code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class PlatformRefused(PlatformError):
    """A definitive refusal (unknown batch, restricted user, batch ended): never retried."""


class PlatformKeyReused(PlatformRefused):
    """The idempotency key was used for another request (another batch's terms, another
    user's send): a clash of ours, never retried."""


class PlatformUnavailable(PlatformError):
    """5xx, timeouts, dropped connections: the request may or may not have been applied."""


class PlatformNotReady(PlatformUnavailable):
    """The platform cannot do this yet and says so (WeChat Pay registering a new stock before
    it may start): asked again shortly, it goes through."""


class PlatformRateLimited(PlatformError):
    """The platform's frequency limit answered: back off and try again."""


class FlowUnavailable(PlatformError):
    """The platform publishes no flow file of this kind (WeChat Pay has no sent flow, Alipay
    no flows for vouchers): reconciliation asks about each coupon instead."""


class PlatformBatchUnavailable(PlatformError):
    """The batch cannot send right now but may again (paused, budget used up): coupons wait
    for it instead of failing."""


class PlatformBudgetExhausted(PlatformBatchUnavailable):
    """The batch has no budget left right now; it may come back (the catalog rules decide)."""


T = TypeVar("T")


def answer_text(raw: Mapping[str, Any], name: str) -> str:
    """Field `name` of a platform's answer as a non-empty string; ValueError (an unreadable
    answer, for `read_answer`) otherwise."""
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is not a non-empty string")
    return value


def on_platform(origin: httpx.URL, url: str) -> httpx.URL:
    """`url` (a flow file's address, from the platform's answer) resolved against `origin`,
    only if it stays on that origin: the request carries our credentials, and an answer must
    not send them anywhere else. PlatformUnavailable otherwise (asked again, never a refusal)."""
    try:
        target = origin.join(url)
    except httpx.InvalidURL as exc:
        raise PlatformUnavailable("BAD_FLOW_URL", f"unreadable flow file URL: {exc}") from exc
    if (target.scheme, target.host, target.port) != (origin.scheme, origin.host, origin.port):
        raise PlatformUnavailable(
            "BAD_FLOW_URL", f"flow file at {target.scheme}://{target.host}, off the platform"
        )
    return target


async def exchange(
    client: httpx.AsyncClient, what: str, method: str, url: str | httpx.URL, **request: Any
) -> httpx.Response:
    """One HTTP exchange with a platform, whatever it answers. A redirect is never followed:
    it could lead off the platform with our key or signature. No answer at all (a timeout,
    a broken connection) is `PlatformUnavailable`: whether the platform acted is unknown."""
    try:
        return await client.request(method, url, follow_redirects=False, **request)
    except httpx.TimeoutException as exc:
        raise PlatformUnavailable("TIMEOUT", f"{what}: {exc!r}") from exc
    except httpx.TransportError as exc:
        raise PlatformUnavailable("TRANSPORT_ERROR", f"{what}: {exc!r}") from exc


def read_answer(parse: Callable[[dict[str, Any]], T], raw: dict[str, Any]) -> T:
    """`parse(raw)`, where an answer we cannot read is PlatformUnavailable: a success we cannot
    read may still have been applied, so it is ambiguous (retried), never a refusal."""
    try:
        return parse(raw)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PlatformUnavailable("BAD_RESPONSE", f"unreadable answer: {exc!r}") from exc


@runtime_checkable
class FixesRequest(Protocol):
    """A platform whose create request holds something chosen when it is made (WeChat Pay
    and Alipay fill a window not given from the time of the call): it says what, so the
    catalog's intent keeps the very request and a later resend, from any process, is the
    same one under the same key."""

    def batch_request(self, spec: BatchSpec) -> BatchSpec: ...


class Platform(Protocol):
    # What a receiver answers (text/plain, 200) to take a notification, when the platform
    # asks for exact words (Alipay: "success"); None: any 2xx will do.
    @property
    def callback_success(self) -> str | None: ...

    async def create_batch(self, spec: BatchSpec) -> PlatformBatch: ...

    async def get_batch(self, batch_id: str) -> PlatformBatch: ...

    async def change_batch(self, batch_id: str, action: BatchAction) -> PlatformBatch:
        """Start, pause, resume or stop a batch; repeating an action already done is a no-op."""
        ...

    async def batch_flow(self, batch_id: str, kind: FlowKind) -> list[FlowRecord]:
        """Download and verify the batch's flow file of sent or used coupons."""
        ...

    async def send_coupon(self, request: SendRequest) -> PlatformCoupon: ...

    async def get_coupon(self, user_id: str, coupon_id: str) -> PlatformCoupon | None:
        """The coupon as the platform's lookup shows it now; None while it is not (yet) visible."""
        ...

    def verify_callback(self, headers: Mapping[str, str], body: bytes) -> CouponUsedNotice | None:
        """Check a redemption notification's signature and freshness and read it; raises
        `CallbackRejected` on any doubt. None: a genuine notification of something else (a
        platform sends other events to the same address), to be acknowledged and ignored,
        or the platform would deliver it again for a day. Pure and synchronous: no I/O, cheap
        enough to run on the request path. `body` is the request's exact bytes; header names
        match in any case."""
        ...

    async def refresh_keys(self) -> bool:
        """Fetch the keys the platform verifies with now (WeChat Pay's platform certificates);
        True when one we did not hold arrived. For a notification `verify_callback` rejected
        with `key_unknown`; platforms whose keys are configured, not fetched, answer False."""
        ...

    async def aclose(self) -> None: ...


async def verified_notice(
    platform: Platform, headers: Mapping[str, str], body: bytes
) -> CouponUsedNotice | None:
    """`platform.verify_callback`, asked once more after `refresh_keys` when the notification
    was signed by a key the adapter did not hold yet (a platform certificate it never fetched,
    or a new one): what a receiver of notifications calls."""
    try:
        return platform.verify_callback(headers, body)
    except CallbackRejected as rejected:
        if not rejected.key_unknown:
            raise
    # Asked again whatever the refresh found: notifications that arrive together wait for one
    # fetch, and only the first one's fetch finds the key new.
    await platform.refresh_keys()
    return platform.verify_callback(headers, body)


class PlatformWrapper:
    """The part of a Platform that wraps another (metered, limited) and passes each call on
    to it: what is not a call, the callback's answer and the request a batch would send, is
    the inner platform's own."""

    def __init__(self, inner: Platform) -> None:
        self._inner = inner

    @property
    def callback_success(self) -> str | None:
        return self._inner.callback_success

    def batch_request(self, spec: BatchSpec) -> BatchSpec:
        """What the wrapped platform would send (FixesRequest); `spec` when it fixes
        nothing."""
        if isinstance(self._inner, FixesRequest):
            return self._inner.batch_request(spec)
        return spec
