"""What a long-running process does with its memory once started."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

# Python runs a full collection after every 10 collections of its middle generation. A
# worker's heap is mostly its cached workflows (about 360 tracked objects each), and evicting
# one leaves a cycle of them only a full collection frees. So at 100 lifecycles in flight
# with the cache full, 6 full collections per 1,000 lifecycles took 0.43 s each (the event
# loop stopped meanwhile): 3.3 ms of the worker's CPU per lifecycle spent collecting, 2.5 of
# them in full collections. After every 100 instead: one, and 1.2 ms in all; the worker's
# CPU per lifecycle 22.4 ms against 24.4, its RSS 320 MiB against 280 to 297 with the
# garbage kept longer (bench/results/2026-12-07-profile.md).
FULL_COLLECTION_AFTER = 100


def freeze_startup_heap() -> None:
    """Leave the objects made while starting (modules, clients, pools: most of the heap)
    out of every later garbage collection.

    A full collection walks every tracked object; in a process serving claims, that walk
    stopped the event loop for 90 to 97 ms once in every 10,000 claims at 500 a second,
    the longest stall in the run. With the start-up heap frozen (gc.freeze: the objects go
    to a permanent generation no collection visits), no collection took over 1.2 ms and
    the claims' p99 went from 31-35 ms to 25-27 ms (bench/results/2026-12-06-profile.md).
    Collected first, so no garbage of the start is frozen with it."""
    gc.collect()
    gc.freeze()


def space_out_full_collections() -> None:
    """Run a full collection after every FULL_COLLECTION_AFTER collections of the middle
    generation instead of 10, the two younger generations' thresholds kept."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)


def time_collections(record: Callable[[int, float], None]) -> Callable[[], None]:
    """Report each garbage collection to `record` (its generation, its seconds) until the
    function returned is called."""
    started = [0.0]

    def on_collection(phase: str, info: dict[str, Any]) -> None:
        # Collections never overlap (the GIL), whichever thread's allocation starts one.
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            record(info["generation"], time.perf_counter() - started[0])

    gc.callbacks.append(on_collection)
    return lambda: gc.callbacks.remove(on_collection)
