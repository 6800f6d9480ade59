"""Exact per-replica prefix index: which chained block hashes each replica's radix cache holds.

A block hash names a whole prefix (it chains through every page before it, see engine.block_hash),
so "replica r can reuse the first k pages of a request" is exactly "r holds the request's first k
block hashes". Two kinds of entries per replica slot:

- confirmed[r]: a set mirrored from r's cache event feed ("stored" adds, "removed" drops),
  replaced by a /v1/cache_state snapshot on resync (gap or new epoch), emptied when r goes down.
  Updates are bulk set operations (C speed), whatever the number of pages an event names;
- host[r]: the hashes whose K/V wait in r's host tier (events with `medium: "host"`). r continues a
  request's tree match there page by page and copies those pages in instead of prefilling them, so
  `match` extends each replica's depth over the consecutive hashes its host tier holds. This set is
  not closed under prefixes (the host tier evicts by LRU), so the extension is a linear walk;
- snapshots[r], recurrent[r]: a replica of a model with linear attention layers (Qwen3.5, Granite 4.0-H) resumes a
  prefix only where a snapshot of its recurrent states was taken (engine.state_snapshots), so its depth is cut back to
  the deepest matched hash it has a snapshot for (events with `medium: "snapshot"`; a replica is recurrent once its
  cache_state says so or it reports a snapshot). Not closed under prefixes either: the cut is a walk back;
- pending runs: chains of hashes the router records the moment it routes a request to r (r
  stores those pages only after its prefill, and the event arrives a poll later), so a burst of
  one prefix keeps landing where the first request went. A run is kept whole, keyed by its first
  hash, and expires after a TTL: recording costs O(1), not O(pages);
- affinity runs: the same for hashes no event will confirm (a chat's pages from its first image on, hashed by the
  images' sources: RouteRequest.exact_pages), with a TTL of their own (affinity_ttl_s), so a later question about
  the same picture goes where the picture went. A replica that restarts (a new epoch) or goes down loses its runs.

NOTE (the invariant `match` relies on): a confirmed set is closed under prefixes. A radix tree
holds every ancestor of every page it holds, events are applied in order and snapshots are whole
trees, so if r holds a request's hash i it holds hashes 0..i-1 too. The reusable depth on r is
then found by binary search (O(log pages) lookups per replica holding the first page), and
`match_linear` is the page-by-page reference the tests compare it with.
`EventFeed` is one replica's cursor over its event feed.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Literal, Sequence


def common_run_len(run: tuple[int, ...], hashes: Sequence[int], start: int) -> int:
    """Length of the common prefix of `run` and hashes[start:], given run[0] == hashes[start].

    NOTE: binary search is exact because both are chains from the same parent: equal at page i
    means equal at every page before i.
    """
    k = len(run)
    if tuple(hashes[start : start + k]) == run:
        return k
    lo, hi = 1, min(k, len(hashes) - start)
    while lo < hi:
        mid = (lo + hi) // 2
        if hashes[start + mid] == run[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


class PrefixIndex:
    """Block hashes held per replica slot (0..num_replicas-1). Host data only, no I/O."""

    def __init__(self, num_replicas: int, pending_ttl_s: float = 30.0, affinity_ttl_s: float = 600.0) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.num_replicas = num_replicas
        self.pending_ttl_s = pending_ttl_s
        self.affinity_ttl_s = affinity_ttl_s
        self._confirmed: list[set[int]] = [set() for _ in range(num_replicas)]
        self._host: list[set[int]] = [set() for _ in range(num_replicas)]
        self._snapshots: list[set[int]] = [set() for _ in range(num_replicas)]
        self._recurrent = [False] * num_replicas
        self._runs: dict[int, list[tuple[int, tuple[int, ...], float]]] = {}  # first hash -> [(slot, run, expiry)]
        # NOTE: expiries are recorded in call order with a fixed TTL, so each deque is sorted (pending runs', affinity
        # runs').
        self._expiry: deque[tuple[float, int, tuple[int, tuple[int, ...], float]]] = deque()
        self._affinity_expiry: deque[tuple[float, int, tuple[int, tuple[int, ...], float]]] = deque()

    # --- reads ---------------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> list[int]:
        """Per slot, how many leading hashes of `hashes` it holds (pages of reusable prefix)."""
        depth = [0] * self.num_replicas
        n = len(hashes)
        if n:
            h0, hint = hashes[0], n  # hint: the last depth found; replicas often agree
            for slot, held in enumerate(self._confirmed):
                if h0 not in held:
                    continue
                if hashes[hint - 1] in held and (hint == n or hashes[hint] not in held):
                    depth[slot] = hint
                    continue
                lo, hi = 1, n  # hashes[lo - 1] held; the depth is the first i in [lo, n] not held
                while lo < hi:
                    mid = (lo + hi) // 2
                    if hashes[mid] in held:
                        lo = mid + 1
                    else:
                        hi = mid
                depth[slot] = hint = lo
        self._extend_with_host(hashes, depth)
        self._cut_to_snapshots(hashes, depth)
        if self._runs:
            self._extend_with_runs(hashes, depth)
        return depth

    def match_linear(self, hashes: Sequence[int]) -> list[int]:
        """Reference for `match`: page by page, no reliance on prefix closure (a page counts if either tier holds
        it: the device tier's closure means no device page follows a page only the host holds)."""
        depth = []
        for held, host in zip(self._confirmed, self._host):
            d = 0
            while d < len(hashes) and (hashes[d] in held or hashes[d] in host):
                d += 1
            depth.append(d)
        self._cut_to_snapshots(hashes, depth)
        if self._runs:
            self._extend_with_runs(hashes, depth)
        return depth

    def _extend_with_host(self, hashes: Sequence[int], depth: list[int]) -> None:
        for slot, host in enumerate(self._host):
            if host:
                d = depth[slot]
                while d < len(hashes) and hashes[d] in host:
                    d += 1
                depth[slot] = d

    def _cut_to_snapshots(self, hashes: Sequence[int], depth: list[int]) -> None:
        """A recurrent replica's depth, back to the deepest matched hash with a snapshot of its states (0: none)."""
        for slot, snapshots in enumerate(self._snapshots):
            if self._recurrent[slot]:
                d = depth[slot]
                while d and hashes[d - 1] not in snapshots:
                    d -= 1
                depth[slot] = d

    def _extend_with_runs(self, hashes: Sequence[int], depth: list[int]) -> None:
        runs, n = self._runs, len(hashes)
        todo = set(depth)  # distinct depths: one lookup each
        while todo:
            d = todo.pop()
            if d >= n:
                continue
            entries = runs.get(hashes[d])
            if not entries:
                continue
            for slot, run, _ in entries:
                if depth[slot] == d:
                    ext = common_run_len(run, hashes, d)
                    if d + ext > depth[slot]:
                        depth[slot] = d + ext
                        todo.add(d + ext)  # a later run may continue this one
            # NOTE: slots moved past d by one entry are not re-tested against d's other entries.

    def holds(self, slot: int, h: int) -> bool:
        """Confirmed (from events or a snapshot) only."""
        return h in self._confirmed[slot]

    def num_confirmed(self, slot: int) -> int:
        return len(self._confirmed[slot])

    def num_pending_runs(self, slot: int) -> int:
        return sum(1 for entries in self._runs.values() for e in entries if e[0] == slot)

    # --- writes --------------------------------------------------------------------------------

    def _held(self, slot: int, medium: str) -> set[int]:
        if medium == "snapshot":
            self._recurrent[slot] = True
            return self._snapshots[slot]
        return (self._host if medium == "host" else self._confirmed)[slot]

    def store(self, slot: int, hashes: Iterable[int], medium: str = "device") -> None:
        self._held(slot, medium).update(hashes)

    def remove(self, slot: int, hashes: Iterable[int], medium: str = "device") -> None:
        self._held(slot, medium).difference_update(hashes)

    def is_recurrent(self, slot: int) -> bool:
        return self._recurrent[slot]

    def num_host(self, slot: int) -> int:
        return len(self._host[slot])

    def record(self, slot: int, hashes: Sequence[int], now: float) -> None:
        """Optimistically mark `hashes` (a chain run) as held by `slot` until now + pending_ttl_s."""
        self._record(slot, hashes, now + self.pending_ttl_s, self._expiry)

    def record_affinity(self, slot: int, hashes: Sequence[int], now: float) -> None:
        """Mark `hashes` (a chain run no event will confirm: pages hashed by an image's source, RouteRequest.exact_pages)
        as held by `slot` until now + affinity_ttl_s."""
        self._record(slot, hashes, now + self.affinity_ttl_s, self._affinity_expiry)

    def _record(self, slot: int, hashes: Sequence[int], expiry: float, queue: deque) -> None:
        if not len(hashes):
            return
        entry = (slot, tuple(hashes), expiry)
        self._runs.setdefault(entry[1][0], []).append(entry)
        queue.append((entry[2], entry[1][0], entry))

    def expire(self, now: float) -> None:
        """Drop pending and affinity runs whose TTL has passed."""
        runs = self._runs
        for q in (self._expiry, self._affinity_expiry):
            while q and q[0][0] <= now:
                _, key, entry = q.popleft()
                entries = runs.get(key)
                if entries is not None:
                    entries[:] = [e for e in entries if e is not entry]
                    if not entries:
                        del runs[key]

    def reset(self, slot: int, hashes: Iterable[int], host_hashes: Iterable[int] = (), recurrent: bool = False,
              snapshot_hashes: Iterable[int] = ()) -> None:
        """Resync: `slot`'s confirmed set becomes exactly `hashes`, its host tier `host_hashes`, and (`recurrent`) its
        resumable prefixes `snapshot_hashes` (a cache_state snapshot)."""
        self._confirmed[slot] = set(hashes)
        self._host[slot] = set(host_hashes)
        self._snapshots[slot] = set(snapshot_hashes)
        self._recurrent[slot] = recurrent

    def drop(self, slot: int) -> None:
        """Forget everything about `slot` (it went down): confirmed entries and pending runs."""
        self._confirmed[slot] = set()
        self._host[slot] = set()
        self._snapshots[slot] = set()
        self._recurrent[slot] = False
        self.drop_runs(slot)

    def drop_runs(self, slot: int) -> None:
        """Forget `slot`'s pending and affinity runs (it went down, or restarted with an empty cache)."""
        for key in list(self._runs):
            kept = [e for e in self._runs[key] if e[0] != slot]
            if kept:
                self._runs[key] = kept
            else:
                del self._runs[key]

    def apply_event(self, slot: int, event: dict[str, Any]) -> None:
        """One cache event as the replicas publish it ({"kind", "block_hashes", "medium", ...}; no medium: device)."""
        kind, medium = event["kind"], event.get("medium", "device")
        if medium not in ("device", "host", "snapshot"):
            raise ValueError(f"unknown cache event medium {medium!r}")
        if kind == "stored":
            self.store(slot, event["block_hashes"], medium)
        elif kind == "removed":
            self.remove(slot, event["block_hashes"], medium)
        else:
            raise ValueError(f"unknown cache event kind {kind!r}")


class EventFeed:
    """One replica's cursor over its /v1/cache_events feed, applying what it reads to the index.

    The feed is trusted only within one epoch and without gaps: a new epoch (the replica restarted)
    or `gap: true` (events were dropped) asks for a resync from /v1/cache_state, whose `last_seq`
    the next poll continues after.
    """

    def __init__(self, index: PrefixIndex, slot: int) -> None:
        self.index = index
        self.slot = slot
        self.epoch: str | None = None  # None: never synced, or dropped since
        self.last_seq = 0

    @property
    def synced(self) -> bool:
        return self.epoch is not None

    def apply(self, response: dict[str, Any]) -> Literal["resync", "more", "done"]:
        """Apply a /v1/cache_events?after=last_seq response.

        "resync": fetch /v1/cache_state and call `resync`; "more": the replica has more events
        (poll again now); "done": caught up.
        """
        if self.epoch is None or response["epoch"] != self.epoch or response.get("gap"):
            return "resync"
        for event in response["events"]:
            seq = event["seq"]
            if seq <= self.last_seq:
                continue  # already applied (an overlapping poll)
            self.index.apply_event(self.slot, event)
            self.last_seq = seq
        return "more" if response["last_seq"] > self.last_seq else "done"

    def resync(self, state: dict[str, Any]) -> None:
        """Replace this replica's confirmed hashes with a /v1/cache_state snapshot (a new epoch after a known one: the
        replica restarted, so what the router recorded for it is gone too)."""
        if self.epoch is not None and state["epoch"] != self.epoch:
            self.index.drop_runs(self.slot)
        self.index.reset(self.slot, (h for hashes in state["block_hashes"].values() for h in hashes),
                         state.get("host_block_hashes", ()), state.get("recurrent", False),
                         state.get("snapshot_block_hashes", ()))
        self.epoch = state["epoch"]
        self.last_seq = state["last_seq"]

    def drop(self) -> None:
        """The replica went down: forget its entries; the next contact resyncs."""
        self.index.drop(self.slot)
        self.epoch = None
        self.last_seq = 0
