"""Redemption notifications, both sides: the simulator signs and delivers them to a real HTTP
receiver started in the test, and RestPlatform.verify_callback decides what to believe.

Each simulator here is private (started with a callback secret and pointed at this test's
receiver), so the session's shared simulator keeps running without callbacks.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from app.embedded import SimulatorProcess, free_port
from coupons.platforms.base import (
    CallbackRejected,
    CouponUsedNotice,
    Platform,
    PlatformBatch,
    PlatformCoupon,
    SendRequest,
)
from coupons.platforms.generic.adapter import RestPlatform
from coupons.platforms.simcore.knobs import CALLBACK_RETRY_CAP_S
from coupons.platforms.simcore.notifier import retry_delay

from .conftest import SimControl, StartSimulator, batch_spec, coupon_use, new_key, running_batch

SECRET = f"callback-secret-{uuid.uuid4().hex}"
HEADERS = ("x-platform-timestamp", "x-platform-nonce", "x-platform-signature")


# ---------------------------------------------------------------- a receiver


@dataclass
class Received:
    headers: dict[str, str]  # names lowercased
    body: bytes
    at: float  # monotonic, when the request had arrived
    status: int | None = None  # None: no answer given (the caller gave up first)


Answer = Callable[[Received], Awaitable[int]]


async def ok(_: Received) -> int:
    return 200


@dataclass
class Receiver:
    """A tiny HTTP/1.1 server on a free port: records every request, answers what `answer`
    says (one request per connection)."""

    answer: Answer = ok
    received: list[Received] = field(default_factory=list)
    server: asyncio.Server | None = None
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/callbacks/platform"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for handler in self.handlers:  # answers still held back (a hanging receiver)
                handler.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        try:
            await reader.readline()  # the request line
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Received(headers, body, time.monotonic())
            self.received.append(request)
            request.status = await self.answer(request)
            head = f"HTTP/1.1 {request.status} X\r\nContent-Length: 0\r\nConnection: close\r\n"
            writer.write(head.encode() + b"\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the simulator hung up (its timeout): nothing to answer
        finally:
            writer.close()
            self.handlers.discard(handler)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(request.body) for request in self.received]


def answering(*statuses: int, then: int = 200) -> Answer:
    """Answer `statuses` in turn, then `then` for ever."""
    queue = list(statuses)

    async def answer(_: Received) -> int:
        return queue.pop(0) if queue else then

    return answer


def verifying(platform: RestPlatform) -> Answer:
    """A correct receiver: 2xx only for what verifies."""

    async def answer(request: Received) -> int:
        try:
            platform.verify_callback(request.headers, request.body)
        except CallbackRejected:
            return 401
        return 200

    return answer


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- fixtures


def callback_env(url: str, **knobs: str) -> dict[str, str]:
    env = {"PLATFORM_CALLBACK_SECRET": SECRET, "SIM_CALLBACK_URL": url}
    env |= {"SIM_CALLBACK_RETRY_S": "0.05"} | {f"SIM_{k.upper()}": v for k, v in knobs.items()}
    return env


@dataclass
class Callbacks:
    process: SimulatorProcess
    control: SimControl
    platform: RestPlatform  # holds the callback secret
    receiver: Receiver
    batch: PlatformBatch | None = None

    async def used_coupon(self) -> PlatformCoupon:
        """A coupon sent and then used at the till: what triggers a notification."""
        if self.batch is None:
            self.batch = await running_batch(self.platform, batch_spec(quantity=100))
        request = SendRequest(self.batch.batch_id, new_key("user"), new_key("send"))
        coupon = await self.platform.send_coupon(request)
        used = await self.control.use(coupon.coupon_id)
        assert used.status_code == 200
        return coupon

    async def notifications(self, **params: Any) -> list[dict[str, Any]]:
        response = await self.control.http.get("/sim/notifications", params=params)
        response.raise_for_status()
        listed: list[dict[str, Any]] = response.json()["notifications"]
        return listed

    async def delivered(self, coupon_id: str) -> dict[str, Any]:
        """The coupon's one notification, once the simulator has it delivered: it does on
        the receiver's answer, a moment after the receiver has the request."""

        async def done() -> bool:
            return [n["state"] for n in await self.notifications(coupon_id=coupon_id)] == [
                "delivered"
            ]

        await eventually(done)
        [listed] = await self.notifications(coupon_id=coupon_id)
        return listed

    async def stats_once(self, counter: str, value: int) -> dict[str, int]:
        """The simulator's statistics once `counter` has reached `value` (a delivery is
        counted on the receiver's answer, a moment after the receiver has the request)."""

        async def reached() -> bool:
            return (await self.control.stats())[counter] >= value

        await eventually(reached)
        return await self.control.stats()

    def verify(self, request: Received) -> CouponUsedNotice:
        return coupon_use(self.platform, request.headers, request.body)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def open_callbacks(process: SimulatorProcess, receiver: Receiver) -> Callbacks:
    return Callbacks(
        process,
        SimControl(process.url),
        RestPlatform(process.url, timeout_s=5.0, callback_secret=SECRET),
        receiver,
    )


