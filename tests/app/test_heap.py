"""The start-up heap frozen: out of later collections, with the start's garbage collected
first rather than kept forever."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from app.heap import freeze_startup_heap


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
