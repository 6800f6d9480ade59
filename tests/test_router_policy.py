"""Routing policies on host data: no HTTP, no model."""
import pytest

from engine.router.index import PrefixIndex
from engine.router.policy import (NoReplicaAvailable, ReplicaState, RouteRequest, make_policy)

PS = 16


def req(start, n_pages, extra=5):
    return RouteRequest(tuple(range(start, start + n_pages)), n_pages * PS + extra)


def test_round_robin_cycles_and_skips_down():
    rr = make_policy("round_robin")
    states = [ReplicaState() for _ in range(3)]
    assert [rr.route(req(0, 1), states, 0).replica for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    states[1].up = False
    assert [rr.route(req(0, 1), states, 0).replica for _ in range(4)] == [0, 2, 0, 2]
    assert rr.route(req(0, 1), states, 0, exclude={0}).replica == 2
    for s in states:
        s.up = False
    with pytest.raises(NoReplicaAvailable):
        rr.route(req(0, 1), states, 0)


def test_least_load_picks_fewest_in_flight_then_backlog():
    ll = make_policy("least_load")
    states = [ReplicaState(in_flight=3), ReplicaState(in_flight=1, waiting_tokens=500),
              ReplicaState(in_flight=1, queued_tokens=10)]
    assert ll.route(req(0, 1), states, 0).replica == 2
    assert ll.route(req(0, 1), states, 0, exclude={2}).replica == 1


def test_prefix_aware_picks_the_replica_holding_the_prefix():
    idx = PrefixIndex(4)
    pa = make_policy("prefix_aware", idx, PS)
    idx.store(2, range(100, 164))  # replica 2 holds a 64-page system prompt
    idx.store(0, range(100, 104))  # replica 0 only its first 4 pages
    states = [ReplicaState(in_flight=1) for _ in range(4)]
    c = pa.route(req(100, 70), states, now=0.0)
    assert (c.replica, c.matched_len, c.reason) == (2, 64 * PS, "prefix")
    # a request without any cached prefix goes by cost: the least backlog
    states[3].queued_tokens = 0
    for i in (0, 1, 2):
        states[i].queued_tokens = 5000
    c = pa.route(req(5000, 10), states, now=0.0)
    assert (c.replica, c.reason) == (3, "cost")


def test_prefix_aware_bursts_stick_before_events_arrive():
    idx = PrefixIndex(3)
    pa = make_policy("prefix_aware", idx, PS)
    states = [ReplicaState() for _ in range(3)]
    first = pa.route(req(7000, 100), states, now=0.0).replica
    states[first].in_flight += 1
    states[first].queued_tokens += 1600
    # the same prefix again, before any cache event: the optimistic record pulls it to `first`
    shared = tuple(range(7000, 7100))
    c = pa.route(RouteRequest(shared + (1, 2), 102 * PS), states, now=1.0)
    assert c.replica == first and c.matched_len == 100 * PS
    # after the pending TTL without confirmation, the record is gone
    idx.expire(now=1000.0)
    assert idx.match(shared)[first] == 0


def test_prefix_aware_records_a_chats_pages_past_its_first_image_as_affinity():
    """A chat with an image: its exact pages (before the image) are recorded as a pending run, the rest (hashed by the
    image's source) as an affinity run, so another question about the picture minutes later, after the pending TTL,
    still goes where the picture went, though that replica is busier."""
    idx = PrefixIndex(3, pending_ttl_s=30.0, affinity_ttl_s=600.0)
    pa = make_policy("prefix_aware", idx, PS)
    states = [ReplicaState() for _ in range(3)]
    system, image = tuple(range(100, 104)), tuple(range(9000, 9020))  # 4 pages of text, then the picture's 20 pages
    first = pa.route(RouteRequest(system + image + (1,), 25 * PS, exact_pages=4), states, now=0.0).replica
    idx.store(first, system)  # the replica's events confirm its own pages, never the picture's hashes
    states[first].in_flight, states[first].queued_tokens = 1, 200
    idx.expire(now=300.0)  # past the pending TTL
    c = pa.route(RouteRequest(system + image + (2, 3), 26 * PS, exact_pages=4), states, now=300.0)
    assert (c.replica, c.matched_len, c.reason) == (first, 24 * PS, "prefix")
    other = pa.route(RouteRequest(system + tuple(range(8000, 8020)), 24 * PS, exact_pages=4), states, now=300.0)
    assert other.matched_len == (4 * PS if other.replica == first else 0)  # another picture: the text alone
    idx.expire(now=1000.0)  # past the affinity TTL
    assert idx.match(system + image)[first] == 4


def test_hot_spot_guard_spreads_one_popular_prefix():
    idx = PrefixIndex(4)
    pa = make_policy("prefix_aware", idx, PS, hot_spot_ratio=1.25, hot_spot_slack=4)
    idx.store(0, range(100, 164))
    states = [ReplicaState(in_flight=20), ReplicaState(in_flight=2), ReplicaState(in_flight=1),
              ReplicaState(in_flight=3)]
    # mean in flight 6.5: 20 > 1.25 * 6.5 + 4, so the prefix may not pin the request to replica 0
    c = pa.route(req(100, 70), states, now=0.0)
    assert (c.replica, c.reason) == (2, "hot_spot")
    # replica 2 now holds this prompt too (pending), so the same prompt again stays there
    c = pa.route(req(100, 70), states, now=0.0)
    assert (c.replica, c.reason, c.matched_len) == (2, "prefix", 70 * PS)
    # below the threshold the prefix wins despite the higher load
    idx2 = PrefixIndex(4)
    idx2.store(0, range(100, 164))
    pa2 = make_policy("prefix_aware", idx2, PS, hot_spot_ratio=1.25, hot_spot_slack=4)
    states[0].in_flight = 6
    c = pa2.route(req(100, 70), states, now=0.0)
    assert (c.replica, c.reason) == (0, "prefix")


def test_hot_spot_guard_in_a_burst():
    """One prefix, many requests, none finishing: traffic spreads instead of piling on one replica."""
    idx = PrefixIndex(4)
    pa = make_policy("prefix_aware", idx, PS)
    states = [ReplicaState() for _ in range(4)]
    counts = [0] * 4
    for i in range(200):
        c = pa.route(RouteRequest(tuple(range(100, 164)) + (10**6 + i,), 65 * PS), states, now=i * 0.01)
        states[c.replica].in_flight += 1
        counts[c.replica] += 1
    assert max(counts) < 0.5 * 200 and min(counts) > 0


def test_make_policy_errors():
    with pytest.raises(ValueError):
        make_policy("prefix_aware")
    with pytest.raises(ValueError):
        make_policy("random")
