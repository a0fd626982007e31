"""The simulator as an ASGI app: a face's routes over the core, the control plane, and the
notification deliveries running beside them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Route

from coupons.platforms.simcore.core import Face, Simulator
from coupons.platforms.simcore.knobs import Knobs

log = logging.getLogger("coupons.platforms.simulator")


def _report_stop(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("notification delivery stopped", exc_info=task.exception())


def create_app(data_path: Path, face: Face, knobs: Knobs, keys_dir: Path) -> Starlette:
    """The simulator as an ASGI app speaking `face`'s protocol over the core at `data_path`."""
    sim = Simulator(data_path, knobs, face, keys_dir)
    log.info("simulator (%s) data at %s", face.name, data_path)
    if not face.callbacks_on:
        log.info("callbacks off: PLATFORM_CALLBACK_SECRET is not set, no notification is sent")
    else:
        log.info("callbacks on, to %s", sim.knobs.callback_url or "nowhere yet (callback_url)")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        delivery = asyncio.create_task(sim.notifier.run()) if sim.notifier.on else None
        if delivery is not None:
            delivery.add_done_callback(_report_stop)
        try:
            yield
        finally:
            if delivery is not None:
                delivery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await delivery
            sim.store.close()

    control = sim.control
    routes = [
        Route("/health", sim.health, methods=["GET"]),
        *face.routes(sim),
        Route("/sim/knobs", control(sim.get_knobs), methods=["GET"]),
        Route("/sim/knobs", control(sim.put_knobs), methods=["PUT"]),
        Route("/sim/knobs", control(sim.reset_knobs), methods=["DELETE"]),
        Route("/sim/stats", control(sim.stats), methods=["GET"]),
        Route("/sim/notifications", control(sim.notifications), methods=["GET"]),
        Route("/sim/batches", control(sim.batches), methods=["GET"]),
        Route("/sim/batches/{batch_id}", control(sim.put_batch), methods=["PUT"]),
        Route("/sim/batches/{batch_id}/coupons", control(sim.batch_coupons), methods=["GET"]),
        Route("/sim/coupons/{coupon_id}/use", control(sim.use_coupon), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.simulator = sim
    return app
