"""The one way this project supervises a child process, and the one way a server is one.

`ManagedProcess` starts a child in its own session, signals it only by the pid `Popen` gave
back, kills its whole tree when it will not stop, and can have the kernel stop it when its
parent dies. `Server` is a server run as one such child: start waits until it serves;
stop, kill and restart act on that child. Processes that are not our children (a dead
stack's) are known by pid and start time (`app.embedded.pids`), never by name.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from app.embedded.pids import (
    children_of,
    die_with_parent,
    process_start_time,
    reap,
    run_as,
    set_child_subreaper,
)

logger = logging.getLogger(__name__)


class ProcessStartError(RuntimeError):
    """A child exited or did not become ready in time; the message carries its log tail."""


# Children still running when the interpreter exits (a test that crashed before its
# finally, an exception in `make run` before the orderly shutdown). Because they live in
# their own session, nothing else would ever stop them.
_running: set[ManagedProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_running):
        logger.warning("stopping %s (pid %s) left running at exit", proc.name, proc.pid)
        with contextlib.suppress(Exception):
            proc.stop(timeout_s=5)


# The niceness of work that runs behind the answers on a machine that also answers: one
# box running the whole stack (`make run`, the benchmark) gives the CPU first to what a
# user waits on (PostgreSQL, the API) and lets the workflow engine and its worker, which
# start and drive coupons behind the answer, take what is left. It changes nothing while
# the machine has CPU to spare.
# Where the kernel groups the CPU by session (autogroup, on by default in most
# distributions' kernels), a niceness acts only inside the child's own session, and every
# child here has a session of its own: the group's niceness is set too, or the engine took
# as much CPU as the API in a claim burst (0.52 of a core against 0.60; with the group's
# niceness, 0.36 against 0.75 and a quarter more claims a second).
BACKGROUND_NICE = 10
_AUTOGROUP = "/proc/self/autogroup"


class ManagedProcess:
    """A child process we own, with its output in a log file we name.

    The child gets its own session and process group (start_new_session=True): a Ctrl-C on
    the terminal reaches only our process, which can then stop the children in order (the
    worker before Temporal and PostgreSQL) instead of them all dying at once.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        signal_group: bool = True,
        redact: Sequence[str] = (),
        die_with_parent: bool = False,
        nice: int = 0,
        stop_timeout_s: float = 10,
    ) -> None:
        """`user` runs the child as that system user (needs root). `stop_signal` is what
        stop() sends first; `signal_group` sends it to the whole process group rather than
        to the leader only (PostgreSQL wants only its postmaster signalled). `redact`: secrets
        in `argv` that the log's command line shows as ***. `die_with_parent`: the kernel
        sends the child `stop_signal` when the thread that started it exits (see
        `die_with_parent()`): only for a parent that starts it from its main thread.
        `nice`: added to the child's niceness, for work that should yield the CPU to others
        on a busy machine (see BACKGROUND_NICE). `stop_timeout_s`: how long stop() waits
        after `stop_signal` before it kills, by default."""
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.signal_group = signal_group
        self.redact = tuple(secret for secret in redact if secret)
        self.die_with_parent = die_with_parent
        self.nice = nice
        self.stop_timeout_s = stop_timeout_s
        self._popen: subprocess.Popen[bytes] | None = None
        self._start_time: int | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    @property
    def start_time(self) -> int | None:
        """When the current run started (see `process_start_time`), None before start()."""
        return self._start_time

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        ids = run_as(self.user)
        # Append, so the log of a restarted child keeps what the previous run said; the
        # offset lets error messages quote only the current run.
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            command = shlex.join(self.argv)
            for secret in self.redact:
                command = command.replace(secret, "***")
            log.write(f"--- {stamp} starting {self.name}: {command}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=self._preexec(),
                **ids,
            )
        # Read while the child is ours and unreaped, so it names this very process.
        self._start_time = process_start_time(self._popen.pid)
        _running.add(self)
        logger.debug("started %s (pid %d), log %s", self.name, self._popen.pid, self.log_path)

    def _preexec(self) -> Callable[[], None] | None:
        """What the child runs between fork and exec: its parent-death signal, its nice (its
        own and its session's)."""
        parent_death = die_with_parent(self.stop_signal) if self.die_with_parent else None
        if not self.nice:
            return parent_death
        nice = self.nice

        def run() -> None:
            if parent_death is not None:
                parent_death()
            niceness = os.nice(nice)
            # After setsid (Popen runs it first), so this is the child's own group.
            with contextlib.suppress(OSError), open(_AUTOGROUP, "w") as group:
                group.write(str(niceness))

        return run

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines this run of the child wrote to its log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(
        self, check: Callable[[], bool], timeout_s: float, interval_s: float = 0.1
    ) -> None:
        """Poll `check` until it returns True; raise ProcessStartError if the child exits
        first or `timeout_s` passes. An exception from `check` counts as "not yet" (a refused
        connection is the normal answer while a server starts) and is quoted on timeout."""
        deadline = time.monotonic() + timeout_s
        last_error: BaseException | None = None
        while True:
            if not self.alive:
                raise ProcessStartError(
                    f"{self.name} exited with code {self.returncode} before it was ready; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if check():
                    return
            except Exception as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                detail = f" (last check error: {last_error!r})" if last_error else ""
                raise ProcessStartError(
                    f"{self.name} (pid {self.pid}) not ready after {timeout_s:.0f} s{detail}; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(interval_s)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Ask the child to exit with `stop_signal`; SIGKILL it (see kill) after `timeout_s`
        (default: its `stop_timeout_s`). Returns the exit code (negative for a signal), None
        if it was never started."""
        if timeout_s is None:
            timeout_s = self.stop_timeout_s
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            # Signalling only while the leader is unreaped guarantees its pid, which is
            # also the group id, still names our child and not a recycled pid.
            if self.signal_group:
                self._signal_group(self.stop_signal)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, self.stop_signal)
            try:
                popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) still running %.0f s after %s; killing it",
                    self.name,
                    popen.pid,
                    timeout_s,
                    self.stop_signal.name,
                )
                self._kill_tree()
        _running.discard(self)
        logger.debug("%s (pid %d) exited with %s", self.name, popen.pid, popen.returncode)
        return popen.returncode

    def kill(self) -> None:
        """SIGKILL the child, its process group and its direct children, as a crash of the
        whole component would (chaos tests)."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            self._kill_tree()
        _running.discard(self)

    def _kill_tree(self) -> None:
        """SIGKILL the leader, its group and its direct children, then reap them all.

        The group alone is not enough: PostgreSQL's backends call setsid(), so they are in
        groups of their own. Left alive they notice the postmaster's death only at their
        next wait, and while they hold the old shared memory a new postmaster refuses to
        start. Freezing the leader with SIGSTOP first makes its list of children final (a
        stopped process neither forks nor reaps, so those pids stay its children).

        Orphans go to the nearest "child subreaper", else to pid 1, which may reap them late
        (this project's sandbox leaves them <defunct> for a while). So for the moment of the
        kill we become their subreaper and wait for exactly those pids, which cannot touch
        any other child of ours.
        """
        popen = self._popen
        assert popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, signal.SIGSTOP)
        children = children_of(popen.pid)
        adopted = set_child_subreaper(True)
        try:
            self._signal_group(signal.SIGKILL)
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            popen.wait()
            reap(children, timeout_s=5)
        finally:
            if adopted:
                set_child_subreaper(False)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)


