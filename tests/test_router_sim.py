"""The simulator's pieces: HashCache against engine.radix_cache.RadixCache, and small end-to-end runs."""
import random

import pytest

from engine.block_hash import page_hashes
from engine.page_pool import PagePool
from engine.radix_cache import RadixCache
from engine.router.hash_cache import HashCache
from engine.router.simulator import SimConfig, TraceSpec, generate_trace, simulate

PS = 2


@pytest.mark.parametrize("seed", range(6))
def test_hash_cache_matches_radix_cache(seed):
    """Same ops on tokens (RadixCache) and on their block hashes (HashCache): same match lengths,
    same evicted counts, same stored/removed hashes, same eviction order."""
    rng = random.Random(seed)
    pool = PagePool(4096)
    ref = RadixCache(pool, PS)
    fast = HashCache()
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(0, 12))] for _ in range(4)]
    locked = []
    for _ in range(300):
        op = rng.random()
        tokens = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        tokens = tokens[: len(tokens) - len(tokens) % PS]
        hashes = tuple(page_hashes(tokens, PS))
        if op < 0.4:
            pages = pool.alloc(len(tokens) // PS)
            got_ref = ref.insert(tokens, pages)
            pool.unref(pages)
            _, got_fast = fast.insert(hashes)
            assert got_fast * PS == got_ref
        elif op < 0.6:
            m = ref.match(tokens)
            node, n = fast.match(hashes)
            assert n * PS == m.num_tokens
            if rng.random() < 0.5:
                ref.lock(m.node)
                fast.lock(node)
                locked.append((m.node, node))
        elif op < 0.75 and locked:
            a, b = locked.pop(rng.randrange(len(locked)))
            ref.unlock(a)
            fast.unlock(b)
        else:
            k = rng.randrange(1, 6)
            assert fast.evict(k) == ref.evict(k)
        assert fast.num_cached_pages == ref.num_cached_pages
        assert fast.num_evictable_pages == ref.num_evictable_pages
        ev_ref = [(e.kind, e.block_hashes) for e in ref.drain_events()]
        ev_fast, fast.events[:] = list(fast.events), []
        assert ev_fast == ev_ref
    ref.check_invariants()
    fast.check_invariants()


def test_trace_shapes():
    reqs = list(generate_trace(TraceSpec("many_groups", 2000, 1.0), 4, 16))
    assert len(reqs) == 2000
    times = [r[0] for r in reqs]
    assert times == sorted(times)
    heads = {r[1][:375] for r in reqs}
    assert len(heads) <= 150 and all(len(r[1]) == r[2] // 16 for r in reqs)
    desk = list(generate_trace(TraceSpec("support_desk", 4000, 1.0), 4, 16))
    shared = sum(1 for r in desk if r[1] and r[1][0] < 1 << 62)
    assert 0.65 < shared / len(desk) < 0.75


@pytest.mark.parametrize("trace", ["support_desk", "many_groups"])
def test_simulate_small(trace):
    cfg = SimConfig(num_replicas=4, num_pages=2048)
    spec = TraceSpec(trace, 1500, {"support_desk": 6.0, "many_groups": 0.7}[trace])
    rows = {p: simulate(p, spec, cfg) for p in ("round_robin", "least_load", "prefix_aware")}
    for r in rows.values():
        assert r["requests"] == 1500 and 0 <= r["hit_rate"] < 1
        assert r["ttft_p50_s"] <= r["ttft_p99_s"]
    assert rows["round_robin"]["per_replica_max"] == 375  # exact cycling
    assert rows["prefix_aware"]["hit_rate"] > rows["round_robin"]["hit_rate"]


def test_host_tier_in_the_simulator_and_the_router_seeing_it():
    """Replicas with a host tier (engine.host_cache's semantics) bring evicted prefixes back by copy; a router whose
    index gets the tier's events (medium host) routes to where they wait, so more of each prompt is reused."""
    spec = TraceSpec("many_groups", 2000, 0.7)
    rows = {name: simulate("prefix_aware", spec, SimConfig(num_replicas=4, num_pages=2048, **kw)) for name, kw in {
        "none": {}, "invisible": {"host_pages": 8192, "host_visible": False}, "visible": {"host_pages": 8192}}.items()}
    assert rows["none"]["host_hit_rate"] == 0 < rows["invisible"]["host_hit_rate"] < rows["visible"]["host_hit_rate"]
    assert rows["none"]["hit_rate"] < rows["invisible"]["hit_rate"] < rows["visible"]["hit_rate"]
    assert rows["visible"]["prefill_tokens_per_request"] < 0.9 * rows["invisible"]["prefill_tokens_per_request"]
