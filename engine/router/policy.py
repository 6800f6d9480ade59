"""Routing policies: a request's block hashes + what the router knows of each replica -> a replica.

The live router (engine.router.forward) and the simulator (engine.router.simulator) call the same
objects: `policy.route(request, replicas, now, exclude)`. Policies own no I/O; the caller keeps
`ReplicaState` current (up/down, in-flight requests, queued prefill tokens, the replica's own
/load report) and the `PrefixIndex` fed from cache events.

prefix_aware, per request:
1. match the request's block hashes against the index: pages of reusable prefix per replica;
2. cost of sending it to replica r, in prefill-token equivalents:
       prefill_weight * (prompt_len - matched_len[r]) + backlog_tokens[r]
           + request_cost_tokens * in_flight[r]
   i.e. the prefill r would still compute, plus what r already has queued. prefill_weight > 1
   (default 2) because recomputing a prefix costs twice: this request waits for it, and the whole
   cluster loses that compute and a second copy of the prefix takes cache from others (in the
   simulator, weight 1 halves the many-groups hit rate: requests leave the replica holding their
   prefix whenever its queue is one prefill longer);
3. hot-spot guard: if the replica holding the longest prefix carries more than
   hot_spot_ratio * mean in-flight + hot_spot_slack, the prefix is not allowed to pin the
   request there: pick the least loaded replica instead (tie-break by cost), so one popular
   prefix spreads over more replicas instead of queueing on one;
4. record the request's unmatched hashes on the chosen replica as pending (optimistic), so the
   next request with this prefix finds it before the replica's event feed confirms it.
"""
from __future__ import annotations

import dataclasses
from typing import Collection, Sequence

from engine.router.index import PrefixIndex


class NoReplicaAvailable(RuntimeError):
    """Every replica is down or was already tried for this request."""


@dataclasses.dataclass(frozen=True, slots=True)
class RouteRequest:
    block_hashes: tuple[int, ...]  # engine.block_hash.page_hashes of the prompt, one per full page
    prompt_len: int  # tokens
    # How many leading hashes are the replicas' own (None: all). A chat with images: the pages up to its first image;
    # the rest hash each image by its source (engine/router/prompts.py), which no replica's events will confirm: they
    # are recorded as affinity runs (PrefixIndex.record_affinity), so a later question about the same picture goes
    # where it went.
    exact_pages: int | None = None

    @property
    def exact_hashes(self) -> tuple[int, ...]:
        """The hashes the replicas' own caches may hold."""
        return self.block_hashes if self.exact_pages is None else self.block_hashes[: self.exact_pages]


@dataclasses.dataclass(slots=True)
class ReplicaState:
    """What a policy sees of one replica; the router (or the simulator) keeps it current."""

    up: bool = True
    in_flight: int = 0  # requests this router sent there that have not finished
    queued_tokens: int = 0  # prefill tokens this router sent there whose first token is not back
    waiting_tokens: int = 0  # the replica's own report (GET /load), 0 when unknown

    @property
    def backlog_tokens(self) -> int:
        return max(self.queued_tokens, self.waiting_tokens)


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    replica: int
    matched_len: int  # prompt tokens the chosen replica already holds, per the index (0 if unused)
    reason: str  # round_robin | least_load | prefix | cost | hot_spot


def _candidates(replicas: Sequence[ReplicaState], exclude: Collection[int]) -> list[int]:
    cands = [i for i, r in enumerate(replicas) if r.up and i not in exclude]
    if not cands:
        raise NoReplicaAvailable("no replica is up (or all were tried)")
    return cands


class RoundRobin:
    name = "round_robin"
    uses_index = False

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaState], now: float,
              exclude: Collection[int] = ()) -> Choice:
        n = len(replicas)
        i = min(_candidates(replicas, exclude), key=lambda i: (i - self._next) % n)  # next in rotation
        self._next = i + 1
        return Choice(i, 0, self.name)


