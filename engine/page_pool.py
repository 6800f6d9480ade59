"""Page pool: the KV cache's page ids as plain ints with refcounts.

A page is the unit of KV memory: `page_size` token slots in every layer's K and V arrays. The pool
knows only ids `0 .. num_pages - 1` and how many owners (running requests, radix-tree nodes) hold
each one; the runner owns the physical arrays those ids index.

Invariants (checked by `check_invariants`):
  - every page is either free (refcount 0, on the free list exactly once) or used (refcount >= 1);
  - num_free + num_used == num_pages.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable


class OutOfPages(RuntimeError):
    """Raised by `PagePool.alloc` when fewer pages are free than asked for."""


class PagePool:
    """Fixed set of page ids with per-page refcounts and a free list.

    `alloc` hands out free pages with refcount 1; `ref` and `unref` add and drop owners; a page
    whose refcount reaches 0 goes back on the free list. Nothing is ever freed implicitly.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        # NOTE: refcount 0 <=> the page is on `_free`; the two are updated together, never apart.
        self._refcounts: list[int] = [0] * num_pages
        # A stack: alloc pops from the end, so a fresh pool hands out 0, 1, 2, ... in order.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_alloc(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take `n` free pages, each with refcount 1 (owned by the caller)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            raise OutOfPages(
                f"asked for {n} pages but only {len(self._free)} of {self.num_pages} are free"
            )
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def ref(self, pages: Iterable[int]) -> None:
        """Add one owner to each page (a page listed twice gains two). Pages must be in use."""
        pages = list(pages)
        for page in pages:  # validate everything before changing anything
            self._check_id(page)
            if self._refcounts[page] == 0:
                raise ValueError(f"page {page} is free; only used pages can be referenced")
        for page in pages:
            self._refcounts[page] += 1

    def unref(self, pages: Iterable[int]) -> None:
        """Drop one owner from each page; pages reaching refcount 0 return to the free list."""
        counts = Counter(pages)
        for page, n in counts.items():  # validate everything before changing anything
            self._check_id(page)
            if self._refcounts[page] < n:
                raise ValueError(
                    f"page {page} has refcount {self._refcounts[page]}, cannot drop {n}"
                )
        for page, n in counts.items():
            self._refcounts[page] -= n
            if self._refcounts[page] == 0:
                self._free.append(page)

    def refcount(self, page: int) -> int:
        self._check_id(page)
        return self._refcounts[page]

    def check_invariants(self) -> None:
        """Assert the free list and the refcounts agree. O(num_pages): debug and tests only."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        for page in free:
            assert 0 <= page < self.num_pages, f"free list holds out-of-range page {page}"
            assert self._refcounts[page] == 0, f"free page {page} has a nonzero refcount"
        used = [p for p, rc in enumerate(self._refcounts) if rc != 0]
        for page in used:
            assert self._refcounts[page] > 0, f"page {page} has negative refcount"
        assert len(free) + len(used) == self.num_pages, "free + used != num_pages"

    def _check_id(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page id {page} out of range [0, {self.num_pages})")