async def close_callbacks(callbacks: Callbacks) -> None:
    await callbacks.platform.aclose()
    await callbacks.control.http.aclose()


@pytest.fixture
async def callbacks(
    start_simulator: StartSimulator, receiver: Receiver
) -> AsyncIterator[Callbacks]:
    """A private simulator that signs with SECRET and calls this test's receiver back, its
    retries 50 ms apart (doubling)."""
    # In a thread: the receiver lives on this test's event loop, which must keep running.
    process = await asyncio.to_thread(start_simulator, callback_env(receiver.url))
    opened = await open_callbacks(process, receiver)
    try:
        yield opened
    finally:
        await close_callbacks(opened)


# ---------------------------------------------------------------- the adapter alone


def signed(
    body: bytes, *, secret: str = SECRET, timestamp: int | None = None, nonce: str = "n0nce"
) -> dict[str, str]:
    """Headers per the protocol, computed here independently of both sides' code."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    message = f"{stamp}\n{nonce}\n".encode() + body + b"\n"
    signature = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return {
        "X-Platform-Timestamp": stamp,
        "X-Platform-Nonce": nonce,
        "X-Platform-Signature": signature,
    }


def notification(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "ntf_1",
        "event_type": "COUPON.USED",
        "create_time": "2025-01-02T03:04:05+00:00",
        "coupon": {
            "coupon_id": "cpn_1",
            "batch_id": "bat_1",
            "user_id": "alice",
            "used_at": "2025-01-02T03:04:05.123456+00:00",
        },
    }
    body |= changes
    return body


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()


def adapter(**options: Any) -> RestPlatform:
    # Never used for HTTP: verify_callback does no I/O.
    return RestPlatform("http://127.0.0.1:9", **({"callback_secret": SECRET} | options))


def test_a_notification_signed_per_the_protocol_verifies() -> None:
    body = encoded(notification())
    # Header names in any case: a receiver may hand over its framework's spelling.
    headers = {name.lower(): value for name, value in signed(body).items()}

    notice = adapter().verify_callback(headers, body)

    assert notice == CouponUsedNotice(
        notification_id="ntf_1",
        platform_coupon_id="cpn_1",
        batch_id="bat_1",
        user_id="alice",
        used_at=datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        raw=notification(),
    )
    typed: Platform = adapter()  # verify_callback is part of the protocol (checked by mypy)
    assert coupon_use(typed, signed(body), body).notification_id == "ntf_1"


def _without(name: str) -> Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]]:
    return lambda headers, body: ({k: v for k, v in headers.items() if k != name}, body)


def _header(
    name: str, value: str
) -> Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]]:
    return lambda headers, body: (headers | {name: value}, body)


def _resigned(
    body: bytes, **options: Any
) -> Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]]:
    return lambda _headers, _body: (signed(body, **options), body)


REJECTIONS: dict[
    str, tuple[Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]], str]
] = {
    "tampered body": (lambda h, b: (h, b.replace(b"alice", b"mallo")), "bad signature"),
    "wrong key": (_resigned(encoded(notification()), secret="not-the-secret"), "bad signature"),
    "signature of another nonce": (_header("X-Platform-Nonce", "other"), "bad signature"),
    "stale": (_resigned(encoded(notification()), timestamp=int(time.time()) - 3600), "stale"),
    "from the future": (
        _resigned(encoded(notification()), timestamp=int(time.time()) + 3600),
        "future",
    ),
    "no timestamp": (_without("X-Platform-Timestamp"), "missing header x-platform-timestamp"),
    "no nonce": (_without("X-Platform-Nonce"), "missing header x-platform-nonce"),
    "no signature": (_without("X-Platform-Signature"), "missing header x-platform-signature"),
    "no headers": (lambda _h, b: ({}, b), "missing header"),
    "garbled timestamp": (_header("X-Platform-Timestamp", "12:00"), "garbled timestamp"),
    "garbled nonce": (_header("X-Platform-Nonce", "a b"), "garbled nonce"),
    "garbled signature": (_header("X-Platform-Signature", "sha256=zz"), "garbled signature"),
    "unparseable body": (_resigned(b"{not json"), "unparseable body"),
    "not utf-8": (_resigned(b"\xff\xfe"), "unparseable body"),
    "not an object": (_resigned(b"[]"), "not a JSON object"),
    "no coupon": (_resigned(encoded(notification(coupon=None))), "unreadable"),
    "no coupon id": (
        _resigned(encoded(notification(coupon={**notification()["coupon"], "coupon_id": ""}))),
        "unreadable",
    ),
    "used_at without a timezone": (
        _resigned(
            encoded(
                notification(coupon={**notification()["coupon"], "used_at": "2025-01-02T03:04:05"})
            )
        ),
        "unreadable",
    ),
}


@pytest.mark.parametrize("case", REJECTIONS)
def test_a_doubtful_notification_is_rejected_with_a_reason(case: str) -> None:
    spoil, reason = REJECTIONS[case]
    body = encoded(notification())
    headers, body = spoil(signed(body), body)

    with pytest.raises(CallbackRejected) as rejected:
        adapter().verify_callback(headers, body)

    assert reason in rejected.value.reason
    assert SECRET not in str(rejected.value)


def test_a_genuine_notification_of_another_event_is_taken_and_ignored() -> None:
    """Signed by the platform, about something else: acknowledged (None), not rejected, or
    the platform would deliver it again and again."""
    body = encoded(notification(event_type="COUPON.EXPIRED"))

    assert adapter().verify_callback(signed(body), body) is None
    forged = {**signed(body), "X-Platform-Signature": "0" * 64}
    with pytest.raises(CallbackRejected, match="bad signature"):
        adapter().verify_callback(forged, body)


def test_without_a_secret_nothing_verifies() -> None:
    body = encoded(notification())

    for platform in (adapter(callback_secret=None), adapter(callback_secret="")):
        with pytest.raises(CallbackRejected, match="no callback secret"):
            platform.verify_callback(signed(body), body)


def test_the_allowed_skew_is_configurable() -> None:
    body = encoded(notification())
    two_minutes_old = signed(body, timestamp=int(time.time()) - 120)

    assert coupon_use(adapter(), two_minutes_old, body).notification_id == "ntf_1"
    with pytest.raises(CallbackRejected, match="stale"):
        adapter(callback_max_skew_s=60).verify_callback(two_minutes_old, body)


def test_retry_delay_doubles_up_to_a_minute() -> None:
    assert [retry_delay(failures, 1.0) for failures in range(1, 9)] == [
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        60.0,
        60.0,
    ]
    assert retry_delay(10_000, 0.5) == CALLBACK_RETRY_CAP_S


# ---------------------------------------------------------------- through the simulator


async def test_a_used_coupon_is_notified_once_signed_so_the_adapter_verifies_it(
    callbacks: Callbacks,
) -> None:
    coupon = await callbacks.used_coupon()
    await eventually(lambda: len(callbacks.receiver.received) == 1)
    await callbacks.control.use(coupon.coupon_id)  # used again: no second notification

    request = callbacks.receiver.received[0]
    notice = callbacks.verify(request)
    seen = await callbacks.platform.get_coupon(coupon.user_id, coupon.coupon_id)
    assert seen is not None
    assert (notice.platform_coupon_id, notice.batch_id, notice.user_id, notice.used_at) == (
        coupon.coupon_id,
        coupon.batch_id,
        coupon.user_id,
        seen.used_at,
    )
    assert notice.notification_id.startswith("ntf_")
    assert notice.raw["event_type"] == "COUPON.USED"
    assert set(HEADERS) <= set(request.headers)
    assert request.headers["content-type"] == "application/json"
    # A genuine request replayed later is refused: its timestamp is signed too.
    with pytest.raises(CallbackRejected, match="stale"):
        RestPlatform(
            callbacks.process.url, callback_secret=SECRET, callback_max_skew_s=0
        ).verify_callback(request.headers, request.body)

    listed = await callbacks.delivered(coupon.coupon_id)
    assert (listed["id"], listed["attempts"]) == (notice.notification_id, 1)
    assert listed["body"] == notice.raw and listed["delivered_at"] is not None
    stats = await callbacks.control.stats()
    assert (stats["callbacks_delivered"], stats["callbacks_pending"]) == (1, 0)
    await asyncio.sleep(0.2)
    assert len(callbacks.receiver.received) == 1


async def test_failed_deliveries_are_retried_with_backoff_until_a_2xx(
    callbacks: Callbacks,
) -> None:
    hang = 2.0

    async def answer(request: Received) -> int:
        turn = callbacks.receiver.received.index(request)
        if turn == 3:
            await asyncio.sleep(hang)  # slower than the simulator waits: a timeout
        return [500, 503, 302, 200, 200][turn]

    callbacks.receiver.answer = answer
    await callbacks.control.knobs(callback_retry_s=0.1, callback_timeout_s=0.3)
    coupon = await callbacks.used_coupon()
    await eventually(lambda: len(callbacks.receiver.received) == 5)

    received = callbacks.receiver.received
    notices = [callbacks.verify(request) for request in received]
    assert len({request.body for request in received}) == 1  # the same notification each time
    assert len({request.headers["x-platform-nonce"] for request in received}) == 5
    assert len({notice.notification_id for notice in notices}) == 1
    # Waits of 0.1, 0.2, 0.4, 0.8 s after each failure (the fourth failing after 0.3 s).
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(received)]
    assert [round(gap, 1) >= 0.1 * 2**i for i, gap in enumerate(gaps)] == [True] * 4, gaps
    listed = await callbacks.delivered(coupon.coupon_id)
    assert (listed["attempts"], listed["last_error"]) == (5, None)
    stats = await callbacks.control.stats()
    assert (stats["callback_attempts_failed"], stats["callbacks_delivered"]) == (4, 1)
    assert stats["callbacks_given_up"] == 0


async def test_a_notification_is_given_up_after_its_attempts(callbacks: Callbacks) -> None:
    # Nothing listens there: every attempt is a refused connection.
    await callbacks.control.knobs(
        callback_url=f"http://127.0.0.1:{free_port()}/cb", callback_max_attempts=3
    )
    coupon = await callbacks.used_coupon()

    async def given_up() -> bool:
        [listed] = await callbacks.notifications(coupon_id=coupon.coupon_id)
        return bool(listed["state"] == "given_up")

    await eventually(given_up)
    [listed] = await callbacks.notifications(coupon_id=coupon.coupon_id)
    assert listed["attempts"] == 3
    assert listed["next_attempt_at"] is None
    assert "Connect" in listed["last_error"]
    stats = await callbacks.control.stats()
    assert (stats["callback_attempts_failed"], stats["callbacks_given_up"]) == (3, 1)
    assert (stats["callbacks_delivered"], stats["callbacks_pending"]) == (0, 0)
    assert callbacks.receiver.received == []


async def test_the_duplicate_knob_delivers_the_identical_notification_again(
    callbacks: Callbacks,
) -> None:
    await callbacks.control.knobs(callback_duplicate_rate=1.0)
    await callbacks.used_coupon()
    await eventually(lambda: len(callbacks.receiver.received) == 2)

    first, again = callbacks.receiver.received
    assert first.body == again.body
    assert callbacks.verify(first) == callbacks.verify(again)
    stats = await callbacks.stats_once("callbacks_duplicated", 1)
    assert (stats["callbacks_delivered"], stats["callbacks_duplicated"]) == (1, 1)


async def test_forged_probes_come_first_and_a_verifying_receiver_refuses_them(
    callbacks: Callbacks,
) -> None:
    callbacks.receiver.answer = verifying(callbacks.platform)
    await callbacks.control.knobs(callback_forged_rate=1.0)
    for expected in (2, 4):
        await callbacks.used_coupon()
        # One coupon at a time, so each probe is next to its genuine notification.
        await eventually(lambda: len(callbacks.receiver.received) == expected)  # noqa: B023

    received = callbacks.receiver.received
    assert [request.status for request in received] == [401, 200, 401, 200]
    wrong_key, genuine, tampered, genuine_too = received
    # Alternately: the genuine body under a wrong key, a changed body under a genuine signature.
    assert wrong_key.body == genuine.body
    assert tampered.body != genuine_too.body
    assert json.loads(tampered.body)["coupon"] == json.loads(genuine_too.body)["coupon"]
    stats = await callbacks.stats_once("callbacks_delivered", 2)
    assert (stats["callbacks_forged_sent"], stats["callbacks_forged_accepted"]) == (2, 0)
    assert stats["callbacks_delivered"] == 2

    # A receiver that believes anything is caught by the statistic.
    callbacks.receiver.answer = ok
    await callbacks.used_coupon()
    await eventually(lambda: len(callbacks.receiver.received) == 6)
    stats = await callbacks.control.stats()
    assert (stats["callbacks_forged_sent"], stats["callbacks_forged_accepted"]) == (3, 1)


async def test_the_delay_knob_holds_a_new_notification(callbacks: Callbacks) -> None:
    await callbacks.control.knobs(callback_delay_ms=600)
    used = time.monotonic()
    await callbacks.used_coupon()
    await eventually(lambda: len(callbacks.receiver.received) == 1)

    assert callbacks.receiver.received[0].at - used >= 0.6


async def test_a_hanging_receiver_never_holds_up_requests(callbacks: Callbacks) -> None:
    async def hang(_: Received) -> int:
        await asyncio.sleep(5)
        return 200

    callbacks.receiver.answer = hang
    await callbacks.control.knobs(callback_timeout_s=1.0)
    coupons = [await callbacks.used_coupon() for _ in range(3)]
    await eventually(lambda: len(callbacks.receiver.received) == 3)

    started = time.monotonic()
    for coupon in coupons:
        assert await callbacks.platform.get_coupon(coupon.user_id, coupon.coupon_id) is not None
    await callbacks.used_coupon()
    assert time.monotonic() - started < 0.5

    async def timed_out() -> bool:
        return (await callbacks.control.stats())["callback_attempts_failed"] >= 3

    await eventually(timed_out)
    listed = await callbacks.notifications(coupon_id=coupons[0].coupon_id)
    assert listed[0]["last_error"] == "timeout"


async def test_an_undelivered_notification_survives_a_restart(callbacks: Callbacks) -> None:
    callbacks.receiver.answer = answering(then=503)
    coupon = await callbacks.used_coupon()
    await eventually(lambda: len(callbacks.receiver.received) >= 2)
    [before] = await callbacks.notifications(coupon_id=coupon.coupon_id)
    assert (before["state"], before["last_error"]) == ("pending", "HTTP 503")

    await asyncio.to_thread(callbacks.process.stop)
    callbacks.receiver.answer = ok
    failed = len(callbacks.receiver.received)
    await asyncio.to_thread(callbacks.process.start)
    await eventually(lambda: any(r.status == 200 for r in callbacks.receiver.received))

    delivered = [r for r in callbacks.receiver.received if r.status == 200]
    assert len(delivered) == 1
    assert delivered[0].body == callbacks.receiver.received[0].body
    assert callbacks.verify(delivered[0]).platform_coupon_id == coupon.coupon_id
    listed = await callbacks.delivered(coupon.coupon_id)
    assert listed["id"] == before["id"]
    # Each attempt is counted, before the restart and after it.
    # (An attempt cut short by the stop reached the receiver but is not counted.)
    assert failed + 1 <= listed["attempts"] <= len(callbacks.receiver.received)


async def test_without_a_secret_no_notification_is_recorded_or_sent(
    start_simulator: StartSimulator, receiver: Receiver
) -> None:
    env = callback_env(receiver.url) | {"PLATFORM_CALLBACK_SECRET": ""}
    process = await asyncio.to_thread(start_simulator, env)
    callbacks = await open_callbacks(process, receiver)
    try:
        await callbacks.used_coupon()
        await asyncio.sleep(0.3)

        assert receiver.received == []
        assert await callbacks.notifications() == []
        assert (await callbacks.control.stats())["callbacks_pending"] == 0
        assert "callbacks off" in process.log_path.read_text()
    finally:
        await close_callbacks(callbacks)


async def test_callback_url_off_records_nothing_and_setting_it_turns_callbacks_on(
    callbacks: Callbacks,
) -> None:
    await callbacks.control.knobs(callback_url="")
    unnoticed = await callbacks.used_coupon()
    assert await callbacks.notifications(coupon_id=unnoticed.coupon_id) == []

    await callbacks.control.knobs(callback_url=callbacks.receiver.url)
    noticed = await callbacks.used_coupon()
    await eventually(lambda: len(callbacks.receiver.received) == 1)

    assert callbacks.verify(callbacks.receiver.received[0]).platform_coupon_id == (
        noticed.coupon_id
    )


@pytest.mark.parametrize(
    "knob",
    [
        {"callback_url": "ftp://example.com/cb"},
        {"callback_url": "not a url"},
        {"callback_url": 5},
        {"callback_retry_s": 0},
        {"callback_max_attempts": 0},
        {"callback_timeout_s": -1},
        {"callback_duplicate_rate": 1.5},
        {"callback_forged_rate": -0.1},
        {"callback_delay_ms": "soon"},
    ],
)
async def test_bad_callback_knobs_are_refused(sim: SimControl, knob: dict[str, Any]) -> None:
    before = (await sim.http.get("/sim/knobs")).json()

    response = await sim.http.put("/sim/knobs", json=knob)

    assert (response.status_code, response.json()["code"]) == (400, "INVALID_REQUEST")
    assert (await sim.http.get("/sim/knobs")).json() == before


async def test_notification_listing_refuses_a_bad_limit(sim: SimControl) -> None:
    response = await sim.http.get("/sim/notifications", params={"limit": "0"})

    assert response.status_code == 400
    assert (await sim.http.get("/sim/notifications")).json() == {"notifications": []}
