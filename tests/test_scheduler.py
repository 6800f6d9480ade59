"""The scheduler on host data only: a fake runner writes token ids into a fake paged KV store and checks,
every step, that each sequence's page table really holds its own tokens (so prefix hits, copy-on-write,
chunking, eviction and preemption are verified without a model)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine import speculative
from engine.host_cache import HostPageIndex

from engine.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from engine.request import SamplingParams, Sequence, Status
from engine.scheduler import Scheduler
from engine.window_pages import slots_per_sequence
import fresh

VOCAB = 50


def random_model(ids: tuple[int, ...]) -> int:
    """The fake 'model': a token determined by the whole sequence."""
    return hash(ids) % VOCAB


def repetitive_model(ids: tuple[int, ...]) -> int:
    """Mostly repeats the token three back (so n-gram drafts are often right), sometimes not."""
    h = hash(ids)
    return ids[-3] if len(ids) >= 3 and h % 4 else h % VOCAB


class FakeDisk:
    """The disk tier's interface over a dict (block hash -> a page's tokens). Reads complete at the fake runner's next
    step (or when the loop finds nothing else to run), so sequences really wait for them."""

    def __init__(self, files: dict[int, list] | None = None):
        self.files = {} if files is None else files
        self.key = "layout"
        self.pending: list[tuple[concurrent.futures.Future, list[int]]] = []
        self.num_reads = 0
        self.hang = False  # reads never complete (a hung network filesystem)

    def present(self, hashes) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.files:
            n += 1
        return n

    def wanted(self, block_hash: int) -> bool:
        return block_hash not in self.files

    def fetch(self, hashes) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        self.pending.append((future, list(hashes)))
        self.num_reads += 1
        return future

    def complete_reads(self) -> None:
        if self.hang:
            return
        for future, hashes in self.pending:
            future.set_result({h: self.files[h] for h in hashes if h in self.files})
        self.pending = []


class FakeRunner:
    """KV store = page -> list of token ids; the model samples a token determined by the whole sequence. Chunks
    with draft tokens get a token for every position from the real last token on, as the engine's runner does."""

    def __init__(self, num_pages: int, page_size: int, model=random_model, window: int = 0, window_pages: int = 0,
                 disk: FakeDisk | None = None, chunked: bool = False):
        self.ps = page_size
        self.disk = disk
        self.model = model
        self.store = [[None] * page_size for _ in range(num_pages)]
        # Hybrid cache: the windowed layers' store, by window slot; a token must read the last `window` positions there
        # (chunked: its chunk of `window` positions up to itself, as Llama 4's chunked layers).
        self.window = window
        self.chunked = chunked
        self.window_store = [[None] * page_size for _ in range(window_pages)]
        self.host: dict[int, list[int]] = {}  # host tier: slot -> a saved page's tokens
        # A model with linear attention layers: the tokens each state slot's recurrent state has seen (a sequence's,
        # or a snapshot's), and the host tier's state slots likewise. None: no recurrent states.
        self.states: dict[int, tuple[int, ...]] | None = None
        self.host_states: dict[int, tuple[int, ...]] = {}
        self.disk_states: FakeDisk | None = None  # the disk tier's files of them
        self.prev: list[int | None] = []  # what the last run sampled: placeholders stand for these

    def token(self, t: int) -> int:
        return self.prev[-1 - t] if t < 0 else t

    def run(self, plan):
        # as the runner: slot moves (all read before any is written), saves, host loads, copies, disk loads, the step
        moved = [self.store[src // self.ps][src % self.ps] for src, _ in plan.slot_moves]
        for (_, dst), token in zip(plan.slot_moves, moved):
            self.store[dst // self.ps][dst % self.ps] = token
        for page, slot, h in plan.disk_saves:
            self.disk.files[h] = (list(self.store[page]), list(self.window_store[slot]) if slot >= 0 else None)
        for page, slot in plan.host_saves:
            self.host[slot] = list(self.store[page])
        for slot, page in plan.host_loads:
            self.store[page] = list(self.host[slot])
        for src, dst in plan.page_copies:
            self.store[dst] = list(self.store[src])
        for src, dst in plan.window_copies:
            self.window_store[dst] = list(self.window_store[src])
        for (tokens, window_tokens), page, slot in plan.disk_loads:  # after the copies, as the runner
            self.store[page] = list(tokens)
            if slot >= 0:  # a hybrid cache: the windowed layers' K/V go to the page's window slot
                self.window_store[slot] = list(window_tokens)
        if self.states is not None:  # as the runner: saves, loads, then copies from snapshot slots
            for slot, host_slot in plan.state_saves:
                self.host_states[host_slot] = self.states[slot]
            for slot, h in plan.state_disk_saves:
                self.disk_states.files[h] = self.states[slot]
            for host_slot, slot in plan.state_loads:
                self.states[slot] = self.host_states[host_slot]
            for state, slot in plan.state_disk_loads:
                self.states[slot] = state
            for src, dst in plan.state_copies:
                self.states[dst] = self.states[src]
        sampled = []
        for c in plan.chunks:
            seq = c.seq
            for i, tok in enumerate(c.token_ids):
                pos = c.start + i
                self.store[c.pages[pos // self.ps]][pos % self.ps] = self.token(tok)
                if self.window:
                    slot = c.window_pages[pos // self.ps]
                    assert slot >= 0, f"{seq.request_id}: new position {pos} has no window slot"
                    self.window_store[slot][pos % self.ps] = self.token(tok)
            end = c.start + len(c.token_ids)
            ids = [self.token(t) for t in seq.all_ids[: c.start] + c.token_ids]
            # NOTE: this is the invariant attention relies on: every position < end reads its own token.
            for pos in range(end):
                got = self.store[c.pages[pos // self.ps]][pos % self.ps]
                assert got == ids[pos], f"{seq.request_id}: position {pos} holds {got}, expected {ids[pos]}"
            # ... and in the windowed layers, every position the chunk's first token can see.
            first = c.start // self.window * self.window if self.chunked else max(0, c.start - self.window + 1)
            for pos in range(first, end if self.window else 0):
                slot = c.window_pages[pos // self.ps]
                got = self.window_store[slot][pos % self.ps] if slot >= 0 else "no slot"
                assert got == ids[pos], f"{seq.request_id}: window position {pos} holds {got}, expected {ids[pos]}"
            if self.states is not None:
                # NOTE: the recurrent state a chunk starts from is that of exactly the tokens before it (zero at 0).
                got = self.states.get(seq.state_slot) if c.start else ()
                assert got == tuple(ids[: c.start]), f"{seq.request_id}: a state of {got} before position {c.start}"
                self.states[seq.state_slot] = tuple(ids)
                if c.snapshot is not None:
                    offset, slot = c.snapshot
                    self.states[slot] = tuple(ids[: c.start + offset])
            if not c.sample:
                sampled.append(None)
            elif c.draft:  # each node after the root and its ancestors (a chain: the positions before it)
                root, tree = end - len(c.draft), c.draft_tree
                sampled.append([self.model(tuple(ids[:root] + [c.draft[n - 1] for n in tree.path(j)]))
                                for j in range(len(c.draft) + 1)])
            else:
                sampled.append(self.model(tuple(ids)))
        self.prev = [t if t is None or isinstance(t, int) else t[-1] for t in sampled]
        self.complete_reads()
        return sampled

    def complete_reads(self) -> None:
        for disk in (self.disk, self.disk_states):
            if disk is not None:
                disk.complete_reads()


def make(num_pages=64, page_size=4, max_batch_tokens=32, max_running=8, policy="fcfs", caching=True, long_prefill_tokens=0,
         eos_ids=frozenset(), spec=SpeculativeConfig(), model=random_model, max_model_len=256, host_pages=0, window=0,
         window_pages=0, disk: FakeDisk | None = None, disk_read_timeout_s: float = 10.0, snapshots=0, host_states=0,
         disk_states: FakeDisk | None = None, chunked: bool = False):
    """chunked: the hybrid cache's `window` is an attention chunk. snapshots: a model with linear attention layers (a recurrent state per running sequence) and that many snapshot
    slots; host_states: the host tier's slots for them; disk_states: the disk tier's files of them."""
    sched = Scheduler(
        SchedulerConfig(max_batch_tokens=max_batch_tokens, max_running=max_running, policy=policy,
                        long_prefill_tokens=long_prefill_tokens),
        CacheConfig(page_size=page_size, num_pages=num_pages, prefix_caching=caching,
                    disk_read_timeout_s=disk_read_timeout_s),
        num_pages=num_pages,
        max_model_len=max_model_len,
        eos_ids=eos_ids,
        spec=spec,
        num_host_pages=host_pages,
        window=window,
        num_window_pages=window_pages,
        disk=disk,
        num_state_slots=max_running if snapshots else 0,
        num_snapshots=snapshots,
        num_host_states=host_states,
        disk_states=disk_states,
        chunked_window=chunked,
    )
    runner = FakeRunner(num_pages, page_size, model, window, window_pages, disk, chunked)
    if snapshots:
        runner.states, runner.disk_states = {}, disk_states
    return sched, runner


def seq(rid, tokens, max_tokens=4, namespace=None):
    return Sequence(request_id=rid, prompt_ids=list(tokens), params=SamplingParams(max_tokens=max_tokens, temperature=0),
                    namespace=namespace)


def run_all(sched, runner, seqs, check=True, on_plan=None, overlap=False, churn: random.Random | None = None):
    """Runs to the end. overlap: as the engine's overlapped loop, step N+1 is planned and run before step N's
    tokens are resolved (the fake runner reads the placeholders from what it sampled last). churn: requests arrive
    a few at a time between steps and some are aborted, waiting or running (step in flight or not), as the
    engine's callers do (their finish_reason is "abort")."""
    arriving = list(seqs)
    steps, inflight = 0, None
    while arriving or sched.has_work() or inflight:
        for _ in range(len(arriving) if churn is None else min(len(arriving), churn.choice([0, 0, 1, 3]))):
            sched.add(arriving.pop(0))
        live = [s for s in seqs if s.status is not Status.FINISHED and s not in arriving]
        if churn is not None and live and churn.random() < 0.1:
            sched.abort(churn.choice(live).request_id)
        plan = sched.schedule()
        if plan is None and not inflight and sched.disk_reads():  # the engine waits for the reads here
            runner.complete_reads()
            continue
        if plan is None and not inflight and (arriving or not sched.has_work()):
            continue  # more to come, or the last request was just aborted
        assert plan is not None or inflight, "work left but nothing scheduled (deadlock)"
        if plan is not None:
            assert plan.num_tokens <= sched.cfg.max_batch_tokens
            if on_plan:
                on_plan(plan)
            sampled = runner.run(plan)
        if inflight:
            sched.resolve(*inflight)
            inflight = None
        if plan is not None:
            sched.advance(plan)
            inflight = (plan, sampled)
            if not overlap:
                sched.resolve(*inflight)
                inflight = None
        if check:
            sched.check_invariants()
        steps += 1
        assert steps < 10_000
    if runner.disk is not None:  # what the engine writes out once idle
        runner.disk.files.update((h, (list(runner.store[page]), list(runner.window_store[slot]) if slot >= 0 else None))
                                 for page, slot, h in sched.take_disk_saves())
        if runner.disk_states is not None:
            runner.disk_states.files.update((h, runner.states[slot]) for slot, h in sched.take_disk_states())
    return {s.request_id: list(s.output_ids) for s in seqs}


def test_second_request_prefills_only_the_unmatched_tail():
    sched, runner = make()
    prefix = list(range(1, 17))  # 4 full pages
    run_all(sched, runner, [seq("a", prefix + [20, 21])])
    b = seq("b", prefix + [30, 31, 32])
    starts = []
    run_all(sched, runner, [b], on_plan=lambda p: starts.extend(c.start for c in p.chunks if c.seq is b and len(c.token_ids) > 1))
    assert b.num_cached_prompt == 16
    assert starts == [16], "prefill must start after the cached prefix"


def test_whole_prompt_hit_recomputes_only_last_token_with_copy_on_write():
    sched, runner = make()
    prompt = list(range(1, 13))  # exactly 3 pages
    first = run_all(sched, runner, [seq("a", prompt)])
    b = seq("b", prompt)
    plans = []
    second = run_all(sched, runner, [b], on_plan=plans.append)
    assert first["a"] == second["b"]
    first_chunk = next(c for c in plans[0].chunks if c.seq is b)
    assert len(first_chunk.token_ids) == 1 and first_chunk.start == 11
    assert len(plans[0].page_copies) == 1
    assert b.num_cached_prompt == 11


def test_two_waiting_requests_sharing_a_new_prefix_compute_it_once():
    sched, runner = make(max_batch_tokens=64)
    prefix = list(range(1, 25))  # 6 pages, not cached yet
    a, b = seq("a", prefix + [40]), seq("b", prefix + [41, 42])
    prefill_tokens = []
    run_all(sched, runner, [a, b], on_plan=lambda p: prefill_tokens.append(p.num_prefill_tokens))
    assert b.num_cached_prompt == 24, "b must wait for a's prefix and then hit it"
    assert sum(prefill_tokens) == 25 + 2  # a whole, then only b's two-token tail


def test_chunked_prefill_respects_budget_and_mixes_decodes():
    sched, runner = make(max_batch_tokens=8, num_pages=128)
    a = seq("a", [1, 2, 3], max_tokens=12)
    long = seq("long", list(range(5, 45)), max_tokens=2)
    mixed = []
    run_all(sched, runner, [a, long], on_plan=lambda p: mixed.append((p.num_decode_tokens, p.num_prefill_tokens)))
    assert any(d > 0 and pf > 0 for d, pf in mixed), "decodes and prefill chunks must share steps"
    assert all(d + pf <= 8 for d, pf in mixed)


@pytest.mark.parametrize("limit", [0, 8])
def test_long_prefill_limit_lets_a_short_prompt_start_beside_a_long_one(limit):
    sched, runner = make(max_batch_tokens=32, num_pages=128, long_prefill_tokens=limit)
    long, short = seq("long", [1 + i % 40 for i in range(100)]), seq("short", [7, 8, 9])
    sched.add(long)
    first = sched.schedule()
    sched.commit(first, runner.run(first))
    sched.add(short)  # arrives while the long prompt is still prefilling
    second = sched.schedule()
    chunks = {c.seq.request_id: len(c.token_ids) for c in second.chunks}
    if limit:
        assert chunks == {"long": 8, "short": 3}, "the long prompt is capped; the short one starts now"
    else:
        assert chunks == {"long": 32}, "without a limit the long prompt takes the whole budget"
    sched.commit(second, runner.run(second))
    outputs = run_all(sched, runner, [])
    assert sched.stats.cached_prompt_tokens == 0 and not sched.has_work() and outputs == {}


def test_namespaces_never_share_pages():
    sched, runner = make()
    prompt = list(range(1, 17))
    run_all(sched, runner, [seq("a", prompt, namespace="tenant-a")])
    b = seq("b", prompt, namespace="tenant-b")
    run_all(sched, runner, [b])
    assert b.num_cached_prompt == 0
    c = seq("c", prompt, namespace="tenant-a")
    run_all(sched, runner, [c])
    assert c.num_cached_prompt == 15  # whole-prompt hit: all but the last token


def test_lpm_admits_longest_cached_prefix_first():
    sched, runner = make(max_running=1, policy="lpm")
    cached = list(range(1, 17))
    run_all(sched, runner, [seq("warm", cached)])
    order = []
    cold, hot = seq("cold", [30 + i for i in range(16)]), seq("hot", cached + [45])
    run_all(sched, runner, [cold, hot], on_plan=lambda p: order.extend(c.seq.request_id for c in p.chunks if c.seq.request_id not in order))
    assert order[0] == "hot"


def _workload(rng: random.Random, n: int):
    systems = [[rng.randrange(1, VOCAB) for _ in range(rng.choice([8, 12, 13]))] for _ in range(3)]
    seqs = []
    for i in range(n):
        prompt = rng.choice(systems) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 7))]
        if not prompt:
            prompt = [1]
        seqs.append(seq(f"r{i}", prompt, max_tokens=rng.randrange(1, 9), namespace=rng.choice([None, None, "ns"])))
    return seqs


def _cache_and_overlap_runs(seed: int) -> tuple[int, int]:
    """Runs one workload with the cache off, on, thrashing, and thrashing with a host tier, each serial and
    overlapped; all outputs must be equal. Returns how often a sequence was preempted while its last token was
    still being sampled, and how many prompt tokens came back from the host tier."""
    results, pending_preempted, host_hits, disk_hits = {}, 0, 0, 0
    disk = FakeDisk()  # one disk for the runs below that use it: the later ones start with the earlier ones' pages
    window_disk = FakeDisk()  # a hybrid cache's pages carry their windowed layers too
    for overlap in (False, True):
        for name, kwargs in {
            "off": dict(caching=False, num_pages=256),
            "on": dict(caching=True, num_pages=256),
            "tiny": dict(caching=True, num_pages=14, max_running=6),
            "tiny+host": dict(caching=True, num_pages=14, max_running=6, host_pages=6),
            "tiny+disk": dict(caching=True, num_pages=14, max_running=6, disk=disk),
            "tiny+host+disk": dict(caching=True, num_pages=14, max_running=6, host_pages=4, disk=disk),
            "tiny+priority": dict(caching=True, num_pages=14, max_running=6, policy="priority"),
            # Hybrid cache: windowed layers see 6 positions, in few slots (the tree's are evicted, prefixes recomputed).
            "window": dict(caching=True, num_pages=64, window=6, window_pages=12),
            "window+tiny": dict(caching=True, num_pages=14, max_running=6, window=5, window_pages=11),
            "window+priority": dict(caching=True, num_pages=20, max_running=6, window=9, window_pages=12, policy="priority"),
            "window+disk": dict(caching=True, num_pages=14, max_running=6, window=5, window_pages=11, disk=window_disk),
            # ... and chunked layers seeing back to the start of their chunk of 6 (5) positions.
            "chunk": dict(caching=True, num_pages=64, window=6, window_pages=12, chunked=True),
            "chunk+tiny": dict(caching=True, num_pages=14, max_running=6, window=5, window_pages=11, chunked=True),
        }.items():
            sched, runner = make(**kwargs, eos_ids=frozenset({0, 1, 2}))
            preempt = sched.preempt

            def counting_preempt(s, preempt=preempt):
                nonlocal pending_preempted
                pending_preempted += s.has_pending_token
                preempt(s)

            sched.preempt = counting_preempt
            seqs = _workload(random.Random(seed), 30)
            for i, s in enumerate(seqs):
                s.priority = (i * 7) % 3 if name.endswith("priority") else 0  # later arrivals often more urgent: preemption
            results[name, overlap] = run_all(sched, runner, seqs, overlap=overlap)
            assert not sched.running and not sched.waiting
            # When every request has ended, the pool is exactly free pages + the tree's pages.
            assert sched.pool.num_free + sched.tree.num_cached_pages == sched.pool.num_pages
            if "tiny" in name:
                assert sched.stats.num_preemptions + sched.stats.num_evicted_pages > 0, "the tiny pool must thrash"
            if sched.window is not None:  # ... and the window slots are then the tree's alone, or free
                assert sched.window.num_obtainable == sched.window.pool.num_pages
            host_hits += sched.stats.host_hit_tokens
            disk_hits += sched.stats.disk_hit_tokens
            if name == "window+disk" and overlap:  # the serial run before it wrote the pages: a restart
                assert sched.stats.disk_hit_tokens > 0
    first = results["off", False]
    assert all(r == first for r in results.values())
    assert any(out[-1] in (0, 1, 2) and len(out) < s.params.max_tokens
               for out, s in zip(first.values(), _workload(random.Random(seed), 30)))  # some stop early
    return pending_preempted, host_hits, disk_hits


def test_outputs_identical_with_cache_off_on_and_thrashing_serial_or_overlapped():
    """Prefix caching never changes results, even with a pool small enough to force eviction and preemption, with
    or without a host tier (a small one, so its slots are reused: the fake runner's pages are checked every step)
    and a disk tier (the runs after the first start with the pages the earlier ones wrote: a restart); neither does overlapped scheduling, where stops (tokens 0-2 end a sequence) are found a step late and
    sequences are preempted while their last token is still being sampled (which the runs do reach)."""
    pending, host_hits, disk_hits = zip(*(_cache_and_overlap_runs(seed) for seed in range(8)))
    assert sum(pending) > 0 and sum(host_hits) > 0 and sum(disk_hits) > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_valid_configuration_finishes_with_the_plain_outputs(data):
    """Any configuration the engine accepts runs every request to the end with the outputs of an uncached run: page
    size, a pool just big enough for one sequence or roomy, batch and chunk limits, policies, a hybrid cache with
    window slots just enough for one sequence's window, host and disk tiers, speculative drafts, overlapped steps,
    requests arriving between steps and aborted. (Running prefills that each held part of the pool or of the window
    slots used to wait on each other forever.)"""
    draw = data.draw
    ps = draw(st.sampled_from([2, 4, 8]), label="page_size")
    longest = 13 + 6 + 8  # the workload's longest prompt and output
    least_pages = -(-longest // ps) + 1  # one sequence, and a copy-on-write page
    kw = dict(page_size=ps, num_pages=draw(st.integers(least_pages, least_pages + 24), label="num_pages"))
    kw["max_running"] = draw(st.integers(1, 8), label="max_running")
    kw["max_batch_tokens"] = draw(st.integers(max(kw["max_running"], 4), 40), label="max_batch_tokens")
    kw["long_prefill_tokens"] = draw(st.sampled_from([0, 0, 1, 3, 4, 9]), label="long_prefill_tokens")
    kw["policy"] = draw(st.sampled_from(["fcfs", "lpm", "priority"]), label="policy")
    if draw(st.booleans(), label="hybrid"):
        kw["window"] = draw(st.integers(2, 12), label="window")
        least_slots = slots_per_sequence(kw["window"], ps)
        kw["window_pages"] = draw(st.integers(least_slots, least_slots + 12), label="window_pages")
    else:
        kw["host_pages"] = draw(st.sampled_from([0, 0, 2, 6]), label="host_pages")
    if draw(st.booleans(), label="speculative"):
        method = draw(st.sampled_from(["ngram", "suffix"]), label="method")
        kw["spec"] = SpeculativeConfig(method=method, num_tokens=draw(st.integers(1, 4), label="draft_tokens"),
                                       ngram_min=1, ngram_max=2, ngram_branches=draw(st.sampled_from([1, 3]),
                                                                                     label="ngram_branches")
                                       if method == "ngram" else 1,
                                       suffix_trees=draw(st.booleans(), label="suffix_trees"),
                                       suffix_max_cached_requests=draw(st.sampled_from([0, 2, 100]), label="cached"))
    disk = FakeDisk() if draw(st.booleans(), label="disk") else None
    churn = draw(st.booleans(), label="arrivals and aborts")
    seed = draw(st.integers(0, 2**16), label="workload")
    model = draw(st.sampled_from([random_model, repetitive_model]), label="model")

    def workload():
        seqs = _workload(random.Random(seed), 24)
        for i, s in enumerate(seqs):
            s.priority = (i * 7) % 3 if kw["policy"] == "priority" else 0
        return seqs

    plain = run_all(*make(caching=False, num_pages=256, model=model, eos_ids=frozenset({0, 1})), workload())
    # The second run starts with the pages the first wrote to disk (a restart). The engine plans a speculative step
    # only once the last one's tokens are known (drafts come from them): no overlap then.
    for overlap in (False, "spec" not in kw):
        sched, runner = make(**kw, model=model, eos_ids=frozenset({0, 1}), disk=disk)
        seqs = workload()
        out = run_all(sched, runner, seqs, overlap=overlap, churn=random.Random(seed) if churn else None)
        aborted = {s.request_id for s in seqs if s.finish_reason == "abort"}
        assert out == {k: out[k] if k in aborted else v for k, v in plain.items()}  # the others as they would alone
        assert sched.pool.num_free + sched.tree.num_cached_pages == sched.pool.num_pages


def test_running_prefills_holding_every_window_slot_preempt_instead_of_waiting_forever():
    """Six prompts admitted a few tokens at a time (long_prefill_tokens) hold all eleven window slots between them with
    their next pages still to come: the oldest takes its page from the newest, rather than all of them waiting."""
    kw = dict(num_pages=14, max_running=6, window=6, window_pages=11, max_batch_tokens=32, long_prefill_tokens=4)
    sched, runner = make(**kw)
    plain = run_all(*make(caching=False, num_pages=256), _workload(random.Random(48), 30))
    assert run_all(sched, runner, _workload(random.Random(48), 30)) == plain
    assert sched.stats.num_preemptions > 0


def test_abort_frees_everything():
    sched, runner = make()
    a, b = seq("a", list(range(1, 20)), max_tokens=50), seq("b", list(range(1, 9)), max_tokens=50)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        plan = sched.schedule()
        sched.commit(plan, runner.run(plan))
    sched.abort("a")
    sched.abort("b")
    assert a.status is Status.FINISHED and a.finish_reason == "abort"
    assert not sched.running
    sched.check_invariants()
    assert sched.pool.num_free + sched.tree.num_cached_pages == sched.pool.num_pages


# ------------------------------------------------------------------------------ speculative decoding
def test_speculative_decoding_never_changes_outputs():
    """N-gram drafts verified in the step change how many tokens a step yields, never which: with a model that
    mostly repeats itself (drafts accepted and rejected), stops inside an accepted run, length limits (max_tokens
    and the context), budgets and pools small enough to preempt, outputs equal plain decoding's. Page tables are
    checked every step (rejected drafts leave stale K/V past the computed length that must never be read)."""
    drafted = accepted = 0
    for seed in range(6):
        results, work = {}, {}
        for name, kwargs in {
            "plain": dict(num_pages=256),
            "spec": dict(num_pages=256, spec=SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1, ngram_max=3)),
            "spec-long": dict(num_pages=256, spec=SpeculativeConfig(method="ngram", num_tokens=7, ngram_min=2, ngram_max=4)),
            "spec-tiny": dict(num_pages=14, max_running=6, max_batch_tokens=12,
                              spec=SpeculativeConfig(method="ngram", num_tokens=3, ngram_min=1, ngram_max=2)),
            "spec-nocache": dict(num_pages=256, caching=False, spec=SpeculativeConfig(method="ngram", max_batch=3)),
            "spec-window": dict(num_pages=64, max_batch_tokens=16, window=5, window_pages=12,
                                spec=SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1, ngram_max=3)),
            "tree": dict(num_pages=256, spec=SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1, ngram_max=3,
                                                               ngram_branches=3)),
            "tree-tiny": dict(num_pages=14, max_running=6, max_batch_tokens=12,
                              spec=SpeculativeConfig(method="ngram", num_tokens=3, ngram_min=1, ngram_max=2,
                                                     ngram_branches=4)),
            "tree-window": dict(num_pages=64, max_batch_tokens=16, window=5, window_pages=12,
                                spec=SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1, ngram_max=3,
                                                       ngram_branches=2)),
            "tree-capped": dict(num_pages=256, spec=SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1,
                                                                      ngram_max=3, ngram_branches=3, tree_nodes=6)),
            "suffix": dict(num_pages=256, spec=SpeculativeConfig(method="suffix", num_tokens=8, ngram_min=1,
                                                                 suffix_min_prob=0.05, suffix_spec_factor=2.0)),
            "suffix-chain": dict(num_pages=256, spec=SpeculativeConfig(method="suffix", num_tokens=5, ngram_min=2,
                                                                       suffix_trees=False)),
            "suffix-tiny": dict(num_pages=14, max_running=6, max_batch_tokens=12,
                                spec=SpeculativeConfig(method="suffix", num_tokens=6, ngram_min=1, suffix_max_depth=4,
                                                       suffix_max_cached_requests=3, suffix_min_prob=0.0)),
            "suffix-window": dict(num_pages=64, max_batch_tokens=16, window=5, window_pages=12,
                                  spec=SpeculativeConfig(method="suffix", num_tokens=4, ngram_min=1)),
        }.items():
            sched, runner = make(**kwargs, eos_ids=frozenset({0, 1, 2}), model=repetitive_model, max_model_len=40)
            seqs = _workload(random.Random(seed), 30)
            for s in seqs:
                s.params = dataclasses.replace(s.params, max_tokens=random.Random(s.request_id).randrange(1, 30))
            computed = []  # tokens computed at non-draft positions

            def on_plan(plan, most=sched.spec.draft_nodes):
                assert all(len(c.draft) <= most for c in plan.chunks)  # (tree_nodes)
                computed.append(plan.num_tokens - sum(len(c.draft) for c in plan.chunks))

            results[name] = run_all(sched, runner, seqs, on_plan=on_plan)
            assert sched.pool.num_free + sched.tree.num_cached_pages == sched.pool.num_pages
            drafted += sched.stats.spec_draft_tokens
            accepted += sched.stats.spec_accepted_tokens
            if name in ("plain", "spec", "spec-long"):  # no preemption: an accepted draft is a token not computed again
                work[name] = sum(computed) + sched.stats.spec_accepted_tokens
        assert all(r == results["plain"] for r in results.values()), seed
        assert work["spec"] == work["spec-long"] == work["plain"]
    assert 0 < accepted < drafted


def test_draft_trees_keep_the_branch_the_model_takes():
    """A draft tree holds the continuations after several earlier occurrences of the suffix, one per next token; the
    step keeps the branch the model samples, where a chain (the latest occurrence alone) is rejected at its first
    token. Tokens of a branch other than the first were computed past their positions: their K/V moves there before
    the next step (`slot_moves`), which goes on after them; with a hybrid cache's windowed layers they are computed
    again in place instead (the fake runner checks every position a step reads)."""
    model = lambda ids: {1: 2, 2: 3, 3: 9, 9: 8, 8: 5, 5: 1}.get(ids[-1], 0)  # noqa: E731
    prompt = [1, 2, 3, 9, 8, 5, 1, 2, 3, 7, 4, 5, 1, 2]  # the latest "1 2 3" goes on with 7, the one before with 9
    outs, stats = {}, {}
    for name, branches in (("plain", 0), ("chain", 1), ("tree", 3), ("hybrid", 3)):
        spec = SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1, ngram_max=3, ngram_branches=max(branches, 1))
        hybrid = {"window": 8, "window_pages": 32} if name == "hybrid" else {}
        sched, runner = make(num_pages=64, spec=spec if branches else SpeculativeConfig(), model=model, **hybrid)
        plans = []
        outs[name] = run_all(sched, runner, [seq("a", prompt, max_tokens=21)], on_plan=plans.append)
        stats[name] = (sched.stats.spec_draft_tokens, sched.stats.spec_accepted_tokens, len(plans))
        first = next((c for p in plans for c in p.chunks if c.draft), None)
        if name == "chain":  # the latest occurrence's continuation, wrong at its first token
            assert first.draft == (7, 4, 5, 1) and not first.draft_parents
        if name in ("tree", "hybrid"):  # both continuations; the second is taken whole
            assert first.draft == (7, 4, 5, 1, 9, 8, 5, 1) and first.draft_parents == (0, 1, 2, 3, 0, 5, 6, 7)
            assert speculative.accepted_path(first.draft_tree, [9, 0, 0, 0, 0, 8, 5, 1, 2]) == [5, 6, 7, 8]
            root = first.start  # the real token's position; the branch's nodes are 5..8 after it
            pages = first.pages
            slot = lambda pos: pages[pos // 4] * 4 + pos % 4  # noqa: E731
            if name == "tree":  # moved to their positions, the next step goes on after them
                assert plans[2].slot_moves == [(slot(root + n + 5), slot(root + n + 1)) for n in range(4)]
                assert plans[2].chunks[0].start == root + 5 and plans[2].chunks[0].token_ids[0] == 2
            else:  # computed again in place, with drafts after
                assert not plans[2].slot_moves and plans[2].chunks[0].token_ids[:5] == [9, 8, 5, 1, 2]
    assert outs["tree"] == outs["hybrid"] == outs["chain"] == outs["plain"]
    assert stats["tree"][2] < stats["chain"][2]  # steps: 5 against 6 (plain decoding: 21)


def test_drafter_trees_keep_the_best_scored_paths():
    """draft_trees.select_tree: the `nodes` best-scored candidates (a path's log probability), each after its parent
    (ties: the shallower first; -inf: a path the row may not take), depth-first with the likeliest child first;
    best_path: the best path of the deepest level, for a sequence that drafts chains."""
    from engine import draft_trees

    tokens = np.array([10, 11, 20, 21, 22, 23, 30])
    parents = np.array([-1, -1, 0, 0, 1, 1, 2])
    scores = np.array([-0.1, -1.0, -0.2, -2.0, -1.1, -3.0, -np.inf], np.float32)
    assert draft_trees.select_tree(tokens, parents, scores, 4) == speculative.DraftTree((10, 20, 11, 22), (0, 1, 0, 3))
    assert draft_trees.select_tree(tokens, parents, scores, 3) == speculative.DraftTree((10, 20, 11), (0, 1, 0))
    assert draft_trees.select_tree(tokens, parents, scores, 9) == speculative.DraftTree(
        (10, 20, 21, 11, 22, 23), (0, 1, 1, 0, 4, 4))  # (30 may not be taken)
    ties = np.array([-0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5], np.float32)  # a child as likely as its parent
    assert draft_trees.select_tree(tokens, parents, ties, 3) == speculative.DraftTree((10, 20, 11), (0, 1, 0))
    assert draft_trees.best_path(tokens, parents, scores) == speculative.DraftTree.chain([10, 20])
    assert draft_trees.best_path(tokens, parents, np.full(7, -np.inf, np.float32)) == speculative.DraftTree.chain()


@pytest.mark.parametrize("seed", range(3))
def test_incremental_ngram_trees_are_the_full_scans(seed):
    """NgramIndex.propose_tree against the reference full scan (propose_ngram_tree) as random sequences grow; a tree's
    first branch is the chain proposal; masks and depths follow the parents; `accepted_path` walks the sampled
    branch."""
    rng = random.Random(seed)
    lo, hi = rng.choice([(1, 1), (1, 3), (2, 4)])
    branches = rng.choice([2, 3, 5])
    tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
    index = speculative.NgramIndex(lo, hi, branches)
    while len(tokens) < 200:
        k, nodes = rng.randrange(1, 6), rng.randrange(1, 20)
        tree = index.propose_tree(tokens, k, nodes)
        assert tree == speculative.propose_ngram_tree(tokens, k, lo, hi, branches, nodes), (tokens, k, nodes)
        chain = speculative.propose_ngram(tokens, min(k, nodes), lo, hi)
        assert list(tree.tokens[: len(chain)]) == chain and tree.parents[: len(chain)] == tuple(range(len(chain)))
        assert len(tree) <= nodes and all(p <= j for j, p in enumerate(tree.parents))
        assert speculative.build_tree(tree.branches(), nodes) == tree  # (a grammar cuts the branches one by one)
        for node, mask in enumerate(tree.masks()):
            ancestors = tree.path(node)[:-1] + [0]
            hidden = [node - 1 - b for b in range(32) if (mask >> b) & 1]
            assert sorted(hidden) == [j for j in range(node) if j not in ancestors]
            assert tree.depth(node) == len(tree.path(node)) <= k
        tokens += [rng.randrange(3) for _ in range(rng.randrange(1, 5))]
    tree = speculative.build_tree([[4, 5, 6], [4, 7], [8]], 32)
    assert tree == speculative.DraftTree((4, 5, 6, 7, 8), (0, 1, 2, 1, 0))
    assert speculative.accepted_path(tree, [4, 7, 0, 0, 1, 2]) == [1, 4]
    assert speculative.build_tree([[4, 5, 6], [4, 7], [8]], 3) == speculative.DraftTree((4, 5, 6), (0, 1, 2))


def test_draft_tokens_respect_budget_pages_and_limits():
    spec = SpeculativeConfig(method="ngram", num_tokens=5, ngram_min=1, ngram_max=2)
    sched, runner = make(num_pages=8, page_size=4, max_batch_tokens=8, max_running=4, spec=spec, model=repetitive_model)
    a = seq("a", [3, 4, 5, 3, 4, 5, 3, 4], max_tokens=4)
    sched.add(a)
    plan = sched.schedule()
    sched.commit(plan, runner.run(plan))  # prefill; a's first token is sampled
    plan = sched.schedule()
    [chunk] = plan.chunks
    assert len(chunk.draft) == 2  # max_tokens 4: one token out, at most 3 more from this step = 1 real + 2 drafts
    assert chunk.token_ids[1:] == list(chunk.draft) and len(chunk.pages) * 4 >= a.num_tokens + 2
    sched.commit(plan, runner.run(plan))
    sched.check_invariants()
    b = seq("b", [7, 8, 7, 8, 7, 8, 7, 8, 7, 8], max_tokens=20)
    c = seq("c", [9, 10, 9, 10, 9, 10, 9, 10, 9, 10], max_tokens=20)
    sched, runner = make(num_pages=64, page_size=4, max_batch_tokens=20, max_running=4, spec=spec, model=repetitive_model)
    sched.add(b)
    sched.add(c)
    plan = sched.schedule()
    sched.commit(plan, runner.run(plan))
    plan = sched.schedule()
    # Drafts share the budget (20 tokens: b takes 1 + 5, c 1 + 5), each decode keeps its slot.
    assert plan.num_tokens == 12 and [len(ch.draft) for ch in plan.chunks] == [5, 5]
    assert sched.stats.spec_draft_tokens == 0  # counted when verified
    sched.commit(plan, runner.run(plan))
    assert sched.stats.spec_draft_tokens == 10
    sched, runner = make(num_pages=64, page_size=4, max_batch_tokens=8, max_running=4, model=repetitive_model)
    sched.add(b := seq("b", b.prompt_ids, max_tokens=20))
    sched.add(c := seq("c", c.prompt_ids, max_tokens=20))
    while b.is_prefilling or c.is_prefilling:  # both decoding, without drafts so far
        plan = sched.schedule()
        sched.commit(plan, runner.run(plan))
    sched.spec = spec
    plan = sched.schedule()
    assert plan.num_tokens == 8 and [len(ch.draft) for ch in plan.chunks] == [5, 1]  # c keeps its one token
    assert speculative.propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 1, 3) == [7, 1]  # the latest occurrence
    assert speculative.propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 5, 1, 3) == [7, 1, 2, 3, 7]  # copies into itself
    assert speculative.propose_ngram([1, 2, 3, 4], 3, 1, 3) == []
    assert speculative.propose_ngram([5, 5], 3, 1, 1) == [5, 5, 5]


