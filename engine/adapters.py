"""A replica's LoRA adapter slots: which adapter sits in which slot of the stacked weights the step reads.

Slot i holds adapter id i + 1 (a sequence's `adapter`; 0 is the base model). The configured adapters
(lora.adapters) fill the first slots; with lora.max_adapters the rest start empty and take adapters loaded
while serving. Empty slots are zeros of the same shapes (every projection, rank lora.max_rank), so loading
and unloading never change the arrays' shapes and never recompile the step. Each slot keeps the host copy it
was stacked from, and each name the digest of the files last loaded under it: a name loaded again with other
files must not meet pages cached for the old ones. Slots hold adapters of a mixture-of-experts model's experts only
with lora.experts (E times a projection's weights each).
"""
from __future__ import annotations

import hashlib
import logging
import os

from engine.config import LoraConfig, check_adapter_name
from models import lora, sharding
from models.config import LlamaConfig
from models.loader import resolve_path

log = logging.getLogger(__name__)

DEFAULT_MAX_RANK = 16  # lora.max_rank 0 with slots to fill later


class AdapterSlots:
    def __init__(self, cfg: LoraConfig, loaded_cfg: LlamaConfig, model_cfg: LlamaConfig, dtype, tensor: int,
                 mesh=None):
        """loaded_cfg: the checkpoint's config (adapters are read against it); model_cfg: the one the step runs (its
        tensor-parallel layout)."""
        self.cfg, self.loaded_cfg, self.model_cfg = cfg, loaded_cfg, model_cfg
        self.dtype, self.tensor, self.mesh = dtype, tensor, mesh
        self.names: list[str | None] = list(cfg.adapters) + [None] * (cfg.max_adapters - len(cfg.adapters))
        self._weights: list[dict | None] = [None] * len(self.names)
        self._digests: dict[str, str] = {}
        for i, (name, path) in enumerate(cfg.adapters.items()):
            self._weights[i], self._digests[name] = self.read(path)
        if cfg.adapters:
            log.info("LoRA adapters: %s", ", ".join(cfg.adapters))

    @property
    def loaded(self) -> list[str]:
        return [name for name in self.names if name is not None]

    def id_of(self, name: str | None) -> int:
        """A request's adapter id (0: the base model); `name` must be loaded."""
        return 0 if name is None else self.names.index(name) + 1

    def read(self, path: str) -> tuple[dict, str]:
        """A PEFT adapter directory -> (its weights in this replica's layout, a digest of its files). Any thread."""
        path = resolve_path(path)
        adapter = lora.load_peft_adapter(path, self.loaded_cfg)
        max_rank = self.cfg.max_rank or DEFAULT_MAX_RANK
        if self.cfg.max_adapters and lora.rank(adapter) > max_rank:
            raise ValueError(f"LoRA adapter {path}: rank {lora.rank(adapter)} is over lora.max_rank={max_rank}")
        if lora.adapts_experts(adapter):
            if self.model_cfg.expert_parallel:
                raise ValueError(f"LoRA adapter {path}: adapters of the experts are not supported with parallel.expert "
                                 "(the experts lie whole on the devices; their adapters would have to follow them)")
            if self.cfg.max_adapters and not self.cfg.experts:
                raise ValueError(f"LoRA adapter {path} adapts the experts: set lora.experts: true so that the "
                                 "lora.max_adapters slots hold adapters of the experts")
        digest = hashlib.blake2b(digest_size=16)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                digest.update(f.read())
        [adapter] = sharding.prepare_lora_for_tensor_parallel(self.loaded_cfg, [adapter], self.tensor)
        return adapter, digest.hexdigest()

    def stacked(self) -> dict:
        """Every slot stacked for the step ({} without slots)."""
        if not self.names:
            return {}
        dynamic = self.cfg.max_adapters > 0
        stacked = lora.stack_adapters(self._weights, self.model_cfg, self.dtype, every_projection=dynamic,
                                      max_rank=(self.cfg.max_rank or DEFAULT_MAX_RANK) if dynamic else 0,
                                      experts=self.cfg.experts)
        return sharding.shard_lora(stacked, self.mesh) if self.mesh is not None else stacked

    def install(self, name: str, weights: dict, digest: str) -> bool:
        """Puts an adapter `read` returned in a free slot. -> whether the prefix cache must be emptied (the name held
        other files before). ValueError names what is wrong."""
        if not self.cfg.max_adapters:
            raise ValueError("loading LoRA adapters while serving needs lora.max_adapters (slots) > 0")
        check_adapter_name(name)
        if name in self.names:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded; unload it first")
        if None not in self.names:
            raise ValueError(f"all lora.max_adapters={len(self.names)} slots are taken ({', '.join(self.loaded)}); "
                             "unload one first")
        stale = self._digests.get(name, digest) != digest
        slot = self.names.index(None)
        self.names[slot], self._weights[slot], self._digests[name] = name, weights, digest
        log.info("LoRA adapter %r loaded (slot %d of %d)", name, slot + 1, len(self.names))
        return stale

    def remove(self, name: str) -> None:
        self.check_loaded(name)
        slot = self.names.index(name)
        self.names[slot], self._weights[slot] = None, None
        log.info("LoRA adapter %r unloaded", name)

    def check_loaded(self, name: str) -> None:
        if name not in self.names:
            raise ValueError(f"no LoRA adapter named {name!r} (loaded: {', '.join(self.loaded) or 'none'})")
