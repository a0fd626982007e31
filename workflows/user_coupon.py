"""One long-running workflow per user coupon.

About 500 lines on purpose: one workflow, whole, each wait next to the signals and updates
that end it; its timeouts and retries are in `workflows/policies.py`.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import NoReturn

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.policies import (
    BUDGET_RECHECK,
    BUDGET_RECHECK_CAP,
    FINAL_LOOKUP_RETRY,
    HISTORY_LIMIT,
    ISSUE_RETRY,
    LEDGER_CALL,
    LEDGER_RETRY,
    PLATFORM_CALL_TIMEOUT,
    REDEMPTION_POLL,
)

# Activities are called by reference (typed end to end); their modules do I/O, so they and
# what they import come from outside the sandbox, as does the state machine library.
with workflow.unsafe.imports_passed_through():
    from activities.ledger import LedgerActivities
    from activities.platform import PlatformActivities
    from coupons import contract as act
    from coupons.errors import UNKNOWN_TASK, WRONG_STATE
    from coupons.lifecycle import Lifecycle, TransitionNotAllowed, UnknownTask
    from coupons.model import (
        CAMPAIGN_ID,
        COUPON_STATE,
        PLATFORM_COUPON_ID,
        USER_ID,
        BudgetNotice,
        CancelRequest,
        CarriedRun,
        CouponInput,
        CouponStatus,
        ExpireRequest,
        IssueInput,
        LookupInput,
        PlatformView,
        Receipt,
        RecordTransitionInput,
        RedemptionReport,
        TaskCompletion,
        Transition,
    )

# Patches, each named for the change it guards; see "Changing the workflow" in the README.
FIRST_POLL_AFTER_BACKOFF = "first-poll-after-backoff"
# The budget recheck backs off (BUDGET_RECHECK doubling to BUDGET_RECHECK_CAP) and the
# waiting run continues as new past HISTORY_LIMIT; runs from before it recheck every
# BUDGET_RECHECK and never continue as new.
BUDGET_WAIT_BOUNDED = "budget-wait-bounded"
# A redemption report that arrives while the final lookup runs redeems the coupon; runs
# from before it lapsed the coupon when the lookup said unused, the report dropped.
REPORT_DURING_FINAL_LOOKUP = "report-during-final-lookup"


@workflow.defn
class UserCouponWorkflow:
    """The lifecycle of one claimed coupon, from claim to redemption or lapse.

    Exposes:
    - signal `task_done` (fire and forget) and update `complete_task` (validated, answers
      with the new status) for task completion;
    - signal `cancel` and update `cancel_coupon`;
    - signal `report_redemption` for platform callbacks and reconciliation repairs;
    - update `expire_coupon` for an operator ending the campaign;
    - signal `budget_available` from the catalog sync, for coupons waiting for budget;
    - query `status` with the full state.

    The workflow stays open after issuing so one history tells the coupon's whole story;
    only a long wait for budget continues it as new (its runs together tell the story, the
    status carries every transition).
    """

    @workflow.init
    def __init__(self, input: CouponInput) -> None:
        self._input = input
        self._lifecycle = _lifecycle_of(input)
        # A first run starts as a continued one would with nothing carried.
        carried = input.carried or CarriedRun([], [], None, BUDGET_RECHECK.total_seconds(), 0)
        self._runs_before = carried.runs_before
        self._transitions: list[Transition] = list(carried.transitions)
        self._unrecorded: list[Transition] = []
        # A run resumed from the ledger's `issued` starts with the ledger's receipt.
        self._receipt: Receipt | None = input.receipt
        self._redemption: RedemptionReport | None = carried.redemption
        self._ignored: list[str] = list(carried.ignored_signals)
        self._budget_notices = 0
        self._budget_recheck = timedelta(seconds=carried.budget_recheck_s)
        self._waiting_for = "start"
        self._platform_queue = act.platform_task_queue(workflow.info().task_queue)
        # The claim started the workflow with these search attributes already set.
        self._published_state = self._lifecycle.state

    # ----- the process -------------------------------------------------------------

    @workflow.run
    async def run(self, input: CouponInput) -> CouponStatus:
        if input.resume_state == "received":
            self._take_reported_tasks(input.tasks_done)
        # Each step runs only where the machine stands when the one before it ends.
        if self._lifecycle.value == "received":
            await self._await_tasks()
        if self._lifecycle.value == "usable":
            await self._issue()
        if self._lifecycle.value == "issued":
            await self._await_redemption()
        await self._record_pending()
        self._waiting_for = "nothing (final)"
        self._publish()
        # Let update handlers that are still running reply before the workflow closes.
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    async def _await_tasks(self) -> None:
        deadline = self._input.task_deadline
        self._waiting_for = "task completion" + (
            f" until {deadline.isoformat()}" if deadline else ""
        )
        self._publish()
        try:
            if deadline is not None and _until(deadline) <= timedelta(0):
                raise TimeoutError
            await workflow.wait_condition(
                lambda: self._lifecycle.value != "received",
                timeout=_until(deadline) if deadline else None,
                timeout_summary="task deadline",
            )
        except TimeoutError:
            self._fire("expire", "task deadline passed")

    async def _issue(self) -> None:
        # From here on the coupon may be in the wallet: the machine refuses a cancel.
        self._lifecycle.send("begin_send")
        # The move into `usable` is written by the issue activity itself, saving a round trip.
        became_usable = self._unrecorded.pop() if self._unrecorded else None
        while True:
            self._waiting_for = "the platform to confirm the send"
            self._publish()
            # Counted before the send: a notice that arrives while the send is being
            # refused must still end the wait that follows.
            notices = self._budget_notices
            try:
                receipt = await workflow.execute_activity_method(
                    PlatformActivities.issue_coupon,
                    IssueInput(
                        self._input.coupon_id,
                        self._input.batch_id,
                        self._input.user_id,
                        became_usable,
                        # No patch guards the wait: its branch starts only from a
                        # failure type no earlier worker raised, so no stored history
                        # can take it (and a patch would cost every coupon two events).
                        wait_for_budget=True,
                    ),
                    task_queue=self._platform_queue,
                    start_to_close_timeout=act.ISSUE_START_TO_CLOSE,
                    heartbeat_timeout=act.ISSUE_HEARTBEAT,
                    retry_policy=ISSUE_RETRY,
                    summary="send to the platform and record the receipt",
                )
                break
            except ActivityError as err:
                cause = err.cause
                if not isinstance(cause, ApplicationError):
                    raise
                if cause.type == act.BATCH_UNAVAILABLE:
                    if not workflow.patched(BUDGET_WAIT_BOUNDED):
                        await self._wait_for_budget(cause.message, notices, BUDGET_RECHECK)
                        continue
                    if await self._wait_for_budget(cause.message, notices, self._budget_recheck):
                        # Nothing came: the next wait is longer, up to the cap.
                        self._budget_recheck = min(2 * self._budget_recheck, BUDGET_RECHECK_CAP)
                    if self._history_full():
                        # The next run starts where this one would go on: with the send.
                        await self._continue_as_new()
                    continue
                if cause.type != act.SEND_REFUSED:
                    raise
                self._fire("refuse", f"platform refused: {cause.message}")
                return
        self._receipt = receipt
        # The issue activity wrote `issued` with the receipt in one transaction.
        self._fire("issue", "platform confirmed the send", at=receipt.confirmed_at, recorded=True)

    async def _wait_for_budget(self, why: str, notices: int, recheck: timedelta) -> bool:
        """The batch cannot send now: wait for the catalog sync to see budget (a notice
        beyond the `notices` seen before the send), or `recheck`; True if nothing came.

        Retrying the send on a short backoff instead would turn a campaign's backlog into a
        flood of refused calls at the platform.
        """
        self._waiting_for = f"budget at the platform ({why})"
        self._publish()
        try:
            await workflow.wait_condition(
                lambda: self._budget_notices != notices,
                timeout=recheck,
                timeout_summary="budget recheck",
            )
        except TimeoutError:
            return True
        return False

    def _history_full(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= HISTORY_LIMIT
        )

    async def _continue_as_new(self) -> NoReturn:
        """Go on in a fresh run of this workflow (same id, search attributes and task
        queue), `usable` with the send next, carrying what the ledger does not hold.

        Only from the wait for budget: the machine is `sending` there (refused, so nothing
        reached the wallet) and the next run begins that send again with the same key."""
        # The move into `usable` was written by the first refused send; nothing else moves
        # in this wait, but what is unwritten must not be lost with this run.
        await self._record_pending()
        # Let update handlers that are still running reply before this run closes.
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            replace(
                self._input,
                resume_state="usable",
                tasks_done=list(self._lifecycle.tasks_done),
                receipt=None,
                carried=CarriedRun(
                    transitions=list(self._transitions),
                    ignored_signals=list(self._ignored),
                    redemption=self._redemption,
                    budget_recheck_s=self._budget_recheck.total_seconds(),
                    runs_before=self._runs_before + 1,
                ),
            )
        )

    async def _await_redemption(self) -> None:
        assert self._receipt is not None
        valid_until = self._receipt.valid_until
        lookup = LookupInput(self._input.user_id, self._receipt.platform_coupon_id)
        self._waiting_for = f"redemption until {valid_until.isoformat()}"
        self._publish()
        view: PlatformView | None = None
        first_poll = min(REDEMPTION_POLL.initial_interval, _until(valid_until))
        if workflow.patched(FIRST_POLL_AFTER_BACKOFF) and first_poll > timedelta(0):
            # Nobody redeems a coupon within seconds of receiving it: look first after
            # the poll's initial interval, which keeps a platform call and an activity
            # off the busy moment of the send.
            try:
                await workflow.wait_condition(
                    lambda: self._redemption is not None,
                    timeout=first_poll,
                    timeout_summary="first redemption poll",
                )
            except TimeoutError:
                pass
        if self._redemption is None and _until(valid_until) > timedelta(0):
            poll = workflow.start_activity_method(
                PlatformActivities.wait_for_redemption,
                lookup,
                task_queue=self._platform_queue,
                start_to_close_timeout=PLATFORM_CALL_TIMEOUT,
                retry_policy=REDEMPTION_POLL,
                summary="poll the platform for redemption",
            )
            try:
                await workflow.wait_condition(
                    lambda: self._redemption is not None or poll.done(),
                    timeout=_until(valid_until),
                    timeout_summary="coupon validity",
                )
            except TimeoutError:
                pass
            if poll.done():
                view = poll.result()  # retried until it answers: it completes, never fails
            else:
                poll.cancel()
                try:
                    await poll
                except ActivityError:
                    pass  # the cancellation we just asked for
        if self._redemption is not None:
            report = self._redemption
            self._fire("redeem", f"redeemed ({report.source})", at=report.used_at)
            return
        if view is None:
            # Validity is over: one last look, for a use since the last poll.
            view = await workflow.execute_activity_method(
                PlatformActivities.lookup_coupon,
                lookup,
                task_queue=self._platform_queue,
                start_to_close_timeout=PLATFORM_CALL_TIMEOUT,
                retry_policy=FINAL_LOOKUP_RETRY,
                summary="final platform lookup at validity end",
            )
        if view.status == "used":
            self._fire("redeem", "redeemed (platform lookup)", at=view.used_at)
        elif self._redemption is not None and workflow.patched(REPORT_DURING_FINAL_LOOKUP):
            # The report arrived while the final lookup ran (a callback that was slower
            # than the platform's own lookup, or a reconciliation repair): the use stands.
            report = self._redemption
            self._fire("redeem", f"redeemed ({report.source})", at=report.used_at)
        else:
            self._fire("lapse", f"validity ended unused (platform: {view.status})")

    # ----- task completion ---------------------------------------------------------

    @workflow.signal(name=act.TASK_DONE)
    def task_done(self, completion: TaskCompletion) -> None:
        try:
            self._complete(completion)
        except ApplicationError as err:
            self._ignore(f"task_done({completion.task})", err)

    @workflow.update
    def complete_task(self, completion: TaskCompletion) -> CouponStatus:
        self._complete(completion)
        return self.status()

    @complete_task.validator
    def _validate_complete_task(self, completion: TaskCompletion) -> None:
        # Rejected here, the update leaves nothing in history.
        self._check("complete_task", completion.task)

    def _take_reported_tasks(self, tasks: list[str]) -> None:
        """A recovered run: the task reports its stuck run was given (the ledger keeps only
        states, not each task), taken as if reported again; a move to `usable` is written
        to the ledger as any other."""
        for task in tasks:
            try:
                self._complete(TaskCompletion(task))
            except ApplicationError as err:
                self._ignore(f"recovered task_done({task})", err)

    def _complete(self, completion: TaskCompletion) -> None:
        before = self._take("complete_task", completion.task)
        if self._lifecycle.state != before:
            self._note(before, f"tasks done: {', '.join(self._lifecycle.tasks_done)}")
        else:
            self._publish()  # one of several tasks, or a repeated report

    # ----- cancel and redemption reports -------------------------------------------

    @workflow.signal(name=act.CANCEL)
    def cancel(self, request: CancelRequest) -> None:
        try:
            self._note(self._take("cancel"), request.reason)
        except ApplicationError as err:
            self._ignore("cancel", err)

    @workflow.update
    def cancel_coupon(self, request: CancelRequest) -> CouponStatus:
        self._note(self._take("cancel"), request.reason)
        return self.status()

    @cancel_coupon.validator
    def _validate_cancel(self, request: CancelRequest) -> None:
        self._check("cancel")

    # ----- operator expiry and budget notices --------------------------------------

    @workflow.update(name=act.EXPIRE_COUPON)
    def expire_coupon(self, request: ExpireRequest) -> CouponStatus:
        self._note(self._take("expire"), request.reason)
        return self.status()

    @expire_coupon.validator
    def _validate_expire(self, request: ExpireRequest) -> None:
        self._check("expire")

    @workflow.signal(name=act.BUDGET_AVAILABLE)
    def budget_available(self, notice: BudgetNotice) -> None:
        self._budget_notices += 1

    def _ignore(self, signal: str, refusal: ApplicationError) -> None:
        # A signal cannot answer; keep the refusal visible instead of failing the task.
        workflow.logger.warning("ignored %s: %s", signal, refusal.message)
        self._ignored.append(f"{signal}: {refusal.message}")

    @workflow.signal(name=act.REPORT_REDEMPTION)
    def report_redemption(self, report: RedemptionReport) -> None:
        # A report may overtake our own confirmation of the send: keep it for `issued`.
        if self._lifecycle.may_be_used and self._redemption is None:
            self._redemption = report
        else:
            self._ignored.append(f"report_redemption: coupon is {self._lifecycle.state}")

    @workflow.query
    def status(self) -> CouponStatus:
        return CouponStatus(
            coupon_id=self._input.coupon_id,
            campaign_id=self._input.campaign_id,
            user_id=self._input.user_id,
            state=self._lifecycle.state,
            tasks_required=list(self._input.required_tasks),
            tasks_done=list(self._lifecycle.tasks_done),
            task_deadline=self._input.task_deadline,
            claimed_at=self._input.claimed_at,
            waiting_for=self._waiting_for,
            receipt=self._receipt,
            transitions=list(self._transitions),
            ignored_signals=list(self._ignored),
        )

    # ----- asking the machine, and moving it -----------------------------------------

    def _check(self, event: str, *args: str) -> None:
        """Refuse, as the caller's error, an event the machine would refuse now; moves
        nothing (the coupon's values stay as they were), so validators can ask it."""
        try:
            self._lifecycle.check(event, *args)
        except (TransitionNotAllowed, UnknownTask) as err:
            raise self._refusal(event, err) from None

    def _take(self, event: str, *args: str) -> str:
        """Send an event a caller asked for; the state it left. Refused, it is the caller's
        error (a refused event moves nothing), never a workflow task failure."""
        before = self._lifecycle.state
        try:
            self._lifecycle.send(event, *args)
        except (TransitionNotAllowed, UnknownTask) as err:
            raise self._refusal(event, err) from None
        return before

    def _refusal(self, event: str, err: TransitionNotAllowed | UnknownTask) -> ApplicationError:
        if isinstance(err, UnknownTask):
            return ApplicationError(str(err), type=UNKNOWN_TASK, non_retryable=True)
        return ApplicationError(
            self._lifecycle.refusal(event), type=WRONG_STATE, non_retryable=True
        )

    # ----- effects -------------------------------------------------------------------

    def _fire(
        self, event: str, cause: str, *, at: datetime | None = None, recorded: bool = False
    ) -> None:
        before = self._lifecycle.state
        try:
            self._lifecycle.send(event)
        except TransitionNotAllowed as err:
            # The workflow's own events (deadline, the platform's answers) come only where
            # the machine takes them: a refusal is a bug in the workflow, not bad input.
            raise RuntimeError(f"lifecycle refused {event} in {before}: {err}") from err
        self._note(before, cause, at=at, recorded=recorded)

    def _note(
        self, before: str, cause: str, *, at: datetime | None = None, recorded: bool = False
    ) -> None:
        transition = Transition(before, self._lifecycle.state, cause, at or workflow.now())
        self._transitions.append(transition)
        if not recorded:
            self._unrecorded.append(transition)
        self._publish()

    async def _record_pending(self) -> None:
        while self._unrecorded:
            transition = self._unrecorded[0]
            await workflow.execute_activity_method(
                LedgerActivities.record_transition,
                RecordTransitionInput(self._input.coupon_id, transition),
                start_to_close_timeout=LEDGER_CALL,
                retry_policy=LEDGER_RETRY,
                summary=f"ledger: {transition.from_state} → {transition.to_state}",
            )
            self._unrecorded.pop(0)

    def _publish(self) -> None:
        """Keep the Web UI's search attributes and current details in step with the machine."""
        state = self._lifecycle.state
        if state != self._published_state:
            # Only on a state change: each upsert is a history event.
            # The same one upsert per state change as before the platform coupon id was
            # added to it: replay compares commands, not their attributes.
            updates = [
                COUPON_STATE.value_set(state),
                CAMPAIGN_ID.value_set(self._input.campaign_id),
                USER_ID.value_set(self._input.user_id),
            ]
            if self._receipt is not None:
                updates.append(PLATFORM_COUPON_ID.value_set(self._receipt.platform_coupon_id))
            workflow.upsert_search_attributes(updates)
            self._published_state = state
        done = len(self._lifecycle.tasks_done)
        required = len(self._input.required_tasks)
        pending = ", ".join(self._lifecycle.tasks_pending) or "none"
        lines = [
            f"**{state}** · campaign `{self._input.campaign_id}` · user `{self._input.user_id}`",
            f"tasks {done}/{required} done (pending: {pending})",
            f"waiting for: {self._waiting_for}",
        ]
        if self._receipt is not None:
            lines.append(f"platform coupon `{self._receipt.platform_coupon_id}`")
        workflow.set_current_details("\n\n".join(lines))


def _lifecycle_of(input: CouponInput) -> Lifecycle:
    """Where a run starts: at the claim's start (`received`, or `usable` for a
    campaign without tasks), or where the ledger says a recovered coupon is."""
    if input.resume_state in ("usable", "issued"):
        # Its tasks are done. A usable coupon's send starts again (same key); an issued
        # one's is over. A continued run keeps the order they were done in.
        done = input.tasks_done if input.carried else input.required_tasks
        return Lifecycle(input.required_tasks, tasks_done=done, state=input.resume_state)
    return Lifecycle(input.required_tasks)


def _until(moment: datetime) -> timedelta:
    return max(moment - workflow.now(), timedelta(0))