def test_drafts_back_off_while_they_keep_missing():
    """Text that does not repeat (the random fake model) stops paying for drafts: after two verifications in a row
    accept nothing, a sequence waits 2, 4, ... 16 steps before drafting again; an accepted draft resets it."""
    assert [speculative.pause_after(m) for m in range(7)] == [0, 0, 2, 4, 8, 16, 16]
    spec = SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1, ngram_max=1)
    drafted = {}
    for pause in (True, False):
        sched, runner = make(num_pages=256, max_model_len=256, spec=spec)
        if not pause:
            speculative_pause, speculative.pause_after = speculative.pause_after, lambda misses: 0
        try:
            out = run_all(sched, runner, [seq(f"r{i}", [i + 1, 3, i + 1, 3], max_tokens=120) for i in range(3)])
        finally:
            if not pause:
                speculative.pause_after = speculative_pause
        drafted[pause] = (sched.stats.spec_draft_tokens, out)
    assert drafted[True][1] == drafted[False][1]  # the same outputs
    assert drafted[True][0] < drafted[False][0] / 2


@pytest.mark.parametrize("seed", range(4))
def test_incremental_ngram_index_proposes_what_the_full_scan_does(seed):
    """The scheduler's NgramIndex (updated as tokens are appended, one or several at a time) against the reference
    full scan, on fresh random sequences over small vocabularies (many repeats), every length, several (n, k)."""
    rng = random.Random(seed)
    lo, hi = rng.choice([(1, 1), (1, 3), (2, 4), (3, 3)])
    tokens = [rng.randrange(rng.choice([2, 3, 8])) for _ in range(rng.randrange(1, 6))]
    index = speculative.NgramIndex(lo, hi)
    while len(tokens) < 300:
        k = rng.randrange(1, 8)
        assert index.propose(tokens, k) == speculative.propose_ngram(tokens, k, lo, hi), (tokens, k)
        tokens += [rng.randrange(3) for _ in range(rng.randrange(1, 5))]
    chain = speculative.DraftTree.chain
    assert speculative.accepted_path(chain([4, 5, 6]), [4, 5, 9, 1]) == [1, 2]
    assert speculative.accepted_path(chain([4]), [3, 4]) == []


