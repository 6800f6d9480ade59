"""Prompt pages from a prefill replica's device to a decode replica's, over the network (`parallel.kv_transfer: jax`).

Prefill/decode disaggregation (engine/disaggregation.py) hands a prompt's K/V to the decode replica. With the disk
tier as the transport both replicas must share files; with this one each replica runs JAX's transfer server
(`jax.experimental.transfer`, built for arrays moving between TPU slices over the data-center network, which runs
on CPU and GPU clients too) and nothing is shared but the network:

  prefill replica                                   decode replica
  prompt computed, its pages in the tree
  gather them into one array per cache array ---->  (the router forwards the offer: X-RadixLM-KV-Offers)
  `offer`: await_pull(uuid, arrays)                 `pull`: the arrays, by uuid, into its own devices
                                                    as pages received (engine.cache_tiers: `receive`), which the
                                                    admission of the request takes as cached prompt pages

An offer is pulled once: a second pull of a uuid, one of an expired offer, or one of a uuid the server never
offered does not fail: its arrays never become ready. `pull` therefore polls them against a deadline and leaves a
stuck one behind instead of waiting on it (no thread blocks on it); the decode replica then computes the prompt
itself. Offers expire (`OFFER_TIMEOUT_S`), so one that nobody pulls does not hold device memory for long; until it
is pulled an offer is a copy of its pages on the prefill replica's devices, outside the KV cache's budget (leave
room for the longest prompt's K/V, as for a prefill's activations).

The same offers serve the router's peer fetch: a replica holding a prompt's prefix offers its pages without
computing anything (`disaggregation.offer_cached`), for the replica the policy chose.
"""
from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import os
import random
import threading
from typing import Callable

import jax
import numpy as np

from engine.block_hash import ADAPTER_NAMESPACE, page_hashes
from engine.config import ConfigKeyError
from engine.disk_cache import layout_key, weights_identity

log = logging.getLogger(__name__)

OFFER_TIMEOUT_S = 60.0  # an offer nobody pulled is dropped (its arrays freed) after this long
POLL_S = 0.002  # how often a pull looks whether its arrays have arrived