class LeastLoad:
    """Fewest in-flight requests (sent by this router); ties by backlog tokens, then rotation."""

    name = "least_load"
    uses_index = False

    def __init__(self) -> None:
        self._turn = 0

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaState], now: float,
              exclude: Collection[int] = ()) -> Choice:
        n = len(replicas)
        self._turn += 1
        turn = self._turn
        best = min(_candidates(replicas, exclude),
                   key=lambda i: (replicas[i].in_flight, replicas[i].backlog_tokens, (i - turn) % n))
        return Choice(best, 0, self.name)


class PrefixAware:
    name = "prefix_aware"
    uses_index = True

    def __init__(self, index: PrefixIndex, page_size: int, prefill_weight: float = 2.0,
                 request_cost_tokens: int = 32, hot_spot_ratio: float = 1.25,
                 hot_spot_slack: int = 4) -> None:
        self.index = index
        self.prefill_weight = prefill_weight
        self.page_size = page_size
        self.request_cost_tokens = request_cost_tokens
        self.hot_spot_ratio = hot_spot_ratio
        self.hot_spot_slack = hot_spot_slack
        self._turn = 0

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaState], now: float,
              exclude: Collection[int] = ()) -> Choice:
        self.index.expire(now)
        depth = self.index.match(request.block_hashes)  # pages held, per replica
        ps, w, rc, n = self.page_size, self.prefill_weight, self.request_cost_tokens, len(replicas)
        self._turn += 1
        turn = self._turn % n  # rotation: among equal costs, spread instead of always taking slot 0
        plen = request.prompt_len
        # One pass (this runs per request at 1M-request simulator scale): the replica holding the
        # longest prefix and its load (ties: fewer in flight), total load, and the cheapest replica.
        prefix_depth, prefix_load = -1, 0
        total_load = num_up = 0
        best_i, best_cost, best_rot = -1, 0.0, 0
        for i, r in enumerate(replicas):
            if not r.up or i in exclude:
                continue
            d, load = depth[i], r.in_flight
            num_up += 1
            total_load += load
            if d > prefix_depth or (d == prefix_depth and load < prefix_load):
                prefix_depth, prefix_load = d, load
            backlog = r.queued_tokens if r.queued_tokens > r.waiting_tokens else r.waiting_tokens
            cost = w * (plen - d * ps) + backlog + rc * load
            rot = (i - turn) % n
            if best_i < 0 or cost < best_cost or (cost == best_cost and rot < best_rot):
                best_i, best_cost, best_rot = i, cost, rot
        if best_i < 0:
            raise NoReplicaAvailable("no replica is up (or all were tried)")
        if prefix_depth > 0 and prefix_load > self.hot_spot_ratio * total_load / num_up + self.hot_spot_slack:
            # Hot spot: least loaded replica, ties by cost.
            def key(i: int) -> tuple[int, float, int]:
                r = replicas[i]
                return (r.in_flight, w * (plen - depth[i] * ps) + r.backlog_tokens + rc * r.in_flight,
                        (i - turn) % n)
            choice = min(_candidates(replicas, exclude), key=key)
            reason = "hot_spot"
        else:
            choice = best_i
            reason = "prefix" if depth[choice] > 0 else "cost"
        matched = depth[choice]
        # NOTE: only the unmatched tail is recorded; the matched head is already in the index.
        exact = len(request.block_hashes) if request.exact_pages is None else request.exact_pages
        self.index.record(choice, request.block_hashes[matched:exact], now)
        self.index.record_affinity(choice, request.block_hashes[max(matched, exact):], now)
        return Choice(choice, min(matched * ps, plen), reason)


def make_policy(name: str, index: PrefixIndex | None = None, page_size: int = 16,
                prefill_weight: float = 2.0, request_cost_tokens: int = 32,
                hot_spot_ratio: float = 1.25, hot_spot_slack: int = 4) -> RoundRobin | LeastLoad | PrefixAware:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_load":
        return LeastLoad()
    if name == "prefix_aware":
        if index is None:
            raise ValueError("prefix_aware needs a PrefixIndex")
        return PrefixAware(index, page_size, prefill_weight, request_cost_tokens, hot_spot_ratio,
                           hot_spot_slack)
    raise ValueError(f"unknown policy {name!r} (allowed: round_robin, least_load, prefix_aware)")
