"""Processes known by their pid, through the kernel: the parent-death signal and the
subreaper role (prctl), a process's start time and children from /proc, stopping a process
that is not our child (a dead stack's) by pid and start time, reaping, running as another
user. `process.ManagedProcess` is built on these; nothing here looks a process up by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


# prctl(2) options, from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `sig` to the child when its parent dies (Linux
    only; None elsewhere), so a parent killed with SIGKILL leaves no server behind.

    The kernel sends it when the *thread* that forked the child exits, so only a parent
    that starts its children from a thread that lives as long as they should may use it.
    It runs after the child took its user and group (Popen sets them first), since a change
    of credentials clears it.
    """
    return _parent_death_signal(sig, parent=os.getpid())


def set_own_parent_death_signal(sig: signal.Signals) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux only)."""
    set_it = _parent_death_signal(sig, parent=os.getppid())
    if set_it is not None:
        set_it()


def _parent_death_signal(sig: signal.Signals, parent: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    # Looked up now, in the parent: the child between fork and exec only calls it.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            # The parent died before the setting took effect: act as if it had.
            os.kill(os.getpid(), sig)

    return set_parent_death_signal


def set_child_subreaper(enabled: bool) -> bool:
    """Make this process the subreaper of orphaned descendants (Linux only).

    Returns True only if this call changed the setting, so the caller restores it only
    then and never undoes a subreaper role someone else gave this process.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        current = ctypes.c_int(0)
        if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(current), 0, 0, 0) != 0:
            return False
        if bool(current.value) == enabled:
            return False
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid`, read from /proc (empty where there is no /proc)."""
    children: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                    fields = stat_file.read()
            except OSError:
                continue  # exited while we looked
            # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
            after_comm = fields[fields.rindex(b")") + 2 :].split()
            if int(after_comm[1]) == pid:
                children.append(int(entry.name))
    return children


def process_start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot, /proc/<pid>/stat field 22): with the pid, it
    names one process, never a later one given the same pid. None if no such process runs
    (a zombie has exited: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    after_comm = fields[fields.rindex(b")") + 2 :].split()
    if after_comm[0] in (b"Z", b"X"):
        return None
    return int(after_comm[19])


def same_process_alive(pid: int, start_time: int) -> bool:
    """True while the process `pid` that started at `start_time` runs."""
    return pid > 0 and process_start_time(pid) == start_time


def stop_recorded(pid: int, start_time: int, sig: signal.Signals, timeout_s: float = 10) -> bool:
    """Stop a process that is not our child (a dead stack's), known by its pid and start
    time: `sig`, then after `timeout_s` SIGKILL for it and its direct children (PostgreSQL's
    backends have sessions of their own). False if it was not running."""
    if not same_process_alive(pid, start_time):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while same_process_alive(pid, start_time):
        if time.monotonic() >= deadline:
            logger.warning(
                "pid %d still running %.0f s after %s; killing it", pid, timeout_s, sig.name
            )
            # Frozen first, so its list of children is final (see ManagedProcess._kill_tree).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            for victim in [pid, *children_of(pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while same_process_alive(pid, start_time) and time.monotonic() < deadline:
                time.sleep(0.05)
            break
        time.sleep(0.05)
    return True


def reap(pids: Sequence[int], timeout_s: float) -> None:
    """Wait for each of `pids` that is (now) our child; skip any that is not."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while True:
            try:
                reaped, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if reaped:
                break
            if time.monotonic() >= deadline:
                logger.warning("pid %d still not exited after SIGKILL", pid)
                return
            time.sleep(0.01)


def run_as(user: str | None) -> dict[str, Any]:
    """`Popen` arguments that run a child as the system `user` (needs root; None: as us)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    # Without group/extra_groups the child would keep root's groups.
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