# ------------------------------------------------------------------------------------ host tier
def test_host_tier_brings_evicted_prefixes_back():
    """A prefix evicted from a small pool is copied to the host tier and copied back for the next prompt that shares
    it (more cached tokens than without the tier, same outputs; page contents checked by the fake runner)."""
    system = list(range(3, 3 + 16))  # four pages
    other = list(range(30, 30 + 16))

    def run(host_pages):
        sched, runner = make(num_pages=6, page_size=4, max_batch_tokens=32, max_running=1, host_pages=host_pages)
        if sched.host is not None:  # the router feed's events (LLMEngine.drain_cache_events turns them on)
            sched.host.record_events = True
        outs = [run_all(sched, runner, [seq(f"r{i}", p + [i + 1], max_tokens=3)])
                for i, p in enumerate([system, other, system, other, system])]
        return outs, sched.stats, sched

    plain, plain_stats, _ = run(0)
    tiered, stats, sched = run(8)
    held = set()  # the host tier's events add up to what it holds
    for e in sched.host.drain_events():
        assert e.medium == "host"
        (held.update if e.kind == "stored" else held.difference_update)(e.block_hashes)
    assert held == set(sched.host._slots) and len(held) >= 4
    assert plain == tiered
    assert stats.host_hit_tokens >= 32 and stats.cached_prompt_tokens == plain_stats.cached_prompt_tokens + stats.host_hit_tokens
    assert stats.host_saved_pages > 0


