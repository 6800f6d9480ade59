"""The prefix cache below the device tree, as the scheduler sees it: the host tier (pages the tree evicts, kept in
host slots: engine.host_cache) and the disk tier (every page the tree stores, also in files: engine.disk_cache).

The tree calls in when it lets pages go (the host tier saves them) and when it stores new ones (the disk tier writes
them); admission asks how far a prompt's match continues past the tree (host slots first, then disk pages, whose
read starts here and is waited for); each plan takes the saves collected since the last. Ints and opaque page
payloads only: the runner moves the bytes.

Pages received from a prefill replica (prefill/decode disaggregation over the network: engine.kv_transfer) wait in
host memory by block hash (`receive`) until an admission takes them, after the host tier's and before the disk's,
as pages read from disk; the oldest go first past `received_capacity` pages.

A model with linear attention layers resumes a prefix only where a snapshot of its recurrent state is
(engine.state_snapshots): its host tier also keeps the snapshots the device lets go, in host state slots by block
hash, and its disk tier every snapshot a step takes, in files of their own (`disk_states`); a prompt whose match ends
at one takes a copy of it into its state slot instead of recomputing the prefix.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Callable

from engine.block_hash import ADAPTER_NAMESPACE, page_hashes
from engine.host_cache import HostPageIndex
from engine.request import Sequence


class CacheTiers:
    def __init__(self, page_size: int, num_host_pages: int = 0, disk=None, stats=None,
                 window_slot: Callable[[int], int] | None = None, disk_read_timeout_s: float = 10.0,
                 num_host_states: int = 0, disk_states=None, first_window_page: Callable[[int], int] | None = None):
        """disk: an engine.disk_cache.DiskCache, or what tests give in its place. stats: the scheduler's SchedulerStats
        (the saved-page counts). window_slot: a hybrid cache's page -> window slot (-1: none; the page's windowed
        layers are written from there, and a page without one is not written); None: not hybrid. num_host_states: host
        slots for snapshots of recurrent states (a model with linear attention layers); disk_states: the disk tier's
        files for them (a DiskCache of one state slot per file), with `disk`. first_window_page: a hybrid cache's
        position -> the first page its windowed layers attend to (engine.window_pages.WindowPages.first_page)."""
        self.page_size = page_size
        self.window_slot = window_slot
        self.first_window_page = first_window_page
        self.disk_read_timeout_s = disk_read_timeout_s
        self.host = HostPageIndex(num_host_pages) if num_host_pages else None
        if self.host is not None:
            self.host.record_events = False  # until someone drains them (LLMEngine.drain_cache_events)
        self.disk = disk
        self.stats = stats
        # Snapshots of recurrent states by block hash (no events kept: the router's feed reports the snapshots, device
        # and host together, SequencePages.drain_snapshot_events).
        self.host_states = HostPageIndex(num_host_states) if num_host_states and self.host is not None else None
        if self.host_states is not None:
            self.host_states.record_events = False
        self.state_saves: list[tuple[int, int]] = []  # (snapshot slot, host state slot) not yet in a plan
        self.state_loads: list[tuple[int, int]] = []  # (host state slot, sequence's state slot) of the plan being built
        self._states_kept: set[int] = set()  # host state slots an admission of this plan resumes from (`keep_state`)
        self.disk_states = disk_states if disk is not None else None
        self.has_snapshot: Callable[[int], bool] = lambda block_hash: False  # on the device or the host (SequencePages)
        # Snapshots for the disk tier: (slot, hash) taken by the plan being built (its step writes them), then those
        # of the plan before (written by a step dispatched before the next plan's: that plan writes them out).
        self._states_taken: list[tuple[int, int]] = []
        self._states_written: list[tuple[int, int]] = []
        self.state_disk_loads: list[tuple[object, int]] = []  # (state read from disk, sequence's state slot) this plan
        self._read_states: dict[int, object] = {}  # snapshots read from disk for the plan being built, by hash
        self.host_saves: list[tuple[int, int]] = []  # (page, slot) not yet in a plan
        self.disk_saves: list[tuple[int, int, int]] = []  # (page, window slot, hash) not yet in a plan
        self.loading: set[int] = set()  # host slots the plan being built loads from: not reused for a save in it
        # Disk reads in flight (or done this plan) by their first page's hash: a prompt starting there shares the read.
        self._disk_reading: dict[int, tuple] = {}
        # Pages received from prefill replicas, by block hash, oldest first: (payload as the disk tier reads it, whether
        # its windowed layers' entries are real: a hybrid cache's page sent without a window slot has none); at most
        # `received_capacity` (the engine sets it with parallel.kv_transfer: jax; 0: none are taken).
        self.received_capacity = 0
        self.received: collections.OrderedDict[int, tuple] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.host is not None or self.disk is not None or self.received_capacity > 0

    def receive(self, hashes: list[int], payloads: list[tuple], window_from: int = 0) -> None:
        """Pages a prefill replica computed (each one's block hash and payload), for the admissions that follow; in a
        hybrid cache those from `window_from` on carry their windowed layers' entries."""
        for i, (h, payload) in enumerate(zip(hashes, payloads)):
            self.received[h] = (payload, i >= window_from)
            self.received.move_to_end(h)
        while len(self.received) > self.received_capacity:
            self.received.popitem(last=False)
            self.stats.received_dropped_pages += 1

    # ------------------------------------------------------------------------------------ admission
    def continue_match(self, seq: Sequence, match) -> tuple[list[int], list[object]] | None:
        """(host slots, disk pages) holding the pages after the tree's `match`, in a row, host tier first, then pages
        received, then the disk tier (never the page of the last token: a step must compute at least that one); a
        received page counts as read from disk (`seq.received_pages` of them lead the disk pages). None: the disk tier
        holds some, being read (the read starts here the first time); the sequence waits for it."""
        tokens, ps = seq.all_ids, self.page_size
        end = (len(tokens) - 1) // ps * ps
        hashes = page_hashes(tokens[match.num_tokens : end], ps, seq.namespace, parent=match.node.last_hash())
        slots = []
        if self.host is not None:
            for h in hashes:
                slot = self.host.lookup(h)
                if slot is None:
                    break
                slots.append(slot)
        run = []
        for h in hashes[len(slots) :]:
            if h not in self.received:
                break
            run.append(self.received[h])
        if self.first_window_page is not None:  # hybrid: the run ends only where every received page the window of
            # its end reaches (its first token's, or the one before: MTP's head row recomputes that) has windowed entries
            start = match.num_tokens // ps + len(slots)
            while run and not all(real for _, real in run[max(0, self.first_window_page((start + len(run)) * ps - 1)
                                                                     - start):]):
                run.pop()
        pages: list[object] | None = [payload for payload, _ in run]
        seq.received_pages = len(pages)
        done = len(slots) + len(pages)
        if self.disk is not None and done < len(hashes) and not _is_adapter(seq.namespace):
            read = self._disk_hits(seq, hashes[done:])
            if read is None:
                return None
            pages += read
        self.loading.update(slots)  # before any eviction can pick these slots for a save in this plan
        return slots, pages

    def _disk_hits(self, seq: Sequence, hashes: list[int]) -> list[object] | None:
        """The pages of the first of `hashes` that the disk tier holds in a row, read; None while being read (up to
        the read timeout: then the sequence computes them, and reads nothing more)."""
        key = self.disk.key
        if seq.disk_read == "timed out":
            return []
        if seq.disk_read is None or seq.disk_read[0] != key:  # another prompt's read of the same pages will do
            seq.disk_read = self._disk_reading.get(hashes[0])
        if seq.disk_read is not None and seq.disk_read[0] == key:
            future = seq.disk_read[1]
            if not future.done():
                if time.monotonic() - seq.disk_read[2] < self.disk_read_timeout_s:
                    return None
                seq.disk_read = "timed out"
                self.stats.disk_read_timeouts += 1
                return []
            got, *states = future.result()
            for read in states:  # (a snapshot read along, for the admission that follows: `read_state`)
                self._read_states.update(read)
            if hashes[0] in got:  # else the match moved back (its pages were evicted meanwhile): read again
                pages = []
                for h in hashes:
                    if h not in got:
                        break
                    pages.append(got[h])
                return pages
        n, state = self.disk.present(hashes), None
        if n and self.disk_states is not None:
            n, state = self._resumable(hashes[:n])
        if n:
            reads = [self.disk.fetch(hashes[:n])] + ([self.disk_states.fetch([state])] if state is not None else [])
            seq.disk_read = (key, _joined(reads), time.monotonic())
            self._disk_reading[hashes[0]] = seq.disk_read
        else:
            seq.disk_read = None
        return None if n else []

    def _resumable(self, hashes: list[int]) -> tuple[int, int | None]:
        """(how many of the disk tier's pages `hashes` a model with linear attention layers can use: up to the deepest
        with a snapshot of its states, the hash of that snapshot when only the disk tier has it, to read too)."""
        for n in range(len(hashes), 0, -1):
            if self.has_snapshot(hashes[n - 1]):
                return n, None
            if self.disk_states.present(hashes[n - 1 : n]):
                return n, hashes[n - 1]
        return 0, None

    def disk_reads(self, waiting) -> list:
        """The disk reads (futures) that the `waiting` sequences wait for, each once."""
        reads = {id(s.disk_read[1]): s.disk_read[1] for s in waiting if isinstance(s.disk_read, tuple)}
        return [f for f in reads.values() if not f.done()]

    # ------------------------------------------------------------------------------------ plans
    def start_plan(self) -> None:
        self.loading = set()
        self.state_loads, self.state_disk_loads, self._states_kept = [], [], set()

    def end_plan(self) -> None:
        """Finished reads stay with the sequences that wait for them; later prompts find the pages in the tree."""
        if self._disk_reading:
            self._disk_reading = {h: r for h, r in self._disk_reading.items() if not r[1].done()}
        self._read_states = {}

    def take_host_saves(self) -> list[tuple[int, int]]:
        saves, self.host_saves = self.host_saves, []
        return saves

    def take_host_states(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The plan's (snapshot slot, host slot) saves and (host slot, state slot) loads of recurrent states; saves
        first (a load may read a state saved by the same plan)."""
        saves, self.state_saves = self.state_saves, []
        return saves, self.state_loads

    def take_disk_states(self, idle: bool = False) -> tuple[list[tuple[int, int]], list[tuple[object, int]]]:
        """The plan's (snapshot slot, hash) snapshots to write to the disk tier, those an earlier step wrote, and
        (state read, state slot) loads from it. `idle`: no step is in flight, every snapshot taken is written."""
        saves, self._states_written = self._states_written, self._states_taken
        self._states_taken = []
        if idle:
            saves, self._states_written = saves + self._states_written, []
        return saves, self.state_disk_loads

    def take_disk_saves(self) -> list[tuple[int, int, int]]:
        """(page, hash) pages stored since the last plan: the next plan's, or written out at once when no step runs."""
        saves, self.disk_saves = self.disk_saves, []
        return saves

    def saving(self, hashes: set[int]) -> bool:
        """Whether a page or snapshot named in `hashes` waits for a plan to carry it to the disk tier."""
        return any(h in hashes for _, _, h in self.disk_saves) or \
            any(h in hashes for _, h in self._states_taken + self._states_written)

    # ------------------------------------------------------------------------------------ the tree
    def tree_evicting(self, pages: list[int], hashes: list[int]) -> None:
        """The tree lets go of `pages`: each is copied to a host slot (unless its hash is there already) before reuse."""
        if self.host is None:
            return
        for page, h in zip(pages, hashes):
            slot = self.host.store(h, avoid=self.loading)
            if slot is not None:
                self.host_saves.append((page, slot))
                self.stats.host_saved_pages += 1

    def snapshot_taken(self, block_hash: int, slot: int, namespace: str | None) -> None:
        """A step writes (or has written) a snapshot into `slot`: the disk tier writes it out after that step."""
        if self.disk_states is None or _is_adapter(namespace) or not self.disk_states.wanted(block_hash):
            return
        if all(h != block_hash for _, h in self._states_taken + self._states_written):  # (a name taken twice: once)
            self._states_taken.append((slot, block_hash))
            self.stats.disk_saved_states += 1

    def read_state(self, block_hash: int):
        """The snapshot named `block_hash` read from the disk tier for this plan's admissions, or None."""
        return self._read_states.get(block_hash)

    def load_read_state(self, block_hash: int, state_slot: int) -> None:
        """The plan copies the snapshot read from disk into a sequence's state slot before its step."""
        self.state_disk_loads.append((self._read_states[block_hash], state_slot))
        self.stats.disk_state_hits += 1

    def has_state(self, block_hash: int) -> bool:
        """The host tier holds a snapshot of the recurrent states after the prefix named `block_hash`."""
        return self.host_states is not None and block_hash in self.host_states

    def keep_state(self, block_hash: int) -> None:
        """An admission resumes from the host snapshot `block_hash`: not replaced by a save before it is loaded (the
        pages its admission takes may evict others, whose snapshots are saved)."""
        if self.has_state(block_hash):
            self._states_kept.add(self.host_states.lookup(block_hash))

    def load_state(self, block_hash: int, state_slot: int) -> None:
        """The plan copies the host snapshot named `block_hash` into a sequence's state slot before its step."""
        slot = self.host_states.lookup(block_hash)
        self.state_loads.append((slot, state_slot))
        self.stats.host_state_hits += 1

    def save_state(self, block_hash: int, snapshot_slot: int) -> None:
        """A written snapshot leaves its device slot: copied to a host slot first (unless one holds it already; never
        one a load of this plan reads)."""
        if self.host_states is None:
            return
        slot = self.host_states.store(block_hash, avoid=self._states_kept | {s for s, _ in self.state_loads})
        if slot is not None:
            self.state_saves.append((snapshot_slot, slot))
            self.stats.host_saved_states += 1

    def tree_storing(self, pages: list[int], hashes: list[int], namespace: str | None) -> None:
        """The tree stores new pages: those the disk tier lacks are written out from before the next step (the step
        computing them, dispatched before it, has written their K/V by then). An adapter's pages are not kept there
        (its files can change under its name). Pages received under those hashes are in the tree now: let go."""
        if self.received:
            for h in hashes:
                self.received.pop(h, None)
        if self.disk is None or _is_adapter(namespace):
            return
        new = []
        for page, h in zip(pages, hashes):
            slot = -1 if self.window_slot is None else self.window_slot(page)
            if self.disk.wanted(h) and (slot >= 0 or self.window_slot is None):
                new.append((page, slot, h))
        self.disk_saves += new
        self.stats.disk_saved_pages += len(new)

    def reset(self) -> None:
        """Empties the host tier; pages of the weights that were are never written under the new ones' key."""
        if self.host is not None:
            self.host.reset()
        if self.host_states is not None:
            self.host_states.reset()
        self.host_saves.clear()
        self.state_saves.clear()
        self._states_taken.clear()
        self._states_written.clear()
        self.disk_saves.clear()
        self._disk_reading.clear()
        self.received.clear()


def _joined(futures: list[concurrent.futures.Future]) -> concurrent.futures.Future:
    """One future of the results of `futures` (a tuple; {} for one that failed), done when all are."""
    out: concurrent.futures.Future = concurrent.futures.Future()
    left, lock = [len(futures)], threading.Lock()

    def one_done(_):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            out.set_result(tuple(f.result() if f.exception() is None else {} for f in futures))

    for f in futures:
        f.add_done_callback(one_done)
    return out


def _is_adapter(namespace: str | None) -> bool:
    return namespace is not None and namespace.startswith(ADAPTER_NAMESPACE)
