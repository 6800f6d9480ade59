"""PrefixIndex and EventFeed on host data: apply, resync, gap, epoch, pending runs, and the
binary-search match against its page-by-page reference on trees built by a real cache."""
import random

import pytest

from engine.router.config import load_router_config, router_config_from_dict
from engine.config import ConfigKeyError
from engine.router.hash_cache import HashCache
from engine.router.index import EventFeed, PrefixIndex


def chain(start, n):
    return tuple(range(start, start + n))


def test_store_remove_match():
    idx = PrefixIndex(3)
    a = chain(100, 10)
    idx.store(0, a[:6])
    idx.store(2, a[:3])
    assert idx.match(a) == [6, 0, 3]
    idx.remove(0, a[4:6])  # a tail evicted
    assert idx.match(a) == [4, 0, 3]
    assert idx.match(chain(999, 4)) == [0, 0, 0]
    assert idx.match(()) == [0, 0, 0]


def test_pending_runs_extend_and_expire():
    idx = PrefixIndex(2, pending_ttl_s=10.0)
    a = chain(100, 10)
    idx.store(1, a[:4])
    idx.record(1, a[4:], now=0.0)  # routed there, not confirmed yet
    idx.record(0, a[:2], now=5.0)
    assert idx.match(a) == [2, 10]
    assert idx.match(a[:6] + (7, 8)) == [2, 6]  # a run matches up to where the request diverges
    idx.remove(1, a[:4])  # `removed` events do not touch pending runs ...
    assert idx.match(a) == [2, 0]  # ... but a run is only reachable from where it starts
    idx.store(1, a[:4])
    idx.expire(now=10.0)
    assert idx.match(a) == [2, 4]
    idx.expire(now=15.0)
    assert idx.match(a) == [0, 4] and idx.num_pending_runs(0) == 0


def test_affinity_runs_outlive_pending_ones_and_go_with_a_restart():
    """Runs no event will confirm (a chat's pages past its first image) expire after affinity_ttl_s, not pending_ttl_s;
    they continue a pending run or a confirmed prefix as pending runs do; a replica's restart (a new epoch at resync)
    and its going down drop them, a resync within one epoch (a gap) keeps them."""
    idx = PrefixIndex(2, pending_ttl_s=10.0, affinity_ttl_s=100.0)
    a = chain(100, 10)
    idx.store(1, a[:3])
    idx.record(1, a[3:5], now=0.0)  # the replica's own pages, not confirmed yet
    idx.record_affinity(1, a[5:], now=0.0)  # hashed by an image's source
    assert idx.match(a) == [0, 10]
    idx.expire(now=50.0)  # the pending run is gone: the affinity run starts where nothing reaches
    assert idx.match(a) == [0, 3]
    idx.store(1, a[3:5])  # the replica's events confirm its pages: the affinity run is reached again
    assert idx.match(a) == [0, 10]
    idx.expire(now=100.0)
    assert idx.match(a) == [0, 5] and idx.num_pending_runs(1) == 0
    feed = EventFeed(idx, 1)
    feed.resync({"epoch": "e1", "last_seq": 0, "block_hashes": {"": list(a[:5])}})
    idx.record_affinity(1, a[5:], now=200.0)
    feed.resync({"epoch": "e1", "last_seq": 0, "block_hashes": {"": list(a[:5])}})  # a gap: same epoch
    assert idx.match(a) == [0, 10]
    feed.resync({"epoch": "e2", "last_seq": 0, "block_hashes": {"": list(a[:5])}})  # restarted
    assert idx.match(a) == [0, 5] and idx.num_pending_runs(1) == 0


def test_drop_and_reset():
    idx = PrefixIndex(2)
    a = chain(1, 8)
    idx.store(0, a)
    idx.record(0, chain(50, 3), now=0.0)
    idx.store(1, a[:2])
    idx.drop(0)
    assert idx.match(a) == [0, 2] and idx.num_confirmed(0) == 0 and idx.num_pending_runs(0) == 0
    idx.reset(1, a[:5])
    assert idx.match(a) == [0, 5]