# ------------------------------------------------------------------------------------ recurrent states
def _shared_prefix_waves(rng: random.Random, num_waves: int) -> list[list[list[int]]]:
    """Waves of prompts over three system prompts (of 3-6 pages and a bit), each wave also repeating an earlier
    prompt whole or continued (the same prompt again, a conversation's next turn)."""
    systems = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(13, 26))] for _ in range(3)]
    waves, seen = [], []
    for _ in range(num_waves):
        wave = [rng.choice(systems) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 9))]
                for _ in range(rng.randrange(1, 4))]
        if seen and rng.random() < 0.7:
            earlier = rng.choice(seen)
            wave.append(earlier + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 6))])
        seen += wave
        waves.append(wave)
    return waves


# (pool pages, snapshot slots, host pages, host state slots, max running): roomy; every slot reused all the time (an
# admission's evictions save snapshots over the host one it resumes from, unless `CacheTiers.keep_state` keeps it)
@pytest.mark.parametrize("sizes", [(24, 3, 64, 16, 3), (12, 1, 4, 3, 1)])
@pytest.mark.parametrize("overlap", [False, True])
def test_recurrent_states_resume_from_the_host_tier(overlap, sizes):
    """A model with linear attention layers resumes a cached prefix only where a snapshot of its recurrent state is.
    With a pool and snapshot slots small enough to thrash, the snapshots the device lets go (their pages evicted, or
    their slots reused) go to the host tier's state slots with the pages, and later prompts resume from there: the
    fake runner checks every step that each chunk starts from the state of exactly the tokens before it, and that
    its pages hold them. More prompt tokens come from the cache than without the host tier."""
    rng = random.Random(fresh.seed())
    num_pages, snapshots, host_pages, host_states, max_running = sizes

    def run(waves, host_pages, host_states):
        sched, runner = make(num_pages=num_pages, page_size=4, max_batch_tokens=16, max_running=max_running,
                             snapshots=snapshots, host_pages=host_pages, host_states=host_states)
        outs = {}
        for w, prompts in enumerate(waves):
            outs |= run_all(sched, runner, [seq(f"w{w}p{i}", p, max_tokens=3) for i, p in enumerate(prompts)],
                            overlap=overlap)
        return outs, sched.stats

    for _ in range(4):
        waves = _shared_prefix_waves(rng, 12)
        plain, plain_stats = run(waves, 0, 0)
        tiered, stats = run(waves, host_pages, host_states)
        assert plain == tiered
        assert stats.host_saved_states > 0 and stats.host_state_hits > 0 and plain_stats.host_state_hits == 0
        assert stats.cached_prompt_tokens > plain_stats.cached_prompt_tokens


