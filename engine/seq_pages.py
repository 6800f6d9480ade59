"""The pages sequences run on: the page pool, the radix tree that caches full pages over it, a hybrid cache's window
slots (engine.window_pages) and the host and disk tiers behind the tree (engine.cache_tiers).

The scheduler decides who runs; this decides which pages they run on: how many a sequence can get now, reserving
them (evicting the tree's unlocked leaves and window holds), taking them at admission after a cached prefix, sliding
a sequence's window, and giving them back (its computed full pages into the tree first). Host ints only, like the
scheduler it serves (nano-vllm's block manager, with a radix tree).

Ownership (DESIGN.md invariants): a running sequence holds one pool reference on each of its pages and locks the tree
node of its cached path; the tree holds its own reference on every page it stores. In a hybrid cache a sequence also
holds the window slots of its pages from `seq.window_from` on, and the tree those of the pages it stores.
"""
from __future__ import annotations

import collections

from engine.cache_tiers import CacheTiers
from engine.config import CacheConfig
from engine.page_pool import PagePool
from engine.block_hash import page_hashes
from engine.radix_cache import CacheEvent, RadixCache
from engine.request import Sequence
from engine.state_snapshots import StateSnapshots
from engine.window_pages import WindowPages


class SequencePages:
    """Pages, cached prefixes and window slots for the scheduler's sequences. Not thread safe."""

    def __init__(self, cache: CacheConfig, num_pages: int, stats, num_host_pages: int = 0, window: int = 0,
                 num_window_pages: int = 0, disk=None, num_state_slots: int = 0, num_snapshots: int = 0,
                 num_host_states: int = 0, disk_states=None, chunked_window: bool = False):
        """stats: the scheduler's SchedulerStats (evictions, tier hits). window, num_window_pages: a hybrid cache's
        sliding window (an attention chunk with `chunked_window`) and window slots (0: every layer keeps every page).
        disk: the disk tier (an engine.disk_cache.DiskCache, or what tests give in its place). num_state_slots: a model with linear attention
        layers, the recurrent-state slots (one per running sequence: `Sequence.state_slot`), and `num_snapshots` more
        for the prefix cache's (engine.state_snapshots) after a scratch one; `num_host_states` host slots keep those
        the device lets go, with a host tier, and `disk_states` (the disk tier's files for them) every one taken
        (engine.cache_tiers)."""
        self.page_size = cache.page_size
        self.prefix_caching = cache.prefix_caching
        self.stats = stats
        self.pool = PagePool(num_pages)
        self.tree = RadixCache(self.pool, cache.page_size)
        self.tree.record_events = False  # until someone drains them (LLMEngine.drain_cache_events)
        self.window = (WindowPages(num_window_pages, window, cache.page_size, chunked_window) if num_window_pages
                       else None)
        self._window_copies: list[tuple[int, int]] = []  # (src, dst) window slots of the plan being built
        # Host and disk tiers: the tree's evicted pages saved to host slots, its stored pages written to disk (the
        # plans carry the copies); prompts continue their match in them.
        self.tiers = CacheTiers(cache.page_size, num_host_pages if self.prefix_caching else 0,
                                disk if self.prefix_caching else None, stats,
                                self.window_slot if self.window is not None else None, cache.disk_read_timeout_s,
                                num_host_states if num_state_slots and self.prefix_caching else 0,
                                disk_states if num_state_slots and self.prefix_caching else None,
                                first_window_page=self.window.first_page if self.window is not None else None)
        if self.window is not None and self.tiers.host is not None:
            raise ValueError("a hybrid cache (window pages) has no host tier")
        self.has_states = num_state_slots > 0
        self.free_state_slots = list(range(num_state_slots))[::-1]
        self._state_copies: list[tuple[int, int]] = []  # (snapshot slot, sequence's slot) of the plan being built
        # Snapshots taken where a token was still being sampled (overlapped steps): (sequence, position, slot), named
        # by their block hash once it is known.
        self._unnamed: list[tuple[Sequence, int, int]] = []
        self.snapshots = (StateSnapshots(num_state_slots + 1, num_snapshots)
                          if self.has_states and self.prefix_caching else None)
        if self.snapshots is not None:
            self.snapshots.on_evict = self.tiers.save_state if self.tiers.host_states is not None else None
            self.tiers.has_snapshot = self._has_snapshot
        self.tree.on_evict = self._tree_evicting
        self.tree.on_store = self.tiers.tree_storing
        self._published_snapshots: set[int] = set()  # what drain_snapshot_events reported last

    def drain_snapshot_events(self) -> list[CacheEvent]:
        """For the router's feed (a model with linear attention layers; none otherwise): the prefixes a request can
        resume from here, whose recurrent states have a snapshot on the device or in the host tier, that appeared or
        went since the last call, as `medium="snapshot"` events ("removed" then "stored"; the first call reports what
        is here). A diff of the two sets: a snapshot leaving the device for the host tier stays resumable."""
        if self.snapshots is None:
            return []
        now = set(self.snapshots.names())
        if self.tiers.host_states is not None:
            now.update(self.tiers.host_states.hashes())
        removed, stored = self._published_snapshots - now, now - self._published_snapshots
        self._published_snapshots = now
        return [CacheEvent(kind, tuple(hashes), None, None, medium="snapshot")  # type: ignore[arg-type]
                for kind, hashes in (("removed", removed), ("stored", stored)) if hashes]

    # ----------------------------------------------------------------------------------- queries
    def match(self, seq: Sequence, whole: bool = False):
        """(the tree's longest prefix of `seq` that it can start after, how many tokens the tree stores). A hybrid
        cache cuts the prefix back to the last page boundary whose window still has its slots (engine.window_pages), a
        model with linear attention layers to the last one with a snapshot of their state (engine.state_snapshots;
        `whole`: not yet, the host tier may continue it: `resume_point`); the pages after it are recomputed."""
        match = self.tree.match(seq.all_ids, seq.namespace)
        if self.snapshots is not None:  # resumable only where a snapshot of the recurrent state is, before the last token
            if whole:
                return match, match.num_tokens
            usable = self._snapshot_before(match, seq.num_tokens - 1)
        elif self.window is not None:
            usable = self.window.usable(match.pages, seq.num_tokens) * self.page_size
        else:
            return match, match.num_tokens
        if usable == match.num_tokens:
            return match, match.num_tokens
        return self.tree.match(seq.all_ids[:usable], seq.namespace), match.num_tokens

    def cut_before(self, seq: Sequence, match, limit: int):
        """The tree's match of `seq` (a model with linear attention layers) cut back to the deepest page boundary at or
        before `limit` with a snapshot of their states: where a sequence can start."""
        usable = self._snapshot_before(match, limit)
        return match if usable == match.num_tokens else self.tree.match(seq.all_ids[:usable], seq.namespace)

    def resume_point(self, seq: Sequence, match, host_slots: list[int], disk_pages: list[object]):
        """(the match, the host and disk tiers' pages after it) cut back to the deepest page boundary with a snapshot of
        the recurrent states, on the device or in a tier (`match` the tree's whole one, the pages continuing it): past
        the tree when a tier's page ends at one, else on the tree's path."""
        for i in range(len(host_slots) + len(disk_pages), 0, -1):
            if self._has_snapshot(block_hash := self.prefix_hash(seq, match.num_tokens + i * self.page_size)):
                self.tiers.keep_state(block_hash)
                return match, host_slots[:i], disk_pages[: max(0, i - len(host_slots))]
        usable = self._snapshot_before(match, seq.num_tokens - 1)
        if usable:
            self.tiers.keep_state(self.prefix_hash(seq, usable))
        if usable == match.num_tokens:
            return match, [], []
        return self.tree.match(seq.all_ids[:usable], seq.namespace), [], []

    def _has_snapshot(self, block_hash: int) -> bool:
        return (self.snapshots.usable(block_hash) or self.tiers.has_state(block_hash)
                or self.tiers.read_state(block_hash) is not None)

    def _snapshot_before(self, match, limit: int) -> int:
        """The deepest page boundary of `match`'s path at or before `limit` with a snapshot of the recurrent state (not
        one this plan is still writing; on the device or in the host tier); 0 if none."""
        node, end, ps = match.node, match.num_tokens, self.page_size
        while node is not None and node.hashes:
            for i in range(len(node.hashes) - 1, -1, -1):
                pos = end - (len(node.hashes) - 1 - i) * ps
                if pos <= limit and self._has_snapshot(node.hashes[i]):
                    return pos
            end -= len(node.tokens)
            node = node.parent
        return 0

    def prefix_hash(self, seq: Sequence, num_tokens: int) -> int:
        """The chained block hash of the sequence's first `num_tokens` tokens (a page boundary > 0), extending the
        hashes it keeps (`Sequence.block_hashes`)."""
        done, n = len(seq.block_hashes), num_tokens // self.page_size
        if n > done:
            seq.block_hashes += page_hashes(seq.token_slice(done * self.page_size, n * self.page_size), self.page_size,
                                            seq.namespace, parent=seq.block_hashes[-1] if done else None)
        return seq.block_hashes[n - 1]

    def restore_state(self, seq: Sequence, num_tokens: int) -> None:
        """The sequence resumes after its first `num_tokens` (ending at a snapshot): its slot takes a copy of it before
        the step, from the device's snapshot slot, else the host tier's, else the one read from disk."""
        block_hash = self.prefix_hash(seq, num_tokens)
        if self.snapshots.usable(block_hash):
            self._state_copies.append((self.snapshots.slot(block_hash), seq.state_slot))
        elif self.tiers.has_state(block_hash):
            self.tiers.load_state(block_hash, seq.state_slot)
        else:
            self.tiers.load_read_state(block_hash, seq.state_slot)

    def take_snapshot(self, seq: Sequence, start: int, end: int) -> tuple[int, int] | None:
        """(tokens after `start`, slot) of the snapshot a chunk of `seq` over [start, end) takes, or None: at the end
        of the cached path it left at admission, else at its prompt's last page boundary, else at its latest page
        boundary (which replaces its previous latest)."""
        ps = self.page_size
        prompt_end = len(seq.prompt_ids) // ps * ps
        for pos, latest in ((seq.snapshot_at, False), (prompt_end, False), (end // ps * ps, True)):
            if start < pos <= end:
                break
        else:
            return None
        if seq.has_pending_token and pos >= seq.num_tokens:  # its last token is a placeholder: named later
            slot = self.snapshots.reserve()
            if slot is not None:
                self._unnamed.append((seq, pos, slot))
        else:
            slot = self._named_snapshot(seq, pos, latest, self.snapshots.take)
        return None if slot is None else (pos - start, slot)

    def _named_snapshot(self, seq: Sequence, pos: int, latest: bool, put) -> int | None:
        """put(block hash) -> the slot of the snapshot at `pos`; a sequence's latest replaces its previous one."""
        block_hash = self.prefix_hash(seq, pos)
        slot = put(block_hash)
        if slot is not None:
            self.tiers.snapshot_taken(block_hash, slot, seq.namespace)
        if slot is not None and latest:
            if seq.latest_snapshot is not None and seq.latest_snapshot != block_hash:
                self.snapshots.drop([seq.latest_snapshot])
            seq.latest_snapshot = block_hash
        return slot

    def _name_snapshots(self) -> None:
        """Names the snapshots whose last token has been sampled since (an aborted sequence's give their slot back)."""
        waiting = []
        for seq, pos, slot in self._unnamed:
            if seq.finish_reason == "abort" or seq.num_tokens < pos:
                self.snapshots.release(slot)
            elif seq.has_pending_token and pos >= seq.num_tokens:
                waiting.append((seq, pos, slot))
            else:
                self._named_snapshot(seq, pos, True, lambda h: self.snapshots.name(slot, h) or slot)
        self._unnamed = waiting

    def take_state_copies(self) -> list[tuple[int, int]]:
        """The (snapshot slot, sequence slot) copies of the plan being built; snapshots it takes are usable from the
        next plan on."""
        copies, self._state_copies = self._state_copies, []
        if self.snapshots is not None:
            self.snapshots.end_plan()
            self._name_snapshots()
        return copies

    @property
    def num_obtainable(self) -> int:
        """Pages a sequence could get now (freeing unlocked tree pages): each new page takes a window slot too."""
        n = self.pool.num_free + (self.tree.num_evictable_pages if self.prefix_caching else 0)
        return n if self.window is None else min(n, self.window.num_obtainable)

    @property
    def num_free(self) -> int:
        """Pages a sequence can get without evicting anything."""
        return self.pool.num_free if self.window is None else min(self.pool.num_free, self.window.pool.num_free)

    def fit(self, seq: Sequence, n: int) -> int:
        """How many of `n` more tokens fit in the pages the sequence has or could get now."""
        return min(n, (len(seq.pages) + self.num_obtainable) * self.page_size - seq.num_computed)

    def window_slot(self, page: int) -> int:
        """The page's window slot in a hybrid cache; -1 when it has none, or the cache is not hybrid."""
        return -1 if self.window is None else self.window.slot_of.get(page, -1)

    def window_row(self, seq: Sequence) -> tuple[int, ...]:
        """The window slot of each of the sequence's pages (a chunk's), empty if the cache is not hybrid; -1 before
        `window_from` (pages nothing it computes can see), so a step's host work is the window's length, not the
        sequence's."""
        if self.window is None:
            return ()
        slot_of = self.window.slot_of
        return (-1,) * seq.window_from + tuple(slot_of[p] for p in seq.pages[seq.window_from :])

    # ----------------------------------------------------------------------------------- taking
    def reserve(self, n: int, protect=None, slots: int | None = None) -> bool:
        """Makes `n` pages (and in a hybrid cache `slots` window slots, by default `n`) free, evicting unlocked tree
        leaves and the tree's window slots if needed; `protect` (a match) is not evicted."""
        slots = n if slots is None else slots
        if self.window is not None and slots > self.window.pool.num_free:
            self.stats.window_evicted_pages += self.window.reserve(slots)
            if slots > self.window.pool.num_free:
                return False
        if n <= self.pool.num_free:
            return True
        if self.prefix_caching:
            if protect is not None:
                self.tree.lock(protect.node)  # NOTE: the path being admitted must survive its own eviction
            self.stats.num_evicted_pages += self.tree.evict(n - self.pool.num_free)
            if protect is not None:
                self.tree.unlock(protect.node)
        return n <= self.pool.num_free

    def alloc(self, n: int, slots_from: int = 0) -> list[int]:
        """`n` new pages (reserved before), each from `slots_from` on with a window slot in a hybrid cache (pages read
        from the disk tier before the sequence's window need none)."""
        pages = self.pool.alloc(n)
        if self.window is not None:
            self.window.alloc(pages[slots_from:])
        return pages

    def admit(self, seq: Sequence, match, shared: list[int], cow_src: int | None, num_cached: int, n: int,
              copies: list[tuple[int, int]], cut=None) -> int | None:
        """Gives `seq` its cached prefix (`shared`: the tree's pages of `match`) and new pages for its first chunk of
        up to `n` tokens after `num_cached`; the pages between (host and disk hits) are new ones too, filled before the
        step. `cow_src`: the tree's last page, copied into the first new one (`copies`), when the whole sequence is
        cached. Returns the chunk's length (a hybrid cache's window slots can cut it, then `cut` (n -> the chunk a
        step may compute: scheduler._image_cut) too), or None if out of pages."""
        window_held, slotless = [], 0
        if self.window is not None:  # hold the window's slots first, so that reserving cannot evict them
            seq.window_from = self.window.first_page(num_cached)
            window_held = shared[seq.window_from :] + ([cow_src] if cow_src is not None else [])
            self.window.ref(window_held)
            slotless = max(0, seq.window_from - len(shared))  # pages read from disk before its window: no slot
            # Each other new page takes a slot: the chunk ends where the slots to be had do.
            n = min(n, (len(shared) + slotless + self.window.num_obtainable) * self.page_size - num_cached)
            if n > 0 and cut is not None:
                n = cut(n)
            if n <= 0:
                self.window.release(window_held)
                return None
        num_new = -(-(num_cached + n) // self.page_size) - len(shared)
        slotless = min(slotless, num_new)
        if not self.reserve(num_new, protect=match, slots=num_new - slotless):
            if self.window is not None:
                self.window.release(window_held)
            return None
        if match is not None:
            self.tree.lock(match.node)
            seq.lock_node = match.node
            self.pool.ref(shared)
        seq.pages = shared + self.alloc(num_new, slotless)
        if cow_src is not None:
            copies.append((cow_src, seq.pages[len(shared)]))
            if self.window is not None:
                self._window_copies.append((self.window.slot_of[cow_src], self.window.slot_of[seq.pages[len(shared)]]))
                self.window.release([cow_src])  # copied before the step: the tree's page keeps its own hold
        seq.num_tree_tokens = len(shared) * self.page_size
        if self.has_states and seq.state_slot < 0:  # (never empty: the running never outnumber the slots)
            seq.state_slot = self.free_state_slots.pop()
        return n

    def take_window_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) window slot copies of the plan being built (copy-on-write of a cached last page)."""
        copies, self._window_copies = self._window_copies, []
        return copies

    def slide_window(self, seq: Sequence) -> None:
        """Pages out of reach of the tokens `seq` has still to compute leave its window (their slots are released)."""
        if self.window is None:
            return
        start = self.window.first_page(seq.num_computed)
        if start > seq.window_from:
            self.window.release(seq.pages[seq.window_from : start])
            seq.window_from = start

    # ----------------------------------------------------------------------------------- giving back
    def cache_computed(self, seq: Sequence) -> None:
        """Inserts the sequence's computed full pages into the tree and moves its lock to the new path."""
        if not self.prefix_caching:
            return
        num_full = seq.num_computed // self.page_size
        if num_full * self.page_size <= seq.num_tree_tokens:
            return
        tokens = seq.token_slice(0, num_full * self.page_size)
        num_cached = self.tree.insert(tokens, seq.pages[:num_full], seq.namespace)
        if self.window is not None:
            ps, slot_of, taken = self.page_size, self.window.slot_of, []
            if num_cached > seq.num_tree_tokens:
                # The tree stores pages this sequence recomputed (their window was evicted): it takes this sequence's
                # pages where its own have no window slots.
                taken = self.tree.adopt(tokens[:num_cached], seq.pages[: num_cached // ps], seq.namespace,
                                        lambda old, new: old not in slot_of and new in slot_of)
            self.window.tree_hold(taken + seq.pages[num_cached // ps : num_full])
        match = self.tree.match(tokens, seq.namespace)
        self.tree.lock(match.node)
        if seq.lock_node is not None:
            self.tree.unlock(seq.lock_node)
        seq.lock_node = match.node
        seq.num_tree_tokens = match.num_tokens

    def release(self, seq: Sequence) -> None:
        """`seq` stops running: its computed full pages go into the tree, its references and lock go."""
        self.cache_computed(seq)
        if seq.lock_node is not None:
            self.tree.unlock(seq.lock_node)
            seq.lock_node = None
        if self.window is not None:
            self.window.release(seq.pages[seq.window_from :])
            seq.window_from = 0
        self.pool.unref(seq.pages)
        seq.pages, seq.num_computed, seq.num_tree_tokens = [], 0, 0
        if seq.state_slot >= 0:  # its recurrent state goes with it (a preempted sequence computes it again)
            self.free_state_slots.append(seq.state_slot)
            seq.state_slot = -1

    def reset(self) -> None:
        """Drops every cached page no running sequence uses, on the device and in the host tier (the disk tier's
        files stay: they are named by the weights they came from)."""
        self.tree.reset()
        self.tiers.reset()
        if self.snapshots is not None:
            self.snapshots.reset()
            for _, _, slot in self._unnamed:
                self.snapshots.release(slot)
            self._unnamed = []

    def _tree_evicting(self, pages: list[int], hashes: list[int]) -> None:
        """The tree is letting go of `pages`: their window slots go with them; the host tier saves them."""
        if self.window is not None:
            self.window.tree_drop(pages)
        if self.snapshots is not None:
            self.snapshots.drop(hashes, save=True)
        self.tiers.tree_evicting(pages, hashes)

    # ------------------------------------------------------------------------------ invariants
    def check_invariants(self, running: list[Sequence]) -> None:
        """Every page is free or referenced exactly by the tree and the `running` sequences; every window slot by
        its holders (debug mode)."""
        self.pool.check_invariants()
        self.tree.check_invariants()
        holders: collections.Counter[int] = collections.Counter(self.tree.held_pages())
        for seq in running:
            holders.update(seq.pages)
        for page in range(self.pool.num_pages):
            # NOTE: the DESIGN.md invariant: a page is free, or referenced exactly once per holder.
            assert self.pool.refcount(page) == holders[page], (
                f"page {page}: refcount {self.pool.refcount(page)} but {holders[page]} holders"
            )
        assert self.pool.num_free + self.pool.num_used == self.pool.num_pages
        held = [seq.state_slot for seq in running if seq.state_slot >= 0]
        assert len(set(held)) == len(held) and not set(held) & set(self.free_state_slots), "a state slot held twice"
        if self.snapshots is not None:
            self.snapshots.check_invariants([slot for _, _, slot in self._unnamed])
        if self.window is not None:
            window_holders: collections.Counter[int] = collections.Counter()
            for seq in running:
                window_holders.update(seq.pages[seq.window_from :])
            self.window.check_invariants(window_holders)
            tree_pages, tree_held = set(self.tree.held_pages()), self.window.tree_held()
            assert tree_held <= tree_pages, "the tree holds the window slot of a page it does not store"
            assert all(p in tree_held for p in tree_pages if p in self.window.slot_of), \
                "a tree page's window slot is not held by the tree"