def test_host_tier_extends_the_match():
    """A replica continues its tree match in its host tier page by page (engine.host_cache): the index counts
    those pages as held, from `medium: "host"` events and cache_state's host_block_hashes."""
    idx = PrefixIndex(3)
    a = chain(100, 10)
    idx.apply_event(0, ev(1, "stored", a[:3]))
    idx.apply_event(0, {**ev(2, "stored", a[3:6] + a[7:9]), "medium": "host"})  # a[6] is in neither tier
    idx.apply_event(1, {**ev(1, "stored", a[:2]), "medium": "host"})  # host only: a match from the first page
    idx.store(2, a[5:], medium="host")  # unreachable: the pages before it are nowhere
    assert idx.match(a) == idx.match_linear(a) == [6, 2, 0]
    assert idx.num_confirmed(0) == 3 and idx.num_host(0) == 5
    idx.apply_event(0, {**ev(3, "removed", a[4:5]), "medium": "host"})
    assert idx.match(a) == [4, 2, 0]
    with pytest.raises(ValueError, match="medium 'disk'"):
        idx.apply_event(0, {**ev(4, "stored", a), "medium": "disk"})
    feed = EventFeed(idx, 1)
    feed.resync({"epoch": "e", "last_seq": 0, "block_hashes": {"": list(a[:1])}, "host_block_hashes": list(a[1:4])})
    assert idx.match(a)[1] == 4
    feed.drop()
    assert idx.match(a)[1] == 0 and idx.num_host(1) == 0


def test_a_recurrent_replica_counts_its_match_up_to_its_deepest_snapshot():
    """A replica of a model with linear attention layers resumes a prefix only where a snapshot of its recurrent
    states is (`medium: "snapshot"` events, cache_state's snapshot_block_hashes): its depth is cut back to the deepest
    matched hash it has one for, over tree and host pages alike; other replicas keep their whole match; pending runs
    still extend from the cut."""
    idx = PrefixIndex(3)
    a = chain(100, 10)
    for slot in range(3):
        idx.store(slot, a[:6])
    idx.store(1, a[6:8], medium="host")
    idx.apply_event(1, {**ev(1, "stored", (a[2], a[7], a[9])), "medium": "snapshot"})  # a[9]: past the match
    idx.apply_event(2, {**ev(1, "stored", ()), "medium": "snapshot"})  # recurrent, no snapshot yet
    assert idx.is_recurrent(1) and idx.is_recurrent(2) and not idx.is_recurrent(0)
    assert idx.match(a) == idx.match_linear(a) == [6, 8, 0]
    idx.apply_event(1, {**ev(2, "removed", a[7:8]), "medium": "snapshot"})
    assert idx.match(a) == idx.match_linear(a) == [6, 3, 0]
    idx.record(2, a[:5], now=0.0)  # routed there: its prefill will snapshot the prompt's last page boundary
    assert idx.match(a) == [6, 3, 5]
    feed = EventFeed(idx, 1)
    feed.resync({"epoch": "e", "last_seq": 0, "block_hashes": {"": list(a[:4])}, "recurrent": True,
                 "snapshot_block_hashes": [a[1]]})
    assert idx.match(a)[1] == 2
    feed.resync({"epoch": "e", "last_seq": 0, "block_hashes": {"": list(a[:4])}})  # (an attention model's replica)
    assert idx.match(a)[1] == 4 and not idx.is_recurrent(1)
    idx.drop(2)
    assert not idx.is_recurrent(2)