def test_a_prefix_resumes_past_the_tree_where_the_host_tier_has_its_state():
    """The tree's match ends before the host tier's pages do: the prompt takes the host pages up to the deepest one
    ending at a host snapshot, and that snapshot into its state slot (not the shallower snapshot on the device)."""
    prompt = list(range(1, 1 + 33))  # eight pages and a token
    sched, runner = make(num_pages=12, page_size=4, max_batch_tokens=32, max_running=1, snapshots=2, host_pages=16,
                         host_states=4)
    run_all(sched, runner, [seq("a", prompt, max_tokens=1)])  # snapshots at its prompt's last page boundary (32)
    run_all(sched, runner, [seq("b", list(range(40, 40 + 37)), max_tokens=1)])  # evicts a's pages and snapshot
    assert sched.stats.host_saved_states >= 1
    plans = []
    again = seq("c", prompt + [60, 61], max_tokens=1)
    run_all(sched, runner, [again], on_plan=plans.append)
    assert again.num_cached_prompt == 32 and len(plans[0].state_loads) == 1 and not plans[0].state_copies
    assert sched.stats.host_state_hits == 1


@pytest.mark.parametrize("overlap", [False, True])
def test_recurrent_states_resume_from_the_disk_tier_after_a_restart(overlap):
    """The disk tier of a model with linear attention layers keeps every snapshot a step takes beside the pages: a
    restarted replica (an empty pool, tree and snapshot slots) reads both back for prompts sharing a prefix, each
    prompt's pages only up to the deepest one with a snapshot, and resumes from it; the fake runner checks every
    chunk's state and pages every step."""
    rng = random.Random(fresh.seed())
    waves = _shared_prefix_waves(rng, 8)
    disk, disk_states = FakeDisk(), FakeDisk()

    def run():
        sched, runner = make(num_pages=24, page_size=4, max_batch_tokens=16, max_running=3, snapshots=3, disk=disk,
                             disk_states=disk_states)
        outs = {}
        for w, prompts in enumerate(waves):
            outs |= run_all(sched, runner, [seq(f"w{w}p{i}", p, max_tokens=3) for i, p in enumerate(prompts)],
                            overlap=overlap)
        return outs, sched.stats

    first, first_stats = run()
    assert first_stats.disk_saved_states > 0 and len(disk_states.files) == first_stats.disk_saved_states
    restarted, stats = run()
    assert restarted == first
    assert stats.disk_state_hits > 0 and stats.disk_hit_tokens > 0


