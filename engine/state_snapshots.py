"""The prefix cache's recurrent states (models with linear attention layers: Qwen3.5's Gated DeltaNet).

The radix tree's pages hold the attention layers' K/V of a prefix; a linear attention layer has no per-token memory
to page, only its state after the last token. So a prefix can be resumed only where a snapshot of every linear layer's
state was taken at its end. Snapshots live in state slots past the running sequences' (`States` on the device), named
by the chained block hash of the page they end (engine.block_hash: equal hashes, equal prefixes), here as host ints.

A match in the tree is cut back to its deepest page boundary with a snapshot (`usable`); the sequence's own slot
takes a copy of it before its first step. Steps take snapshots at page boundaries the scheduler picks (one per chunk,
inside the forward, `Chunk.snapshot`): where a prompt left a cached path (so the next prompt that shares this much
resumes there: a shared system prompt is computed twice, then served), the prompt's last page boundary (the same
prompt again: retries, n > 1), and each sequence's latest one (a conversation's next turn; a preempted sequence
resuming), which replaces the sequence's previous latest.

Slots are reused least recently used first; the tree's evicted pages take their snapshots with them (`drop`). With a
host tier, a snapshot leaving either way is copied to a host slot first (`on_evict`, engine.cache_tiers), and a prefix
can resume from there too.
"""
from __future__ import annotations

import collections
from typing import Callable


class StateSnapshots:
    """Snapshot slots by block hash, LRU. Host ints only, like the scheduler that owns it."""

    def __init__(self, first_slot: int, num_slots: int):
        self.first_slot, self.num_slots = first_slot, num_slots
        self._slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # hash -> slot, LRU first
        self._free = list(range(first_slot + num_slots - 1, first_slot - 1, -1))
        self._pending: set[int] = set()  # taken by the plan being built: written by its step, not readable before
        self._freed_after_plan: list[int] = []  # slots of pending snapshots dropped: no other writer in this step
        # (block hash, slot) of a written snapshot about to lose its slot (its page evicted, or the slot reused): the
        # host tier saves it before any step can overwrite the slot. None: no host tier.
        self.on_evict: Callable[[int, int], None] | None = None

    def __len__(self) -> int:
        return len(self._slot_of)

    def names(self):
        """The block hashes with a snapshot (being written by this plan's step included)."""
        return self._slot_of.keys()

    def usable(self, block_hash: int) -> bool:
        """A snapshot named so exists and a step before the next one writes it."""
        return block_hash in self._slot_of and block_hash not in self._pending

    def slot(self, block_hash: int) -> int:
        """The slot of a snapshot (now the most recently used)."""
        self._slot_of.move_to_end(block_hash)
        return self._slot_of[block_hash]

    def take(self, block_hash: int) -> int | None:
        """A slot for a new snapshot named `block_hash` (the least recently used one's when none is free); None if that
        snapshot exists already, or every slot is being written by this plan."""
        if block_hash in self._slot_of:
            return None
        slot = self._claim()
        if slot is not None:
            self._slot_of[block_hash] = slot
            self._pending.add(block_hash)
        return slot

    def reserve(self) -> int | None:
        """A slot for a snapshot whose name is not known yet (its last token is still being sampled), held out of the
        LRU until `name` or `release`; None if every slot is being written."""
        return self._claim()

    def _claim(self) -> int | None:
        """A free slot, else the least recently used snapshot's that this plan does not write; None if none."""
        if self._free:
            return self._free.pop()
        oldest = next((h for h in self._slot_of if h not in self._pending), None)
        if oldest is None:
            return None
        slot = self._slot_of.pop(oldest)
        if self.on_evict is not None:
            self.on_evict(oldest, slot)
        return slot

    def name(self, slot: int, block_hash: int) -> None:
        """A reserved slot's snapshot, named now (a later plan's: usable at once); a duplicate gives its slot back."""
        if block_hash in self._slot_of:
            self._free.append(slot)
        else:
            self._slot_of[block_hash] = slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def end_plan(self) -> None:
        self._pending.clear()
        self._free += self._freed_after_plan
        self._freed_after_plan = []

    def drop(self, hashes, save: bool = False) -> None:
        """The snapshots named by `hashes` go (their pages left the tree, or a newer one replaces them); `save`: those
        written go through `on_evict` first."""
        for h in hashes:
            slot = self._slot_of.pop(h, None)
            if slot is None:
                continue
            if h in self._pending:  # this plan's step still writes it: free once the plan is built
                self._pending.discard(h)
                self._freed_after_plan.append(slot)
            else:
                if save and self.on_evict is not None:
                    self.on_evict(h, slot)
                self._free.append(slot)

    def reset(self) -> None:
        self.drop(list(self._slot_of))

    def check_invariants(self, reserved: list[int] = ()) -> None:
        slots = list(self._slot_of.values()) + self._free + self._freed_after_plan + list(reserved)
        assert sorted(slots) == list(range(self.first_slot, self.first_slot + self.num_slots)), "a snapshot slot lost"