class Server(abc.ABC):
    """A server we run as one `ManagedProcess`: what every embedded server does the same way.

    start() refuses a second start, makes the child ready to run (`_prepare`), starts it,
    waits until it serves (`_ready`, then `_finish_start`) and stops it again if it does not;
    stop(), kill() and restart() act on that child only. A server says what is its own: its
    checks and files in `_prepare`, when it serves (`_ready`, `_finish_start`), and what the
    log says of it (`_ready_detail`).
    """

    title: ClassVar[str]
    """The server in a sentence: "<title> is already running"."""
    label: ClassVar[str]
    """The server in the log: "<label> ready on <where> ..."."""

    def __init__(self, process: ManagedProcess, startup_timeout_s: float, where: str) -> None:
        """`where`: where it serves, for the log."""
        self._process = process
        self.startup_timeout_s = startup_timeout_s
        self.where = where

    @property
    def process(self) -> ManagedProcess:
        """The child; the same object across restarts."""
        return self._process

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.alive

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines the current run wrote to its log."""
        return self._process.log_tail(lines)

    def start(self) -> None:
        """Start the child and wait until it serves; a child that does not is stopped."""
        if self.alive:
            raise RuntimeError(f"{self.title} is already running (pid {self.pid})")
        began = time.monotonic()
        self._prepare()
        self._process.start()
        try:
            self._process.wait_ready(self._ready, self.startup_timeout_s)
            self._finish_start(began)
        except BaseException:
            self.stop(timeout_s=5)
            raise
        # Logged as the server's own module, beside what else it logs.
        logging.getLogger(type(self).__module__).info(
            "%s ready on %s (pid %s) in %.2f s%s",
            self.label,
            self.where,
            self.pid,
            time.monotonic() - began,
            self._ready_detail(),
        )

    def stop(self, timeout_s: float = 10) -> None:
        """The child's stop signal; SIGKILL for its tree after `timeout_s`."""
        self._process.stop(timeout_s)

    def kill(self) -> None:
        """SIGKILL the child and its tree, as a crash would (chaos tests)."""
        self._process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Before each start: refuse ports in use, make directories and files."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """Polled until True while the child starts (an exception counts as not yet)."""

    def _finish_start(self, began: float) -> None:
        """Once `_ready`: what must be done before the server counts as started (by
        default nothing)."""
        return

    def _ready_detail(self) -> str:
        """Appended to the log's ready line."""
        return ""
