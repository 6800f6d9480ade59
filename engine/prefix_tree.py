"""The prefix tree both caches share: edges of whole pages, counted locks, LRU leaf eviction.

`engine.radix_cache.RadixCache` keys it by tokens and keeps KV pages on its edges;
`engine.router.hash_cache.HashCache` (the router simulator's model of a replica) keys it by
chained block hashes. What they share lives here:

* Below a root, every edge holds a run of >= 1 pages; children are keyed by their first page, so
  siblings always differ there. A match that ends inside an edge splits it (`_split`), so a
  handle always ends exactly where its match ends.
* Locks: `lock(node)` counts on the node and every ancestor, so a locked node's ancestors are
  locked too, and the evictable pages are exactly those of nodes with `lock_count == 0`, which
  always form whole subtrees.
* Eviction takes pages off the tail of the least recently used unlocked leaf, through a heap of
  candidate leaves with lazy invalidation (an entry is stale once its node is accessed again,
  gains a child, gets locked or leaves the tree). Recency is a monotonic counter stamped on the
  whole path by every walk, so a parent is never older than its children.

A subclass walks its own keys (the hot path) and owns its edges' payload through three hooks:
`_key(node)` (the node's key in its parent's children), `_cut(node, n)` (a new node holding the
first `n` pages' payload, `node` keeping the rest) and `_drop_tail(node, n)` (release the last
`n` pages' payload). The pages a node holds are `node.num_pages()`.
"""
from __future__ import annotations

import heapq
import itertools


class Edge:
    """One edge of the tree (a subclass adds its payload). A root has no parent and no pages."""

    __slots__ = ("parent", "children", "lock_count", "last_access", "alive")

    def __init__(self, parent: Edge | None, last_access: int) -> None:
        self.parent = parent
        self.children: dict = {}  # first page's key -> child
        self.lock_count = 0  # locks on this edge plus locks on all its descendants
        self.last_access = last_access
        self.alive = True  # False once evicted (or, for a root, pruned): a stale handle

    def num_pages(self) -> int:
        raise NotImplementedError


