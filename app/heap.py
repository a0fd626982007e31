"""What a long-running process does with its memory once started."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any


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