# ------------------------------------------------------------------------------------ disk tier
def test_disk_tier_serves_a_restarted_replica_the_same_outputs():
    """A replica writes every page its tree stores to the disk tier; a new one (a restart: empty pool and tree) reads
    the prompts' pages back instead of computing them: the same outputs, the fake runner checking every page table
    every step. Prompts sharing a prefix share one read, and a prompt waiting for its read lets others run."""
    system = list(range(3, 3 + 20))  # five pages
    prompts = [system + [40 + i, 41 + i] for i in range(6)] + [list(range(60, 75))]

    def run(disk, stagger=False):
        sched, runner = make(num_pages=64, page_size=4, max_batch_tokens=32, max_running=8, disk=disk)
        seqs = [seq(f"r{i}", p, max_tokens=3) for i, p in enumerate(prompts)]
        if stagger:  # the first prompt alone first: its pages, and its output's, enter the tree
            return run_all(sched, runner, seqs[:1]) | run_all(sched, runner, seqs[1:]), sched
        return run_all(sched, runner, seqs), sched

    plain, _ = run(None)
    disk = FakeDisk()
    first, sched = run(disk, stagger=True)
    assert first == plain and sched.stats.disk_hit_tokens == 0
    assert sched.stats.disk_saved_pages == len(disk.files) >= 5  # the system prompt's pages, and the outputs' too
    restarted, sched = run(disk)
    assert restarted == plain
    assert sched.stats.disk_hit_tokens >= 6 * 20 and disk.num_reads == 2  # six prompts share one read; one more
    assert sched.stats.cached_prompt_tokens >= sched.stats.disk_hit_tokens

    # While the system prompt's pages are read, a prompt the disk lacks is admitted; the six wait.
    sched, runner = make(num_pages=64, page_size=4, max_batch_tokens=64, max_running=8, disk=FakeDisk(disk.files))
    for i, p in enumerate(prompts[:6] + [list(range(80, 90))]):
        sched.add(seq(f"r{i}", p, max_tokens=3))
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["r6"] and len(sched.disk_reads()) == 1
    sched.abort("r0")  # the sequence that started the read goes; the others keep its read
    runner.run(plan)
    plan = sched.schedule()
    assert sorted(c.seq.request_id for c in plan.chunks) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert len(plan.disk_loads) == 5 * 5 and sched.stats.disk_hit_tokens == 5 * 20


