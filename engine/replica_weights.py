"""A replica's weights: laid out for the step and placed on its devices at start-up, new ones read and swapped in
while it serves, moved off the devices while it sleeps.

The layout pipeline is one for all three (`prepare`): KV heads repeated for tensor parallelism, SmoothQuant folded
in (w8a8), the weights quantized (models/quant.py); then `place` splits them over the mesh with the same shardings
every time. New weights are checked against the abstract shapes and dtypes of the ones placed at start-up, so the
compiled steps run them unchanged. What the cache holds, whether requests are in flight, and the KV arrays are the
engine's business (`LLMEngine.update_weights`, `sleep`, `wake_up`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from engine import multihost
from engine.config import W8A8, EngineConfig
from models import llama, quant, sharding
from models.weights import cast_params, layers_of
from models.config import LlamaConfig
from models.loader import load_weights
from models.safetensors_loader import params_from_state_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedWeights:
    """Weights `ReplicaWeights.read` read, checked and laid out (host arrays, or device arrays a trainer passed),
    ready to swap in."""

    params: dict
    source: str = "in-process"  # the checkpoint path they were read from


def smooths(config: EngineConfig, params: dict) -> bool:
    """Whether these loaded weights get SmoothQuant (`ReplicaWeights._smooth`): w8a8 over float weights, not a
    checkpoint whose weights are int8 already (it was smoothed, or not, when it was quantized), without LoRA adapters
    (they read the unsmoothed inputs)."""
    model = config.model
    stored_int8 = any(k.endswith(quant.SCALE_SUFFIX) for k in params["layers"])
    return model.quantization == "w8a8" and model.smoothquant_alpha > 0 and not config.lora.adapters and not stored_int8


class ReplicaWeights:
    def __init__(self, config: EngineConfig, loaded_cfg: LlamaConfig, model_cfg: LlamaConfig, dtype, mesh, tokenizer,
                 params: dict, progress: bool, replicate: bool = False):
        """loaded_cfg: the checkpoint's config (new weights must match it); model_cfg: the one the step runs, before
        int8 activations (SmoothQuant calibrates the float model); params: the loaded weights (host arrays).
        replicate: a whole copy on every device of the mesh instead of split across it (a draft model)."""
        self.config, self.loaded_cfg, self.model_cfg = config, loaded_cfg, model_cfg
        self.dtype, self.mesh, self.tokenizer, self.replicate = dtype, mesh, tokenizer, replicate
        self.params: dict | None = self.place(self.prepare(params, progress))
        log.info("weights: %.1f MiB on each device", max(sharding.bytes_per_device(self.params).values()) / 2**20)
        self.avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
        self.host: dict | None = None  # off the devices (asleep): the weights to put back, if kept

    def prepare(self, params: dict, progress: bool) -> dict:
        """Loaded weights (host arrays, `dtype`) -> the layout the step reads, still on the host."""
        model = self.config.model
        # NOTE: calibrated on the checkpoint's layout, before tensor parallelism repeats KV heads: the same program
        # whatever the degree, so the same smoothing and int8 weights (a repeated head's attention differs in the last
        # bits, and a calibrated max moved by one ulp moves some weights by a quantization step).
        if smooths(self.config, params):
            params = self._smooth(params, model.smoothquant_alpha)
        _, params = sharding.prepare_for_tensor_parallel(self.loaded_cfg, params, self.config.parallel.tensor,
                                                         self.config.parallel.expert)
        if model.quantization != "none":
            t_quant = time.perf_counter()
            method = W8A8.get(model.quantization, model.quantization)
            if method == "mxfp4" and not any(k.endswith(quant.EXPONENT_SUFFIX) for k in params["layers"]):
                log.warning("model.quantization: mxfp4 rounds this checkpoint's float weights to MXFP4, which costs far "
                            "more accuracy than int4 (docs/benchmarks.md); it is exact for MXFP4 checkpoints (gpt-oss)")
            params = quant.quantize_params(params, method, model.quantization_group_size,
                                           embeddings=model.quantize_embeddings, progress=progress and multihost.is_leader())
            log.info("%s weights: %s%s quantized in %.1f s", method,
                     "experts" if method == "mxfp4" and self.loaded_cfg.num_experts else "projections",
                     ", embeddings and LM head (int8)" if model.quantize_embeddings else "", time.perf_counter() - t_quant)
        return params

    def place(self, params: dict) -> dict:
        """Host weights (or device arrays) -> device arrays of their own: split across the mesh, or on the one device.
        Never the given arrays themselves: a trainer may donate or delete its own, and sleep deletes these."""
        # NOTE: a copy first: jax.device_put(may_alias=False) to a replicated sharding still shares the source
        # device's buffer (jax 0.10.2: deleting the result deletes the source).
        params = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, params)
        if self.mesh is None or self.replicate:
            return jax.device_put(params, None if self.mesh is None else sharding.replicated(self.mesh))
        return sharding.shard_params(self.model_cfg, params, self.mesh)

    def read(self, source, progress: bool = False) -> PreparedWeights:
        """New weights, read and laid out while the replica serves: `source` is a checkpoint path (any `model.path`
        form; its config must equal the served one), a pytree in the layout `load_weights` returns, or HF tensor names
        -> arrays (`model.layers.0.self_attn.q_proj.weight`, ...; a trainer's state dict; numpy or JAX arrays)."""
        if self.config.parallel.num_processes > 1:
            raise ValueError("update_weights is not supported with parallel.num_processes > 1")
        cfg, on_device = self.loaded_cfg, False
        if isinstance(source, str):
            loaded_cfg, params = load_weights(source, self.dtype, self.config.model.quantization)
            differ = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(loaded_cfg, f.name)]
            if differ:
                name = differ[0]
                raise ValueError(f"{source}: its {name}={getattr(loaded_cfg, name)!r}, the served model's is "
                                 f"{getattr(cfg, name)!r}; update_weights takes weights of the same architecture")
        elif isinstance(source, dict) and source and all(isinstance(k, str) and k.startswith(("model.", "lm_head.", "score."))
                                                           for k in source):
            params = params_from_state_dict(cfg, source, self.dtype)
        elif self._stays_on_device(source):
            # An in-process trainer's arrays: cast where they are, then copied device to device by `place`.
            params, on_device = cast_params(source, self.dtype, lambda a, d: a.astype(d)), True
        else:
            params = cast_params(source, self.dtype)
        llama.check_params(cfg, params, "update_weights")
        return PreparedWeights(params if on_device else self.prepare(params, progress),
                               source if isinstance(source, str) else "in-process")

    def _stays_on_device(self, source) -> bool:
        """Whether weights given as JAX arrays can skip host memory: `prepare` would leave them as they are (no
        quantization, no KV heads to repeat and no linear attention layers to reorder for tensor parallelism)."""
        leaves = jax.tree.leaves(source)
        tp = self.config.parallel.tensor
        return (bool(leaves) and all(isinstance(a, jax.Array) for a in leaves)
                and self.config.model.quantization == "none" and self.loaded_cfg.num_kv_heads % tp == 0
                and not (tp > 1 and self.loaded_cfg.linear_layers))

    def check(self, new: PreparedWeights) -> None:
        """ValueError naming a tensor whose shape or dtype is not the served one's."""
        old = dict(jax.tree_util.tree_flatten_with_path(self.avals)[0])
        flat = jax.tree_util.tree_flatten_with_path(new.params)[0]
        if len(flat) != len(old):
            raise ValueError(f"update_weights: {len(flat)} tensors, the served weights have {len(old)}")
        for path, arr in flat:
            have = old.get(path)
            if have is None or have.shape != arr.shape or have.dtype != arr.dtype:
                raise ValueError(f"update_weights: tensor {jax.tree_util.keystr(path)} is {arr.dtype}{list(arr.shape)}, the "
                                 f"served one {'missing' if have is None else f'{have.dtype}{list(have.shape)}'}")

    def swap(self, new: PreparedWeights) -> None:
        """Serves `new` (checked) from now on: placed at once, or kept in host memory while off the devices. Nothing
        else may hold the old arrays, or the device holds both for a moment."""
        if self.params is None:
            self.host = new.params
        else:
            self.params = None  # the old weights leave the device before the new arrive
            self.params = self.place(new.params)

    def offload(self, keep: bool) -> None:
        """Off the devices now (deleted, not left to the last reference), kept in host memory if `keep`."""
        self.host = jax.device_get(self.params) if keep else None
        for array in jax.tree.leaves(self.params):
            array.delete()
        self.params = None

    def restore(self) -> None:
        """Back on the devices; ValueError if none were kept (and none swapped in since)."""
        if self.host is None:
            raise ValueError("asleep at level 2 without weights: update_weights first, then wake_up")
        self.params, self.host = self.place(self.host), None

    def _smooth(self, params: dict, alpha: float) -> dict:
        """SmoothQuant for W8A8: each projection group's largest |input| per channel over built-in calibration text,
        then the smoothing folded into the float weights (models/quant.smooth_params)."""
        t0 = time.perf_counter()
        device_params = jax.device_put(params)
        cfg = dataclasses.replace(self.model_cfg, num_kv_heads=self.loaded_cfg.num_kv_heads)  # the checkpoint's heads
        amax = None
        for ids in quant.calibration_ids(self.tokenizer):
            a = llama.activation_amax(device_params, cfg, jnp.asarray(ids, jnp.int32))
            amax = a if amax is None else jax.tree.map(jnp.maximum, amax, a)
        del device_params
        params = quant.smooth_params(params, jax.tree.map(np.asarray, amax), alpha, functools.partial(layers_of, cfg))
        log.info("w8a8: SmoothQuant (alpha %.2f) calibrated in %.1f s", alpha, time.perf_counter() - t0)
        return params