@pytest.mark.parametrize("seed", range(5))
def test_match_equals_linear_reference_on_real_cache_trees(seed):
    """Feed the index from HashCaches driven at random (inserts, evictions, pending records):
    the binary-search match equals the page-by-page one, and equals each cache's own match."""
    rng = random.Random(seed)
    n = 4
    caches = [HashCache() for _ in range(n)]
    idx = PrefixIndex(n, pending_ttl_s=3.0)
    heads = [chain(1000 * k, rng.randrange(1, 12)) for k in range(1, 6)]
    fresh = iter(range(10**6, 10**7))
    for step in range(400):
        seq = rng.choice(heads)[: rng.randrange(1, 12)] + tuple(next(fresh) for _ in range(rng.randrange(0, 4)))
        r = rng.randrange(n)
        op = rng.random()
        if op < 0.5:
            caches[r].insert(seq)
        elif op < 0.7:
            caches[r].evict(rng.randrange(1, 6))
        elif op < 0.8:
            idx.record(r, seq[rng.randrange(len(seq)):], now=step / 10)
        elif op < 0.9:  # a host tier: any pages, not closed under prefixes
            (idx.store if rng.random() < 0.6 else idx.remove)(r, seq[rng.randrange(len(seq)):], "host")
        elif op < 0.95 and r % 2:  # odd replicas recurrent: snapshots at some of the pages
            (idx.store if rng.random() < 0.7 else idx.remove)(r, rng.sample(seq, rng.randrange(len(seq) + 1)),
                                                              "snapshot")
        for slot, c in enumerate(caches):
            for kind, hashes in c.events:
                (idx.store if kind == "stored" else idx.remove)(slot, hashes)
            c.events.clear()
        idx.expire(step / 10)
        probe = rng.choice(heads)[: rng.randrange(1, 12)] + (next(fresh),)
        assert idx.match(probe) == idx.match_linear(probe)
        if not idx._runs and not any(idx.num_host(s) or idx.is_recurrent(s) for s in range(n)):
            assert idx.match(probe) == [c.match(probe)[1] for c in caches]


def feed_response(epoch, events, last_seq=None, gap=False):
    return {"epoch": epoch, "gap": gap, "events": events,
            "last_seq": last_seq if last_seq is not None else (events[-1]["seq"] if events else 0)}


def ev(seq, kind, hashes):
    return {"seq": seq, "kind": kind, "block_hashes": list(hashes), "parent_hash": None, "namespace": None}


def test_event_feed_apply_resync_gap_epoch():
    idx = PrefixIndex(2)
    feed = EventFeed(idx, 1)
    a = chain(10, 5)
    assert feed.apply(feed_response("e1", [ev(1, "stored", a)])) == "resync"  # never synced
    feed.resync({"epoch": "e1", "last_seq": 3, "block_hashes": {"": list(a[:2])}})
    assert feed.synced and feed.last_seq == 3 and idx.match(a) == [0, 2]
    # events after the snapshot apply in order; older (already in the snapshot) are skipped
    assert feed.apply(feed_response("e1", [ev(3, "removed", a[:2]), ev(4, "stored", a[2:4])])) == "done"
    assert idx.match(a) == [0, 4] and feed.last_seq == 4
    assert feed.apply(feed_response("e1", [ev(5, "removed", a[3:4])], last_seq=9)) == "more"
    assert idx.match(a) == [0, 3] and feed.last_seq == 5
    # a gap (events dropped) or a new epoch (restart) asks for a resync
    assert feed.apply(feed_response("e1", [], last_seq=20, gap=True)) == "resync"
    assert feed.apply(feed_response("e2", [ev(1, "stored", a)])) == "resync"
    feed.resync({"epoch": "e2", "last_seq": 0, "block_hashes": {"": [], "salt": [77]}})
    assert idx.match(a) == [0, 0] and idx.holds(1, 77)
    feed.drop()
    assert not feed.synced and idx.num_confirmed(1) == 0


def test_router_config(tmp_path):
    cfg = router_config_from_dict({"replicas": ["http://a:1/", "http://b:2"], "policy": "least_load"})
    assert cfg.replica_urls == ("http://a:1", "http://b:2")
    p = tmp_path / "r.yaml"
    p.write_text("router:\n  replicas: [http://x:1]\n  page_size: 32\n")
    cfg = load_router_config(str(p), ["policy=round_robin", "replicas=http://y:1,http://z:2"])
    assert cfg.policy == "round_robin" and cfg.page_size == 32 and cfg.replica_urls == ("http://y:1", "http://z:2")
    for bad in ({"replicas": "x:1"}, {"replicas": ""}, {"policy": "random"}, {"polcy": "x"},
                {"replicas": "http://a:1,http://a:1"}, {"page_size": 0}):
        with pytest.raises(ConfigKeyError):
            router_config_from_dict(bad)
    assert load_router_config("configs/router.yaml").policy == "prefix_aware"
