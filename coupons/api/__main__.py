"""`python -m coupons.api`: the HTTP API on uvicorn, at API_HOST:API_PORT."""

from __future__ import annotations

import logging
import sys

import uvicorn

from coupons.api.app import create_app
from coupons.api.codec import RedactPathToken
from coupons.config import ConfigError
from coupons.running import settings_from_env

log = logging.getLogger("coupons.api")


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The Web UI's codec endpoint carries its token in the path: never in the access log.
    logging.getLogger("uvicorn.access").addFilter(RedactPathToken())
    try:
        # The running stack's settings where the environment says nothing (coupons.running).
        settings = settings_from_env().with_stack_secrets()
    except ConfigError as err:
        log.error("%s", err)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # our logging above, one format for every line
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
