"""The copies of KV pages around a step, and the host side of the cache's tiers.

Before a step's forward the runner hands its cache here (`apply`), in this order:
  0. slot moves: the K/V of accepted draft-tree nodes off the tree's first branch, to their positions (before anything
     reads pages the tree may have stored with them);
  1. disk saves: pages the tree stored, gathered and copied to the host asynchronously, for the disk tier's writer;
  2. host saves: pages the tree evicted, gathered and copied out to their host slots (engine.host_cache);
  3. host loads: host slots scattered into the pages of prompts that hit them;
  4. copy-on-write: a shared last page copied into a sequence's private one;
  5. disk loads: pages read from disk scattered into fresh pages (after the copies: a copy-on-write source's window
     slot is held by the tree only, and the same plan may hand it to a page read from disk).
Saved pages land in host memory at the next fetch (`land`). A model with linear attention layers moves snapshots of
its recurrent states the same way (`apply_states`): those the device lets go out to host state slots, those prompts
resume from back into their sequences' state slots. The cache is a tuple of arrays [L, Hkv, P, ...] (K and V
pages, and an 8-bit cache's scales): a page is index P of each; a hybrid cache (llama.HybridLayout) is one stack whose
windowed layers' entries are window slots, so its pages move as [L, n] entries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


COPY_FIELDS = ("slot_moves", "copies", "host_saves", "host_loads", "disk_saves", "disk_loads")  # StepArrays' fields `pack` fills


class PageCopies:
    """Page copies of a step and the tiers' host side. `to_device`: the runner's (replicated over a mesh)."""

    def __init__(self, kv_shapes, num_pages: int, num_host_pages: int, layout, disk, to_device, state_shapes=None,
                 num_state_slots: int = 0, disk_states=None):
        """state_shapes: a model with linear attention layers, the shapes of its states' arrays (a pytree, the slot axis
        1) with the host tier's state slots (none without a host tier); num_state_slots: the device's; disk_states: the
        disk tier's files of snapshots (engine.disk_cache.DiskCache, one state slot [Lg, 1, ...] per file)."""
        self.disk_states = disk_states
        self.num_pages = num_pages
        self.page_size = kv_shapes[0][0][3]
        self.num_state_slots = num_state_slots
        self.layout = layout
        self.disk = disk  # engine.disk_cache.DiskCache, or None
        self._to_device = to_device
        # Host tier: slots in host memory for every cache array, [L, Hkv, slots, ...] like the cache (np.zeros maps
        # untouched memory lazily); saves copy device pages out asynchronously and land here at the next fetch.
        self.host_kv = tuple(np.zeros(s[:2] + (num_host_pages,) + s[3:], d) for s, d in kv_shapes) \
            if num_host_pages else None
        self._pending_saves: list[tuple[np.ndarray, tuple[jax.Array, ...]]] = []
        # ... and snapshots of recurrent states, [Lg, slots, ...] per state array, float32
        self.host_states = (jax.tree.map(lambda shape: np.zeros(shape, np.float32), state_shapes,
                                         is_leaf=lambda x: isinstance(x, tuple)) if state_shapes is not None else None)
        self._state_tree = None if state_shapes is None else jax.tree.structure(self.host_states)
        self._pending_states: list[tuple[np.ndarray, object]] = []
        self._pending_disk_states: list[tuple[str | None, tuple[int, ...], object]] = []
        # Disk tier: pages gathered and copied to the host asynchronously, handed to the disk's writer at the next
        # fetch (with the layout key they were computed under: new weights make the pages of the old ones worthless).
        self._pending_disk: list[tuple[str | None, tuple[int, ...], tuple[jax.Array, ...]]] = []
        self._copy = jax.jit(_copy_pages, donate_argnums=0)
        self._move = jax.jit(_move_slots, donate_argnums=0, static_argnames="page_size")
        self._gather = jax.jit(_gather_pages)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=0)
        self._gather_entries = jax.jit(_gather_entries)
        self._scatter_entries = jax.jit(_scatter_entries, donate_argnums=0)
        self._gather_states = jax.jit(_gather_states)
        self._scatter_states = jax.jit(_scatter_states, donate_argnums=0)

    # ------------------------------------------------------------------------------ host side of a plan
    def pack(self, plan) -> dict:
        """The plan's copies as padded host arrays, StepArrays' fields: copies, host_saves, host_loads, disk_saves,
        disk_loads (None where the plan has none)."""
        if self.layout is None:
            copies = self._pack_pairs(plan.page_copies, fill=(0, self.num_pages))  # padding dropped
        else:
            copies = self._pack_pairs(self.layout.flat_pairs(plan.page_copies, plan.window_copies),
                                      fill=(0, self.layout.size))
        return {"slot_moves": self._pack_moves(plan.slot_moves),  # COPY_FIELDS
                "copies": copies,
                "host_saves": self._pack_pairs(plan.host_saves, fill=(0, -1)),  # padding: page 0 read, dropped on landing
                "host_loads": self._pack_pairs(plan.host_loads, fill=(0, self.num_pages)),  # padding: out of range
                "disk_saves": self._pack_disk_saves(plan.disk_saves),
                "disk_loads": self._pack_disk_loads(plan.disk_loads)}

    def pack_states(self, plan) -> dict:
        """The plan's moves of recurrent states between the device and the host tier, StepArrays' fields."""
        return {"state_saves": self._pack_pairs(plan.state_saves, fill=(0, -1)),  # padding: slot 0 read, dropped
                "state_loads": self._pack_pairs(plan.state_loads, fill=(0, self.num_state_slots)),  # out of range
                "state_disk_saves": self._pack_state_disk_saves(plan.state_disk_saves),
                "state_disk_loads": self._pack_state_disk_loads(plan.state_disk_loads)}

    def _pack_state_disk_saves(self, saves: list[tuple[int, int]]) -> tuple[np.ndarray, tuple[int, ...]] | None:
        """(snapshot slots padded to a power of two with slot 0, the block hashes of the real ones)."""
        if not saves:
            return None
        slots = np.zeros(1 << (len(saves) - 1).bit_length(), np.int32)
        slots[: len(saves)] = [slot for slot, _ in saves]
        return slots, tuple(h for _, h in saves)

    def _pack_state_disk_loads(self, loads: list[tuple[tuple[np.ndarray, ...], int]]):
        """(each state array's snapshots [Lg, n, ...], the state slots they go to), n padded to a power of two (padding
        slots out of range: dropped)."""
        if not loads:
            return None
        n = 1 << (len(loads) - 1).bit_length()
        payloads, slots = zip(*loads)
        pad = [tuple(np.zeros_like(a) for a in payloads[0])] * (n - len(loads))
        arrays = tuple(np.concatenate(column, axis=1) for column in zip(*payloads, *pad))
        where = np.full(n, self.num_state_slots, np.int32)
        where[: len(loads)] = slots
        return jax.tree.unflatten(self._state_tree, arrays), where

    # ------------------------------------------------------------------------------ device side
    def apply(self, kv, step) -> tuple:
        """Dispatches a step's copies (its StepArrays) on the cache, in the module's order; returns the cache."""
        if step.slot_moves is not None:
            kv = self._move(kv, *self._to_device(step.slot_moves), page_size=self.page_size)
        if step.disk_saves is not None:  # before anything below can overwrite them (pages evicted since)
            self._dispatch_disk_saves(kv, *step.disk_saves)
        if step.host_saves is not None:  # before anything below can overwrite the evicted pages
            pages, slots = step.host_saves
            saved = self._gather(kv, self._to_device(pages))
            for a in saved:
                a.copy_to_host_async()
            self._pending_saves.append((slots, saved))
        if step.host_loads is not None:
            slots, pages = step.host_loads
            self.land()  # a load may read a slot saved by this or a recent step
            loaded = tuple(h[:, :, slots] for h in self.host_kv)
            kv = self._scatter(kv, *self._to_device((loaded, pages)))
        if step.copies is not None:
            kv = self._copy(kv, *self._to_device(step.copies))
        # NOTE: after the copies: a copy-on-write source's window slot is held by the tree only, and may be handed to
        # a page this plan reads from disk (a hybrid cache).
        if step.disk_loads is not None:
            scatter = self._scatter if self.layout is None else self._scatter_entries
            kv = scatter(kv, *self._to_device(step.disk_loads))
        return kv

    def gather_pages(self, kv, pages: list[int], slots: list[int]) -> tuple:
        """Each cache array's `pages` (page ids), every layer: [L, Hkv, len(pages), ...], dispatched now; in a hybrid
        cache the windowed layers' entries from the pages' window `slots` (-1: none, those entries undefined)."""
        if self.layout is None:
            return self._gather(kv, self._to_device(np.array(pages, np.int32)))
        return self._gather_entries(kv, self._to_device(self._where(pages, slots, fill=-1, size=len(pages))))

    def move_slots(self, kv, moves: list[tuple[int, int]]) -> tuple:
        """(src, dst) cache slots (page * page_size + offset) moved now, in every array, outside a step."""
        packed = self._pack_moves(moves)
        return kv if packed is None else self._move(kv, *self._to_device(packed), page_size=self.page_size)

    def _pack_moves(self, moves: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray] | None:
        return self._pack_pairs(moves, fill=(0, self.num_pages * self.page_size))  # padding: out of range, dropped

    def apply_states(self, states, step):
        """Dispatches a step's copies of recurrent states between the device and the host tier; returns the states.
        Saves first: a load may read a state saved by the same step."""
        if step.state_saves is not None:
            slots, host_slots = step.state_saves
            saved = self._gather_states(states, self._to_device(slots))
            for a in jax.tree.leaves(saved):
                a.copy_to_host_async()
            self._pending_states.append((host_slots, saved))
        if step.state_disk_saves is not None:
            self._dispatch_state_disk_saves(states, *step.state_disk_saves)
        if step.state_loads is not None:
            host_slots, slots = step.state_loads
            self.land()
            loaded = jax.tree.map(lambda h: h[:, host_slots], self.host_states)
            states = self._scatter_states(states, *self._to_device((loaded, slots)))
        if step.state_disk_loads is not None:
            states = self._scatter_states(states, *self._to_device(step.state_disk_loads))
        return states

    def save_states_to_disk(self, states, saves: list[tuple[int, int]]) -> None:
        """Writes (snapshot slot, block hash) snapshots out now, with no step to carry them (the engine is idle)."""
        if saves:
            self._dispatch_state_disk_saves(states, *self._pack_state_disk_saves(saves))
            self.land()

    def _dispatch_state_disk_saves(self, states, slots: np.ndarray, hashes: tuple[int, ...]) -> None:
        saved = self._gather_states(states, self._to_device(slots))
        for a in jax.tree.leaves(saved):
            a.copy_to_host_async()
        self._pending_disk_states.append((self.disk_states.key, hashes, saved))

    def land(self) -> None:
        """Writes the pages (and states) saved by dispatched steps into their host slots (oldest first: a reused slot
        gets the newer page), and hands those saved for the disk tier to its writer."""
        for slots, saved in self._pending_saves:
            keep = slots >= 0
            for host, pages in zip(self.host_kv, saved):
                host[:, :, slots[keep]] = np.asarray(pages)[:, :, keep]
        self._pending_saves = []
        for slots, saved in self._pending_states:
            keep = slots >= 0
            for host, state in zip(jax.tree.leaves(self.host_states), jax.tree.leaves(saved)):
                host[:, slots[keep]] = np.asarray(state)[:, keep]
        self._pending_states = []
        for key, hashes, saved in self._pending_disk_states:  # each state array as [Lg, 1, n, ...]: a file per slot
            self.disk_states.put(hashes, tuple(np.asarray(a)[:, None] for a in jax.tree.leaves(saved)), key)
        self._pending_disk_states = []
        for key, hashes, saved in self._pending_disk:
            self.disk.put(hashes, tuple(np.asarray(a) for a in saved), key)
        self._pending_disk = []

    def saving_to_disk(self, hashes: set[int]) -> bool:
        """Whether pages or snapshots named in `hashes` are on their way from the device to the disk's writer."""
        return any(not hashes.isdisjoint(named) for _, named, _ in self._pending_disk + self._pending_disk_states)

    def save_to_disk(self, kv, saves: list[tuple[int, int, int]]) -> None:
        """Writes (page, window slot, block hash) pages out now, with no step to carry them (the engine is idle)."""
        if saves:
            self._dispatch_disk_saves(kv, *self._pack_disk_saves(saves))
            self.land()

    def _dispatch_disk_saves(self, kv, where: np.ndarray, hashes: tuple[int, ...]) -> None:
        saved = (self._gather if self.layout is None else self._gather_entries)(kv, self._to_device(where))
        for a in saved:
            a.copy_to_host_async()
        self._pending_disk.append((self.disk.key, hashes, saved))

    # ------------------------------------------------------------------------------ packing
    def _pack_disk_saves(self, saves: list[tuple[int, int, int]]) -> tuple[np.ndarray, tuple[int, ...]] | None:
        """(where the pages are: pages, or a hybrid cache's [L, n] entries; padded to a power of two, block hashes of
        the real ones)."""
        if not saves:
            return None
        pages, slots, hashes = zip(*saves)
        return self._where(pages, slots, fill=0), hashes

    def _pack_disk_loads(self, loads: list[tuple[tuple[np.ndarray, ...], int, int]]):
        """(each cache array's pages [L, Hkv, n, ...], where they go), n padded to a power of two (padding: dropped)."""
        if not loads:
            return None
        n = 1 << (len(loads) - 1).bit_length()
        payloads, pages, slots = zip(*loads)
        pad = [tuple(np.zeros_like(a) for a in payloads[0])] * (n - len(loads))
        arrays = tuple(np.stack(page, axis=2) for page in zip(*payloads, *pad))
        return arrays, self._where(pages, slots, fill=-1)

    def _where(self, pages, slots, fill: int, size: int | None = None) -> np.ndarray:
        """Where pages live, padded to a power of two (or `size`): the page ids; in a hybrid cache, [L, n] entries of
        the one stacked array (a windowed layer's entry is the page's window slot; none, or `fill` -1: out of range,
        dropped by a scatter)."""
        n = size or 1 << (len(pages) - 1).bit_length()
        if self.layout is None:
            return np.array(list(pages) + [self.num_pages if fill < 0 else fill] * (n - len(pages)), np.int32)
        size = self.layout.size
        pages = np.array(list(pages) + [fill] * (n - len(pages)), np.int64)
        slots = np.array(list(slots) + [fill] * (n - len(slots)), np.int64)
        bases = np.array(self.layout.bases, np.int64)[:, None]
        windowed = np.array(self.layout.windowed)[:, None]
        entries = np.where(windowed, slots[None], pages[None])
        return np.where(entries < 0, size, entries + bases).astype(np.int32)

    @staticmethod
    def _pack_pairs(pairs: list[tuple[int, int]], fill: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """(a, b) pairs as two int32 arrays padded to a power of two with `fill` (few compiled shapes)."""
        if not pairs:
            return None
        n = 1 << (len(pairs) - 1).bit_length()
        a, b = np.full(n, fill[0], np.int32), np.full(n, fill[1], np.int32)
        a[: len(pairs)], b[: len(pairs)] = zip(*pairs)
        return a, b


def _gather_pages(kv, pages):
    """Each cache array's `pages` (every layer): [L, Hkv, n, ...]."""
    return tuple(a[:, :, pages] for a in kv)


def _scatter_pages(kv, loaded, pages):
    """Writes `loaded` (like `_gather_pages`' result) into `pages` (out-of-range pages dropped)."""
    return tuple(a.at[:, :, pages].set(new, mode="drop") for a, new in zip(kv, loaded))


def _gather_entries(kv, entries):
    """A hybrid cache's pages (every layer's entry of the one stacked array, entries [L, n]): [L, Hkv, n, ...]."""
    num_layers, n = entries.shape
    out = []
    for a in kv:  # [1, Hkv, size, ...]
        g = a[0][:, entries.reshape(-1)]  # [Hkv, L * n, ...]
        out.append(jnp.swapaxes(g.reshape(g.shape[0], num_layers, n, *g.shape[2:]), 0, 1))
    return tuple(out)


def _scatter_entries(kv, loaded, entries):
    """Writes `loaded` (like `_gather_entries`' result) into a hybrid cache's entries [L, n] (out of range: dropped)."""
    num_layers, n = entries.shape
    out = []
    for a, new in zip(kv, loaded):  # new: [L, Hkv, n, ...]
        upd = jnp.swapaxes(new, 0, 1).reshape(new.shape[1], num_layers * n, *new.shape[3:])[None]
        out.append(a.at[:, :, entries.reshape(-1)].set(upd.astype(a.dtype), mode="drop"))
    return tuple(out)


def _gather_states(states, slots):
    """Each state array's `slots` (every linear layer): [Lg, n, ...]."""
    return jax.tree.map(lambda a: a[:, slots], states)


def _scatter_states(states, loaded, slots):
    """Writes `loaded` (like `_gather_states`' result) into state `slots` (out-of-range slots dropped)."""
    return jax.tree.map(lambda a, new: a.at[:, slots].set(new, mode="drop"), states, loaded)


def _copy_pages(kv, src, dst):
    """Copies pages src[i] -> dst[i] in every cache array (out-of-range dst dropped)."""
    return tuple(a.at[:, :, dst].set(a[:, :, src], mode="drop") for a in kv)


def _move_slots(kv, src, dst, *, page_size: int):
    """Copies cache slots src[i] -> dst[i] (page * page_size + offset) in every cache array [L, Hkv, P, page_size, ...],
    all read before any is written (out-of-range dst dropped)."""
    return tuple(a.at[:, :, dst // page_size, dst % page_size].set(a[:, :, src // page_size, src % page_size], mode="drop")
                 for a in kv)