def test_disk_loads_land_after_copy_on_write_in_a_hybrid_cache():
    """A whole-prompt hit copies its last page (and window slot) before the step; that slot is then held by the tree
    only, so the same plan may hand it to a page read from disk. The copy must come first: found by fuzzing (this
    workload failed with the disk loads before the copies, the fake runner's window check naming the position)."""
    kw = dict(caching=True, num_pages=20, max_running=6, window=3, window_pages=11, max_batch_tokens=16,
              long_prefill_tokens=4)
    plain = run_all(*make(caching=False, num_pages=256), _workload(random.Random(396), 30))
    disk = FakeDisk()
    for overlap in (False, True):
        sched, runner = make(**kw, disk=disk)
        assert run_all(sched, runner, _workload(random.Random(396), 30), overlap=overlap) == plain
    assert sched.stats.disk_hit_tokens > 0


def test_a_prompt_stops_waiting_for_a_read_that_hangs():
    """A read that never completes (a hung network filesystem): after cache.disk_read_timeout_s the prompt computes
    its pages instead, with the same outputs, and does not read again."""
    prompts = [list(range(3, 23)) + [40 + i] for i in range(3)]
    plain = run_all(*make(num_pages=64, page_size=4), [seq(f"r{i}", p) for i, p in enumerate(prompts)])
    disk = FakeDisk()
    run_all(*make(num_pages=64, page_size=4, disk=disk), [seq(f"r{i}", p) for i, p in enumerate(prompts)])
    disk.hang = True
    sched, runner = make(num_pages=64, page_size=4, disk=disk, disk_read_timeout_s=0.0)
    assert run_all(sched, runner, [seq(f"r{i}", p) for i, p in enumerate(prompts)]) == plain
    assert sched.stats.disk_read_timeouts >= 1 and sched.stats.disk_hit_tokens == 0 and disk.num_reads == 1  # shared, once


