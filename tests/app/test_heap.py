"""The start-up heap frozen: out of later collections, with the start's garbage collected
first rather than kept forever; each collection timed for the worker's metrics."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from app.heap import freeze_startup_heap, time_collections


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_the_heap_is_frozen_and_the_garbage_of_the_start_collected_first(
    unfrozen_after: None,
) -> None:
    kept = Node()
    garbage, partner = Node(), Node()
    garbage.other, partner.other = partner, garbage  # a cycle only a collection frees
    gone = weakref.ref(garbage)
    del garbage, partner
    before = gc.get_freeze_count()

    freeze_startup_heap()

    assert gone() is None, "the start's garbage was frozen instead of collected"
    assert gc.get_freeze_count() > before
    # What was kept is in the permanent generation: no collection visits it.
    assert not any(o is kept for o in gc.get_objects())


def test_each_collection_is_reported_with_its_generation_until_stopped() -> None:
    seen: list[tuple[int, float]] = []
    stop = time_collections(lambda generation, seconds: seen.append((generation, seconds)))
    try:
        gc.collect()
        gc.collect(0)
    finally:
        stop()
    assert [generation for generation, _ in seen] == [2, 0]
    assert all(seconds >= 0 for _, seconds in seen)
    gc.collect()
    assert len(seen) == 2, "reported after being stopped"
