"""The sliding-window layers' share of a hybrid KV cache: window slots attached to the full cache's pages.

Models that mix sliding-window and global layers (Gemma 2 and 3: 5 of every 6 layers see only the last 512 or
1,024 tokens) need every position's K/V in their global layers but only the last window's in the windowed ones.
A hybrid cache (`cache.hybrid`) stores the global layers in the page pool as usual and the windowed layers in a
smaller pool of *window slots*. A page id still names a run of `page_size` positions; `slot_of[page]`, when
present, is where the windowed layers' K/V of those positions live.

Holders. A slot is refcounted like a page (`engine.page_pool.PagePool`):
  - a running sequence holds the slots of its pages from `seq.window_from` on: every page a token it has yet to
    compute can attend to in a windowed layer, and its newest pages (allocated with a fresh slot each). As it
    moves on, pages falling out of its window are released;
  - the radix tree holds the slot of every page it stores that has one, so a later prompt can start right after a
    cached prefix whose last window still has its slots. Those holds are evicted on their own, least recently
    released first (a page's full K/V stays cached without them): `reserve` takes them when slots run short.

A cached prefix is usable only up to the last page boundary whose window is complete (`usable`); the tokens
after it are recomputed, and the recomputed pages replace the tree's slotless ones (`RadixCache.adopt`), so a
prefix whose window was evicted is restored by the next request that needs it.
"""
from __future__ import annotations

import collections
from typing import Iterable

from engine.page_pool import PagePool


def slots_per_sequence(window: int, page_size: int) -> int:
    """Most slots a decoding sequence holds: the pages its next token can see in a windowed layer, and a new page (an
    attention chunk of `window` tokens reaches as far back as a window of as many at most)."""
    return -(-(window - 1) // page_size) + 2


class WindowPages:
    """Window slots for pages: allocation, holders' references and the tree's evictable holds. Not thread safe."""

    def __init__(self, num_slots: int, window: int, page_size: int, chunked: bool = False) -> None:
        """window: the windowed layers' reach in tokens: a sliding window, or with `chunked` an attention chunk (a
        token sees back to its chunk's first position, (pos // window) x window: Llama 4's chunked layers)."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.pool = PagePool(num_slots)
        self.window = window
        self.chunked = chunked
        self.page_size = page_size
        self.slot_of: dict[int, int] = {}  # page -> its window slot (pages without one are absent)
        # Pages whose slot the tree holds: still held by a sequence too, and held by the tree alone (evictable, in the
        # order they became so: least recently used first).
        self._tree_shared: set[int] = set()
        self._tree_only: collections.OrderedDict[int, None] = collections.OrderedDict()

    # --- geometry -----------------------------------------------------------------------------------
    def first_page(self, pos: int) -> int:
        """Index of the first page the token at position `pos` attends to in a windowed layer."""
        if self.chunked:
            return pos // self.window * self.window // self.page_size
        return max(0, pos - self.window + 1) // self.page_size

    def usable(self, pages: list[int], num_tokens: int) -> int:
        """How many of a cached prefix's `pages` a sequence of `num_tokens` tokens can take: the most j whose first
        token to compute (position j * page_size, or the last token when that is the whole sequence) finds every
        page it attends to in a windowed layer holding a slot."""
        ps, run, best = self.page_size, 0, 0
        for i, page in enumerate(pages):
            run = run + 1 if page in self.slot_of else 0
            start = min((i + 1) * ps, num_tokens - 1)
            if run >= i + 1 - self.first_page(start):
                best = i + 1
        return best

    # --- holders ------------------------------------------------------------------------------------
    @property
    def num_obtainable(self) -> int:
        """Slots free now or after evicting the tree's sole holds."""
        return self.pool.num_free + len(self._tree_only)

    def reserve(self, n: int) -> int:
        """Evicts the tree's sole holds, least recently used first, until `n` slots are free (or none is left);
        returns how many were evicted."""
        evicted = 0
        while self.pool.num_free < n and self._tree_only:
            page, _ = self._tree_only.popitem(last=False)
            self._unref(page)
            evicted += 1
        return evicted

    def alloc(self, pages: Iterable[int]) -> None:
        """A fresh slot for each page (new pages of a sequence, which holds them). Reserve first."""
        for page in pages:
            assert page not in self.slot_of, f"page {page} already has window slot {self.slot_of[page]}"
            self.slot_of[page] = self.pool.alloc(1)[0]

    def ref(self, pages: Iterable[int]) -> None:
        """One more holder (a sequence) of each page's slot; every page must have one."""
        for page in pages:
            self.pool.ref([self.slot_of[page]])
            if page in self._tree_only:
                del self._tree_only[page]
                self._tree_shared.add(page)

    def release(self, pages: Iterable[int]) -> None:
        """A sequence lets go of each page's slot."""
        for page in pages:
            self._unref(page)

    def tree_hold(self, pages: Iterable[int]) -> None:
        """The tree holds the slot of each of its pages that has one (once per page)."""
        for page in pages:
            if page in self.slot_of and page not in self._tree_shared and page not in self._tree_only:
                self.pool.ref([self.slot_of[page]])
                self._tree_shared.add(page)  # a sequence that just computed it holds it too

    def tree_drop(self, pages: Iterable[int]) -> None:
        """The tree lets go of the slots of pages it no longer stores."""
        for page in pages:
            if page in self._tree_only:
                del self._tree_only[page]
            elif page in self._tree_shared:
                self._tree_shared.discard(page)
            else:
                continue
            self._unref(page)

    def tree_held(self) -> set[int]:
        return self._tree_shared | set(self._tree_only)

    def _unref(self, page: int) -> None:
        slot = self.slot_of[page]
        self.pool.unref([slot])
        rc = self.pool.refcount(slot)
        if rc == 0:
            del self.slot_of[page]
        elif rc == 1 and page in self._tree_shared:  # the tree is its last holder: evictable from now on
            self._tree_shared.discard(page)
            self._tree_only[page] = None

    # --- invariants -----------------------------------------------------------------------------------
    def check_invariants(self, holders: collections.Counter) -> None:
        """`holders`: page -> how many sequences hold its slot. Every slot is free or mapped from exactly one page,
        with a refcount of its holders (sequences plus the tree). Debug and tests only."""
        self.pool.check_invariants()
        assert len(set(self.slot_of.values())) == len(self.slot_of), "a slot is mapped from two pages"
        assert not self._tree_shared & set(self._tree_only), "a page is both shared and tree-only"
        tree = self.tree_held()
        assert tree <= set(self.slot_of), "the tree holds a page without a slot"
        for page, slot in self.slot_of.items():
            rc = self.pool.refcount(slot)
            want = holders[page] + (page in tree)
            assert rc == want, f"page {page}: window slot {slot} has refcount {rc} but {want} holders"
            if page in tree:
                assert (page in self._tree_only) == (rc == 1), f"page {page}: tree-only state disagrees with refcount"
        assert all(page in self.slot_of for page, n in holders.items() if n), "a sequence holds a page without a slot"
        assert self.pool.num_used == len(self.slot_of), "used slots != mapped pages"
