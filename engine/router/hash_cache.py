"""HashCache: engine.radix_cache.RadixCache's semantics over block hashes, for the simulator.

The simulator models a replica's prefix cache at 1M requests; RadixCache works on tokens and
hashes every new page with blake2b (~3 us a page here), far too slow at that scale. HashCache
keys the same tree (`engine.prefix_tree.PrefixTree`: locks, splits, LRU leaf eviction) by the
pages' chained block hashes directly (one hash = one page), and its events name the pages stored
and removed. tests/test_router_sim.py checks it against RadixCache op for
op (match lengths, evicted counts, events).

NOTE: matching inside an edge binary-searches the first differing page. That is exact because
hashes chain: two sequences with equal hashes at page i are equal at every page before i.
No page pool: the caller (the simulator's replica) does the page accounting.
"""
from __future__ import annotations

from typing import Sequence

from engine.prefix_tree import Edge, PrefixTree
from engine.router.index import common_run_len


class _Edge(Edge):
    __slots__ = ("hashes",)

    def __init__(self, hashes: tuple[int, ...], parent: _Edge | None, last_access: int) -> None:
        super().__init__(parent, last_access)
        self.hashes = hashes  # one per page; hashes[0] is this edge's key in parent.children

    def num_pages(self) -> int:
        return len(self.hashes)


class HashCache(PrefixTree):
    """Prefix tree of block-hash chains with LRU leaf eviction. One namespace (hashes carry it)."""

    edge_type = _Edge

    def __init__(self, collect_events: bool = True) -> None:
        super().__init__()
        self.root = _Edge((), None, 0)
        # ("stored" | "removed", hashes); None: not collected
        self.events: list[tuple[str, tuple[int, ...]]] | None = [] if collect_events else None
        self.on_evict = None  # called with the hashes of pages the tree lets go of (a host tier keeps them)

    def match(self, hashes: tuple[int, ...]) -> tuple[_Edge, int]:
        """(handle, pages matched) for the longest cached prefix of `hashes`; stamps the path."""
        return self._walk(hashes)

    def insert(self, hashes: tuple[int, ...]) -> tuple[_Edge, int]:
        """Store every page of `hashes`; return (handle at the end of `hashes`, pages already cached)."""
        node, pos = self._walk(hashes)
        if pos < len(hashes):
            leaf = _Edge(hashes[pos:], node, self._clock)
            self._add_leaf(node, leaf)
            if self.events is not None:
                self.events.append(("stored", leaf.hashes))
            node = leaf
        return node, pos

    def cached_hashes(self) -> set[int]:
        """Every hash in the tree. Scans everything: tests and snapshots only."""
        out: set[int] = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            out.update(node.hashes)
            stack.extend(node.children.values())
        return out

    def check_invariants(self) -> None:
        """Assert the tree's structure and counters. Scans everything: tests only."""
        self._check_counters([self.root])

    # --- internals -----------------------------------------------------------------------------

    def _walk(self, hashes: Sequence[int]) -> tuple[_Edge, int]:
        clock = self._tick()
        node = self.root
        node.last_access = clock
        pos, n = 0, len(hashes)
        while pos < n:
            child = node.children.get(hashes[pos])
            if child is None:
                break
            common = common_run_len(child.hashes, hashes, pos)  # child.hashes[0] matched (the key)
            if common < len(child.hashes):
                child = self._split(child, common)
            child.last_access = clock
            pos += len(child.hashes)
            node = child
        self._walked_to(node)
        return node, pos

    def _key(self, node: _Edge) -> int:
        return node.hashes[0]

    def _cut(self, node: _Edge, n: int) -> _Edge:
        upper = _Edge(node.hashes[:n], None, 0)
        node.hashes = node.hashes[n:]
        return upper

    def _drop_tail(self, node: _Edge, n: int) -> None:
        keep = len(node.hashes) - n
        if self.on_evict is not None:
            self.on_evict(node.hashes[keep:])
        if self.events is not None:
            self.events.append(("removed", node.hashes[keep:]))
        node.hashes = node.hashes[:keep]
