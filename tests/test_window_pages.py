"""Window slots of a hybrid cache (engine.window_pages) and the tree's adoption of recomputed pages, as units.
The scheduler-level checks (every windowed read of every step) are in tests/test_scheduler.py."""
from __future__ import annotations

import collections
import random

import pytest

from engine.page_pool import PagePool
from engine.radix_cache import RadixCache
from engine.window_pages import WindowPages


def _usable_reference(w: WindowPages, pages: list[int], num_tokens: int) -> int:
    """The most j such that the first token to compute after j pages sees only pages with slots, by brute force."""
    ps, best = w.page_size, 0
    for j in range(1, len(pages) + 1):
        start = min(j * ps, num_tokens - 1)
        # the earliest position it sees (a window back, or its chunk's first), as a page index
        first = (start // w.window * w.window if w.chunked else max(0, start - w.window + 1)) // ps
        if all(p in w.slot_of for p in pages[first:j]):
            best = j
    return best


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("chunked", [False, True])
def test_usable_prefix_matches_brute_force(seed, chunked):
    rng = random.Random(seed)
    ps = rng.choice([1, 2, 4, 8])
    w = WindowPages(64, window=rng.randrange(1, 40), page_size=ps, chunked=chunked)
    pages = rng.sample(range(200), rng.randrange(0, 30))
    w.alloc([p for p in pages if rng.random() < 0.6])
    for num_tokens in {len(pages) * ps, len(pages) * ps + 1, len(pages) * ps + rng.randrange(2, 9)}:
        assert w.usable(pages, num_tokens) == _usable_reference(w, pages, num_tokens)


def test_a_chunked_layer_reaches_back_to_its_chunk_start():
    """An attention chunk of 8 over pages of 4: positions 0-7 see from page 0, 8-15 from page 2 (a sliding window of 8
    keeps page 0 for position 8, which sees position 1); a chunk that does not fill whole pages starts inside one."""
    w = WindowPages(8, window=8, page_size=4, chunked=True)
    assert [w.first_page(p) for p in (0, 7, 8, 15, 16)] == [0, 0, 2, 2, 4]
    assert WindowPages(8, window=8, page_size=4).first_page(8) == 0
    assert [WindowPages(8, window=6, page_size=4, chunked=True).first_page(p) for p in (5, 6, 11, 12)] == [0, 1, 1, 3]


def test_slots_are_evicted_only_from_the_tree_least_recently_released_first():
    w = WindowPages(4, window=8, page_size=4)
    w.alloc([10, 11, 12, 13])  # a sequence's pages
    w.tree_hold([10, 11, 12])  # the tree stores three of them
    assert w.num_obtainable == 0 and w.reserve(1) == 0  # everything still held by the sequence
    w.release([11, 10])  # leave the sequence's window, in this order
    assert w.num_obtainable == 2
    assert w.reserve(1) == 1 and 11 not in w.slot_of and 10 in w.slot_of  # the first released goes first
    w.ref([10])  # a new sequence hits page 10: no longer evictable
    assert w.num_obtainable == 1 and w.reserve(2) == 0
    w.release([12, 13])  # 13 was never in the tree: its slot is free at once
    assert 13 not in w.slot_of and w.pool.num_free == 2 and w.num_obtainable == 3
    w.tree_drop([12])  # the tree evicts page 12 itself
    assert 12 not in w.slot_of and w.pool.num_free == 3
    w.check_invariants(collections.Counter({10: 1}))


def test_tree_adopts_pages_with_slots_in_place_of_its_slotless_ones():
    pool = PagePool(16)
    tree = RadixCache(pool, page_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    old = pool.alloc(3)
    tree.insert(tokens, old)
    pool.unref(old)  # only the tree holds them
    new = [old[0]] + pool.alloc(2)  # a sequence that shared page 0 and recomputed pages 1 and 2
    with_slot = {old[0], new[2]}
    taken = tree.adopt(tokens, new, None, lambda o, n: o not in with_slot and n in with_slot)
    assert taken == [new[2]]
    assert tree.match(tokens).pages == [old[0], old[1], new[2]]
    assert pool.refcount(old[2]) == 0 and pool.refcount(new[2]) == 2  # the tree's and the sequence's
    tree.check_invariants()
    assert not [e for e in tree.drain_events() if e.kind == "removed"], "same hashes: the feed sees no change"
