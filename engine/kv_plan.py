"""How big a replica's KV cache is and where its tiers live, decided once at start-up from the config and the model.

`plan_kv_cache` sizes the device cache (pages of every layer; a hybrid cache's window slots for the sliding-window
layers, engine.window_pages) and the host tier, and refuses by name what cannot work (a pool that cannot hold one
sequence, a host tier with a hybrid cache, ...). `ReplicaDisk` is the disk tier of the replica: its files live under
a key naming the K/V's layout and the weights served, which changes with each weight update.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import jax
import numpy as np

from engine.config import ConfigKeyError, EngineConfig
from engine.disk_cache import DiskCache, layout_key, replica_layout, weights_identity
from engine.runner import cache_arrays, kv_bytes_per_page, kv_page_specs
from engine.window_pages import slots_per_sequence
from models import gated_delta
from pallas_kernels import resolve_backend
from pallas_kernels.ragged_kernel import offsets_wrap

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KVPlan:
    page_bytes: int  # one page of every layer's K and V, on one device
    num_pages: int
    num_window_pages: int  # window slots of a hybrid cache; 0: every layer keeps every page
    num_host_pages: int  # the host tier's slots (whole pages); 0: none
    num_host_states: int = 0  # its slots for snapshots of recurrent states (a model with linear attention layers)


def plan_kv_cache(config: EngineConfig, model_cfg, max_model_len: int, kv_dtype, draft_cfg=None,
                  draft_split: bool = False) -> KVPlan:
    """The cache sizes for `config` (cache.memory_gb is per device: with tensor parallelism each device holds 1/tp of
    every page; a draft model's K/V shares the pages, whole on each device, or split as the model's: `draft_split`,
    an MTP layer's); logs them. ValueError / ConfigKeyError name what cannot work."""
    cache = config.cache
    ps = cache.page_size
    draft_bytes = kv_bytes_per_page(draft_cfg, ps, kv_dtype) if draft_cfg else 0
    page_bytes = kv_bytes_per_page(model_cfg, ps, kv_dtype) + draft_bytes
    # On the devices the model's K/V is split across the tensor-parallel devices, a draft's is whole on each.
    device_bytes = page_bytes + (0 if draft_split else (config.parallel.tensor - 1) * draft_bytes)
    num_pages, num_window_pages = _device_sizes(config, model_cfg, max_model_len, device_bytes)
    num_pages = _indexable_pages(config, model_cfg, kv_dtype, draft_cfg, num_pages, draft_split)
    if num_window_pages:
        num_windowed = sum(model_cfg.kv_reach[0])
        log.info("KV cache (hybrid): %d pages x %d tokens (%d tokens) for the %d global layers, %d window slots for "
                 "the %d %s layers", num_pages, ps, num_pages * ps, model_cfg.num_layers - num_windowed,
                 num_window_pages, num_windowed, "chunked" if model_cfg.kv_reach[2] else "windowed")
    else:
        log.info("KV cache: %d pages x %d tokens (%d tokens)", num_pages, ps, num_pages * ps)
    if num_pages * ps < max_model_len:
        raise ValueError(f"cache.num_pages={num_pages} x cache.page_size={ps} cannot hold one sequence of "
                         f"model.max_model_len={max_model_len} tokens")
    # Host tier: whole pages (every KV head) in host memory; a model with linear attention layers also keeps snapshots
    # of its recurrent states there.
    num_host_states = _host_states(config, model_cfg, num_pages, page_bytes) if cache.prefix_caching else 0
    host_bytes = int(cache.host_memory_gb * 2**30) - num_host_states * gated_delta.state_bytes_per_slot(model_cfg)
    num_host_pages = cache.host_num_pages or max(0, host_bytes // page_bytes)
    if num_host_states and not num_host_pages:
        raise ConfigKeyError(f"cache.host_memory_gb={cache.host_memory_gb} cannot hold "
                             f"cache.host_state_snapshots={num_host_states} snapshots of the recurrent states "
                             f"({gated_delta.state_bytes_per_slot(model_cfg) / 2**20:.1f} MiB each) and a page")
    if num_host_pages and num_window_pages:
        raise ValueError("cache.host_memory_gb: the host tier keeps whole pages of every layer, which a hybrid cache "
                         "(this model's windowed layers) does not have; set cache.hybrid: false to use it")
    if num_host_pages and config.parallel.num_processes > 1:
        raise ValueError("cache.host_memory_gb (the host tier) is not supported with parallel.num_processes > 1")
    if num_host_states and num_host_pages:
        log.info("host tier: %d pages and %d snapshots of the recurrent states", num_host_pages, num_host_states)
    return KVPlan(page_bytes, num_pages, num_window_pages, num_host_pages if cache.prefix_caching else 0,
                  num_host_states if num_host_pages else 0)


def _host_states(config: EngineConfig, cfg, num_pages: int, page_bytes: int) -> int:
    """Host slots for snapshots of a model's recurrent states (0 without linear attention layers or a host tier):
    cache.host_state_snapshots, else the host tier split between pages and snapshots as the device cache is."""
    cache = config.cache
    if not (cfg.linear_layers and (cache.host_memory_gb or cache.host_num_pages)):
        return 0
    if cache.host_state_snapshots:
        return cache.host_state_snapshots
    if cache.host_num_pages:  # as many per page as the device has
        return max(1, round(cache.host_num_pages * cache.state_snapshots / num_pages))
    return snapshots_in(cache.host_memory_gb * 2**30, config, cfg, num_pages, page_bytes)


def snapshots_in(num_bytes: float, config: EngineConfig, cfg, num_pages: int, page_bytes: int) -> int:
    """How many snapshots of the recurrent states a tier of `num_bytes` holds (at least one) when it splits them
    between pages and snapshots as the device cache does (cache.state_snapshots beside `num_pages` pages)."""
    slot_bytes = gated_delta.state_bytes_per_slot(cfg)
    snapshot_bytes = config.cache.state_snapshots * slot_bytes
    share = snapshot_bytes / (snapshot_bytes + num_pages * page_bytes)
    return max(1, int(num_bytes * share // slot_bytes))


def _indexable_pages(config: EngineConfig, cfg, kv_dtype, draft_cfg, num_pages: int, draft_split: bool = False) -> int:
    """num_pages, or fewer where an 8-bit cache array on a device would hold more than 2**31 and at most 2**32
    elements, which the Pallas kernels cannot index (pallas_kernels.ragged_kernel.check_offsets: JAX's Triton
    lowering keeps 32-bit offsets up to 4 GiB). A cache.num_pages asked for is refused by name instead."""
    if np.dtype(kv_dtype).itemsize != 1 or resolve_backend(config.attention.backend, cfg.kv_dims) == "xla":
        return num_pages
    tp, ps = config.parallel.tensor, config.cache.page_size
    def device_share(c, split: bool) -> list[int]:  # elements of a page of each 8-bit array on one device
        return [math.prod(shape) // c.num_kv_heads * (-(-c.num_kv_heads // tp) if split else c.num_kv_heads)
                for shape, dtype in cache_arrays(c, (ps,), kv_dtype) if dtype.itemsize == 1]

    per_page = device_share(cfg, True)
    if draft_cfg is not None:  # a draft's K/V is whole on every device; an MTP layer's split as the model's
        per_page += device_share(draft_cfg, draft_split)
    worst = max(per_page)
    if not offsets_wrap(worst * num_pages, 1):
        return num_pages
    if config.cache.num_pages:
        raise ConfigKeyError(f"cache.num_pages={num_pages} makes an 8-bit cache array of {worst * num_pages} elements, "
                             f"which the Pallas kernels cannot index (JAX's Triton lowering keeps 32-bit offsets up to "
                             f"4 GiB): use at most {2**31 // worst} or more than {2**32 // worst} pages")
    fewer = 2**31 // worst
    log.warning("KV cache: %d pages instead of %d: an 8-bit cache array of %.1f GiB is one the Pallas kernels cannot "
                "index (JAX's Triton lowering keeps 32-bit offsets up to 4 GiB); a cache.memory_gb that makes it over "
                "4 GiB uses all of it", fewer, num_pages, worst * num_pages / 2**30)
    return fewer


def _device_sizes(config: EngineConfig, cfg, max_model_len: int, page_bytes: int) -> tuple[int, int]:
    """(pages, window slots) of the device cache. A model mixing windowed and global layers gets a hybrid cache (0
    slots otherwise): by default enough window slots for every running sequence's window and a step's new pages, and
    the rest of cache.memory_gb in pages of the global layers alone."""
    cache = config.cache
    budget = int(cache.memory_gb * 2**30 * config.parallel.tensor)  # over the devices holding a share of each page
    if cfg.linear_layers:  # the recurrent states come out of it (a slot per running sequence and a scratch one)
        snapshots = cache.state_snapshots if cache.prefix_caching else 0
        drafts = (config.speculative.drafting_rows(config.scheduler.max_running)
                  * config.speculative.draft_tokens)  # (ModelRunner.draft_state_slot)
        slots = config.scheduler.max_running + 1 + snapshots + drafts
        slot_bytes = gated_delta.state_bytes_per_slot(cfg)
        log.info("recurrent states of %d linear attention layers: %d slots x %.1f MiB (%d running sequences, padding, "
                 "%d prefix-cache snapshots, %d for speculative decoding's rollbacks)", sum(cfg.linear_layers), slots,
                 slot_bytes / 2**20, config.scheduler.max_running, snapshots, drafts)
        budget -= slots * slot_bytes
        if not cache.num_pages and budget < page_bytes:
            raise ConfigKeyError(f"cache.memory_gb={cache.memory_gb} cannot hold the recurrent states of "
                                 f"scheduler.max_running={config.scheduler.max_running} sequences, "
                                 f"cache.state_snapshots={cache.state_snapshots} snapshots"
                                 + (f", {drafts} for speculative decoding (max_running, or speculative.max_batch where smaller, "
                                    "x speculative.num_tokens)"
                                    if drafts else "") + " and a page")
    if not (cache.hybrid and cfg.kv_reach):
        return cache.num_pages or budget // page_bytes, 0
    ps, sched = cache.page_size, config.scheduler
    reached, reach, chunked = cfg.kv_reach
    per_sequence = slots_per_sequence(reach, ps)
    wanted = sched.max_running * per_sequence + -(-sched.max_batch_tokens // ps)
    layer_bytes = page_bytes // cfg.num_layers
    num_windowed = sum(reached)
    if cache.num_pages:
        num_pages = cache.num_pages
        num_window = cache.window_pages or min(wanted, num_pages)
    else:
        num_window = cache.window_pages or min(wanted, budget // page_bytes)
        num_pages = (budget - num_window * num_windowed * layer_bytes) // ((cfg.num_layers - num_windowed) * layer_bytes)
    least = min(per_sequence, -(-max_model_len // ps))
    if num_window < least:
        raise ConfigKeyError(f"cache.window_pages={num_window} cannot hold one sequence's "
                             f"{'attention chunk' if chunked else 'window'} of {reach} tokens and a new page: it needs "
                             f"at least {least}")
    return num_pages, num_window


class ReplicaDisk:
    """The replica's disk tier (`cache.disk_path`): an engine.disk_cache.DiskCache whose key names the K/V's layout
    (model, dtypes, page size, tensor parallelism, attention backend, hybrid or not) and the weights served."""

    def __init__(self, config: EngineConfig, model_cfg, dtype, kv_dtype, backend: str, plan: KVPlan, weights_id: str,
                 draft: dict | None = None):
        """weights_id: engine.disk_cache.weights_identity of the checkpoint, or arrays_digest of weights given as
        arrays. draft: a draft model's identity (config, weights, quantization; speculative.method: draft_model),
        whose K/V the pages hold too."""
        if config.parallel.num_processes > 1:
            raise ValueError("cache.disk_path (the disk tier) is not supported with parallel.num_processes > 1")
        self._layout = functools.partial(replica_layout, config, model_cfg, dtype, kv_dtype, backend,
                                         bool(plan.num_window_pages), draft=draft)
        layout = self._layout(weights_id)
        draft_cfg = None if draft is None else draft["config"]
        disk_bytes = config.cache.disk_gb * 2**30
        # A model with linear attention layers: snapshots of its recurrent states in files of their own (one state
        # slot each, [Lg, 1, ...] per state array), the disk split between them and pages as the device cache is.
        self.states = None
        if model_cfg.linear_layers and config.cache.state_snapshots:
            specs = [(shape, np.float32) for shape in jax.tree.leaves(gated_delta.state_shapes(model_cfg, 1),
                                                                       is_leaf=lambda x: isinstance(x, tuple))]
            self.states = DiskCache(config.cache.disk_path, layout_key({**layout, "states": True}), specs,
                                    snapshots_in(disk_bytes, config, model_cfg, plan.num_pages, plan.page_bytes),
                                    describe={**layout, "states": True})
            disk_bytes -= self.states.capacity_pages * gated_delta.state_bytes_per_slot(model_cfg)
        self.cache = DiskCache(config.cache.disk_path, layout_key(layout),
                               kv_page_specs(model_cfg, config.cache.page_size, kv_dtype, draft_cfg),
                               max(1, int(disk_bytes // plan.page_bytes)), describe=layout)

    def serve_weights(self, source: str) -> None:
        """The files for the weights served from now on (`source`, an update's): a directory of their own, or none
        for weights given as arrays (hashing them would cost more than it saves on every update of an RL loop)."""
        if os.path.exists(source):
            layout = self._layout(weights_identity(source))
            self.cache.set_key(layout_key(layout), describe=layout)
            if self.states is not None:
                self.states.set_key(layout_key({**layout, "states": True}), describe={**layout, "states": True})
        else:
            log.warning("the disk tier is off until the next weight update from a checkpoint: weights given as arrays "
                        "have no file to name their K/V by")
            self.cache.set_key(None)
            if self.states is not None:
                self.states.set_key(None)