def test_disk_tier_never_writes_adapter_pages():
    """An adapter's K/V are keyed by its name, whose files can change: they are neither written nor read."""
    from engine.block_hash import cache_namespace

    disk = FakeDisk()
    sched, runner = make(num_pages=64, page_size=4, disk=disk)
    run_all(sched, runner, [seq("a", list(range(3, 20)), namespace=cache_namespace(None, "my-adapter"))])
    assert not disk.files and not disk.num_reads
    run_all(sched, runner, [seq("b", list(range(3, 20)), namespace="tenant")])
    assert len(disk.files) == 5  # 17 prompt tokens and 3 of the 4 outputs hold K/V


def test_host_page_index_is_lru_and_spares_slots_being_read():
    index = HostPageIndex(2)
    assert index.store(10) == 0 and index.store(11) == 1
    assert index.store(10) is None  # already there
    assert index.lookup(10) == 0  # 10 is now the most recent: 11 goes first
    assert index.store(12) == 1 and 11 not in index and index.lookup(11) is None
    assert index.store(13, avoid={0}) == 1 and 12 not in index  # slot 0 is being loaded this step: the next LRU goes
    assert index.store(14, avoid={0, 1}) is None and 14 not in index  # nothing may be taken: not saved
    index.reset()
    assert len(index) == 0 and index.store(15) == 0
    events = [(e.kind, e.block_hashes) for e in index.drain_events()]  # each hash under its last change
    assert events == [("removed", (10, 11, 12, 13)), ("stored", (15,))]
    assert index.drain_events() == []


# ------------------------------------------------------------------------------------ priority
def test_priority_policy_orders_admission_and_preempts_the_least_urgent():
    sched, runner = make(num_pages=64, max_running=2, max_batch_tokens=32, policy="priority")
    low_old, low_new = seq("low-old", [5] * 6, max_tokens=30), seq("low-new", [6] * 6, max_tokens=30)
    for s in (low_old, low_new):
        s.priority = 5
        sched.add(s)
    for _ in range(3):
        plan = sched.schedule()
        sched.commit(plan, runner.run(plan))
    urgent = seq("urgent", [7] * 6, max_tokens=3)
    urgent.priority = -1
    later = seq("later", [8] * 6, max_tokens=3)  # priority 0: more urgent than the low ones, less than `urgent`
    sched.add(later)
    sched.add(urgent)
    plan = sched.schedule()
    # The batch was full: the two arrivals, both more urgent, displace both low-priority sequences.
    assert [c.seq.request_id for c in plan.chunks] == ["urgent", "later"]
    assert low_new.status is low_old.status is Status.WAITING and sched.stats.num_preemptions == 2
    finished = []
    while sched.has_work():
        plan = sched.schedule()
        sched.commit(plan, runner.run(plan))
        finished += [s.request_id for s in (urgent, later, low_old, low_new)
                     if s.status is Status.FINISHED and s.request_id not in finished]
        sched.check_invariants()
    assert finished[:2] == ["urgent", "later"]
    # Equal priorities keep arrival order, and a policy other than "priority" ignores the field.
    sched, runner = make(num_pages=64, max_running=1, policy="fcfs")
    a, b = seq("a", [1, 2]), seq("b", [3, 4])
    b.priority = -10
    sched.add(a)
    sched.add(b)
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["a"]


# ------------------------------------------------------------------------------ hybrid cache (window slots)
def test_hybrid_cache_recomputes_a_prefix_whose_window_was_evicted_then_restores_it():
    """A cached prefix is usable only up to where its windowed layers still have the last window's K/V. Once other
    traffic has taken those slots, the next request recomputes the prefix (its full K/V stays cached) and the tree
    takes the recomputed pages, so the request after that hits the whole prefix again."""
    sched, runner = make(num_pages=64, max_batch_tokens=16, window=8, window_pages=10)
    prefix = list(range(1, 41))  # 10 pages of 4
    run_all(sched, runner, [seq("a", prefix + [45])])
    b = seq("b", prefix + [46])
    run_all(sched, runner, [b])
    assert b.num_cached_prompt == 40
    run_all(sched, runner, [seq("c", [47 + i % 3 for i in range(41)])])  # another prefix takes the window slots
    assert sched.tree.match(prefix).num_tokens == 40, "the prefix's full K/V is still cached"
    assert not any(p in sched.window.slot_of for p in sched.tree.match(prefix).pages[-2:]), "its window is not"
    d = seq("d", prefix + [48])
    run_all(sched, runner, [d])
    assert d.num_cached_prompt < 40 and sched.stats.window_recomputed_tokens == 40 - d.num_cached_prompt
    e = seq("e", prefix + [49])
    run_all(sched, runner, [e])
    assert e.num_cached_prompt == 40, "d's recomputed pages restored the prefix's window"
    assert sched.pool.num_free + sched.tree.num_cached_pages == sched.pool.num_pages


def test_hybrid_cache_sequences_hold_only_their_window():
    """A long sequence holds window slots for the pages its next token can see (plus its newest), not its whole
    length: with slots for 4 pages of a 6-token window it prefills and decodes 60 tokens."""
    sched, runner = make(num_pages=64, max_batch_tokens=4, max_running=1, window=6, window_pages=4, max_model_len=80)
    long = seq("long", [1 + i % 40 for i in range(50)], max_tokens=10)
    held = []
    run_all(sched, runner, [long], on_plan=lambda p: held.append(len(p.chunks[0].seq.pages) - p.chunks[0].seq.window_from))
    assert len(long.output_ids) == 10 and max(held) <= 4
