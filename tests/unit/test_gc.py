"""The server keeps the collector's generations young (decisions #19)."""

from __future__ import annotations

import gc
import weakref

import trio

from broker.server import keep_gc_young


class Node:
    other: Node | None = None


async def run_for(seconds: float, interval: float, full_every: float) -> None:
    with trio.move_on_after(seconds):
        await keep_gc_young(interval, full_every)


async def test_frozen_cycles_wait_for_the_full_collection_which_frees_them() -> None:
    gc.unfreeze()
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only the collector can free it
        gone = weakref.ref(a)
        await run_for(0.05, 0.01, 3600.0)
        assert gc.get_freeze_count() > 0
        del a, b
        gc.collect()  # frozen: out of the collector's reach
        assert gone() is not None
        await run_for(0.05, 0.01, 0.0)  # the full collection's turn
        assert gone() is None
        assert gc.get_freeze_count() > 0  # and what is alive is frozen again
    finally:
        gc.unfreeze()
