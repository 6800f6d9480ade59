"""HashCache: engine.radix_cache.RadixCache's semantics over block hashes, for the simulator.

The simulator models a replica's prefix cache at 1M requests; RadixCache works on tokens and
hashes every new page with blake2b (~3 us a page here), far too slow at that scale. HashCache
keys the same tree by the pages' chained block hashes directly (one hash = one page), with the
same rules: edges are runs of pages, children keyed by their first page, `match` splits an edge
where a match ends inside it and stamps the path, locks count up the path, eviction trims the
least recently used unlocked leaf from its tail through a lazily invalidated heap, and events
name the pages stored and removed. tests/test_router_sim.py checks it against RadixCache op for
op (match lengths, evicted counts, events).

NOTE: matching inside an edge binary-searches the first differing page. That is exact because
hashes chain: two sequences with equal hashes at page i are equal at every page before i.
No page pool: the caller (the simulator's replica) does the page accounting.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Sequence

from engine.router.index import common_run_len


class _Edge:
    __slots__ = ("hashes", "parent", "children", "lock_count", "last_access", "alive")

    def __init__(self, hashes: tuple[int, ...], parent: _Edge | None, last_access: int) -> None:
        self.hashes = hashes  # one per page; hashes[0] is this edge's key in parent.children
        self.parent = parent
        self.children: dict[int, _Edge] = {}
        self.lock_count = 0  # locks on this edge plus on all its descendants
        self.last_access = last_access
        self.alive = True


class HashCache:
    """Prefix tree of block-hash chains with LRU leaf eviction. One namespace (hashes carry it)."""

    def __init__(self, collect_events: bool = True) -> None:
        self.root = _Edge((), None, 0)
        self._clock = 0
        self._heap: list[tuple[int, int, _Edge]] = []  # (last_access, tiebreak, candidate leaf)
        self._tiebreak = itertools.count()
        self._num_nodes = 0
        self.num_cached_pages = 0
        self.num_evictable_pages = 0  # pages of edges with lock_count == 0
        # ("stored" | "removed", hashes); None: not collected
        self.events: list[tuple[str, tuple[int, ...]]] | None = [] if collect_events else None

    def match(self, hashes: tuple[int, ...]) -> tuple[_Edge, int]:
        """(handle, pages matched) for the longest cached prefix of `hashes`; stamps the path."""
        return self._walk(hashes)

    def insert(self, hashes: tuple[int, ...]) -> tuple[_Edge, int]:
        """Store every page of `hashes`; return (handle at the end of `hashes`, pages already cached)."""
        node, pos = self._walk(hashes)
        if pos < len(hashes):
            leaf = _Edge(hashes[pos:], node, self._clock)
            node.children[hashes[pos]] = leaf
            n = len(leaf.hashes)
            self._num_nodes += 1
            self.num_cached_pages += n
            self.num_evictable_pages += n
            self._push(leaf)
            if self.events is not None:
                self.events.append(("stored", leaf.hashes))
            node = leaf
        return node, pos

    def lock(self, node: _Edge) -> None:
        while node is not None:
            if node.lock_count == 0:
                self.num_evictable_pages -= len(node.hashes)
            node.lock_count += 1
            node = node.parent

    def unlock(self, node: _Edge) -> None:
        if node.lock_count < 1:
            raise ValueError("unlock of an edge that is not locked")
        bottom = node
        while node is not None:
            node.lock_count -= 1
            if node.lock_count == 0:
                self.num_evictable_pages += len(node.hashes)
            node = node.parent
        if bottom.lock_count == 0 and bottom.parent is not None and not bottom.children:
            self._push(bottom)

    def evict(self, num_pages: int) -> int:
        """Release up to `num_pages` pages, LRU leaf tail first; return how many went."""
        released = 0
        heap = self._heap
        while released < num_pages and heap:
            stamp, _, node = heapq.heappop(heap)
            if not self._is_candidate(stamp, node):
                continue
            take = min(num_pages - released, len(node.hashes))
            self._trim(node, take)
            released += take
            if node.alive:
                self._push(node)
        return released

    def cached_hashes(self) -> set[int]:
        """Every hash in the tree. Scans everything: tests and snapshots only."""
        out: set[int] = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            out.update(node.hashes)
            stack.extend(node.children.values())
        return out

    # --- internals -----------------------------------------------------------------------------

    def _walk(self, hashes: Sequence[int]) -> tuple[_Edge, int]:
        self._clock += 1
        clock = self._clock
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
        if node.parent is not None and not node.children and node.lock_count == 0:
            self._push(node)
        return node, pos

    def _split(self, node: _Edge, n: int) -> _Edge:
        upper = _Edge(node.hashes[:n], node.parent, node.last_access)
        upper.lock_count = node.lock_count
        node.parent.children[upper.hashes[0]] = upper
        node.hashes = node.hashes[n:]
        node.parent = upper
        upper.children[node.hashes[0]] = node
        self._num_nodes += 1
        return upper

    def _trim(self, node: _Edge, n: int) -> None:
        keep = len(node.hashes) - n
        key = node.hashes[0]
        gone = node.hashes[keep:]
        node.hashes = node.hashes[:keep]
        self.num_cached_pages -= n
        self.num_evictable_pages -= n
        if self.events is not None:
            self.events.append(("removed", gone))
        if keep:
            return
        parent = node.parent
        del parent.children[key]
        node.alive = False
        self._num_nodes -= 1
        if not parent.children and parent.lock_count == 0 and parent.parent is not None:
            self._push(parent)

    @staticmethod
    def _is_candidate(stamp: int, node: _Edge) -> bool:
        return (node.alive and node.parent is not None and not node.children
                and node.lock_count == 0 and stamp == node.last_access)

    def _push(self, node: _Edge) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            live = {id(e[2]): e for e in self._heap if self._is_candidate(e[0], e[2])}
            self._heap = list(live.values())
            heapq.heapify(self._heap)