def offered_tokens(prompt_ids, page_size: int) -> tuple[int, ...]:
    """The tokens of a prompt's whole pages before the page of its last token (a step computes that one in any case):
    what an offer of its pages covers."""
    return tuple(prompt_ids[: (len(prompt_ids) - 1) // page_size * page_size])


def padded_pages(n: int) -> int:
    """The page count an offer of `n` pages is gathered as (few compiled shapes, at most 7 pages sent for nothing):
    powers of two up to 8, then multiples of 8."""
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


class TransferEndpoint:
    """This process's transfer server, started on first use, listening on `address` (host:port; port 0: any)."""

    def __init__(self, address: str):
        self.bind = address  # (ParallelConfig checked it)
        self._host = address.rpartition(":")[0]
        self._server = None
        self._connections: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def server(self):
        with self._lock:
            if self._server is None:
                from jax.experimental import transfer

                # NOTE: the bulk transport's own address list must be given: without one the server aborts the
                # process when a peer closes its connection (jaxlib 0.10).
                self._server = transfer.start_transfer_server(jax.devices()[0].client, self.bind, [f"{self._host}:0"])
                log.info("KV transfer server on %s", self._server.address())
            return self._server

    @property
    def address(self) -> str:
        """Where decode replicas connect to pull this replica's offers."""
        return self.server.address()

    def offer(self, arrays: tuple[jax.Array, ...], timeout_s: float = OFFER_TIMEOUT_S) -> int:
        """Makes `arrays` pullable once, for `timeout_s` -> the uuid that names them."""
        uuid = random.getrandbits(63)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        self.server.await_pull(uuid, list(arrays), timeout=deadline)
        return uuid

    def connect(self, address: str):
        """A connection to the transfer server at `address` (kept for the next pulls; blocks while it connects)."""
        with self._lock:
            conn = self._connections.get(address)
        if conn is None:
            conn = self.server.connect(address)
            with self._lock:
                self._connections[address] = conn
        return conn

    def forget(self, address: str) -> None:
        """Drops the connection to `address` (after a failure: the next pull connects again)."""
        with self._lock:
            self._connections.pop(address, None)

    async def pull(self, address: str, uuid: int, specs: list[jax.ShapeDtypeStruct],
                   timeout_s: float) -> list[jax.Array]:
        """The arrays offered as `uuid` at `address`, on this replica's devices as `specs` place them, once they have
        all arrived; raises TimeoutError after `timeout_s` (what never arrives is left behind, not waited on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            conn = await asyncio.wait_for(asyncio.to_thread(self.connect, address), timeout_s)
            arrays = conn.pull(uuid, specs)  # returns at once; the bytes land in the background
        except Exception:
            self.forget(address)
            raise
        while not all(a.is_ready() for a in arrays):
            if loop.time() > deadline:
                raise TimeoutError(f"the KV offer {uuid} from {address} did not arrive in {timeout_s:g} s (pulled "
                                   "twice, expired, or its replica restarted)")
            await asyncio.sleep(POLL_S)
        return arrays


def page_payloads(arrays: list[jax.Array], num_pages: int) -> list[tuple[np.ndarray, ...]]:
    """Pulled arrays ([L, Hkv, padded pages, ...] each) -> one payload per page, as the disk tier reads them: each
    cache array's page [L, Hkv, ...], in host memory."""
    host = [np.asarray(a) for a in arrays]
    return [tuple(np.ascontiguousarray(a[:, :, i]) for a in host) for i in range(num_pages)]


class ReplicaTransfer:
    """A replica's side of the transfer: its endpoint, the layout key its pages' K/V are computed under (the disk
    tier's: weights, model, dtypes, page size, tensor parallelism, attention backend; pages cross only between
    replicas of one key), the offer of a prompt's pages from its tree, and pages received for its requests. Engine
    thread only, but for `endpoint.pull`."""

    def __init__(self, config, model_cfg, kv_plan, layout: Callable[[object], dict], weights_id, scheduler, runner):
        """layout: weights' identity -> the fields of the layout key (engine.disk_cache.replica_layout's)."""
        why = None
        if not config.cache.prefix_caching:
            why = "needs cache.prefix_caching (received pages enter the prefix cache)"
        elif model_cfg.linear_layers:
            why = ("does not carry the snapshots of recurrent states a model with linear attention layers resumes "
                   "from: use parallel.kv_transfer: disk")
        elif config.parallel.num_processes > 1:
            why = "runs within one process: a replica over several hosts would not copy the pages on the others"
        if why is not None:
            raise ConfigKeyError(f"parallel.kv_transfer: jax {why}")
        self.endpoint = TransferEndpoint(config.parallel.kv_transfer_address)
        self.page_size = config.cache.page_size
        self._hybrid = bool(kv_plan.num_window_pages)
        self._layout = layout
        self.layout_key: str | None = layout_key(layout(weights_id))
        self._scheduler, self._runner = scheduler, runner
        # host bytes of one received page: every device's share of it
        scheduler.tiers.received_capacity = max(1, int(config.parallel.kv_transfer_buffer_gb * 2**30
                                                       // (kv_plan.page_bytes * config.parallel.tensor)))
        self.stats = collections.Counter()  # offered_pages, received_pages (pulled), pulls_failed

    def serve_weights(self, source: str) -> None:
        """New weights (an update's `source`): a new layout key; weights given as arrays have no name to key them by,
        and nothing crosses until the next update from a checkpoint."""
        self.layout_key = layout_key(self._layout(weights_identity(source))) if os.path.exists(source) else None

    def offer(self, tokens: tuple[int, ...], namespace: str | None, timeout_s: float = OFFER_TIMEOUT_S) -> dict | None:
        """Offers the pages the prefix cache holds of `tokens` (a prompt's whole pages) once, to a decode replica: the
        tree's, then those its host tier continues with -> what it pulls them by (uuid, pages, padded, the last page's
        block hash, and `window_from`: in a hybrid cache, the first of the last pages in a row whose window slots the
        tree still holds, whose windowed layers' entries are sent), or None (nothing to offer: no page cached, a LoRA
        adapter's pages, which may differ between replicas under one name, weights with no name, the engine
        asleep)."""
        kv = self._runner.kv
        if self.layout_key is None or kv is None or (namespace or "").startswith(ADAPTER_NAMESPACE):
            return None
        match = self._scheduler.tree.match(tokens, namespace)
        num_tree = match.num_tokens // self.page_size
        host_slots, hashes = self._host_run(tokens, namespace, match)
        n = num_tree + len(host_slots)
        if n == 0:
            return None
        m, window = padded_pages(n), self._scheduler.window
        slots = [-1] * num_tree if window is None else [window.slot_of.get(p, -1) for p in match.pages]
        window_from = num_tree
        while window_from and slots[window_from - 1] >= 0:
            window_from -= 1
        arrays = self._runner.copies.gather_pages(kv, match.pages + [0] * (m - num_tree),
                                                  slots + [-1] * (m - num_tree))
        # NOTE: placed as the cache is, which is how the decode replica pulls them (`specs`)
        arrays = tuple(jax.device_put(x, a.sharding) for x, a in zip(arrays, kv))
        if host_slots:
            arrays = tuple(x.at[:, :, num_tree:n].set(jax.device_put(h[:, :, host_slots], x.sharding))
                           for x, h in zip(arrays, self._runner.copies.host_kv))
        uuid = self.endpoint.offer(arrays, timeout_s)
        self.stats["offered_pages"] += n
        last = hashes[len(host_slots) - 1] if host_slots else match.node.last_hash()
        return {"uuid": uuid, "pages": n, "padded": m, "last_hash": f"{last:016x}",
                "window_from": window_from if self._hybrid else 0}

    def _host_run(self, tokens: tuple[int, ...], namespace: str | None, match) -> tuple[list[int], list[int]]:
        """(the host tier's slots holding the pages of `tokens` after the tree's `match`, in a row; those pages' block
        hashes). A slot whose save waits for the next plan still holds an older page: the run stops there."""
        tiers = self._scheduler.tiers
        if tiers.host is None or self._hybrid:
            return [], []
        hashes = page_hashes(tokens[match.num_tokens :], self.page_size, namespace, parent=match.node.last_hash())
        waiting = {slot for _, slot in tiers.host_saves}
        slots = []
        for h in hashes:
            slot = tiers.host.lookup(h)
            if slot is None or slot in waiting:
                break
            slots.append(slot)
        if slots:
            self._runner.copies.land()  # (saves dispatched by earlier steps, into their slots)
        return slots, hashes

    def answer(self, offers: list[dict | None]) -> dict:
        """A prefill answer's `transfer`: where to pull `offers` from, and the layout their pages are of."""
        return {"address": self.endpoint.address, "layout": self.layout_key, "offers": offers}

    def specs(self, padded: int) -> list[jax.ShapeDtypeStruct]:
        """What an offer of `padded` pages arrives as: each cache array's pages, placed as the cache is."""
        # (a hybrid cache stacks its layers' entries in one [1, Hkv, size, ...] array: an offer has them apart)
        layers = len(self._runner.copies.layout.bases) if self._hybrid else None
        return [jax.ShapeDtypeStruct((layers or a.shape[0], a.shape[1], padded) + a.shape[3:], a.dtype,
                                     sharding=a.sharding) for a in self._runner.kv]

    def receive(self, seq, last_hash: str, payloads: list[tuple[np.ndarray, ...]], window_from: int = 0) -> int:
        """Pages a prefill replica sent for `seq`'s prompt, taken where the block hash of the last is that of `seq`'s
        page there (the same tokens in the same namespace); a hybrid cache's from `window_from` on with their windowed
        layers' entries -> how many were taken."""
        n = len(payloads)
        hashes = page_hashes(seq.prompt_ids[: n * self.page_size], self.page_size, seq.namespace)
        if len(hashes) < n or f"{hashes[-1]:016x}" != last_hash:
            return 0
        self._scheduler.tiers.receive(hashes, payloads, window_from)
        return n
