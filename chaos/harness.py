"""One scenario's stack and the driver that plays the app against it.

The stack is `app.stack.Stack` in a temporary DATA_DIR on free ports, so a chaos run
never touches `make run`'s `.data` or its default ports, and every process it signals is
one this stack started (by pid, through `ManagedProcess`).

The driver claims through `ClaimService` and reports task completion as the app would
(signal or update); where the harness runs the HTTP API it can do both through it too,
with an app key of the default tenant (the campaigns' tenant). A call that fails because a
part is down (or the API answers 5xx, or no answer comes back) is retried until it
succeeds or its deadline passes; only acknowledged claims count as coupons. It also plays
a shop's till, marking coupons used at the platform, whose callbacks then reach the API
(when the harness runs one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from psycopg_pool import AsyncConnectionPool
from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)

from app.claims import ClaimService
from app.embedded import ManagedProcess, free_port
from app.stack import HARNESS_SIMULATOR_KNOBS, Stack
from coupons.catalog.campaigns import ensure_campaign
from coupons.config import Settings
from coupons.contract import RECONCILE_WORKFLOW
from coupons.errors import Refused
from coupons.ledger import claims as ledger
from coupons.ledger import db
from coupons.ledger.batches import Batch, get_batch
from coupons.ledger.campaigns import get_campaign
from coupons.ledger.claims import ClaimRefused
from coupons.ledger.tenants import DEFAULT_TENANT
from coupons.model import CouponStatus, ReconcileInput, ReconcileReport, TaskCompletion
from coupons.platforms.configured import make_platform
from coupons.temporal import connect
from coupons.tenants import create_key
from workflows.user_coupon import UserCouponWorkflow

log = logging.getLogger("chaos.harness")

TASK = "first-order"
# One driver call (claim, signal, update) may take this long before it is retried: long
# enough for the SDK's own retries, short enough to notice a part that came back.
CALL_TIMEOUT_S = 15.0
SLOW_CALL_S = 2.0
Via = Literal["signal", "update"]


class Harness:
    """A scenario's embedded stack; start() and stop() are synchronous (Stack is)."""

    def __init__(
        self,
        root: Path,
        *,
        lag_window_s: float = 30.0,
        sync_interval_s: float = 300.0,
        api: bool = False,
    ) -> None:
        """`api` starts the HTTP API too, on a free port, with the simulator's callbacks
        wired to it (see `app.stack.Stack`)."""
        self.settings = Settings(
            data_dir=root,
            # The platform protocol the simulator speaks (`--platform`, or PLATFORM).
            platform=os.environ.get("PLATFORM") or "generic",
            pg_port=free_port(),
            temporal_port=free_port(),
            temporal_ui_port=free_port(),
            simulator_port=free_port(),
            api_port=free_port(),
            worker_metrics_port=free_port(),
            lag_window_s=lag_window_s,
            # The worker's catalog-sync schedule runs this often.
            sync_interval_s=sync_interval_s,
            # The driver retries its claims itself; the worker's repair is the second line,
            # made quick so a start lost to an outage does not outlast the run.
            claim_repair_after_s=5.0,
        ).check()
        self.stack = Stack(
            self.settings, demo=False, api=api, simulator_knobs=HARNESS_SIMULATOR_KNOBS
        )
        # Set while a scenario takes the worker down on purpose.
        self.worker_down_on_purpose = False
        self.worker_restarts: list[str] = []

    def start(self) -> None:
        self.stack.start()
        self.settings = self.stack.settings  # now with the simulator's API key

    def stop(self) -> None:
        self.stack.stop()

    @property
    def api(self) -> ManagedProcess:
        assert self.stack.api is not None, "this harness runs no API"
        return self.stack.api

    def ensure_worker(self) -> None:
        """Restart a worker that died when no scenario killed it, and remember it."""
        worker = self.stack.worker
        if self.worker_down_on_purpose or worker.alive:
            return
        note = f"worker exited on its own (rc {worker.returncode}); restarted by the driver"
        log.warning(note)
        self.worker_restarts.append(note)
        worker.start()


@dataclass
class Acked:
    """An acknowledged claim."""

    coupon_id: str
    user_id: str
    workflow_id: str
    acked_at: float


@dataclass
class Redemption:
    """A coupon's `redeemed` event in the ledger."""

    cause: str
    # The platform's use (the event's `at`) to the event written (`recorded_at`): one
    # clock, this machine's, on both sides.
    use_to_recorded_s: float


