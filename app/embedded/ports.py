"""Where the embedded servers listen: the loopback address, free ports, and the checks that a
port is taken or a server answers."""

from __future__ import annotations

import contextlib
import socket
import urllib.error
import urllib.request

from app.embedded.process import ProcessStartError

LOCALHOST = "127.0.0.1"

# A proxy from the environment must not intercept calls to our own children.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = LOCALHOST) -> int:
    """Ask the kernel for a TCP port that is free right now.

    There is a window between closing this socket and the child binding the port; callers
    that start several children take all their ports first, and startup errors name the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """`count` different ports free right now: each socket stays bound until all are taken, so
    the kernel cannot hand the same port out twice (as `free_port` called in a row can)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


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


def answers_health(url: str) -> bool:
    """True if GET `url` answers 200 within a second, directly (no proxy)."""
    try:
        with _DIRECT.open(url, timeout=1) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False
