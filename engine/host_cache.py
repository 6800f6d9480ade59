"""The host tier of the prefix cache: KV pages the radix tree evicts from the device, kept in host memory.

Device memory bounds how much of a workload's shared prefixes the radix tree can keep; host memory is
usually many times larger. With `cache.host_memory_gb` > 0 a page the tree evicts is copied to a host
slot before the pool hands it out again, named by its chained block hash (`engine.block_hash`, which
covers the namespace and every token before the page, so equal hashes mean equal K/V). A prompt whose
tree match ends early continues its match here, page by page, and those pages are copied back into
fresh device pages before the step that reads them: a copy instead of a prefill.

`HostPageIndex` is the host-side bookkeeping only (ints: hash -> slot, LRU). The scheduler decides
what to save and load; the runner moves the bytes (`ModelRunner` keeps the slots' arrays).
"""
from __future__ import annotations

import collections

from engine.radix_cache import CacheEvent


class HostPageIndex:
    """Which block hashes have their KV in which host slot; least recently used slots are reused first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slots: collections.OrderedDict[int, int] = collections.OrderedDict()  # hash -> slot, LRU first
        self._free = list(range(num_slots - 1, -1, -1))
        self._events: list[tuple[str, int]] = []  # ("stored" | "removed", hash) in order, for the router's feed
        self.record_events = True  # False: keep no events (nobody drains them: an offline engine)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slots

    def hashes(self):
        """The block hashes held."""
        return self._slots.keys()

    def lookup(self, block_hash: int) -> int | None:
        """The slot holding `block_hash` (now the most recently used), or None."""
        slot = self._slots.get(block_hash)
        if slot is not None:
            self._slots.move_to_end(block_hash)
        return slot

    def store(self, block_hash: int, avoid: set[int] = frozenset()) -> int | None:
        """A slot to copy the page named `block_hash` into, taking the least recently used one (not in `avoid`: slots
        still to be read) when all are in use. None when the page is here already (K/V of a hash never change), or
        no slot can be taken."""
        if block_hash in self._slots:
            self._slots.move_to_end(block_hash)
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((h for h, s in self._slots.items() if s not in avoid), None)
            if victim is None:
                return None
            slot = self._slots.pop(victim)
            if self.record_events:
                self._events.append(("removed", victim))
        self._slots[block_hash] = slot
        if self.record_events:
            self._events.append(("stored", block_hash))
        return slot

    def reset(self) -> None:
        if self.record_events:
            self._events.extend(("removed", h) for h in self._slots)
        self._slots.clear()
        self._free = list(range(self.num_slots - 1, -1, -1))

    def drain_events(self) -> list[CacheEvent]:
        """Hashes that entered or left the host tier since the last call, as at most two `medium="host"` cache events:
        "removed" then "stored", each hash under its last change (the tier is a set, not a tree: nothing orders one
        hash's events against another's, and a full tier swaps one hash for another on every save). A tier that kept
        no events (`record_events` False) starts keeping them here, reporting what it holds now."""
        if not self.record_events:  # kept none so far: this first drain reports what the tier holds now
            self.record_events = True
            self._events = [("stored", h) for h in self._slots]
        last = dict((h, kind) for kind, h in self._events)
        self._events.clear()
        return [CacheEvent(kind, hashes, None, None, medium="host")  # type: ignore[arg-type]
                for kind in ("removed", "stored") if (hashes := tuple(h for h, k in last.items() if k == kind))]
