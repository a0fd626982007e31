"""Where the embedded servers listen: the loopback address, free ports, and the checks that a
port is taken or a server answers."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from app.embedded.process import ProcessStartError

LOCALHOST = "127.0.0.1"

# A proxy from the environment must not intercept calls to our own children.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free right now, below the kernel's ephemeral range, and handed to
    no other caller on this machine for a while (`free_ports`).

    There is a window between this check and the child binding the port; callers that
    start several children take all their ports first, and startup errors name the port.
    """
    [port] = free_ports(1, host)
    return port


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """`count` different ports free right now, each held bound until all are taken.

    Picked below the ephemeral range the kernel draws every outgoing connection's local
    port from: a port from `bind(0)` lies in that range, and a connection opened meanwhile
    can take it before our child binds it (seen: a Temporal UI port taken in between).
    Where that range leaves no room below it, the kernel's own choice is taken.

    A port handed out is promised to its caller, for PROMISE_S, against every process on the
    machine that picks through here: two processes picking at once could otherwise both
    find the same port free before either child binds it (seen: a chaos scenario's simulator
    port bound by the other pytest-xdist process's server in the second between)."""
    low = _ephemeral_low()
    candidates = range(_PICK_FLOOR, low) if low - _PICK_FLOOR >= 1000 else range(0)
    with contextlib.ExitStack() as held, _promises() as promised:
        ports: list[int] = []
        for port in random.sample(candidates, min(len(candidates), 50 * count)):
            if len(ports) == count:
                break
            if str(port) in promised:
                continue
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind((host, port))
            except OSError:
                continue
            ports.append(port)
        while len(ports) < count:
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        now = time.time()
        promised.update((str(port), now) for port in ports)
        return ports


# Long enough for a stack to start every child it picked ports for.
PROMISE_S = 120.0
# The ports promised lately (port -> when), shared by every process of this machine's user.
PROMISES = Path(tempfile.gettempdir()) / f"coupon-lifecycle-ports-{os.getuid()}.json"


@contextlib.contextmanager
def _promises() -> Iterator[dict[str, float]]:
    """The ports promised in the last PROMISE_S, locked against other processes for the
    block and written back after it. Unreadable or unwritable, it is an empty promise:
    picking goes on as before, each process on its own."""
    try:
        lock = open(PROMISES.with_suffix(".lock"), "a")
    except OSError:
        lock = None
    if lock is None:
        yield {}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = time.time()
        try:
            read = json.loads(PROMISES.read_text())
            # A clock stepped back must not keep a promise for longer than PROMISE_S.
            promised = {str(p): float(at) for p, at in read.items() if 0 <= now - at < PROMISE_S}
        except (OSError, ValueError, TypeError, AttributeError):
            promised = {}  # none yet, or not ours to read: the next write replaces it
        yield promised
        with contextlib.suppress(OSError):
            written = PROMISES.with_suffix(f".{os.getpid()}.tmp")
            written.write_text(json.dumps(promised))
            written.replace(PROMISES)


# Ports below this are left to services a machine runs on purpose.
_PICK_FLOOR = 15000


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere, the default)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True if something accepts TCP connections on `host`:`port`."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_free_port(what: str, port: int, host: str = LOCALHOST) -> None:
    """Refuse to start when something already listens on `port` (of `host`).

    Otherwise a server left over from an earlier run would answer our readiness check while
    the child we just started fails to bind and exits, and we would report it as ready.
    """
    if port_open(host, port):
        raise ProcessStartError(
            f"cannot start {what}: {host}:{port} is already in use (a server left over "
            "from an earlier run?); set PG_PORT, TEMPORAL_PORT, TEMPORAL_UI_PORT or "
            "SIMULATOR_PORT to use another port"
        )


def listens(pid: int | None, port: int) -> bool:
    """True if process `pid` itself listens on TCP `port` (others may too: SO_REUSEPORT)."""
    if pid is None:
        return False
    try:
        sockets = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets)


def answers_health(url: str) -> bool:
    """True if GET `url` answers 200 within a second, directly (no proxy)."""
    try:
        with _DIRECT.open(url, timeout=1) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False
