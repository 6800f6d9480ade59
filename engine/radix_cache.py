"""Radix-tree prefix cache: token prefixes -> KV pages, page aligned, LRU-evicted.

Each namespace (None by default; a cache salt or an adapter otherwise) has its own root, so caches
of different namespaces never share a page. Below a root, every edge is a run of whole pages: a
node holds `tokens` (a multiple of `page_size` long), the matching `pages`, and the chained block
hash of each page (`block_hash.page_hashes`, chained from the parent's last hash). Children are
keyed by the tokens of their first page, so siblings always differ in their first page.

Ownership: the tree holds exactly ONE pool reference on every page it stores; callers keep and drop
their own. Locks, splits and LRU leaf eviction are `engine.prefix_tree.PrefixTree`'s (shared with
the router simulator's HashCache): `lock(node)` pins a path, `evict(n)` takes pages off the tail
of the least recently used unlocked leaf, and `match` / `insert` stamp the path they walk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

from engine.block_hash import page_hashes
from engine.page_pool import PagePool
from engine.prefix_tree import Edge, PrefixTree


@dataclass(frozen=True)
class CacheEvent:
    """Pages entering ("stored") or leaving ("removed") the tree, named by chained block hash.

    `parent_hash` is the hash of the page just before `block_hashes[0]` (None at the root). `medium` "host": the
    pages' K/V entered or left the host tier (engine.host_cache) instead; "snapshot": a snapshot of the recurrent
    states after those prefixes appeared or went (a model with linear attention layers resumes a prefix only there,
    engine.state_snapshots). Those events carry no parent or namespace.
    """

    kind: Literal["stored", "removed"]
    block_hashes: tuple[int, ...]
    parent_hash: int | None
    namespace: str | None
    medium: Literal["device", "host", "snapshot"] = "device"


class _Node(Edge):
    """One edge of the tree. A root has no parent, no tokens and no pages."""

    __slots__ = ("tokens", "pages", "hashes", "namespace")

    def __init__(self, tokens: tuple[int, ...], pages: list[int], hashes: list[int],
                 parent: _Node | None, namespace: str | None, last_access: int) -> None:
        super().__init__(parent, last_access)
        self.tokens = tokens  # NOTE: len(tokens) == len(pages) * page_size, >= 1 page except roots
        self.pages = pages
        self.hashes = hashes  # hashes[i] names pages[i]: chained over the whole path to it
        self.namespace = namespace

    def num_pages(self) -> int:
        return len(self.pages)

    def last_hash(self) -> int | None:
        return self.hashes[-1] if self.hashes else None


@dataclass(frozen=True)
class MatchResult:
    """`pages` hold the first `num_tokens` tokens; `node` is the handle to `lock`/`unlock`."""

    pages: list[int]
    num_tokens: int
    node: _Node


class RadixCache(PrefixTree):
    """Prefix cache over a `PagePool`. Not thread safe: the scheduler is its only caller."""

    edge_type = _Node

    def __init__(self, pool: PagePool, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        super().__init__()
        self.pool = pool
        self.page_size = page_size
        self._roots: dict[str | None, _Node] = {}
        self._events: list[CacheEvent] = []
        self.record_events = True  # False: keep no events (nobody drains them: an offline engine)
        # Called with (pages, their block hashes) just before the tree lets go of them (the host tier saves them).
        self.on_evict: Callable[[list[int], list[int]], None] | None = None
        # Called with (pages, their block hashes, namespace) when the tree stores new pages (the disk tier writes them).
        self.on_store: Callable[[list[int], list[int], str | None], None] | None = None

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
            self._add_leaf(node, _Node(tokens[num_cached:], new_pages, hashes, node, namespace,
                                       self._clock))
            if self.record_events:
                self._events.append(CacheEvent("stored", tuple(hashes), parent_hash, namespace))
            if self.on_store is not None:
                self.on_store(new_pages, hashes, namespace)
        return num_cached

    def adopt(self, tokens: Sequence[int], pages: Sequence[int], namespace: str | None,
              take: Callable[[int, int], bool]) -> list[int]:
        """Where the tree stores a prefix of `tokens` (whole pages), puts the caller's page in place of the tree's
        wherever `take(tree_page, page)`: the caller's page holds the same positions' K/V and is the better one to
        keep (a hybrid cache: it has window slots, the tree's has not; engine.window_pages). The tree references each
        page it takes and drops the one it gives up; block hashes stay, so no event. Returns the pages taken."""
        ps = self.page_size
        if len(tokens) != len(pages) * ps:
            raise ValueError(f"adopt needs whole pages: {len(tokens)} tokens != {len(pages)} pages * {ps}")
        node, end, _ = self._walk(tuple(tokens), namespace)
        end //= ps
        taken = []
        while node.parent is not None:
            start = end - len(node.pages)
            for i, old in enumerate(node.pages):
                new = pages[start + i]
                if new != old and take(old, new):
                    self.pool.ref([new])
                    self.pool.unref([old])
                    node.pages[i] = new
                    taken.append(new)
            end, node = start, node.parent
        return taken

    # --- reset and inspection ------------------------------------------------------------------

    def reset(self) -> None:
        """Evict every unlocked page; locked paths (running requests) stay."""
        self.evict(self._num_evictable_pages)
        for root in list(self._roots.values()):
            if not root.children and root.lock_count == 0:
                self._root_emptied(root)
        self._compact_heap()

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
        """Events since the last drain, oldest first. A tree that kept no events (`record_events` False) starts
        keeping them here, and this first drain reports what it holds now ("stored", parents before children)."""
        if not self.record_events:
            self.record_events = True
            stack = list(self._roots.values())
            while stack:
                node = stack.pop()
                if node.pages:
                    self._events.append(CacheEvent("stored", tuple(node.hashes), node.parent.last_hash(), node.namespace))
                stack.extend(node.children.values())
        events, self._events = self._events, []
        return events

    # --- internals -----------------------------------------------------------------------------

    def _walk(self, tokens: tuple[int, ...], namespace: str | None) -> tuple[_Node, int, list[int]]:
        """Follow the full pages of `tokens` down from the root, splitting where the match ends
        mid-edge, and stamp the path as just used. Returns (deepest node, tokens matched, pages)."""
        ps = self.page_size
        clock = self._tick()
        node = self._roots.get(namespace)
        if node is None:
            node = self._roots[namespace] = _Node((), [], [], None, namespace, 0)
        node.last_access = clock
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
            child.last_access = clock
            pages.extend(child.pages)
            pos += len(child.tokens)
            node = child
        self._walked_to(node)
        return node, pos, pages

    def _key(self, node: _Node) -> tuple[int, ...]:
        return node.tokens[: self.page_size]

    def _cut(self, node: _Node, n: int) -> _Node:
        cut = n * self.page_size
        upper = _Node(node.tokens[:cut], node.pages[:n], node.hashes[:n], None, node.namespace, 0)
        node.tokens, node.pages, node.hashes = node.tokens[cut:], node.pages[n:], node.hashes[n:]
        return upper

    def _drop_tail(self, node: _Node, n: int) -> None:
        keep = len(node.pages) - n
        gone_pages, gone_hashes = node.pages[keep:], node.hashes[keep:]
        if self.on_evict is not None:
            self.on_evict(gone_pages, gone_hashes)
        parent_hash = node.hashes[keep - 1] if keep else node.parent.last_hash()
        node.tokens = node.tokens[: keep * self.page_size]
        node.pages, node.hashes = node.pages[:keep], node.hashes[:keep]
        self.pool.unref(gone_pages)  # NOTE: drops the tree's one reference on each page
        if self.record_events:
            self._events.append(CacheEvent("removed", tuple(gone_hashes), parent_hash, node.namespace))

    def _root_emptied(self, root: _Node) -> None:
        """Forget an empty, unlocked namespace root, so namespaces seen once do not pile up."""
        if self._roots.get(root.namespace) is root:
            del self._roots[root.namespace]
            root.alive = False

    def check_invariants(self) -> None:
        """Assert the tree's structure and counters. Scans everything: debug and tests only."""
        ps = self.page_size
        seen_pages: set[int] = set()
        for namespace, root in self._roots.items():
            assert root.alive and root.parent is None and root.namespace == namespace
            assert not root.tokens and not root.pages and not root.hashes
            stack = [root]
            while stack:
                node = stack.pop()
                for child in node.children.values():
                    assert child.namespace == namespace
                    assert len(child.tokens) == len(child.pages) * ps, "ragged edge"
                    hashes = page_hashes(child.tokens, ps, namespace, node.last_hash())
                    assert child.hashes == hashes, "block hashes do not chain"
                    for page in child.pages:
                        assert page not in seen_pages, f"page {page} stored twice in the tree"
                        assert self.pool.refcount(page) >= 1, f"tree page {page} is free"
                        seen_pages.add(page)
                    stack.append(child)
        self._check_counters(self._roots.values())
