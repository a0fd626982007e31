"""`python -m app.api`: the HTTP API on uvicorn, at API_HOST:API_PORT; one of
API_PROCESSES processes there."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from app.running import settings_from_env
from coupons.config import PROMETHEUS_MULTIPROC_DIR, ConfigError, Settings

log = logging.getLogger("app.api")


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        # The running stack's settings where the environment says nothing (app.running).
        settings = settings_from_env().with_stack_secrets()
    except ConfigError as err:
        log.error("%s", err)
        return 2
    try:
        shared = _shared_socket(settings) if settings.api_processes > 1 else None
    except ConfigError as err:
        log.error("%s", err)
        return 2
    except OSError as err:
        log.error("API_PORT %d on %s: %s", settings.api_port, settings.api_host, err)
        return 2
    # Imported once the metrics directory is checked: prometheus_client opens its files
    # there as soon as the app's counters are made (coupons.metrics).
    from app.api.app import create_app
    from app.api.codec import RedactPathToken

    # The Web UI's codec endpoint carries its token in the path: never in the access log.
    logging.getLogger("uvicorn.access").addFilter(RedactPathToken())
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # our logging above, one format for every line
        proxy_headers=False,
        timeout_graceful_shutdown=10,
        # uvicorn's compiled parts (of its `standard` extras), named so that a missing
        # install fails here rather than falling back: with h11 and asyncio's own loop a
        # claim took about 1.0 ms of the API's CPU, with these 0.85 ms.
        http="httptools",
        loop="uvloop",
    )
    if shared is not None:
        # uvicorn names the address it serves only for a socket it bound itself.
        log.info(
            "serving on %s, one of API_PROCESSES=%d processes there",
            settings.api_url,
            settings.api_processes,
        )
    server = uvicorn.Server(config)
    # As uvicorn.run: Ctrl-C stops it gracefully, and an app that did not start exits 3.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=None if shared is None else [shared])
    return 0 if server.started else STARTUP_FAILURE


def _shared_socket(settings: Settings) -> socket.socket:
    """API_PORT bound with SO_REUSEPORT beside the other API processes, which the kernel
    spreads new connections over. Bound, not yet listening: uvicorn listens once the app
    has started, so no connection waits on a process that is still starting."""
    if not os.path.isdir(os.environ.get(PROMETHEUS_MULTIPROC_DIR, "")):
        # Otherwise each /metrics answer would count one process's claims, whichever it is.
        raise ConfigError(
            f"API_PROCESSES={settings.api_processes} needs {PROMETHEUS_MULTIPROC_DIR}: an existing "
            "directory the API processes share, for their metrics (the stack makes one)"
        )
    host = settings.api_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, settings.api_port))
    except OSError:
        sock.close()
        raise
    return sock


if __name__ == "__main__":
    sys.exit(main())
