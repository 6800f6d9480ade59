"""Discrete-event simulation of N replicas behind the router, with no model.

Requests go through the SAME policy objects as the live router (engine.router.policy), fed by the
same PrefixIndex, which here reads each replica's cache events after a feed lag (the router's poll
interval). Each replica is modelled as:

- a prefix cache: HashCache (RadixCache semantics over block hashes) in a pool of `num_pages`
  pages. A request locks its matched prefix, allocates pages for its unmatched prompt and its
  output (evicting LRU leaves when short), inserts its full prompt pages when its prefill ends
  and its whole sequence when it finishes, as the engine's scheduler does;
- one prefill engine, FIFO: a request's prefill takes (prompt_len - matched_len) * prefill_ms
  (at least one token), started when the engine is idle, a running slot is free
  (max_running) and its pages fit; TTFT = prefill end - arrival;
- decode in a batch that does not slow with its size: a request finishes output_len * decode_ms
  after its prefill;
- optionally a host tier of `host_pages` (engine.host_cache.HostPageIndex itself): pages the tree
  evicts keep their hash in an LRU of that size; a request continues its tree match there page by page
  and pays `host_load_ms_per_page` for each instead of their prefill. `host_visible`: whether
  the router's index gets the tier's events (engine.cache_feed's `medium: "host"`).

Traces are sequences of block hashes, not tokens: a shared prefix is a fixed tuple of random
64-bit ids, every other page a fresh id (ids only ever need to be equal exactly when prefixes
are), which keeps 1M requests cheap to generate and to hash.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from typing import Iterator

import numpy as np

from engine.host_cache import HostPageIndex
from engine.router.hash_cache import HashCache
from engine.router.index import PrefixIndex
from engine.router.policy import ReplicaState, RouteRequest, make_policy

# ------------------------------------------------------------------------------------------ traces


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    name: str
    num_requests: int = 1_000_000
    rate_per_replica: float = 1.0  # Poisson arrivals, requests/s per replica
    seed: int = 0


def _lognormal_int(rng, median: float, sigma: float, lo: int, hi: int, size: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, size), lo, hi).astype(np.int64)


def generate_trace(spec: TraceSpec, num_replicas: int, page_size: int,
                   chunk: int = 1 << 16) -> Iterator[tuple[float, tuple[int, ...], int, int]]:
    """(arrival_s, block_hashes, prompt_len, output_len) per request, in arrival order.

    support_desk: 70% of requests start with one of 5 system prompts of 1-2k tokens (popularity
      0.40/0.25/0.15/0.12/0.08) followed by a user message (median 150 tokens, long tail); the
      other 30% are unique prompts (median 600 tokens, long tail up to 16k).
    many_groups (llm-d's shared-prefix benchmark shape): 150 groups of a 6,000-token prefix,
      uniform popularity, plus a 64-256 token question.
    Output lengths: median 120 tokens, long tail up to 1,024.
    """
    rng = np.random.default_rng(spec.seed)
    ps = page_size
    if spec.name == "support_desk":
        prefix_lens = rng.integers(1024, 2049, 5)
        weights = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
        shared_share = 0.7
    elif spec.name == "many_groups":
        prefix_lens = np.full(150, 6000)
        weights = np.full(150, 1 / 150)
        shared_share = 1.0
    else:
        raise ValueError(f"unknown trace {spec.name!r} (support_desk, many_groups)")
    prefix_pages = [tuple(int(x) for x in rng.integers(1, 1 << 62, int(n) // ps, dtype=np.int64))
                    for n in prefix_lens]
    next_id = 1 << 62  # unique page ids live above the random shared ones
    rate = spec.rate_per_replica * num_replicas
    t = 0.0
    for start in range(0, spec.num_requests, chunk):
        m = min(chunk, spec.num_requests - start)
        gaps = rng.exponential(1 / rate, m)
        shared = rng.random(m) < shared_share
        group = rng.choice(len(prefix_lens), m, p=weights)
        if spec.name == "support_desk":
            tail = np.where(shared, _lognormal_int(rng, 150, 1.0, 8, 4000, m),
                            _lognormal_int(rng, 600, 1.0, 16, 16000, m))
        else:
            tail = rng.integers(64, 257, m)
        out = _lognormal_int(rng, 120, 0.7, 8, 1024, m)
        times = t + np.cumsum(gaps)
        t = float(times[-1])
        plens = [int(x) for x in prefix_lens]
        for ti, sh, g, n_tail, n_out in zip(times.tolist(), shared.tolist(), group.tolist(), tail.tolist(),
                                            out.tolist()):
            if sh:
                prefix_len, head = plens[g], prefix_pages[g]
            else:
                prefix_len, head = 0, ()
            prompt_len = prefix_len + n_tail
            n_unique = prompt_len // ps - len(head)
            hashes = head + tuple(range(next_id, next_id + n_unique))
            next_id += n_unique
            yield ti, hashes, prompt_len, n_out


# ------------------------------------------------------------------------------------ the replicas


@dataclasses.dataclass(frozen=True)
class SimConfig:
    num_replicas: int = 8
    num_pages: int = 4096  # KV pages per replica
    page_size: int = 16
    max_running: int = 64  # sequences decoding at once per replica
    prefill_ms_per_token: float = 0.2  # placeholder (H100-class replica): see docs/routing.md
    decode_ms_per_token: float = 20.0  # placeholder: one decode step, whatever the batch
    feed_lag_s: float = 0.2  # cache events reach the index at this poll interval
    host_pages: int = 0  # host-tier pages per replica (0: none)
    host_load_ms_per_page: float = 0.1  # placeholder: one page's K/V over PCIe (~2 MB for an 8B model)
    host_visible: bool = True  # the router's index sees the host tier's events
    pending_ttl_s: float = 30.0
    prefill_weight: float = 2.0
    request_cost_tokens: int = 32
    hot_spot_ratio: float = 1.25
    hot_spot_slack: int = 4


class _Replica:
    __slots__ = ("cache", "queue", "prefill_busy", "running", "free_pages", "host")

    def __init__(self, num_pages: int, collect_events: bool, host_pages: int = 0, host_events: bool = False) -> None:
        self.cache = HashCache(collect_events)
        self.queue: deque[int] = deque()  # request ids waiting for the prefill engine
        self.prefill_busy = False
        self.running = 0
        self.free_pages = num_pages  # pool pages neither in the tree nor private to a request
        self.host = HostPageIndex(host_pages) if host_pages else None  # hashes only: no K/V is simulated
        if self.host is not None:
            self.host.record_events = host_events  # only what the router's index will read
            self.cache.on_evict = self.save_to_host

    def save_to_host(self, hashes: tuple[int, ...]) -> None:
        for h in hashes:
            self.host.store(h)

    def host_match(self, hashes: tuple[int, ...], start: int) -> int:
        """Pages after `start` (the tree's match) the host tier holds, consecutively; touched as used."""
        k = 0
        while start + k < len(hashes) and self.host.lookup(hashes[start + k]) is not None:
            k += 1
        return k


_PREFILL_DONE, _FINISH = 0, 1


def simulate(policy_name: str, trace: TraceSpec, cfg: SimConfig) -> dict:
    """Run one trace through one policy; return the summary metrics (see `summarize`)."""
    n_rep, ps = cfg.num_replicas, cfg.page_size
    index = PrefixIndex(n_rep, cfg.pending_ttl_s)
    policy = make_policy(policy_name, index, ps, cfg.prefill_weight, cfg.request_cost_tokens, cfg.hot_spot_ratio,
                         cfg.hot_spot_slack)
    feed = policy.uses_index
    states = [ReplicaState() for _ in range(n_rep)]
    reps = [_Replica(cfg.num_pages, feed, cfg.host_pages, feed and cfg.host_visible) for _ in range(n_rep)]
    n = trace.num_requests
    host_hit = [0] * n  # prompt tokens a request loaded from its replica's host tier
    # NOTE: plain lists while simulating (numpy scalar access is slow); arrays for the summary.
    arrival, ttft, finish_t = [0.0] * n, [0.0] * n, [0.0] * n
    prompt, matched, where = [0] * n, [0] * n, [0] * n
    decisions: dict[str, int] = {}
    # per request while alive: hashes, output_len, lock handle, private pages, routed tokens
    live: dict[int, list] = {}
    heap: list[tuple[float, int, int]] = []  # (time, kind, request id)
    prefill_s, decode_s = cfg.prefill_ms_per_token / 1e3, cfg.decode_ms_per_token / 1e3
    next_poll = cfg.feed_lag_s
    unique_out = [1 << 63]  # ids for output pages: above every prompt id

    def alloc(rep: _Replica, need: int) -> bool:
        if rep.free_pages < need:
            rep.free_pages += rep.cache.evict(need - rep.free_pages)
        if rep.free_pages < need:
            return False
        rep.free_pages -= need
        return True

    def try_start(r: int, now: float) -> None:
        rep = reps[r]
        while rep.queue and not rep.prefill_busy and rep.running < cfg.max_running:
            rid = rep.queue[0]
            hashes, out_len = live[rid][0], live[rid][1]
            node, hit = rep.cache.match(hashes)
            rep.cache.lock(node)
            # pages: unmatched full prompt pages (those loaded from the host tier too), then the partial page and the output
            private = len(hashes) - hit + (prompt[rid] % ps + out_len + ps - 1) // ps
            if not alloc(rep, private):
                rep.cache.unlock(node)
                if rep.running == 0:
                    raise ValueError(f"a request needs {private} pages; a replica has {cfg.num_pages}")
                return  # blocked on memory until a running request finishes
            rep.queue.popleft()
            rep.running += 1
            rep.prefill_busy = True
            # NOTE: matched after the allocation, whose evictions may have moved pages into the host tier
            loaded = rep.host_match(hashes, hit) if rep.host is not None else 0
            hit_len = min((hit + loaded) * ps, prompt[rid] - 1)  # a fully cached prompt recomputes 1 token
            matched[rid] = hit_len
            host_hit[rid] = max(hit_len - hit * ps, 0)
            live[rid][2], live[rid][3] = node, private
            done = now + (prompt[rid] - hit_len) * prefill_s + loaded * cfg.host_load_ms_per_page / 1e3
            heapq.heappush(heap, (done, _PREFILL_DONE, rid))

    def on_prefill_done(rid: int, now: float) -> None:
        r = where[rid]
        rep, st, rec = reps[r], states[r], live[rid]
        hashes, out_len, node = rec[0], rec[1], rec[2]
        leaf, cached = rep.cache.insert(hashes)
        rep.cache.lock(leaf)
        rep.cache.unlock(node)
        rec[2] = leaf
        rec[3] -= len(hashes) - cached  # those private pages now belong to the tree
        ttft[rid] = now - arrival[rid]
        st.queued_tokens -= rec[4]
        rep.prefill_busy = False
        heapq.heappush(heap, (now + out_len * decode_s, _FINISH, rid))
        try_start(r, now)

    def on_finish(rid: int, now: float) -> None:
        r = where[rid]
        rep, st = reps[r], states[r]
        hashes, out_len, node, private, _ = live.pop(rid)
        n_out = (prompt[rid] + out_len) // ps - len(hashes)
        seq = hashes + tuple(range(unique_out[0], unique_out[0] + n_out))
        unique_out[0] += n_out
        _, cached = rep.cache.insert(seq)
        rep.cache.unlock(node)
        private -= len(seq) - cached
        rep.free_pages += private
        rep.running -= 1
        st.in_flight -= 1
        finish_t[rid] = now
        try_start(r, now)

    def flush_events() -> None:
        for r, rep in enumerate(reps):
            for kind, hashes in rep.cache.events:
                (index.store if kind == "stored" else index.remove)(r, hashes)
            rep.cache.events.clear()
            if rep.host is not None and cfg.host_visible:
                for e in rep.host.drain_events():
                    (index.store if e.kind == "stored" else index.remove)(r, e.block_hashes, "host")

    def advance(until: float) -> None:
        nonlocal next_poll
        while heap and heap[0][0] <= until:
            t, kind, rid = heapq.heappop(heap)
            if feed and t >= next_poll:
                flush_events()
                next_poll = t + cfg.feed_lag_s
            (on_prefill_done if kind == _PREFILL_DONE else on_finish)(rid, t)

    for rid, (t, hashes, prompt_len, out_len) in enumerate(generate_trace(trace, n_rep, ps)):
        advance(t)
        if feed and t >= next_poll:
            flush_events()
            next_poll = t + cfg.feed_lag_s
        choice = policy.route(RouteRequest(hashes, prompt_len), states, t)
        r = choice.replica
        decisions[choice.reason] = decisions.get(choice.reason, 0) + 1
        routed = prompt_len - choice.matched_len
        st = states[r]
        st.in_flight += 1
        st.queued_tokens += routed
        arrival[rid], prompt[rid], where[rid] = t, prompt_len, r
        live[rid] = [hashes, out_len, None, 0, routed]
        reps[r].queue.append(rid)
        try_start(r, t)
    advance(float("inf"))
    assert not live, f"{len(live)} requests never finished"
    return summarize(policy_name, cfg, np.array(arrival), np.array(ttft), np.array(finish_t),
                     np.array(prompt, np.int64), np.array(matched, np.int64), np.array(where, np.int64), decisions,
                     np.array(host_hit, np.int64))


def summarize(policy_name, cfg, arrival, ttft, finish_t, prompt, matched, where, decisions, host_hit) -> dict:
    n = len(arrival)
    per_replica = np.bincount(where, minlength=cfg.num_replicas)
    prefill_tokens = float((prompt - matched).sum())
    span = float(finish_t.max() - arrival.min())
    return {
        "policy": policy_name,
        "replicas": cfg.num_replicas,
        "requests": n,
        "hit_rate": float(matched.sum() / prompt.sum()),
        "host_hit_rate": float(host_hit.sum() / prompt.sum()),  # the part of hit_rate loaded from host tiers
        "throughput_rps": n / span,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "per_replica_max": int(per_replica.max()),
        "per_replica_mean": float(per_replica.mean()),
        "prefill_tokens_per_request": prefill_tokens / n,
        # prefill GPU-hours a day at 1M requests/day with this policy's mean prefill per request
        "prefill_gpu_h_per_1m": prefill_tokens / n * 1e6 * cfg.prefill_ms_per_token / 3.6e6,
        "decisions": decisions,
    }