@dataclass
class Counters:
    claimed: int = 0
    claims_unacknowledged: int = 0
    completions_acked: int = 0
    completions_sent: int = 0
    completions_failed: int = 0
    refusals: list[str] = field(default_factory=list)
    # Calls that failed because a part was down and were tried again, by kind: the
    # evidence that the fault met the flow.
    retried: dict[str, int] = field(default_factory=dict)
    # Calls that succeeded at the first try but took over SLOW_CALL_S, by kind.
    delayed: dict[str, int] = field(default_factory=dict)
    last_completion_at: float = 0.0
    # Calls under way at this moment (a fault's line tells what it met).
    in_flight: int = 0
    # Claims answered with the coupon the user already held: a repeated claim, or a retry
    # that found what its lost first attempt made (a part killed between commit and answer).
    claims_found_held: int = 0


class NoAnswer(Exception):
    """The API answered 5xx or 429: a part behind it is down; the call is tried again."""


class Driver:
    """The app side: claims, completions, the simulator's control plane, ledger reads."""

    def __init__(self, harness: Harness, campaign: str, tag: str) -> None:
        self.harness = harness
        self.settings = harness.settings
        self.campaign = campaign
        self.tag = tag
        # The campaign's batch: the platform's id (the simulator's control plane knows
        # it by that), ours (the ledger's and the catalog workflows') and its size.
        self.batch_id = ""
        self.ledger_batch_id = ""
        self.batch_quantity = 0
        self.acked: dict[str, Acked] = {}
        # Platform coupon ids marked used at the platform (the till's), with their user.
        self.used: dict[str, str] = {}
        self.counters = Counters()
        # Users whose claim was refused, with the refusal's code.
        self.refused: dict[str, str] = {}
        # Coupons whose task completion was acknowledged (the API's 2xx, or Temporal's).
        self.completed: set[str] = set()
        self._pool: AsyncConnectionPool | None = None
        self._client: Client | None = None
        self._http: httpx.AsyncClient | None = None
        self._api: httpx.AsyncClient | None = None
        self._claims: ClaimService | None = None

    async def __aenter__(self) -> Driver:
        # A short pool timeout: a claim during an outage fails fast and is retried.
        self._pool = db.pool(self.settings.database_url, max_size=20, timeout_s=5)
        await self._pool.open(wait=True, timeout=30)
        self._client = await connect(self.settings)
        self._claims = ClaimService(self._pool, self._client, self.settings)
        # The control plane is unauthenticated and never rate limited or faulted.
        self._http = httpx.AsyncClient(
            base_url=self.settings.simulator_url, timeout=10, trust_env=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for http in (self._http, self._api):
            if http is not None:
                await http.aclose()
        if self._pool is not None:
            await self._pool.close()

    @property
    def pool(self) -> AsyncConnectionPool:
        assert self._pool is not None
        return self._pool

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None
        return self._http

    async def open_api(self) -> None:
        """The HTTP API's client, as an app holds it: an `app` key of the default tenant."""
        key = await create_key(self.pool, DEFAULT_TENANT, "app")
        self._api = httpx.AsyncClient(
            base_url=self.settings.api_url,
            headers={"Authorization": f"Bearer {key.api_key}"},
            timeout=CALL_TIMEOUT_S - 1,
            trust_env=False,  # a proxy from the environment must not carry our calls
        )

    @property
    def api(self) -> httpx.AsyncClient:
        assert self._api is not None, "open_api() first"
        return self._api

    # ----- setup ----------------------------------------------------------------------

    async def create_campaign(self, quota: int) -> None:
        platform = make_platform(self.settings)
        try:
            await ensure_campaign(
                self.pool,
                platform,
                self.campaign,
                required_tasks=[TASK],
                quota=quota,
                per_user_limit=1,
                valid_days=30,
                task_deadline=timedelta(days=7),
            )
        finally:
            await platform.aclose()
        found = await ledger.find_claims(
            self.pool, ledger.ClaimFilter(campaign_id=self.campaign, limit=1)
        )
        assert not found, "a fresh campaign has no claims"
        campaign = await get_campaign(self.pool, self.campaign)
        assert campaign is not None
        batch = await get_batch(self.pool, campaign.batch_id)
        assert batch is not None
        self.batch_id = batch.platform_batch_id
        self.ledger_batch_id = batch.id
        self.batch_quantity = batch.quantity

    # ----- the app's calls, retried while a part is down ----------------------------

    async def _retry(
        self, what: str, call: Callable[[], Awaitable[Any]], deadline: float
    ) -> tuple[bool, Any]:
        attempt = 0
        while True:
            attempt += 1
            began = time.monotonic()
            self.counters.in_flight += 1
            try:
                answer = await asyncio.wait_for(call(), timeout=CALL_TIMEOUT_S)
                if time.monotonic() - began > SLOW_CALL_S:
                    # The SDK's own retries rode out the outage: the fault met this call.
                    kind = what.split()[0]
                    self.counters.delayed[kind] = self.counters.delayed.get(kind, 0) + 1
                return True, answer
            except (Refused, WorkflowUpdateFailedError):
                raise  # an answer, not an outage
            except Exception as err:
                if time.monotonic() >= deadline:
                    log.error("%s: giving up after %d attempts: %r", what, attempt, err)
                    return False, err
                log.info("%s: attempt %d failed (%s), retrying", what, attempt, _short(err))
                kind = what.split()[0]
                self.counters.retried[kind] = self.counters.retried.get(kind, 0) + 1
            finally:
                self.counters.in_flight -= 1
            await asyncio.sleep(min(0.25 * attempt, 2.0))

    async def claim(self, user: str, deadline: float, *, api: bool = False) -> Acked | None:
        """The user's claim, in process (`ClaimService`) or through the HTTP API (`api`);
        None when refused (`refused` has the code) or never answered."""
        assert self._claims is not None
        claims = self._claims

        async def in_process() -> tuple[str, str, bool]:
            result = await claims.claim(self.campaign, user)
            return result.coupon_id, result.workflow_id, result.created

        async def through_api() -> tuple[str, str, bool]:
            path = f"/v1/campaigns/{self.campaign}/claims"
            body = _answer(await self.api.post(path, json={"user_id": user}), ClaimRefused)
            return str(body["coupon_id"]), str(body["workflow_id"]), bool(body["created"])

        try:
            ok, answer = await self._retry(
                f"claim {user}", through_api if api else in_process, deadline
            )
        except ClaimRefused as err:
            self.counters.refusals.append(f"claim {user}: {err}")
            self.counters.claims_unacknowledged += 1
            self.refused[user] = err.code
            return None
        if not ok:
            self.counters.claims_unacknowledged += 1
            return None
        coupon_id, workflow_id, created = answer
        self.counters.claims_found_held += not created
        acked = Acked(coupon_id, user, workflow_id, time.monotonic())
        previous = self.acked.setdefault(coupon_id, acked)
        if previous is acked:
            self.counters.claimed += 1
        return acked

    def handle(self, acked: Acked) -> WorkflowHandle[UserCouponWorkflow, CouponStatus]:
        return self.client.get_workflow_handle_for(UserCouponWorkflow.run, acked.workflow_id)

    async def complete(self, acked: Acked, via: Via, deadline: float, *, api: bool = False) -> bool:
        """Report the coupon's task done to its workflow (`via` its signal or its update),
        or through the HTTP API (`api`: the bulk task events, or the synchronous endpoint)."""
        handle = self.handle(acked)
        completion = TaskCompletion(TASK)

        async def once() -> object:
            if via == "signal":
                await handle.signal(UserCouponWorkflow.task_done, completion)
                return None
            return await handle.execute_update(
                UserCouponWorkflow.complete_task,
                completion,
                rpc_timeout=timedelta(seconds=CALL_TIMEOUT_S - 1),
            )

        async def through_api() -> object:
            if via == "update":
                path = f"/v1/coupons/{acked.coupon_id}/tasks/{TASK}/complete"
                return _answer(await self.api.post(path, json={"user_id": acked.user_id}))
            event = {"coupon_id": acked.coupon_id, "user_id": acked.user_id, "task": TASK}
            answer = _answer(await self.api.post("/v1/task-events", json={"events": [event]}))
            [result] = answer["results"]
            if result["code"] == "unavailable":
                raise NoAnswer(f"task event: {result['detail']}")
            if not result["accepted"]:
                raise Refused(result["code"], result["detail"])
            return answer

        self.counters.completions_sent += 1
        try:
            ok, _ = await self._retry(
                f"{via} {acked.coupon_id}", through_api if api else once, deadline
            )
        except (Refused, WorkflowUpdateFailedError) as err:
            # A duplicate report of a done task is answered, never refused: a refusal
            # here means the coupon is somewhere it should not be.
            cause = err.cause or err if isinstance(err, WorkflowUpdateFailedError) else err
            self.counters.refusals.append(f"{via} {acked.coupon_id}: {_short(cause)}")
            return False
        if ok:
            self.counters.completions_acked += 1
            self.counters.last_completion_at = time.monotonic()
            self.completed.add(acked.coupon_id)
        else:
            self.counters.completions_failed += 1
        return bool(ok)

    # ----- the simulator's control plane --------------------------------------------

    async def knobs(self, **changes: object) -> None:
        response = await self.http.put("/sim/knobs", json=changes)
        response.raise_for_status()

    async def sim_stats(self) -> dict[str, int]:
        response = await self.http.get("/sim/stats")
        response.raise_for_status()
        stats: dict[str, int] = response.json()
        return stats

    async def sim_batches(self) -> list[dict[str, Any]]:
        """Every batch the simulator holds, with the request key it was created under."""
        response = await self.http.get("/sim/batches")
        response.raise_for_status()
        batches: list[dict[str, Any]] = response.json()["batches"]
        return batches

    async def set_batch(self, **changes: object) -> dict[str, Any]:
        """Change the batch behind the service's back (`remaining`, `status`), as the
        platform's operator can; the batch as the platform now has it."""
        response = await self.http.put(f"/sim/batches/{self.batch_id}", json=changes)
        response.raise_for_status()
        batch: dict[str, Any] = response.json()
        return batch

    async def use(self, platform_coupon_id: str, user_id: str) -> None:
        """Mark a coupon used at the platform, as a shop's till does (the platform's own
        API, with its key): the platform then sends its COUPON.USED callback."""
        response = await self.http.post(
            f"/sim/coupons/{platform_coupon_id}/use",
            headers={"Authorization": f"Bearer {self.settings.platform_api_key}"},
        )
        response.raise_for_status()
        self.used[platform_coupon_id] = user_id

    async def notifications(self) -> list[dict[str, Any]]:
        """The platform's COUPON.USED notifications, with their delivery state and attempts."""
        response = await self.http.get("/sim/notifications", params={"limit": 10_000})
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()["notifications"]
        return found

    async def platform_coupons(self) -> list[dict[str, Any]]:
        response = await self.http.get(f"/sim/batches/{self.batch_id}/coupons")
        response.raise_for_status()
        coupons: list[dict[str, Any]] = response.json()["coupons"]
        return coupons

    # ----- the catalog ---------------------------------------------------------------

    async def reconcile(self, timeout_s: float) -> ReconcileReport:
        """Run the reconciliation of the campaign's batch as `starter.py reconcile` does,
        as a check only (repair off): the platform's flow files against the ledger."""
        handle = await self.client.start_workflow(
            RECONCILE_WORKFLOW,
            ReconcileInput(self.ledger_batch_id, repair=False),
            id=f"reconcile:chaos-{self.tag}:{uuid.uuid4()}",
            task_queue=self.settings.task_queue,
            result_type=ReconcileReport,
            execution_timeout=timedelta(seconds=timeout_s),
        )
        return await asyncio.wait_for(handle.result(), timeout=timeout_s)

    async def ledger_batch(self) -> Batch | None:
        """The batch as the ledger holds it after the last catalog sync."""
        return await get_batch(self.pool, self.ledger_batch_id)

    # ----- the ledger ------------------------------------------------------------------

    async def states(self) -> dict[str, int]:
        return await ledger.count_by_state(self.pool, self.campaign)

    async def redemptions(self) -> dict[str, tuple[str | None, list[Redemption]]]:
        """Per coupon of the campaign: the platform coupon its receipt names (None without
        one) and its `redeemed` events."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT c.coupon_id, r.platform_coupon_id, e.cause,"
                " extract(epoch FROM e.recorded_at - e.at)"
                " FROM claims c"
                " LEFT JOIN receipts r ON r.coupon_id = c.coupon_id"
                " LEFT JOIN coupon_events e ON e.coupon_id = c.coupon_id"
                " AND e.to_state = 'redeemed'"
                " WHERE c.campaign_id = %s",
                (self.campaign,),
            )
            rows = await cur.fetchall()
        found: dict[str, tuple[str | None, list[Redemption]]] = {}
        for coupon_id, platform_coupon_id, cause, took_s in rows:
            _, events = found.setdefault(coupon_id, (platform_coupon_id, []))
            if cause is not None:
                events.append(Redemption(cause, float(took_s)))
        return found

    async def wait_all_in(self, state: str, timeout_s: float) -> float | None:
        """Poll the ledger until every acknowledged coupon is in `state`; the monotonic
        time it was first seen, or None when the bound ran out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.harness.ensure_worker()
            try:
                states = await self.states()
            except Exception as err:
                log.info("ledger unreadable while waiting: %s", _short(err))
                states = {}
            if states.get(state, 0) >= len(self.acked) and len(self.acked) > 0:
                return time.monotonic()
            await asyncio.sleep(0.5)
        return None


def _answer(response: httpx.Response, refused: type[Refused] = Refused) -> dict[str, Any]:
    """The API's 2xx body; a 4xx answer raises `refused` with its code (an answer, never
    tried again), a 5xx or 429 `NoAnswer` (tried again)."""
    if response.is_success:
        body: dict[str, Any] = response.json()
        return body
    if response.status_code == 429 or response.is_server_error:
        raise NoAnswer(f"HTTP {response.status_code}: {response.text[:160]}")
    try:
        problem = response.json()
        code, detail = str(problem["code"]), str(problem["detail"])
    except (ValueError, KeyError, TypeError):
        code, detail = f"http_{response.status_code}", response.text[:160]
    raise refused(code, detail)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__
