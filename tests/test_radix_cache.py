"""RadixCache on host data: unit tests per method, then a stateful model of the scheduler's use."""

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_hash import page_hashes
from engine.page_pool import PagePool
from engine.radix_cache import CacheEvent, RadixCache

PS = 2  # page size in the unit tests


def make(num_pages=32, page_size=PS):
    pool = PagePool(num_pages)
    return pool, RadixCache(pool, page_size)


def put(pool, cache, tokens, namespace=None):
    """Insert `tokens` (full pages) as a finished request would: alloc, insert, drop own refs."""
    pages = pool.alloc(len(tokens) // cache.page_size)
    cached = cache.insert(tokens, pages, namespace)
    pool.unref(pages)
    cache.check_invariants()
    return pages, cached


def tree_contents(cache):
    """(namespace, token prefix through a page) -> page, read from the tree's internals."""
    out = {}
    for namespace, root in cache._roots.items():
        stack = [(root, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                path = prefix + child.tokens
                for i, page in enumerate(child.pages):
                    out[(namespace, path[: len(prefix) + (i + 1) * cache.page_size])] = page
                stack.append((child, path))
    return out


def test_empty_cache_matches_nothing():
    pool, cache = make()
    m = cache.match([1, 2, 3])
    assert (m.pages, m.num_tokens) == ([], 0)
    cache.lock(m.node)  # the root handle is lockable too
    cache.unlock(m.node)
    assert cache.num_cached_pages == cache.num_evictable_pages == 0
    cache.check_invariants()


def test_insert_takes_one_reference_and_match_is_page_aligned():
    pool, cache = make()
    pages, cached = put(pool, cache, [1, 2, 3, 4])
    assert cached == 0
    assert [pool.refcount(p) for p in pages] == [1, 1]  # the tree's reference only
    m = cache.match([1, 2, 3, 4, 5])  # the partial page [5] is never matched
    assert (m.pages, m.num_tokens) == (pages, 4)
    m = cache.match([1, 2, 3])
    assert (m.pages, m.num_tokens) == (pages[:1], 2)
    assert cache.num_cached_pages == cache.num_evictable_pages == 2
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], pool.alloc(2))


def test_insert_splits_mid_edge_and_keeps_tree_pages():
    pool, cache = make()
    old, _ = put(pool, cache, [1, 2, 3, 4, 5, 6])
    new = pool.alloc(3)
    assert cache.insert([1, 2, 3, 4, 9, 9], new) == 4
    # The tree kept its own pages for the shared prefix and took only the diverging one.
    assert [pool.refcount(p) for p in new] == [1, 1, 2]
    assert cache.match([1, 2, 3, 4, 9, 9]).pages == old[:2] + new[2:]
    assert cache.match([1, 2, 3, 4, 5, 6]).pages == old
    assert cache.num_cached_pages == 4
    pool.unref(new)
    cache.check_invariants()
    assert pool.num_free == 32 - 4


def test_insert_of_cached_path_adds_nothing():
    pool, cache = make()
    put(pool, cache, [1, 2, 3, 4])
    cache.drain_events()
    pages, cached = put(pool, cache, [1, 2, 3, 4])
    assert cached == 4 and all(pool.refcount(p) == 0 for p in pages)
    assert cache.num_cached_pages == 2 and cache.drain_events() == []
    assert cache.insert([], []) == 0


def test_match_splits_so_a_lock_pins_only_the_match():
    pool, cache = make()
    pages, _ = put(pool, cache, [1, 2, 3, 4, 5, 6])
    m = cache.match([1, 2, 3, 4, 7, 7])
    assert (m.pages, m.num_tokens) == (pages[:2], 4)
    cache.lock(m.node)
    assert cache.num_evictable_pages == 1
    assert cache.evict(10) == 1 and pool.refcount(pages[2]) == 0
    assert cache.match([1, 2, 3, 4, 5, 6]).pages == pages[:2]
    cache.unlock(m.node)
    assert cache.evict(10) == 2 and cache.num_cached_pages == 0
    cache.check_invariants()


def test_namespaces_are_isolated():
    pool, cache = make()
    plain, _ = put(pool, cache, [1, 2, 3, 4])
    salted, cached = put(pool, cache, [1, 2, 3, 4], namespace="a")
    assert cached == 0 and not set(plain) & set(salted)
    assert cache.match([1, 2, 3, 4]).pages == plain
    assert cache.match([1, 2, 3, 4], namespace="a").pages == salted
    assert cache.match([1, 2, 3, 4], namespace="b").num_tokens == 0
    assert cache.match([1, 2, 3, 4], namespace="").num_tokens == 0


def test_evict_is_lru_and_trims_leaf_tails():
    pool, cache = make()
    a, _ = put(pool, cache, [1, 1, 1, 1])
    b, _ = put(pool, cache, [2, 2, 2, 2])
    c, _ = put(pool, cache, [3, 3, 3, 3])
    cache.match([1, 1, 1, 1])  # refresh a: b is now the oldest
    assert cache.evict(1) == 1 and pool.refcount(b[1]) == 0  # the tail of the LRU leaf first
    assert cache.evict(2) == 2
    assert cache.match([2, 2, 2, 2]).num_tokens == 0 and pool.refcount(c[1]) == 0
    assert cache.match([3, 3, 3, 3]).pages == c[:1] and cache.match([1, 1, 1, 1]).pages == a
    cache.check_invariants()


def test_match_refreshes_only_the_matched_part():
    pool, cache = make()
    a, _ = put(pool, cache, [1, 1, 1, 1])
    put(pool, cache, [2, 2])
    cache.match([1, 1])  # splits a: its unmatched tail keeps the old stamp
    assert cache.evict(1) == 1 and pool.refcount(a[1]) == 0
    assert cache.match([1, 1, 1, 1]).pages == a[:1]
    cache.check_invariants()


def test_parent_is_evicted_after_its_children():
    pool, cache = make()
    put(pool, cache, [1, 2, 3, 4])
    put(pool, cache, [1, 2, 5, 6])
    put(pool, cache, [8, 8])
    cache.match([8, 8])  # newest: [1, 2]'s children, then [1, 2] itself, go first
    cache.drain_events()
    assert cache.evict(3) == 3
    removed = [e.block_hashes for e in cache.drain_events()]
    h = {tuple(t): page_hashes(t, PS)[-1] for t in ([1, 2], [1, 2, 3, 4], [1, 2, 5, 6])}
    assert sorted(removed[:2]) == sorted([(h[(1, 2, 3, 4)],), (h[(1, 2, 5, 6)],)])
    assert removed[2] == (h[(1, 2)],)
    assert cache.match([8, 8]).num_tokens == 2
    cache.check_invariants()


def test_evict_never_touches_locked_nodes_or_ancestors():
    pool, cache = make()
    pages, _ = put(pool, cache, [1, 2, 3, 4, 5, 6])
    put(pool, cache, [1, 2, 7, 7])
    put(pool, cache, [9, 9])
    m = cache.match([1, 2, 3, 4, 5, 6])
    cache.lock(m.node)
    cache.lock(m.node)
    assert cache.num_evictable_pages == 2
    assert cache.evict(100) == 2
    assert cache.match([1, 2, 3, 4, 5, 6]).pages == pages
    cache.unlock(m.node)
    assert cache.evict(100) == 0  # still locked once
    cache.unlock(m.node)
    with pytest.raises(ValueError):
        cache.unlock(m.node)
    assert cache.num_evictable_pages == 3 and cache.evict(100) == 3
    with pytest.raises(ValueError):
        cache.lock(m.node)  # evicted: stale handle
    assert pool.num_free == 32
    cache.check_invariants()


def test_events_name_pages_by_chained_hash():
    pool, cache = make()
    put(pool, cache, [1, 2, 3, 4], namespace="a")
    put(pool, cache, [1, 2, 3, 4, 5, 6, 7, 8], namespace="a")
    hashes = page_hashes([1, 2, 3, 4, 5, 6, 7, 8], PS, "a")
    assert cache.drain_events() == [
        CacheEvent("stored", tuple(hashes[:2]), None, "a"),
        CacheEvent("stored", tuple(hashes[2:]), hashes[1], "a"),
    ]
    assert cache.drain_events() == []
    cache.evict(1)
    assert cache.drain_events() == [CacheEvent("removed", (hashes[3],), hashes[2], "a")]


def test_reset_drops_everything_unlocked():
    pool, cache = make()
    pages, _ = put(pool, cache, [1, 2, 3, 4])
    put(pool, cache, [5, 6], namespace="a")
    put(pool, cache, [7, 8])
    m = cache.match([1, 2, 3, 4])
    cache.lock(m.node)
    cache.reset()
    assert cache.num_cached_pages == 2 and cache.num_evictable_pages == 0
    assert cache.match([1, 2, 3, 4]).pages == pages
    assert "a" not in cache._roots  # empty namespace roots are forgotten
    cache.check_invariants()
    cache.unlock(m.node)
    cache.reset()
    assert cache.num_cached_pages == 0 and pool.num_free == 32
    cache.check_invariants()


def test_eviction_heap_stays_bounded():
    pool, cache = make()
    put(pool, cache, [1, 2, 3, 4])
    for _ in range(2000):
        m = cache.match([1, 2, 3, 4])
        cache.lock(m.node)
        cache.unlock(m.node)
    assert len(cache._heap) < 100
    cache.check_invariants()


# --- stateful model --------------------------------------------------------------------------
NUM_PAGES, NAMESPACES = 14, [None, "a"]
PROMPTS = [(), (0, 0, 1, 1), (0, 0, 1, 1, 2, 2), (0, 0, 2), (2, 1, 2, 1, 2, 1)]  # shared heads


@dataclass
class Request:
    tokens: list[int]
    namespace: str | None
    node: object  # locked handle from match
    num_matched: int  # pages[:num_matched] are the locked, matched tree pages
    pages: list[int]  # one reference each; pages[i] holds tokens[i * PS : (i + 1) * PS]


class CacheMachine(RuleBasedStateMachine):
    """Requests as the scheduler runs them, against a model that knows every page's owners."""

    def __init__(self):
        super().__init__()
        self.pool = PagePool(NUM_PAGES)
        self.cache = RadixCache(self.pool, PS)
        self.requests: dict[int, Request] = {}
        self.next_id = 0
        self.tree: dict[tuple, int] = {}  # (namespace, prefix through a page) -> tree page
        self.written: dict[int, tuple] = {}  # page -> (namespace, prefix whose KV it holds)
        self.router: set[int] = set()  # block hashes announced by events
        self.history: list[tuple] = []  # sequences seen, for follow-up turns

    def model_match(self, tokens, namespace):
        pages = []
        while (len(pages) + 1) * PS <= len(tokens):
            key = (namespace, tuple(tokens[: (len(pages) + 1) * PS]))
            if key not in self.tree:
                break
            pages.append(self.tree[key])
        return pages

    def locked_pages(self):
        return {p for r in self.requests.values() for p in r.pages[: r.num_matched]}

    def evict(self, num_pages):
        before = [self.pool.refcount(p) for p in range(NUM_PAGES)]
        evictable, locked = self.cache.num_evictable_pages, self.locked_pages()
        released = self.cache.evict(num_pages)
        assert released == min(num_pages, evictable)
        gone = [p for p in range(NUM_PAGES) if self.pool.refcount(p) != before[p]]
        assert len(gone) == released and all(self.pool.refcount(p) == before[p] - 1 for p in gone)
        assert not set(gone) & locked
        by_page = {p: key for key, p in self.tree.items()}
        for page in gone:
            del self.tree[by_page[page]]

    def alloc(self, n):
        if self.pool.num_free < n:
            self.evict(n - self.pool.num_free)
        return self.pool.alloc(n) if self.pool.can_alloc(n) else None

    def write(self, req, first_page):
        for i in range(first_page, len(req.pages)):
            page = req.pages[i]
            assert self.pool.refcount(page) == 1  # writes go only to the request's own pages
            self.written[page] = (req.namespace, tuple(req.tokens[: (i + 1) * PS]))

    def insert_full_pages(self, req):
        n = len(req.tokens) // PS
        expected = self.model_match(req.tokens[: n * PS], req.namespace)
        cached = self.cache.insert(req.tokens[: n * PS], req.pages[:n], req.namespace)
        assert cached == len(expected) * PS >= req.num_matched * PS
        for i in range(len(expected), n):
            self.tree[(req.namespace, tuple(req.tokens[: (i + 1) * PS]))] = req.pages[i]

    @rule(data=st.data(), suffix=st.lists(st.integers(0, 1), max_size=5),
          namespace=st.sampled_from(NAMESPACES))
    def start(self, data, suffix, namespace):
        # A shared system prompt, or an earlier conversation (next turn), plus a new suffix.
        head = data.draw(st.sampled_from(PROMPTS + self.history[-8:]))
        tokens = (list(head) + suffix)[:12] or [0]
        self.history.append(tuple(tokens))
        m = self.cache.match(tokens, namespace)
        assert m.pages == self.model_match(tokens, namespace)
        assert m.num_tokens == len(m.pages) * PS
        for i, page in enumerate(m.pages):  # matched pages hold exactly this prefix's KV
            assert self.written[page] == (namespace, tuple(tokens[: (i + 1) * PS]))
        self.cache.lock(m.node)
        self.pool.ref(m.pages)
        tail = self.alloc(-(-len(tokens) // PS) - len(m.pages))
        if tail is None:  # not enough memory even after eviction: reject
            self.pool.unref(m.pages)
            self.cache.unlock(m.node)
            return
        req = Request(list(tokens), namespace, m.node, len(m.pages), m.pages + tail)
        self.write(req, len(m.pages))
        self.requests[self.next_id] = req
        self.next_id += 1

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def decode(self, data, new_tokens):
        req = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        for token in new_tokens:
            if len(req.tokens) % PS == 0:
                page = self.alloc(1)
                if page is None:
                    break
                req.pages += page
            req.tokens.append(token)
            self.write(req, len(req.pages) - 1)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def checkpoint(self, data):  # a finished prefill's full pages enter the tree mid-request
        self.insert_full_pages(self.requests[data.draw(st.sampled_from(sorted(self.requests)))])

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), finish=st.booleans())
    def end(self, data, finish):  # finish inserts the whole sequence; abort does not
        req = self.requests.pop(data.draw(st.sampled_from(sorted(self.requests))))
        self.history.append(tuple(req.tokens))
        if finish:
            self.insert_full_pages(req)
        self.cache.unlock(req.node)
        self.pool.unref(req.pages)

    @rule(num_pages=st.integers(0, 6))
    def evict_pages(self, num_pages):
        self.evict(num_pages)

    @rule()
    def reset(self):
        self.evict(self.cache.num_evictable_pages)
        self.cache.reset()
        assert self.cache.num_evictable_pages == 0

    @invariant()
    def structures_are_consistent(self):
        self.pool.check_invariants()
        self.cache.check_invariants()
        assert tree_contents(self.cache) == self.tree
        assert self.cache.num_cached_pages == len(self.tree)
        assert self.cache.num_evictable_pages == len(self.tree) - len(self.locked_pages())
        for (namespace, prefix), page in self.tree.items():
            assert len(prefix) == PS or (namespace, prefix[:-PS]) in self.tree  # prefix closed
            assert self.written[page] == (namespace, prefix)
        owners = {}
        for (namespace, _), page in self.tree.items():
            assert owners.setdefault(page, namespace) == namespace  # no page across namespaces

    @invariant()
    def every_page_is_free_or_referenced(self):
        expected = [0] * NUM_PAGES
        for page in self.tree.values():
            expected[page] += 1
        for req in self.requests.values():
            for page in req.pages:
                expected[page] += 1
        assert [self.pool.refcount(p) for p in range(NUM_PAGES)] == expected
        assert self.pool.num_free + sum(1 for n in expected if n) == NUM_PAGES
        if not self.requests:
            assert self.pool.num_free + len(self.tree) == NUM_PAGES

    @invariant()
    def events_track_the_tree(self):
        for event in self.cache.drain_events():
            hashes = set(event.block_hashes)
            if event.kind == "stored":
                assert event.parent_hash is None or event.parent_hash in self.router
                assert not hashes & self.router
                self.router |= hashes
            else:
                assert hashes <= self.router
                self.router -= hashes
                assert event.parent_hash is None or event.parent_hash in self.router
        assert self.router == {page_hashes(prefix, PS, ns)[-1] for ns, prefix in self.tree}


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestCacheMachine = CacheMachine.TestCase
