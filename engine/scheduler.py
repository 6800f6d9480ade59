"""Continuous-batching scheduler: host state in, a plain `StepPlan` out.

Each step it (1) gives every running decode one token, (2) continues running prefills in chunks,
(3) admits waiting sequences in policy order, prefilling only the tail the radix cache does not
hold, all under one token budget. When pages run out it evicts unlocked tree leaves, then preempts
the newest running sequence by recompute (its computed full pages stay in the tree, so readmission
is mostly a hit). It never touches JAX: pages are ints, the plan is ints and lists.

Which pages a sequence runs on, and who holds them, is `engine.seq_pages.SequencePages`'s part
(pool, radix tree, window slots, host and disk tiers); the scheduler decides who runs and when.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Iterable

import numpy as np

from engine.block_hash import page_hashes
from engine import speculative, structured
from engine.suffix_decoding import SuffixCache
from engine.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from engine.multimodal import chunk_cut
from engine.request import Sequence, Status, placeholder
from engine.seq_pages import SequencePages


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Tokens [start, start + len(token_ids)) of one sequence, computed this step."""

    seq: Sequence  # for the engine's post-processing; the runner reads only the plain fields below
    token_ids: list[int]
    start: int
    pages: np.ndarray  # int32, the sequence's whole page list (page-table row; `Sequence.page_array`)
    sample: bool  # this chunk ends at the sequence's last token: sample the next one
    # Speculative decoding: the chunk's last len(draft) tokens are proposed continuations, verified by sampling at
    # every position from the real last token on (see engine.speculative).
    draft: tuple[int, ...] = ()
    # ... a draft tree's shape (speculative.ngram_branches): each draft token's parent (speculative.DraftTree); () for
    # a chain, each draft token after the one before it
    draft_parents: tuple[int, ...] = ()
    # Hybrid cache (engine.window_pages): the window slot of each of `pages`, -1 where it has none (out of window).
    window_pages: tuple[int, ...] = ()
    # A model with linear attention layers: (tokens of this chunk, slot) of the snapshot of its recurrent state taken
    # after them (engine.state_snapshots), or None.
    snapshot: tuple[int, int] | None = None
    # A model with linear attention layers and drafts: which of the step's drafting rows (ModelRunner.
    # draft_state_slot) keeps its state after each of its first len(draft) tokens; -1 without drafts.
    draft_row: int = -1

    @property
    def draft_tree(self) -> speculative.DraftTree:
        if self.draft_parents:
            return speculative.DraftTree(self.draft, self.draft_parents)
        return speculative.DraftTree.chain(self.draft)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    chunks: list[Chunk]  # decodes first, then prefill chunks
    page_copies: list[tuple[int, int]]  # (src, dst): copy-on-write of a shared last page before the step
    num_decode_tokens: int  # decodes' tokens, drafts included
    num_prefill_tokens: int
    # (src, dst) cache slots (page * page_size + offset) moved first of all: the K/V of accepted draft-tree nodes off
    # the tree's first branch, to their positions (Scheduler.resolve)
    slot_moves: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # Host tier (engine.host_cache), before the step, in this order: (page, slot) evicted pages copied to host slots,
    # then (slot, page) host slots copied into the pages of admitted prompts that hit them.
    host_saves: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    host_loads: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # Hybrid cache: (src, dst) window slots copied with `page_copies` (the copied page's windowed layers).
    window_copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # Disk tier (engine.disk_cache), with the host tier's: (page, window slot, block hash) pages the tree stored since
    # the last plan, written out from before the step; (payload, page, window slot) pages read from disk, copied in
    # before the step. The window slot (a hybrid cache's windowed layers) is -1 without one.
    disk_saves: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    disk_loads: list[tuple[object, int, int]] = dataclasses.field(default_factory=list)
    # A model with linear attention layers: (snapshot slot, sequence slot) recurrent states copied before the step (an
    # admitted prompt resuming a cached prefix).
    state_copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # ... and with a host tier, before those: (snapshot slot, host slot) snapshots the device lets go, copied out;
    # then (host slot, sequence slot) host snapshots copied into the slots of prompts resuming from them.
    state_saves: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    state_loads: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # ... and with a disk tier: (snapshot slot, block hash) snapshots an earlier step wrote, written out from before the
    # step; (state read from disk, sequence slot) copied into the slots of prompts resuming from them.
    state_disk_saves: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    state_disk_loads: list[tuple[object, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens


@dataclasses.dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_evicted_pages: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    host_hit_tokens: int = 0  # prompt tokens copied back from the host tier instead of computed
    host_saved_pages: int = 0  # evicted pages copied to the host tier
    host_state_hits: int = 0  # sequences resumed from a snapshot of their recurrent states in the host tier
    host_saved_states: int = 0  # snapshots of recurrent states copied to the host tier
    disk_state_hits: int = 0  # sequences resumed from a snapshot of their recurrent states read from the disk tier
    disk_saved_states: int = 0  # snapshots of recurrent states sent to the disk tier
    disk_hit_tokens: int = 0  # prompt tokens read from the disk tier instead of computed
    disk_saved_pages: int = 0  # pages the tree stored that were sent to the disk tier
    disk_read_timeouts: int = 0  # prompts that stopped waiting for their disk read (cache.disk_read_timeout_s)
    transfer_hit_tokens: int = 0  # prompt tokens received from a prefill replica instead of computed (engine.kv_transfer)
    received_dropped_pages: int = 0  # pages received that no admission took before newer ones pushed them out
    spec_draft_tokens: int = 0  # draft tokens verified (speculative decoding)
    spec_accepted_tokens: int = 0  # of which accepted
    spec_branch_tokens: int = 0  # ... off a draft tree's first branch (a chain would have lost them)
    window_evicted_pages: int = 0  # hybrid cache: window slots the tree gave up (the pages' full K/V stays)
    window_recomputed_tokens: int = 0  # cached prompt tokens recomputed because their window had been evicted


LPM_WINDOW = 256  # waiting sequences the lpm policy sorts per step


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_pages: int, max_model_len: int,
                 eos_ids: frozenset[int] = frozenset(), spec: SpeculativeConfig = SpeculativeConfig(),
                 num_host_pages: int = 0, window: int = 0, num_window_pages: int = 0, disk=None,
                 num_state_slots: int = 0, num_snapshots: int = 0, num_host_states: int = 0, disk_states=None,
                 chunked_window: bool = False):
        """window, num_window_pages: a hybrid cache (engine.window_pages): the sliding window of the model's windowed
        layers (with `chunked_window`, the attention chunk of its chunked layers) and the slots those layers' K/V have
        (0: every layer keeps every page). disk: the disk tier (an
        engine.disk_cache.DiskCache, or what tests give in its place). num_state_slots: a model with linear attention
        layers, its recurrent-state slots (max_running: one per running sequence) and `num_snapshots` slots for the
        prefix cache's snapshots of them, with a host tier `num_host_states` host slots for those the device lets
        go, and with a disk tier `disk_states` its files for them."""
        self.cfg = sched
        self.spec = spec
        self.eos_ids = eos_ids  # the model's end tokens (EOS, end of turn): finish unless ignore_eos
        self.page_size = cache.page_size
        self.max_model_len = max_model_len
        self.prefix_caching = cache.prefix_caching
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.stats = SchedulerStats()
        # A model with linear attention layers: (state slot, tokens kept) of each sequence whose drafts were rejected in
        # part, with its drafting row in that step, for the engine to put its state back (`ModelRunner.rollback_states`)
        # before the next step: (drafting row, state slot, tokens kept)
        self.state_rollbacks: list[tuple[int, int, int]] = []
        # (src, dst) cache slots of accepted draft-tree nodes to move before the cache is read again (StepPlan.slot_moves)
        self.slot_moves: list[tuple[int, int]] = []
        self.pages = SequencePages(cache, num_pages, self.stats, num_host_pages, window, num_window_pages, disk,
                                   num_state_slots, num_snapshots, num_host_states, disk_states, chunked_window)
        self.pool, self.tree, self.window, self.tiers = self.pages.pool, self.pages.tree, self.pages.window, self.pages.tiers
        # Full pages some running prefill is computing right now, by chained block hash: a waiting
        # sequence whose next uncached page is here waits for it instead of computing it again.
        self._inflight: collections.Counter[int] = collections.Counter()
        self._inflight_of: dict[str, list[int]] = {}
        # Suffix decoding: the outputs of this replica's requests, looked up for drafts (engine.suffix_decoding)
        self.suffix = (SuffixCache(spec.ngram_min, spec.suffix_max_depth, spec.suffix_max_cached_requests,
                                   spec.suffix_spec_factor, spec.suffix_min_prob, spec.suffix_trees)
                       if spec.method == "suffix" else None)

    # ----------------------------------------------------------------------------------- queue
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)
        self.stats.prompt_tokens += len(seq.prompt_ids)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status, seq.finish_reason = Status.FINISHED, "abort"
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    # -------------------------------------------------------------------------------- schedule
    def schedule(self) -> StepPlan | None:
        """Plans one step; None when nothing can run."""
        budget = self.cfg.max_batch_tokens
        chunks: list[Chunk] = []
        copies: list[tuple[int, int]] = []
        loads: list[tuple[int, int]] = []
        disk_loads: list[tuple[object, int, int]] = []
        self.tiers.start_plan()
        scheduled: set[str] = set()
        num_decode = num_prefill = 0
        if self.cfg.policy == "priority":
            self._preempt_for_priority()
        if self.suffix is not None:
            self.suffix.sync(self.running)

        # 1. Decodes, oldest first; on a page shortage preempt the newest unscheduled sequence. With speculative
        #    decoding each may carry draft tokens, from budget and free pages the other decodes do not need.
        decodes = [s for s in self._by_urgency(self.running) if not s.is_prefilling or s.spec_redo]
        # (a sequence that accepted another branch of a draft tree computes those tokens again first: up to
        # num_tokens + 1 real tokens, taken here while the budget leaves a token for every other decode)
        real = [s.num_tokens - s.num_computed for s in decodes]
        speculate = self.spec.draft_tokens > 0 and (not self.spec.max_batch or len(decodes) <= self.spec.max_batch)
        # (not while a prefill waits for a step to hold an image whole: drafts could take that budget every step)
        speculate = speculate and not any(s.is_prefilling and not _image_cut(s, s.num_computed, 1) for s in self.running)
        drafting = 0  # sequences with drafts so far (their rows: Chunk.draft_row)
        for i, seq in enumerate(decodes):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if real[i] > 1 and real[i] > budget - (len(decodes) - i - 1):
                continue  # no room for its recomputed tokens now: a prefill chunk below takes what fits
            if not self._make_room(seq, seq.num_tokens, scheduled):
                continue
            room = budget - real[i] - (len(decodes) - i - 1)  # what drafts may take: a token stays for each later decode
            draft = self._draft(seq, room) if speculate else speculative.DraftTree.chain()
            chunks.append(self._chunk(seq, seq.num_computed, real[i] + len(draft), draft, drafting if draft else -1))
            drafting += bool(draft)
            scheduled.add(seq.request_id)
            budget -= real[i] + len(draft)
            num_decode += real[i] + len(draft)

        # 2. Running prefills continue, chunked by the budget and the pages free or evictable now. One whose pages are
        #    full with none to get takes its next page from newer sequences (preempted), as a decode does: otherwise
        #    prefills that each hold part of the pool (or of a hybrid cache's window slots) could all wait forever.
        for seq in [s for s in self._by_urgency(self.running) if s.is_prefilling and s.request_id not in scheduled]:
            if budget <= 0 or seq.status is not Status.RUNNING:
                continue
            n = _image_cut(seq, seq.num_computed, min(seq.num_tokens - seq.num_computed, budget, self._chunk_limit))
            if n == 0:
                continue  # it waits for a step with room for the rest of an image
            fit = self.pages.fit(seq, n)
            # (a chunk that must finish an image takes the pages for all of it, from newer sequences if need be)
            n = _image_cut(seq, seq.num_computed, fit if fit > 0 else min(n, self.page_size)) or n
            if not self._make_room(seq, seq.num_computed + n, scheduled):
                continue
            chunks.append(self._chunk(seq, seq.num_computed, n))
            scheduled.add(seq.request_id)
            budget -= n
            num_prefill += n

        # 3. Admit waiting sequences in policy order while slots, budget and pages last.
        admitted: set[int] = set()
        room = budget > 0 and len(self.running) < self.cfg.max_running
        for seq in self._admission_order() if room else ():  # (lpm's order costs a tree match per waiting prompt)
            if budget <= 0 or len(self.running) >= self.cfg.max_running:
                break
            if seq.has_pending_token:
                continue  # preempted while its last token is still being sampled: readmitted once it is known
            chunk = self._admit(seq, budget, copies, loads, disk_loads)
            if chunk == "wait":
                continue  # its next page is being computed by another prefill, or read from disk: it will hit then
            if chunk is None:
                break  # out of pages: later arrivals must not overtake (no starvation of long prompts)
            chunks.append(chunk)
            admitted.add(id(seq))
            budget -= len(chunk.token_ids)
            num_prefill += len(chunk.token_ids)
        if admitted:
            self.waiting = collections.deque(s for s in self.waiting if id(s) not in admitted)
        self.tiers.end_plan()

        state_copies = self.pages.take_state_copies()
        if not chunks:
            return None  # pages evicted meanwhile are not reused before the next plan, which carries their saves
        window_copies = self.pages.take_window_copies()
        state_saves, state_loads = self.tiers.take_host_states()
        state_disk_saves, state_disk_loads = self.tiers.take_disk_states()
        return StepPlan(chunks=chunks, page_copies=copies, num_decode_tokens=num_decode, num_prefill_tokens=num_prefill,
                        slot_moves=self.take_slot_moves(), host_saves=self.tiers.take_host_saves(), host_loads=loads, window_copies=window_copies,
                        disk_saves=self.tiers.take_disk_saves(), disk_loads=disk_loads, state_copies=state_copies,
                        state_saves=state_saves, state_loads=state_loads, state_disk_saves=state_disk_saves,
                        state_disk_loads=state_disk_loads)

    @property
    def _chunk_limit(self) -> int:
        """Most prompt tokens one sequence prefills in a step (scheduler.long_prefill_tokens)."""
        return self.cfg.long_prefill_tokens or self.cfg.max_batch_tokens

    def _by_urgency(self, seqs) -> list[Sequence]:
        """Most urgent first under the priority policy (stable: ties keep their order), else as given."""
        return sorted(seqs, key=lambda s: s.priority) if self.cfg.policy == "priority" else list(seqs)

    def _preempt_for_priority(self) -> None:
        """Priority policy: a waiting sequence more urgent than some running ones takes their place when the batch is
        full or the pool is short of the pages its first chunk needs; the least urgent (newest among equals) go first."""
        slots = pages = 0  # claimed by the more urgent waiting sequences before this one
        for seq in self._admission_order():
            if seq.has_pending_token:
                continue
            victims = self._victims(lambda s: s.priority > seq.priority)
            if not victims:
                return  # the rest wait for sequences at least as urgent as themselves
            if slots >= self.cfg.max_running:
                return  # more urgent waiting sequences than the batch holds: the rest cannot run this step anyway
            slots, pages = slots + 1, pages + self._pages_to_admit(seq)
            while victims and (len(self.running) + slots > self.cfg.max_running or pages > self.pages.num_obtainable):
                self.preempt(victims.pop(0))

    def _pages_to_admit(self, seq: Sequence) -> int:
        """Pages admitting `seq` would allocate for its first chunk, after its cached prefix."""
        cached = self.pages.match(seq)[0].num_tokens if self.prefix_caching else 0
        cached = min(cached, seq.num_tokens - 1)
        n = min(seq.num_tokens - cached, self.cfg.max_batch_tokens, self._chunk_limit)
        return -(-(cached + n) // self.page_size) - cached // self.page_size

    def _admission_order(self) -> list[Sequence]:
        waiting = list(self.waiting)
        if self.cfg.policy == "priority":
            return self._by_urgency(waiting)
        if self.cfg.policy == "lpm" and self.prefix_caching:
            # Longest cached prefix first (ties keep arrival order) over a bounded window of the queue.
            window = waiting[:LPM_WINDOW]
            lengths = {id(s): self.pages.match(s)[0].num_tokens for s in window}
            window.sort(key=lambda s: -lengths[id(s)])
            return window + waiting[LPM_WINDOW:]
        return waiting

    def _admit(self, seq: Sequence, budget: int, copies: list[tuple[int, int]], loads: list[tuple[int, int]],
               disk_loads: list[tuple[object, int, int]]) -> Chunk | str | None:
        """Admits `seq` with its cached prefix; "wait" if its next page is in flight or being read from disk, None if
        out of pages."""
        tokens = seq.all_ids
        host_slots: list[int] = []
        disk_pages: list[object] = []
        seq.received_pages = 0
        if self.prefix_caching and seq.params.prompt_logprobs is None:  # prompt logprobs need the whole prompt's logits
            # (a model with linear attention layers: the tree's whole match, which the host tier may continue to a
            # snapshot of the recurrent states: cut back to one after)
            resumes_in_tiers = self.pages.snapshots is not None and self.tiers.enabled
            match, num_stored = self.pages.match(seq, whole=resumes_in_tiers)
            if self._waits_for_inflight(seq, match.num_tokens):
                return "wait"
            if self.tiers.enabled:
                hits = self.tiers.continue_match(seq, match)
                if hits is None:
                    return "wait"
                host_slots, disk_pages = hits
                if resumes_in_tiers:
                    num_stored = max(num_stored, match.num_tokens + (len(host_slots) + len(disk_pages)) * self.page_size)
                    match, host_slots, disk_pages = self.pages.resume_point(seq, match, host_slots, disk_pages)
            end = match.num_tokens + (len(host_slots) + len(disk_pages)) * self.page_size
            head_row = self.spec.method in ("mtp", "eagle3") and 0 < end < len(tokens)
            if head_row and self.pages.snapshots is not None:
                match, host_slots, disk_pages = self.pages.cut_before(seq, match, end - self.page_size), [], []
                head_row = False
            shared, num_cached = list(match.pages), match.num_tokens
            num_cached += (len(host_slots) + len(disk_pages)) * self.page_size
        else:
            match, shared, num_cached, head_row = None, [], 0, False
        cow_src = None
        if num_cached == len(tokens):
            # Whole sequence cached: recompute only the last token, into a private copy of the last page.
            cow_src = shared.pop()
            num_cached -= 1
        elif head_row:
            # An MTP layer's or EAGLE-3 head's K/V row at the hit's last position was computed with the token after it
            # in the sequence that cached it: this sequence recomputes that one position (a page of the tree's: into a
            # private copy) and the row reads its own next token (vLLM drops the whole last block). With linear
            # attention layers the hit went back a page above, to the snapshot of their states there. Every draft is
            # then the drafter's guess over the sequence as computed from scratch (tests/test_mtp.py, test_eagle3.py).
            if not host_slots and not disk_pages:
                cow_src = shared.pop()
            num_cached -= 1
        n = _image_cut(seq, num_cached, min(len(tokens) - num_cached, budget, self._chunk_limit))
        if n == 0:
            return "wait"  # the rest of an image needs more of a step than is left in this one
        n = self.pages.admit(seq, match, shared, cow_src, num_cached, n, copies,
                             cut=lambda n: _image_cut(seq, num_cached, n))
        if n is None:
            return None
        loaded = seq.pages[len(shared) :]
        loads += zip(host_slots, loaded)
        disk_loads += [(data, page, self.pages.window_slot(page)) for data, page in zip(disk_pages, loaded[len(host_slots) :])]
        seq.disk_read = None
        self.stats.host_hit_tokens += len(host_slots) * self.page_size
        received = min(seq.received_pages, len(disk_pages))  # (they lead the disk pages)
        self.stats.disk_hit_tokens += (len(disk_pages) - received) * self.page_size
        self.stats.transfer_hit_tokens += received * self.page_size
        seq.num_computed = num_cached
        if self.pages.snapshots is not None:  # resume the recurrent state; snapshot it where the cached path ended
            if num_cached:
                self.pages.restore_state(seq, num_cached)
            seq.snapshot_at = num_stored if match is not None and num_stored > num_cached else 0
        if match is not None and self.window is not None:
            self.stats.window_recomputed_tokens += max(0, min(num_stored, len(tokens) - 1) - num_cached)
        if seq.num_preemptions == 0:
            seq.num_cached_prompt = num_cached
            self.stats.cached_prompt_tokens += num_cached
        seq.status = Status.RUNNING
        if seq.first_scheduled_s is None:
            seq.first_scheduled_s = time.perf_counter()
        self.running.append(seq)
        self._mark_inflight(seq)
        return self._chunk(seq, num_cached, n)

    @property
    def host(self):
        """The host tier's index (engine.host_cache.HostPageIndex), or None."""
        return self.tiers.host

    def take_disk_saves(self) -> list[tuple[int, int, int]]:
        return self.tiers.take_disk_saves()

    def take_disk_states(self) -> list[tuple[int, int]]:
        """(snapshot slot, block hash) snapshots for the disk tier, with no step in flight (all written)."""
        return self.tiers.take_disk_states(idle=True)[0]

    def disk_reads(self) -> list:
        """The disk reads waiting sequences wait for (the engine waits on them when nothing else can run)."""
        return self.tiers.disk_reads(self.waiting)

    def reset_cache(self) -> None:
        """Drops every cached page no running sequence uses, on the device and in the host tier (the disk tier's
        files stay: they are named by the weights they came from)."""
        self.pages.reset()

    def _chunk(self, seq: Sequence, start: int, n: int, draft: speculative.DraftTree | None = None,
               draft_row: int = -1) -> Chunk:
        draft = draft or speculative.DraftTree.chain()
        return Chunk(
            seq=seq,
            token_ids=seq.token_slice(start, start + n - len(draft)) + list(draft.tokens),
            start=start,
            pages=seq.page_array(),
            sample=start + n - len(draft) == seq.num_tokens,
            draft=draft.tokens,
            draft_parents=() if draft.is_chain else draft.parents,
            draft_row=draft_row,
            window_pages=self.pages.window_row(seq),
            snapshot=(self.pages.take_snapshot(seq, start, start + n - len(draft))
                      if self.pages.snapshots is not None else None),
        )

    def _draft(self, seq: Sequence, budget: int) -> speculative.DraftTree:
        """Draft tokens for a decoding sequence (n-gram lookup in its own tokens, a chain or with `ngram_branches` a
        tree; suffix decoding's, from its own tokens and other requests' outputs; with a drafter, slots it fills before
        the step: a chain's, or with `topk` a tree's, `DraftTree.slots`), as many as its length limits, `budget` and
        the pages it holds plus free ones allow; the pages are taken now. A grammar (structured outputs) cuts the draft
        where it stops accepting it. Empty while the last token is pending (overlapped steps)."""
        none = speculative.DraftTree.chain()
        if seq.has_pending_token:
            return none
        if seq.spec_pause:
            seq.spec_pause -= 1
            return none
        depth = min(self.spec.num_tokens,
                    seq.params.max_tokens - len(seq.output_ids) - 1)  # the step yields up to depth + 1 tokens
        room = min(
            budget,
            self.max_model_len - seq.num_tokens - 1,
            (len(seq.pages) + self.pages.num_free) * self.page_size - seq.num_tokens,  # no eviction for a guess
        )
        if min(depth, room) <= 0:
            return none
        if self.spec.method in speculative.DRAFTERS:  # slots a drafter fills before the step (draft_model.py)
            if seq.spec_redo:
                return none  # (its layers' K/V of the tokens it computes again are not where a drafter reads them)
            if self.spec.trees and not (self.pages.has_states or seq.images):  # a tree of its likeliest tokens
                levels = min(depth, room)
                draft = speculative.DraftTree.slots(levels, min(room, levels * self.spec.topk, self.spec.draft_nodes))
            else:
                draft = speculative.DraftTree.chain([0] * min(depth, room))
        else:
            # Chains with linear attention layers (a state per draft position) and with images (their M-RoPE
            # positions follow the chunk).
            tree = self.spec.trees and not (self.pages.has_states or seq.images)
            if self.suffix is not None:
                draft = self.suffix.propose(seq, min(room, self.spec.draft_nodes), min(depth, room), chain=not tree)
            else:
                if seq.draft_index is None:
                    seq.draft_index = speculative.NgramIndex(self.spec.ngram_min, self.spec.ngram_max,
                                                             self.spec.ngram_branches)
                if tree:
                    draft = seq.draft_index.propose_tree(
                        seq.all_ids, depth, min(room, depth * self.spec.ngram_branches, self.spec.draft_nodes))
                else:
                    draft = speculative.DraftTree.chain(seq.draft_index.propose(seq.all_ids, min(depth, room)))
            if seq.images:  # a copy that reaches an image's positions stops there (no sampled token is one)
                draft = speculative.DraftTree.chain(
                    list(itertools.takewhile(lambda t: t < seq.images[0].vocab_size, draft.tokens)))
        if draft and seq.matcher is not None and self.spec.method in ("ngram", "suffix"):
            draft = structured.valid_tree(seq.matcher, draft)  # each branch cut where the grammar stops accepting it
        need = -(-(seq.num_tokens + len(draft)) // self.page_size) - len(seq.pages)
        if need > 0:
            seq.pages += self.pages.alloc(need)
        return draft

    # ------------------------------------------------------------------------------------ pages
    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[str]) -> bool:
        """Gives `seq` pages for `num_tokens` tokens, preempting newer sequences; False if `seq` itself was preempted."""
        need = -(-num_tokens // self.page_size) - len(seq.pages)
        while not self.pages.reserve(need):
            victims = self._victims(lambda s: s is not seq and s.request_id not in scheduled)
            victim = victims[0] if victims else seq
            self.preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.pages += self.pages.alloc(need)
        return True

    def _victims(self, eligible) -> list[Sequence]:
        """Running sequences that `eligible` accepts, in preemption order: newest first, and under the priority policy
        the least urgent first (newest among equals)."""
        victims = [s for s in reversed(self.running) if eligible(s)]
        if self.cfg.policy == "priority":
            victims.sort(key=lambda s: -s.priority)  # stable
        return victims

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: computed full pages go to the tree, the sequence waits at the front."""
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        seq.spec_redo = False
        self.pages.release(seq)
        self._clear_inflight(seq)
        self.running.remove(seq)

    # -------------------------------------------------------------------- in-flight prefixes
    def _waits_for_inflight(self, seq: Sequence, num_cached: int) -> bool:
        """True if the next uncached page of `seq` is being computed by a running prefill."""
        if not self._inflight:
            return False
        hashes = page_hashes(seq.all_ids[: num_cached + self.page_size], self.page_size, seq.namespace)
        first_uncached = num_cached // self.page_size
        return len(hashes) > first_uncached and self._inflight[hashes[first_uncached]] > 0

    def _mark_inflight(self, seq: Sequence) -> None:
        if not self.prefix_caching:
            return
        hashes = page_hashes(seq.all_ids, self.page_size, seq.namespace)[seq.num_computed // self.page_size :]
        self._inflight.update(hashes)
        self._inflight_of[seq.request_id] = hashes

    def _clear_inflight(self, seq: Sequence) -> None:
        hashes = self._inflight_of.pop(seq.request_id, None)
        if hashes:
            self._inflight.subtract(hashes)
            self._inflight += collections.Counter()  # drop zero counts

    # ---------------------------------------------------------------------------------- commit
    def commit(self, plan: StepPlan, sampled: Iterable[int | None]) -> list[Sequence]:
        """Records a finished step: `advance` and `resolve` at once (the step's tokens are already known)."""
        self.advance(plan)
        return self.resolve(plan, sampled)

    def advance(self, plan: StepPlan) -> None:
        """Records a step that has been launched, before its sampled tokens are known.

        Computed lengths move on, finished prefill pages enter the tree (a later step that reads them
        runs after this one on the device), and every sampling chunk appends a placeholder token
        `placeholder(i)` that `resolve` replaces; the next step may already feed it to the model, and
        the runner substitutes the sampled token on the device. A sequence that reaches its length
        limit finishes here, so it takes no slot in the next step.
        """
        for i, chunk in enumerate(plan.chunks):
            seq = chunk.seq
            if seq.status is not Status.RUNNING:
                continue  # aborted, or finished by the previous step's token, while this step ran
            seq.num_computed = chunk.start + len(chunk.token_ids) - len(chunk.draft)  # drafts count once accepted
            seq.spec_redo = False
            if seq.request_id in self._inflight_of:  # a prefill chunk
                self.pages.cache_computed(seq)  # other requests can hit these pages from the next step on
                if not seq.is_prefilling:
                    self._clear_inflight(seq)
            self.pages.slide_window(seq)
            if chunk.sample:
                seq.output_ids.append(placeholder(i))
                self._end_at_length_limit(seq)

    def resolve(self, plan: StepPlan, sampled: Iterable[int | Iterable[int] | None]) -> list[Sequence]:
        """Puts an advanced step's sampled tokens in place of its placeholders and applies stop tokens.

        `sampled[i]` is chunk i's token, or, for a chunk with draft tokens, the tokens sampled at each of its
        positions from the real last token on: the accepted drafts' tokens follow the first (see
        engine.speculative), each checked for stops and the length limit in turn.
        Returns the sequences that got new tokens (the engine checks stop strings and streams them).
        """
        got_token = []
        for i, (chunk, tokens) in enumerate(zip(plan.chunks, sampled)):
            seq = chunk.seq
            if not chunk.sample or seq.finish_reason == "abort" or placeholder(i) not in seq.output_ids[-1:]:
                continue  # aborted, or it was not running when the step was advanced
            tokens = [tokens] if isinstance(tokens, int) else [int(t) for t in np.atleast_1d(tokens)]
            seq.output_ids[-1] = tokens[0]
            got_token.append(seq)
            if self._end_at_stop_token(seq):
                continue
            if not chunk.draft or seq.status is not Status.RUNNING:
                continue
            self.stats.spec_draft_tokens += len(chunk.draft)
            path = speculative.accepted_path(chunk.draft_tree, tokens)
            keep = len(path)
            if keep < len(chunk.draft) and self.pages.has_states:  # its recurrent state went past the kept tokens
                self.state_rollbacks.append((chunk.draft_row, seq.state_slot, 1 + keep))
            seq.spec_misses = 0 if keep else seq.spec_misses + 1
            seq.spec_pause = speculative.pause_after(seq.spec_misses)
            in_place = True
            root = chunk.start + len(chunk.token_ids) - len(chunk.draft) - 1  # the real last token's position
            for depth, node in enumerate(path, 1):
                # An accepted draft token holds valid K/V where it was computed: at its own position along the tree's
                # first branch (a chain's every token); a node of another branch sits past its position, and its K/V
                # (every layer's, a drafter's too) moves there before anything reads the cache again (`slot_moves`).
                # A hybrid cache's windowed layers keep their entries elsewhere: there it and the tokens after it are
                # computed again, in place, at the start of the sequence's next step.
                if node != depth and self.pages.window is None:
                    self.slot_moves.append((self._slot(seq, root + node), self._slot(seq, root + depth)))
                else:
                    in_place = in_place and node == depth
                seq.num_computed += in_place
                seq.spec_redo = seq.spec_redo or not in_place
                seq.output_ids.append(tokens[node])
                self.stats.spec_accepted_tokens += 1
                self.stats.spec_branch_tokens += node != depth
                if self._end_at_stop_token(seq) or self._end_at_length_limit(seq):
                    break
        return got_token

    def _end_at_stop_token(self, seq: Sequence) -> bool:
        """Finishes `seq` ("stop") if its last token is an end token or a stop id."""
        if not self._is_stop_token(seq):
            return False
        seq.ended_by_token = True
        self.finish(seq, "stop")
        return True

    def _end_at_length_limit(self, seq: Sequence) -> bool:
        """Finishes `seq` ("length") once it has max_tokens output tokens or fills the context."""
        if len(seq.output_ids) < seq.params.max_tokens and seq.num_tokens < self.max_model_len:
            return False
        self.finish(seq, "length")
        return True

    def _is_stop_token(self, seq: Sequence) -> bool:
        token = seq.output_ids[-1]
        if token in seq.params.stop_token_ids:
            seq.stop_reason = token
            return True
        return not seq.params.ignore_eos and token in self.eos_ids

    def _slot(self, seq: Sequence, position: int) -> int:
        """The cache slot (page * page_size + offset) of `seq`'s token at `position`."""
        return seq.pages[position // self.page_size] * self.page_size + position % self.page_size

    def take_slot_moves(self) -> list[tuple[int, int]]:
        """The (src, dst) slot moves of accepted draft-tree branches not yet carried by a plan (the engine does them
        itself when no step follows: `LLMEngine._disk_idle`)."""
        moves, self.slot_moves = self.slot_moves, []
        return moves

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence: its full pages stay cached, its own references go. A stop token that arrives for
        a sequence already ended by its length limit makes the reason "stop", as it would have been."""
        if seq.status is Status.RUNNING:
            self._release(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:  # preempted while its last token was pending
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # ------------------------------------------------------------------------------ invariants
    def check_writes(self, plan: StepPlan) -> None:
        """A step writes K/V only into pages its sequence holds alone: never into a page the tree or another sequence
        shares (a cached page recomputed in place would change what the others read). Debug mode."""
        for c in plan.chunks:
            end = c.start + len(c.token_ids)
            for page in c.pages[c.start // self.page_size : -(-end // self.page_size)].tolist():
                assert self.pool.refcount(page) == 1, (
                    f"{c.seq.request_id}: a step writes positions {c.start}..{end - 1} into page {page}, which "
                    f"{self.pool.refcount(page)} hold")

    def check_invariants(self) -> None:
        """Every page is free or referenced exactly by the tree and running sequences (debug mode)."""
        self.pages.check_invariants(self.running)
        for seq in self.running:
            assert seq.page_array().tolist() == seq.pages, f"{seq.request_id}: pages changed in place"


def _image_cut(seq: Sequence, start: int, n: int) -> int:
    """The chunk of `seq` from `start` a step may compute, up to `n` positions: an image whose positions attend to each
    other (Gemma 3) is computed whole (engine.multimodal.chunk_cut)."""
    return chunk_cut(seq.images, start, n) if seq.images else n
