"""Radix-tree prefix cache: token prefixes -> KV pages, page aligned, LRU-evicted.

Each namespace (None by default; a cache salt or an adapter otherwise) has its own root, so caches
of different namespaces never share a page. Below a root, every edge is a run of whole pages: a
node holds `tokens` (a multiple of `page_size` long), the matching `pages`, and the chained block
hash of each page (`block_hash.page_hashes`, chained from the parent's last hash). Children are
keyed by the tokens of their first page, so siblings always differ in their first page.

Ownership: the tree holds exactly ONE pool reference on every page it stores; callers keep and drop
their own. Locks protect a path from eviction: `lock(node)` counts on the node and every ancestor,
so a locked node's ancestors are locked too, and the evictable pages are exactly those of nodes
with `lock_count == 0`, which always form whole subtrees.

Eviction takes pages from the tail of the least recently used unlocked leaf, through a heap of
candidate leaves with lazy invalidation (an entry is stale once its node is accessed again,
gains a child, gets locked or leaves the tree). Recency is a monotonic counter stamped on the
whole path by `match` and `insert`, so a parent is never older than its children.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Literal, Sequence

from engine.block_hash import page_hashes
from engine.page_pool import PagePool


@dataclass(frozen=True)
class CacheEvent:
    """Pages entering ("stored") or leaving ("removed") the tree, named by chained block hash.

    `parent_hash` is the hash of the page just before `block_hashes[0]` (None at the root).
    """

    kind: Literal["stored", "removed"]
    block_hashes: tuple[int, ...]
    parent_hash: int | None
    namespace: str | None


class _Node:
    """One edge of the tree. A root has no parent, no tokens and no pages."""

    __slots__ = ("tokens", "pages", "hashes", "parent", "children", "namespace", "lock_count",
                 "last_access", "alive")

    def __init__(self, tokens: tuple[int, ...], pages: list[int], hashes: list[int],
                 parent: _Node | None, namespace: str | None, last_access: int) -> None:
        self.tokens = tokens  # NOTE: len(tokens) == len(pages) * page_size, >= 1 page except roots
        self.pages = pages
        self.hashes = hashes  # hashes[i] names pages[i]: chained over the whole path to it
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}  # first page's tokens -> child
        self.namespace = namespace
        self.lock_count = 0  # locks on this node plus locks on all its descendants
        self.last_access = last_access
        self.alive = True  # False once evicted (or, for a root, pruned): stale handle

    def last_hash(self) -> int | None:
        return self.hashes[-1] if self.hashes else None


@dataclass(frozen=True)
class MatchResult:
    """`pages` hold the first `num_tokens` tokens; `node` is the handle to `lock`/`unlock`."""

    pages: list[int]
    num_tokens: int
    node: _Node


class RadixCache:
    """Prefix cache over a `PagePool`. Not thread safe: the scheduler is its only caller."""

    def __init__(self, pool: PagePool, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.pool = pool
        self.page_size = page_size
        self._roots: dict[str | None, _Node] = {}
        self._clock = 0
        self._heap: list[tuple[int, int, _Node]] = []  # (last_access, tiebreak, candidate leaf)
        self._tiebreak = itertools.count()
        self._events: list[CacheEvent] = []
        # NOTE: maintained counters; check_invariants recounts them from the tree.
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

    # --- lookup and insertion ------------------------------------------------------------------

    def match(self, tokens: Sequence[int], namespace: str | None = None) -> MatchResult:
        """Longest cached page-aligned prefix of `tokens`; refreshes its path's recency.

        Takes no lock and no reference. If the prefix ends inside an edge, the edge is split there,
        so that `node` ends exactly at `num_tokens` and locking it pins nothing beyond the match.
        The handle stays valid until its node is evicted: lock it before anything can evict.
        """
        ps = self.page_size
        full = tuple(tokens[: len(tokens) - len(tokens) % ps])
        node, num_tokens, pages = self._walk(full, namespace)
        return MatchResult(pages, num_tokens, node)

    def insert(self, tokens: Sequence[int], pages: Sequence[int],
               namespace: str | None = None) -> int:
        """Store `pages` as the KV of `tokens` (whole pages); return how many were already cached.

        Positions already in the tree keep the tree's page; the caller's page there is not taken.
        The tree takes one reference on each page it newly stores; the caller keeps its own.
        """
        ps = self.page_size
        if len(tokens) != len(pages) * ps:
            raise ValueError(
                f"insert needs whole pages: {len(tokens)} tokens != {len(pages)} pages * {ps}"
            )
        tokens = tuple(tokens)
        node, num_cached, _ = self._walk(tokens, namespace)
        if num_cached < len(tokens):
            new_pages = list(pages[num_cached // ps :])
            parent_hash = node.last_hash()
            hashes = page_hashes(tokens[num_cached:], ps, namespace, parent=parent_hash)
            self.pool.ref(new_pages)  # NOTE: the tree's one reference on each page it stores
            leaf = _Node(tokens[num_cached:], new_pages, hashes, node, namespace, self._clock)
            node.children[leaf.tokens[:ps]] = leaf
            self._num_nodes += 1
            self._num_cached_pages += len(new_pages)
            self._num_evictable_pages += len(new_pages)
            self._push(leaf)
            self._events.append(CacheEvent("stored", tuple(hashes), parent_hash, namespace))
        return num_cached

    # --- locks ---------------------------------------------------------------------------------

    def lock(self, node: _Node) -> None:
        """Pin `node` and all its ancestors against eviction (counted: lock twice, unlock twice)."""
        self._check_handle(node)
        while node is not None:
            if node.lock_count == 0:
                self._num_evictable_pages -= len(node.pages)
            node.lock_count += 1
            node = node.parent

    def unlock(self, node: _Node) -> None:
        """Undo one `lock(node)`."""
        self._check_handle(node)
        # NOTE: ancestors' counts are >= node's, so checking node alone validates the whole path.
        if node.lock_count < 1:
            raise ValueError("unlock of a node that is not locked")
        bottom = node
        while node is not None:
            node.lock_count -= 1
            if node.lock_count == 0:
                self._num_evictable_pages += len(node.pages)
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
            take = min(num_pages - released, len(node.pages))
            self._trim(node, take)
            released += take
            if node.alive:
                self._push(node)  # partly trimmed: still the LRU candidate
        return released

    def reset(self) -> None:
        """Evict every unlocked page; locked paths (running requests) stay."""
        self.evict(self._num_evictable_pages)
        for root in list(self._roots.values()):
            if not root.children and root.lock_count == 0:
                self._prune_root(root)
        self._heap = [e for e in self._heap if self._is_candidate(e[0], e[2])]
        heapq.heapify(self._heap)

    def held_pages(self) -> list[int]:
        """Every page the tree holds a reference on. Scans the tree: debug checks and tests only."""
        pages: list[int] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            pages.extend(node.pages)
            stack.extend(node.children.values())
        return pages

    def drain_events(self) -> list[CacheEvent]:
        """Events since the last drain, oldest first."""
        events, self._events = self._events, []
        return events

    # --- internals -----------------------------------------------------------------------------

    def _walk(self, tokens: tuple[int, ...], namespace: str | None) -> tuple[_Node, int, list[int]]:
        """Follow the full pages of `tokens` down from the root, splitting where the match ends
        mid-edge, and stamp the path as just used. Returns (deepest node, tokens matched, pages)."""
        ps = self.page_size
        self._clock += 1
        node = self._roots.get(namespace)
        if node is None:
            node = self._roots[namespace] = _Node((), [], [], None, namespace, 0)
        node.last_access = self._clock
        pos, pages = 0, []
        while pos < len(tokens):
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                break
            n = len(child.pages)
            if tokens[pos : pos + len(child.tokens)] != child.tokens:
                n = 1  # first page matched through the key; find the first differing page
                while n < len(child.pages) and (
                    tokens[pos + n * ps : pos + (n + 1) * ps] == child.tokens[n * ps : (n + 1) * ps]
                ):
                    n += 1
                if n < len(child.pages):
                    child = self._split(child, n)
            # NOTE: stamping the whole path keeps every parent at least as recent as its children.
            child.last_access = self._clock
            pages.extend(child.pages)
            pos += len(child.tokens)
            node = child
        if node.parent is not None and not node.children and node.lock_count == 0:
            self._push(node)  # its stamp changed: the old heap entry is now stale
        return node, pos, pages

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut `node` after its first `n` pages; return the new upper half.

        The original object stays the lower half, so handles keep naming the same path end, and
        its heap entries stay valid (same node, same stamp).
        """
        ps = self.page_size
        cut = n * ps
        upper = _Node(node.tokens[:cut], node.pages[:n], node.hashes[:n], node.parent,
                      node.namespace, node.last_access)
        # NOTE: every lock through `node` also passes through `upper`, so it inherits the count.
        upper.lock_count = node.lock_count
        node.parent.children[upper.tokens[:ps]] = upper
        node.tokens, node.pages, node.hashes = node.tokens[cut:], node.pages[n:], node.hashes[n:]
        node.parent = upper
        upper.children[node.tokens[:ps]] = node
        self._num_nodes += 1
        return upper

    def _trim(self, node: _Node, n: int) -> None:
        """Drop the last `n` pages of unlocked leaf `node`; remove it from the tree when empty."""
        ps = self.page_size
        keep = len(node.pages) - n
        key = node.tokens[:ps]
        gone_pages, gone_hashes = node.pages[keep:], node.hashes[keep:]
        parent_hash = node.hashes[keep - 1] if keep else node.parent.last_hash()
        node.tokens, node.pages = node.tokens[: keep * ps], node.pages[:keep]
        node.hashes = node.hashes[:keep]
        self.pool.unref(gone_pages)  # NOTE: drops the tree's one reference on each page
        self._num_cached_pages -= n
        self._num_evictable_pages -= n
        self._events.append(CacheEvent("removed", tuple(gone_hashes), parent_hash, node.namespace))
        if keep:
            return
        parent = node.parent
        del parent.children[key]
        node.alive = False
        self._num_nodes -= 1
        if not parent.children and parent.lock_count == 0:
            if parent.parent is None:
                self._prune_root(parent)
            else:
                self._push(parent)  # a parent becomes a candidate once its children are gone

    def _prune_root(self, root: _Node) -> None:
        """Forget an empty, unlocked namespace root, so namespaces seen once do not pile up."""
        if self._roots.get(root.namespace) is root:
            del self._roots[root.namespace]
            root.alive = False

    def _is_candidate(self, stamp: int, node: _Node) -> bool:
        return (node.alive and node.parent is not None and not node.children
                and node.lock_count == 0 and stamp == node.last_access)

    def _push(self, node: _Node) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            # Compact stale entries (and duplicates); amortized O(1) per push, no tree scan.
            live = {id(e[2]): e for e in self._heap if self._is_candidate(e[0], e[2])}
            self._heap = list(live.values())
            heapq.heapify(self._heap)

    def _check_handle(self, node: _Node) -> None:
        if not isinstance(node, _Node) or not node.alive:
            raise ValueError("stale or foreign cache handle (its node was evicted)")

    def check_invariants(self) -> None:
        """Assert the tree's structure and counters. Scans everything: debug and tests only."""
        ps = self.page_size
        seen_pages: set[int] = set()
        num_nodes = num_pages = num_evictable = 0
        leaves: set[int] = set()  # ids of unlocked non-root leaves: must be heap candidates
        for namespace, root in self._roots.items():
            assert root.alive and root.parent is None and root.namespace == namespace
            assert not root.tokens and not root.pages and not root.hashes
            stack = [root]
            while stack:
                node = stack.pop()
                child_locks = 0
                for key, child in node.children.items():
                    assert child.alive and child.parent is node and child.namespace == namespace
                    assert child.pages and len(child.tokens) == len(child.pages) * ps, "ragged edge"
                    assert key == child.tokens[:ps], "child not keyed by its first page"
                    hashes = page_hashes(child.tokens, ps, namespace, node.last_hash())
                    assert child.hashes == hashes, "block hashes do not chain"
                    assert child.last_access <= node.last_access, "child more recent than parent"
                    for page in child.pages:
                        assert page not in seen_pages, f"page {page} stored twice in the tree"
                        assert self.pool.refcount(page) >= 1, f"tree page {page} is free"
                        seen_pages.add(page)
                    child_locks += child.lock_count
                    stack.append(child)
                assert node.lock_count >= child_locks, "lock count below its children's sum"
                if node is not root:
                    num_nodes += 1
                    num_pages += len(node.pages)
                    if node.lock_count == 0:
                        num_evictable += len(node.pages)
                        if not node.children:
                            leaves.add(id(node))
        assert num_nodes == self._num_nodes, "node count drifted"
        assert num_pages == self._num_cached_pages, "num_cached_pages drifted"
        assert num_evictable == self._num_evictable_pages, "num_evictable_pages drifted"
        in_heap = {id(node) for stamp, _, node in self._heap if self._is_candidate(stamp, node)}
        assert leaves <= in_heap, "an evictable leaf is missing from the eviction heap"
