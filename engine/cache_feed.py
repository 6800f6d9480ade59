"""The cache-events feed a replica publishes for the router: numbered radix-cache events + the set they add up to.

Contract (the router codes against exactly this):
  GET /v1/cache_events?after=N -> {"epoch", "last_seq", "gap", "events": [{"seq", "kind", "block_hashes",
                                   "parent_hash", "namespace", "medium"}, ...]}   events with seq > N, oldest first
  GET /v1/cache_state          -> {"epoch", "last_seq", "block_hashes": {"<namespace or ''>": [hash, ...]},
                                   "host_block_hashes": [hash, ...], "recurrent": bool,
                                   "snapshot_block_hashes": [hash, ...]}

`medium` is "device" for the radix tree's pages and "host" for its host tier (cache.host_memory_gb): pages whose
K/V wait in host memory, which a request reuses by a copy instead of a prefill. A hash can be in both.
`recurrent`: the model has linear attention layers (Qwen3.5, Granite 4.0-H), whose state a request can resume only
after a prefix with a snapshot of it (engine.state_snapshots); "snapshot" events and `snapshot_block_hashes` name
those prefixes (a snapshot on the device or in the host tier), and a router counts a match only up to the deepest.

`epoch` is fixed for this process: a subscriber that sees it change, or `gap: true` (the events after
N already left the ring buffer, or N is ahead of `last_seq`), resyncs from /v1/cache_state.
Sequence numbers start at 1 and have no holes; `cache_state` reflects exactly the events up to its
`last_seq`.
"""
from __future__ import annotations

import threading
import uuid
from typing import Iterable

MAX_EVENTS_PER_CALL = 10_000


class CacheEventFeed:
    """Thread safe: the engine thread `publish`es, HTTP handlers read."""

    def __init__(self, capacity: int = 200_000, recurrent: bool = False):
        self.epoch = uuid.uuid4().hex
        self.recurrent = recurrent
        self.capacity = capacity
        self._lock = threading.Lock()
        self._events: list[dict] = []  # NOTE: seqs are _first_seq, _first_seq + 1, ... without holes
        self._first_seq = 1
        self._last_seq = 0
        self._state: dict[str, set[int]] = {}  # namespace ("" for None) -> block hashes held now
        self._host: set[int] = set()  # block hashes in the host tier now
        self._snapshots: set[int] = set()  # block hashes with a snapshot of the recurrent states now

    def publish(self, events: Iterable) -> None:
        """Appends radix-cache `CacheEvent`s (kind, block_hashes, parent_hash, namespace) in order."""
        with self._lock:
            for e in events:
                self._last_seq += 1
                hashes = [int(h) for h in e.block_hashes]
                self._events.append({
                    "seq": self._last_seq,
                    "kind": e.kind,
                    "block_hashes": hashes,
                    "parent_hash": e.parent_hash,
                    "namespace": e.namespace,
                    "medium": e.medium,
                })
                if e.medium in ("host", "snapshot"):
                    held = self._host if e.medium == "host" else self._snapshots
                    (held.update if e.kind == "stored" else held.difference_update)(hashes)
                    continue
                held = self._state.setdefault(e.namespace or "", set())
                if e.kind == "stored":
                    held.update(hashes)
                else:
                    held.difference_update(hashes)
                    if not held:
                        del self._state[e.namespace or ""]
            # Trim in batches so publishing stays amortized O(1) per event.
            excess = len(self._events) - self.capacity
            if excess > self.capacity // 4:
                del self._events[:excess]
                self._first_seq += excess

    def events_after(self, after: int, limit: int = MAX_EVENTS_PER_CALL) -> dict:
        with self._lock:
            retained_from = max(self._first_seq, self._last_seq - self.capacity + 1)
            gap = after + 1 < retained_from or after > self._last_seq
            start = max(after + 1, retained_from) - self._first_seq
            events = self._events[start : start + limit] if after <= self._last_seq else []
            return {"epoch": self.epoch, "last_seq": self._last_seq, "gap": gap, "events": events}

    def state(self) -> dict:
        with self._lock:
            return {
                "epoch": self.epoch,
                "last_seq": self._last_seq,
                "block_hashes": {ns: sorted(h) for ns, h in self._state.items()},
                "host_block_hashes": sorted(self._host),
                "recurrent": self.recurrent,
                "snapshot_block_hashes": sorted(self._snapshots),
            }