class PrefixTree:
    """Locks, splits and LRU eviction over `Edge`s. Not thread safe."""

    edge_type: type = Edge  # a subclass's own edge class: handles of any other kind are refused

    def __init__(self) -> None:
        self._clock = 0
        self._heap: list[tuple[int, int, Edge]] = []  # (last_access, tiebreak, candidate leaf)
        self._tiebreak = itertools.count()
        # NOTE: maintained counters; a subclass's check_invariants recounts them from the tree.
        self._num_nodes = 0  # non-root nodes
        self._num_cached_pages = 0
        self._num_evictable_pages = 0  # pages of nodes with lock_count == 0

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached_pages

    @property
    def num_evictable_pages(self) -> int:
        """Pages `evict` can release right now: all pages of unlocked nodes."""
        return self._num_evictable_pages

    # --- hooks ---------------------------------------------------------------------------------

    def _key(self, node: Edge):
        raise NotImplementedError

    def _cut(self, node: Edge, n: int) -> Edge:
        """A new edge with `node`'s first `n` pages (parent, children and locks are set by the
        caller); `node` keeps the rest."""
        raise NotImplementedError

    def _drop_tail(self, node: Edge, n: int) -> None:
        """Release the payload of `node`'s last `n` pages (its parent link is still intact)."""
        raise NotImplementedError

    def _check_handle(self, node: Edge) -> None:
        if not isinstance(node, self.edge_type) or not node.alive:
            raise ValueError("stale or foreign cache handle (its node was evicted)")

    def _root_emptied(self, root: Edge) -> None:
        """A root lost its last child and is unlocked (RadixCache forgets the namespace)."""

    # --- locks ---------------------------------------------------------------------------------

    def lock(self, node: Edge) -> None:
        """Pin `node` and all its ancestors against eviction (counted: lock twice, unlock twice)."""
        self._check_handle(node)
        while node is not None:
            if node.lock_count == 0:
                self._num_evictable_pages -= node.num_pages()
            node.lock_count += 1
            node = node.parent

    def unlock(self, node: Edge) -> None:
        """Undo one `lock(node)`."""
        self._check_handle(node)
        # NOTE: ancestors' counts are >= node's, so checking node alone validates the whole path.
        if node.lock_count < 1:
            raise ValueError("unlock of a node that is not locked")
        bottom = node
        while node is not None:
            node.lock_count -= 1
            if node.lock_count == 0:
                self._num_evictable_pages += node.num_pages()
            node = node.parent
        if bottom.lock_count == 0 and bottom.parent is not None and not bottom.children:
            self._push(bottom)  # an unlocked leaf is an eviction candidate again

    # --- eviction ------------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Release up to `num_pages` pages, LRU leaf first; return how many were released.

        Pages come off the tail of a leaf, so exactly min(num_pages, num_evictable_pages) go.
        """
        released = 0
        while released < num_pages and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if not self._is_candidate(stamp, node):
                continue  # stale entry: lazy invalidation
            take = min(num_pages - released, node.num_pages())
            self._trim(node, take)
            released += take
            if node.alive:
                self._push(node)  # partly trimmed: still the LRU candidate
        return released

    # --- tree edits ----------------------------------------------------------------------------

    def _tick(self) -> int:
        """The stamp of a new walk."""
        self._clock += 1
        return self._clock

    def _walked_to(self, node: Edge) -> None:
        """End of a walk that stamped its path: `node`'s old heap entry is stale."""
        if node.parent is not None and not node.children and node.lock_count == 0:
            self._push(node)

    def _add_leaf(self, parent: Edge, leaf: Edge) -> None:
        """Hang a new, unlocked `leaf` (payload set, >= 1 page) under `parent`."""
        parent.children[self._key(leaf)] = leaf
        n = leaf.num_pages()
        self._num_nodes += 1
        self._num_cached_pages += n
        self._num_evictable_pages += n
        self._push(leaf)

    def _split(self, node: Edge, n: int) -> Edge:
        """Cut `node` after its first `n` pages; return the new upper half.

        The original object stays the lower half, so handles keep naming the same path end, and
        its heap entries stay valid (same node, same stamp).
        """
        upper = self._cut(node, n)
        upper.parent, upper.last_access = node.parent, node.last_access
        # NOTE: every lock through `node` also passes through `upper`, so it inherits the count.
        upper.lock_count = node.lock_count
        node.parent.children[self._key(upper)] = upper
        node.parent = upper
        upper.children[self._key(node)] = node
        self._num_nodes += 1
        return upper

    def _trim(self, node: Edge, n: int) -> None:
        """Drop the last `n` pages of unlocked leaf `node`; remove it from the tree when empty."""
        key = self._key(node)
        self._drop_tail(node, n)
        self._num_cached_pages -= n
        self._num_evictable_pages -= n
        if node.num_pages():
            return
        parent = node.parent
        del parent.children[key]
        node.alive = False
        self._num_nodes -= 1
        if not parent.children and parent.lock_count == 0:
            if parent.parent is None:
                self._root_emptied(parent)
            else:
                self._push(parent)  # a parent becomes a candidate once its children are gone

    @staticmethod
    def _is_candidate(stamp: int, node: Edge) -> bool:
        return (node.alive and node.parent is not None and not node.children
                and node.lock_count == 0 and stamp == node.last_access)

    def _push(self, node: Edge) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            # Compact stale entries (and duplicates); amortized O(1) per push, no tree scan.
            live = {id(e[2]): e for e in self._heap if self._is_candidate(e[0], e[2])}
            self._heap = list(live.values())
            heapq.heapify(self._heap)

    def _compact_heap(self) -> None:
        self._heap = [e for e in self._heap if self._is_candidate(e[0], e[2])]
        heapq.heapify(self._heap)

    def _check_counters(self, roots) -> None:
        """Recount nodes, pages and evictable pages below `roots` against the counters, the locks
        against children's, and check every unlocked leaf is in the heap. Debug and tests only."""
        num_nodes = num_pages = num_evictable = 0
        leaves: set[int] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            child_locks = 0
            for key, child in node.children.items():
                assert child.alive and child.parent is node
                assert child.num_pages() >= 1, "empty edge"
                assert key == self._key(child), "child not keyed by its first page"
                assert child.last_access <= node.last_access, "child more recent than parent"
                child_locks += child.lock_count
                stack.append(child)
            assert node.lock_count >= child_locks, "lock count below its children's sum"
            if node.parent is not None:
                num_nodes += 1
                num_pages += node.num_pages()
                if node.lock_count == 0:
                    num_evictable += node.num_pages()
                    if not node.children:
                        leaves.add(id(node))
        assert num_nodes == self._num_nodes, "node count drifted"
        assert num_pages == self._num_cached_pages, "num_cached_pages drifted"
        assert num_evictable == self._num_evictable_pages, "num_evictable_pages drifted"
        in_heap = {id(node) for stamp, _, node in self._heap if self._is_candidate(stamp, node)}
        assert leaves <= in_heap, "an evictable leaf is missing from the eviction heap"
